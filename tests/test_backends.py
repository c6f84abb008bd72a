"""GradNormLogger, GradientMonitor, TensorBoard and run directories on JAX and PyTorch.

The backend is fixed when keras is imported, so each backend runs
`backend_checks.py` in a fresh process (KERAS_BACKEND set) and reports what it
measured; the recorded norms of every step are compared there with the
backend's own autograd (`jax.grad`, `loss.backward()`) at the same weights and
batch. Skipped where the backend's package is not installed (`pip install -e
".[jax,torch]"`; CI installs both).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_gradtools.runs import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["sequential", "functional_shared", "subclassed", "cnn_batchnorm", "frozen", "lstm",
          "embedding", "float64", "custom_train_step"]


def _available(backend):
    return importlib.util.find_spec(backend) is not None


@pytest.fixture(scope="module", params=["jax", "torch"])
def checked(request, tmp_path_factory):
    backend = request.param
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    tmp = tmp_path_factory.mktemp(backend)
    return backend, str(tmp), _run("backend_checks.py", backend, tmp)


def _run(script, backend, tmp):
    """Runs one check script in a fresh process on `backend`; its RESULT as a dict."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    out = subprocess.run([sys.executable, os.path.join(HERE, script), str(tmp)],
                         capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_every_step_equals_the_backends_own_gradient(checked):
    backend, _, result = checked
    assert result["backend"] == backend
    # custom_train_step: Keras' guide's own train_step for this backend, recorded by the
    # logger; gradnorm_model (PyTorch): GradNormModel's train step records itself.
    assert [m["name"] for m in result["models"]] == MODELS + (
        ["gradnorm_model"] if backend == "torch" else [])
    for model in result["models"]:
        assert model["steps"] == 4, model
        assert model["max_rel"] <= 1e-5, model
        # The model is left as found: no patch, no variable added to the optimizer.
        assert not model["apply_left"] and model["optimizer_variables_same"], model
    # gradient_accumulation_steps=2: each step's own batch gradient is recorded (what the
    # optimizer's apply receives), against NumPy; the weights follow the accumulated SGD.
    accumulation = result["gradient_accumulation"]
    assert accumulation["steps"] == 4 and accumulation["max_rel"] <= 1e-5, accumulation
    assert accumulation["weights_max_abs"] <= 1e-6, accumulation
    # With clipnorm Keras (3.5 on) clips the accumulated mean every 2 steps: no per-step
    # applied row then; Keras 3.3 and 3.4 clip each batch's gradient, recorded as applied.
    clipped = result["gradient_accumulation_clipnorm"]
    assert clipped["max_rel"] <= 1e-5 and clipped["weights_max_abs"] <= 1e-6, clipped
    if clipped["clip_mean"]:
        assert clipped["applied_keys"] == [], clipped
    else:
        assert len(clipped["applied_keys"]) == 1 and clipped["applied_max_rel"] <= 1e-5, clipped
    if backend == "jax":  # Keras' PyTorch trainer refuses steps_per_execution > 1 itself
        spe = result["steps_per_execution"]
        assert spe["steps"] == 4 and spe["max_rel"] <= 1e-5, spe
    else:  # a loop of one's own under recording(), against autograd
        loop = result["recording_loop"]
        assert loop["steps"] == 4 and loop["max_rel"] <= 1e-5 and not loop["apply_left"], loop
    # mixed_float16: Keras wraps SGD in a LossScaleOptimizer; the recorded norms are
    # the unscaled ones (the reference is the float16 model's gradient, unscaled).
    mixed = result["mixed_float16"]
    assert mixed["steps"] == 4 and mixed["max_rel"] <= 1e-2, mixed
    assert not mixed["apply_left"] and mixed["optimizer_variables_same"], mixed
    # Steps the loss-scale optimizer skips (float16 overflow) are rows of NaN, flagged;
    # each halved the scale from its initial 2**15.
    skipped = result["mixed_float16_skipped"]
    assert skipped["optimizer"] == "LossScaleOptimizer"
    count = sum(skipped["skipped"])
    assert 0 < count < 4 and skipped["final_scale"] == 2.0 ** (15 - count), skipped
    assert skipped["nan"] == skipped["skipped"]
    assert all(f != s for f, s in zip(skipped["finite"], skipped["skipped"])), skipped
    # A clipping preset under the loss scale: its applied norms keep one row per step,
    # NaN on each skipped one.
    clipped = result["mixed_float16_skipped_clipped"]
    assert clipped["skipped"] == skipped["skipped"], clipped
    assert clipped["applied_nan"] == clipped["skipped"], clipped
    assert all(f != s for f, s in zip(clipped["applied_finite"], clipped["skipped"])), clipped
    if backend == "torch":  # GradNormModel under a loss scale: its skips are skips
        skips = result["gradnorm_model_skips"]
        count = len(skips["skipped"])
        assert skips["rows"] == 4 and 0 < count < 4 and skips["findings"] == [], skips
        assert skips["final_scale"] == 2.0 ** (18 - count), skips
        assert [not f for f in skips["finite"]] == [s in skips["skipped"] for s in range(4)]
    # Nothing trainable: no rows and no History entries from the logger, on every backend.
    assert result["nothing_trainable"] == {"keys": [], "rows": 0, "epoch_end_steps": [0, 0],
                                           "history": ["loss"]}
    frozen = next(m for m in result["models"] if m["name"] == "frozen")
    assert frozen["keys"] == ["mlp/out/kernel", "mlp/out/bias"]  # the frozen layer is not recorded


