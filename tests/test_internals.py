"""One module touches Keras' insides; every patch comes out as it went in."""

import pathlib
import re

import keras
import numpy as np
import pytest

import keras_gradtools
from keras_gradtools import GradNormLogger, internals
from keras_gradtools.clipping import ClippedOptimizer, clipped_optimizer

PACKAGE = pathlib.Path(keras_gradtools.__file__).parent


def test_only_the_internals_module_imports_keras_or_tensorflow_insides():
    importers = sorted(
        path.name for path in PACKAGE.rglob("*.py")
        if re.search(r"keras\.src|tensorflow\.python", path.read_text())
    )
    assert importers == ["internals.py"]


def test_private_attributes_of_keras_objects_are_touched_only_in_internals():
    # `._x` on anything but our own `self`/`cls` (and a few of our own objects).
    pattern = re.compile(r"(?<!self)(?<!cls)\.(_[a-z][a-z_]*)\b")
    ours = {"_internals", "_tensorflow", "_on_rows", "_add_reader", "_remove_reader"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in pattern.findall(line.split("#")[0]):
                if name not in ours:
                    offenders.append(f"{path.name}:{number}: {name}")
    assert offenders == []


def test_patches_nest_in_any_order_and_leave_the_object_as_found():
    class Thing:
        def value(self):
            return 1

    thing = Thing()
    add_ten = internals.Patch(thing, "value", lambda original: lambda: original() + 10)
    double = internals.Patch(thing, "value", lambda original: lambda: original() * 2)
    add_ten.enter()
    double.enter()
    assert thing.value() == 22
    add_ten.exit()  # the earlier patch leaves first: the later one stays in place
    assert thing.value() == 2
    double.enter()  # counted: a second replica thread
    double.exit()
    assert thing.value() == 2
    double.exit()
    assert thing.value() == 1 and "value" not in vars(thing)
    assert not internals.is_patched(thing, "value")


def test_fit_with_the_logger_leaves_the_optimizer_unpatched():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")], name="n")
    model.compile(optimizer=clipped_optimizer("adam", clip="zclip"), loss="mse")
    inner = model.optimizer.inner_optimizer
    assert "_all_reduce_sum_gradients" not in vars(inner)  # ClippedOptimizer changes nothing
    logger = GradNormLogger()
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=4, verbose=0, callbacks=[logger])
    assert logger.norms.shape == (2, 1)
    for optimizer in (model.optimizer, inner):
        assert "apply" not in vars(optimizer)
        assert "_all_reduce_sum_gradients" not in vars(optimizer)
    assert not model.optimizer._applied_hooks and not model.optimizer._reduced_hooks


def test_clipped_optimizer_never_rebinds_its_inner_optimizer():
    inner = keras.optimizers.SGD(0.1)
    ClippedOptimizer(inner, clip="global_norm", threshold=1.0)
    assert vars(inner).get("_all_reduce_sum_gradients") is None


def test_too_old_keras_is_refused_at_import_naming_the_minimum(monkeypatch):
    monkeypatch.setattr(internals, "KERAS_VERSION", (3, 2, 1))
    monkeypatch.setattr(keras, "__version__", "3.2.1")
    with pytest.raises(ImportError, match=r"Keras >= 3\.3\.0.*Received: keras==3\.2\.1"):
        internals.check_versions()


@pytest.mark.parametrize("backend", ["numpy", "openvino"])
def test_other_backends_are_refused_before_training_starts(monkeypatch, backend):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")], name="n")
    model.compile(optimizer="sgd", loss="mse")
    weights = [w.copy() for w in model.get_weights()]
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    with pytest.raises(ValueError, match=rf"tensorflow, jax, torch backend.*backend\(\)='{backend}'"):
        model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=4, verbose=0,
                  callbacks=[GradNormLogger()])
    monkeypatch.undo()
    assert model.optimizer.iterations.numpy() == 0  # not one step was taken
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_several_replicas_on_keras_before_3_8_are_refused(monkeypatch):
    import types

    monkeypatch.setattr(internals, "KERAS_VERSION", (3, 7, 0))
    monkeypatch.setattr(keras, "__version__", "3.7.0")
    internals.check_replicas_supported(1)  # one replica: fine on any supported Keras
    two = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(ValueError, match=r"from Keras 3\.8\.0 on.*keras==3\.7\.0 with 2 replicas"):
        keras_gradtools.recording(keras.optimizers.SGD(0.1), [], strategy=two)


@pytest.mark.parametrize("path", ["public", "private", "per_tensor"])
def test_torch_norms_equal_vector_norm_whichever_torch_function_exists(monkeypatch, path):
    torch = pytest.importorskip("torch")
    import sys
    import types

    tensors = [torch.randn(300, 7), torch.randn(5).half(), torch.zeros(2, 2),
               torch.randn(3, requires_grad=True)]
    calls = []
    monkeypatch.setattr(internals, "_TORCH_NORMS", None)
    private = getattr(torch, "_foreach_norm", None)
    if path == "public":
        def norm(inputs, ord, dtype):  # the signature of torch.foreach.norm
            calls.append(len(inputs))
            return tuple(torch.linalg.vector_norm(t, ord, dtype=dtype) for t in inputs)
        monkeypatch.setitem(sys.modules, "torch.foreach", types.SimpleNamespace(norm=norm))
    else:
        monkeypatch.setitem(sys.modules, "torch.foreach", None)  # import fails
        if path == "per_tensor" and private is not None:
            monkeypatch.delattr(torch, "_foreach_norm")
        if path == "private" and private is None:
            pytest.skip("this torch has no _foreach_norm")
        if path == "private":
            def counted(inputs, *args, **kwargs):
                calls.append(len(inputs))
                return private(inputs, *args, **kwargs)
            monkeypatch.setattr(torch, "_foreach_norm", counted)
    with torch.no_grad():
        norms = internals.torch_norms(tensors)
    expected = [float(torch.linalg.vector_norm(t.detach(), dtype=torch.float32))
                for t in tensors]
    assert [n.dtype for n in norms] == [torch.float32] * 4
    np.testing.assert_allclose([float(n) for n in norms], expected, rtol=1e-6)
    if path != "per_tensor":  # one call for every tensor (after a dtype probe, private)
        assert calls[-1:] == [4]
    assert internals.torch_norms([]) == ()


def test_accumulated_clipping_semantics_without_keras_source(monkeypatch):
    # Read from Keras' `apply` (checked against NumPy on 3.3.3 and 3.15.1 in
    # test_gradient_accumulation_records_each_batch_gradient); where no source is
    # installed, the release that changed it (3.5.0) gives the same answer.
    import inspect

    from_source = internals.keras_clips_accumulated_mean()
    assert from_source == (internals.KERAS_VERSION >= (3, 5, 0))

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(internals, "_CLIPS_MEAN", None)
    monkeypatch.setattr(inspect, "getsource", no_source)
    assert internals.keras_clips_accumulated_mean() == from_source