def test_clipping_history_tensorboard_and_run_dir(checked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    backend, tmp, result = checked
    tools = result["tools"]
    norms, applied = np.array(tools["norms"]), np.array(tools["applied"])
    assert norms.shape == applied.shape == (16, 2) and tools["epoch_end_steps"] == [8, 16]
    # clipnorm=0.5 clips each variable's gradient: applied = min(raw, 0.5).
    assert (norms > 0.5).any()
    np.testing.assert_allclose(applied, np.minimum(norms, 0.5), rtol=1e-5)
    np.testing.assert_allclose(tools["history_grad"],
                               [norms[:8, 1].mean(), norms[8:, 1].mean()], rtol=1e-6)
    # TensorBoard: every step (update_freq=1), written without TensorFlow ops.
    ea = EventAccumulator(os.path.join(tmp, "logs", "train"), size_guidance={"tensors": 0})
    ea.Reload()
    events = ea.Tensors("grad_norm/mlp/out/kernel")
    assert [e.step for e in events] == list(range(1, 17))
    np.testing.assert_allclose([float(tensor_util.make_ndarray(e.tensor_proto)) for e in events],
                               norms[:, 1], rtol=1e-6)
    # Histograms every 5 steps, computed in the train step with keras.ops: the
    # gradient's range and NumPy's bucket counts over it (the autograd gradient).
    assert sorted(map(int, tools["histograms"])) == [0, 5, 10, 15]
    for step, buckets in tools["histograms"].items():
        buckets, grad = np.array(buckets), np.array(tools["histogram_reference"][step])
        assert buckets.shape == (30, 3)
        np.testing.assert_allclose(buckets[[0, -1], [0, 1]], [grad.min(), grad.max()],
                                   rtol=1e-5, atol=1e-7)
        counts, _ = np.histogram(grad, bins=30, range=(grad.min(), grad.max()))
        assert buckets[:, 2].sum() == grad.size
        assert np.abs(buckets[:, 2] - counts).max() <= 1  # a value on an edge may move over
    hist = ea.Tensors("grad_hist/mlp/out/kernel")
    assert [e.step for e in hist] == [1, 6, 11, 16]
    np.testing.assert_allclose(tensor_util.make_ndarray(hist[1].tensor_proto),
                               tools["histograms"]["5"], rtol=1e-6)
    # The run directory holds the same recording and History.
    run = load_run(os.path.join(tmp, "run"))
    np.testing.assert_allclose(run.norms, norms, rtol=1e-12)
    np.testing.assert_allclose(run.history["loss"], tools["history_loss"], rtol=1e-6)
    assert run.config["backend"] == backend and run.config["clipping"] == "clipnorm=0.5"
    assert run.findings == tools["findings"]
    # Update-to-weight ratios: under SGD(0.1) the update is 0.1 x the clipped gradient.
    ratios, before = np.array(tools["update_ratios"]), np.array(tools["weight_norms"])
    np.testing.assert_allclose(ratios * before, 0.1 * applied, rtol=1e-4)
    np.testing.assert_allclose(run.update_ratios, ratios, rtol=1e-6)
    # Activation probes every 5 steps: mean, std and gain of the tanh layer as NumPy has them.
    assert tools["activation_steps"] == [0, 5, 10, 15]
    for step, expected in tools["activation_reference"].items():
        np.testing.assert_allclose(tools["activations"][step], expected, rtol=1e-5)
    assert run.activations.steps == [0, 5, 10, 15]
    assert {"activation/mlp/h/mean", "activation_hist/mlp/h"} <= set(ea.Tags()["tensors"])
    # Recording, probes, save and figures read the backend's tensors without NumPy 2's
    # copy DeprecationWarning (Keras' own np.array copies raise it on JAX and torch).
    assert tools["copy_warnings"] == []
    assert tools["figures"] == ["accuracy.png", "activations.png", "grad_norms_steps.png",
                                "gradient_flow.png", "loss_and_grad_norms.png",
                                "norm_heatmap.png", "update_ratios.png"]


def test_checkpoints_written_during_fit_load_whole(checked):
    # On JAX the recorder's buffers ride in the optimizer's state during fit(); a checkpoint
    # written then (ModelCheckpoint, BackupAndRestore) must hold the optimizer's own variables
    # only, else Keras skips the whole optimizer state on load (a count mismatch).
    _, _, result = checked
    c = result["checkpoints"]
    assert c["skipping_warnings"] == [] and c["optimizer_equal"], c
    assert c["loaded_iterations"] == 8, c  # 2 epochs x 4 steps
    # Interrupted after epoch 1 (8 steps); resumed at epoch 2: its own 8 steps, no row of the
    # first run's buffer, and the optimizer's count goes on from the backup.
    assert c["first_steps"] == 8 and c["resumed_steps"] == 8, c
    assert c["resumed_epoch_ends"] == [4, 8] and c["resumed_iterations"] == 16, c
    assert not c["save_left"], c


def test_activation_probe_reads_a_nested_model(checked):
    """The hidden layer of a model nested in the user's is watched, its mean = NumPy's."""
    _, _, result = checked
    nested = result["nested_activations"]
    assert nested["names"] == nested["expected_names"]
    np.testing.assert_allclose(nested["means"], nested["expected_means"], rtol=1e-5)


def test_activation_probe_reads_inside_a_subclassed_model_during_fit(checked):
    """A subclassed model with a custom block: its layers are read as they are called; the
    probes before steps 0 and 2 of `fit()` equal NumPy with the weights then."""
    _, _, result = checked
    captured = result["captured_activations"]
    assert captured["steps"] == [0, 2], captured
    assert captured["names"] == captured["expected_names"], captured
    np.testing.assert_allclose(captured["means"], captured["expected_means"], rtol=1e-5)
    assert captured["left_patched"] == []


def test_probe_and_cli_check_equal_the_first_train_step(checked):
    """Regularized model with batch norm: one-batch probe == the logger's first step."""
    backend, _, result = checked
    probe = result["probe"]
    assert probe["keys"] == ["h/kernel", "h/bias", "bn/gamma", "bn/beta", "out/kernel",
                             "out/bias"]
    np.testing.assert_allclose(probe["probe"], probe["logged"], rtol=1e-5)
    assert probe["moving_stats_moved"] == 0.0  # batch norm's statistics restored after the probe
    assert probe["cli_exit"] == 0, probe["cli"]  # gradtools --backend <this> check ...
    kernels = {k: v for k, v in zip(probe["keys"], probe["logged"]) if not k.endswith("bias")}
    assert list(probe["cli"]) == list(kernels)  # biases left out by default
    np.testing.assert_allclose(list(probe["cli"].values()), list(kernels.values()), rtol=1e-5)


@pytest.fixture(scope="module", params=["jax", "torch"])
def clipped(request, tmp_path_factory):
    backend = request.param
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    return _run("clipping_checks.py", backend, tmp_path_factory.mktemp(f"clip_{backend}"))


def test_clipping_presets_clip_as_numpy_does_and_resume(clipped):
    """Every preset's update under plain SGD equals -lr * (NumPy-clipped autograd gradient)."""
    assert not clipped["tensorflow_imported"]  # ran with TensorFlow unimportable
    presets = {m["method"]: m for m in clipped["presets"]}
    assert list(presets) == ["none", "value", "norm", "global_norm", "agc", "autoclip", "zclip"]
    for m in clipped["presets"] + clipped["wrappers"]:
        assert m["max_rel"] <= 1e-5 and m["max_rel_applied"] <= 1e-5, m
        # The thresholds were chosen so that every method clips at some step.
        assert (m["clipped_steps"] > 0) == (m["method"] != "none"), m
    assert {presets[m]["type"] for m in ("agc", "autoclip", "zclip")} == {"ClippedOptimizer"}
    assert {m["type"] for m in clipped["wrappers"]} == {"ClippedOptimizer"}
    # Saved after 3 steps, loaded, 3 more: the same weights as 6 steps in one go.
    for m in clipped["resume"]:
        assert m["type"] == "ClippedOptimizer" and m["max_diff"] == 0.0, m


def test_what_jax_cannot_do_is_refused_before_training(checked):
    """recording() and GradNormModel need a stateful train step: refused on JAX, with the way."""
    backend, tmp, result = checked
    refusals = result["refusals"]
    if backend != "jax":
        assert refusals == {}
        return
    for name in ("recording", "gradnorm_model"):
        assert "runs on the tensorflow, torch backend(s)" in refusals[name], refusals[name]
        assert "optimizer.stateless_apply" in refusals[name]
        assert "backend()='jax'" in refusals[name]


def test_jax_data_parallel_records_and_clips_like_one_device(tmp_path):
    """keras.distribution.DataParallel over 2 host CPU devices == one device, within 1e-5."""
    if not _available("jax"):
        pytest.skip("jax is not installed")
    result = _run("distribution_checks.py", "jax", tmp_path)
    assert result["devices"] == 2
    names = [o["name"] for o in result["optimizers"]]
    assert names == ["sgd", "global_clipnorm", "agc", "zclip", "global_norm_wrapper"]
    for o in result["optimizers"]:
        assert o["steps"] == 8, o
        assert o["max_rel"] <= 1e-5 and o["max_rel_applied"] <= 1e-5, o
        assert o["weights_diff"] <= 1e-5, o  # the same updates: the global gradient clipped
        assert o["clipped"] == (o["name"] != "sgd"), o
    assert "not yet variables sharded over devices" in result["model_parallel"]
    assert "ModelParallel" in result["model_parallel"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_article_cases_at_reduced_scale(backend, tmp_path):
    """`gradtools --backend X reproduce`, in a fresh process with no KERAS_BACKEND set.

    vanishing and resnet at the scale where their effect shows (3,000 samples, 2 epochs);
    exploding and clipped for one epoch of 6,400 samples, in which both must learn (their
    blow-up needs ~7,000 steps: full-scale figures per backend are in docs/reproduction.md).
    That epoch is where a saturated softmax once stopped both cases on JAX and PyTorch, whose
    Keras clips the probabilities (the cases now train on logits).
    """
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for args in (["--case", "vanishing,resnet", "--subset", "3000", "--epochs", "2"],
                 ["--case", "exploding,clipped", "--subset", "6400", "--epochs", "1"]):
        out = subprocess.run(
            [sys.executable, "-m", "keras_gradtools.cli", "--backend", backend, "reproduce",
             *args, "--out", str(tmp_path), "--quiet"],
            capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"on {backend}" in out.stderr  # "Training on ... with Keras ... on <backend>"
    runs = {name.split("-")[0]: load_run(os.path.join(tmp_path, name))
            for name in os.listdir(tmp_path)}
    assert sorted(runs) == ["clipped", "exploding", "resnet", "vanishing"]
    for run in runs.values():
        assert run.config["backend"] == backend
        assert np.isfinite(run.norms).all() and len(run.norms) == run.epoch_end_steps[-1]
    assert max(runs["vanishing"].history["accuracy"]) <= 0.12
    assert "vanishing" in {f["kind"] for f in runs["vanishing"].findings}
    assert runs["resnet"].history["accuracy"][-1] >= 0.9
    assert not {f["kind"] for f in runs["resnet"].findings} & {"vanishing", "exploding"}
    assert runs["clipped"].config["clipping"] == "clipnorm=1"
    for name in ("exploding", "clipped"):  # below chance, ln(10) = 2.303, after 200 steps
        assert runs[name].history["loss"][-1] < 2.3, (name, runs[name].history)
