"""GradNormLogger on the JAX or PyTorch backend, against that backend's own autograd.

Run by tests/test_backends.py in a fresh process with KERAS_BACKEND set (the
backend is fixed when keras is imported); prints one `RESULT {json}` line.
Each model trains with plain SGD on fixed batches while a callback keeps the
weights before every step; the reference gradient of every step is then taken
with `jax.grad` (JAX) or `loss.backward()` (PyTorch) at those weights, on the
same batch, and compared with what the logger recorded.
"""

import contextlib
import json
import os
import sys
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.modules["tensorflow"] = None  # the backends must run without TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradtools import GradNormLogger, GradientMonitor  # noqa: E402
from keras_gradtools.norms import to_numpy  # noqa: E402
from keras_gradtools.plots import plot_run, weight_histogram  # noqa: E402
from numpy_references import gradient_accumulation  # noqa: E402

BACKEND = keras.backend.backend()
BATCH = 8
if BACKEND == "jax":
    import jax

    # On recent NVIDIA GPUs JAX's default float32 matmul rounds its inputs to TF32 (about 1e-3
    # relative), and the train step and each reference are compiled apart, so they would round
    # differently; every comparison here is at float32's precision (a no-op on the CPU).
    jax.config.update("jax_default_matmul_precision", "float32")


class _Weights(keras.callbacks.Callback):
    """The trainable weights before every step."""

    def on_train_batch_begin(self, batch, logs=None):
        self.before = getattr(self, "before", [])
        self.before.append([np.array(to_numpy(v)) for v in self.model.trainable_variables])


def _reference(model, weights, x, y, loss_fn):
    """Per-variable gradient norms at `weights` on one batch, by the backend's autograd."""
    return [float(np.sqrt(np.sum(np.square(g)))) for g in
            _gradients(model, weights, x, y, loss_fn)]


def _gradients(model, weights, x, y, loss_fn):
    """The gradients (float64 NumPy) at `weights` on one batch, by the backend's autograd."""
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(trainable):
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return keras.ops.mean(loss_fn(y, y_pred))

        grads = jax.grad(loss)([jax.numpy.asarray(w) for w in weights])
        return [np.asarray(g, np.float64) for g in grads]
    import torch

    for variable, value in zip(model.trainable_variables, weights):
        variable.assign(value)
    model.zero_grad()
    loss = keras.ops.mean(loss_fn(torch.as_tensor(y), model(torch.as_tensor(x), training=True)))
    loss.backward()
    return [v.value.grad.detach().cpu().double().numpy() for v in model.trainable_variables]


def _compare(name, build, x, y, loss="sparse_categorical_crossentropy", steps=4, **compile_kw):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, **compile_kw)
    variables_before = len(model.optimizer.variables) if model.optimizer.built else None
    logger, weights = GradNormLogger(include_biases=True), _Weights()
    model.fit(x[:steps * BATCH], y[:steps * BATCH], batch_size=BATCH, epochs=1, shuffle=False,
              verbose=0, callbacks=[logger, weights])
    recorded = logger.norms
    loss_fn = keras.losses.get(loss)
    paths = [v.path for v in model.trainable_variables]
    columns = [paths.index(k) for k in logger.keys]
    worst = 0.0
    for step in range(steps):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        expected = np.array(_reference(model, weights.before[step], xb, yb, loss_fn))[columns]
        # Relative error; a gradient that is 0 in exact arithmetic (a conv bias
        # followed by batch norm: both sides are float32 noise) is measured
        # against the step's largest norm instead.
        scale = np.where(np.abs(expected) < 1e-3 * expected.max(), expected.max(),
                         np.abs(expected))
        worst = max(worst, float(np.max(np.abs(recorded[step] - expected) / scale)))
    return {
        "name": name, "steps": int(len(recorded)), "keys": logger.keys, "max_rel": worst,
        # Nothing patched is left on the optimizer or (loss scaling) its inner one.
        "apply_left": any(name in vars(opt) for opt in (
            model.optimizer, getattr(model.optimizer, "inner_optimizer", model.optimizer))
            for name in ("apply", "_stateless_handle_non_finite_grads", "save_own_variables",
                         "load_own_variables")),
        "optimizer_variables_same": (
            (variables_before is None or len(model.optimizer.variables) == variables_before)
            and not any("gradtools" in v.name for v in model.optimizer.variables)),
    }


def _skipped_steps(x, y, steps=4, clip=None):
    """mixed_float16 with inputs so large that float16 gradients overflow at first.

    With `clip` the optimizer is that clipping preset's (SGD), whose applied
    norms are recorded too.
    """
    from keras_gradtools import clipped_optimizer

    keras.utils.set_random_seed(0)
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1) if clip is None else
                  clipped_optimizer("sgd", 0.1, clip=clip),
                  loss="sparse_categorical_crossentropy")
    logger = GradNormLogger(include_biases=True)
    model.fit(x[:steps * BATCH], y[:steps * BATCH], batch_size=BATCH, shuffle=False,
              verbose=0, callbacks=[logger])
    applied = logger.applied_recorder.norms if logger.applied_recorder else np.zeros((0, 0))
    return {"optimizer": type(model.optimizer).__name__,
            "skipped": logger.recorder.skipped.tolist(),
            "nan": np.isnan(logger.norms).all(axis=1).tolist(),
            "finite": np.isfinite(logger.norms).all(axis=1).tolist(),
            "applied_nan": np.isnan(applied).all(axis=1).tolist(),
            "applied_finite": np.isfinite(applied).all(axis=1).tolist(),
            "final_scale": float(to_numpy(model.optimizer.dynamic_scale))}


def _nothing_trainable(x, y, steps=4):
    """A model whose every layer is frozen: no rows (Keras' JAX trainer still calls `apply`)."""
    keras.utils.set_random_seed(0)
    model = _mlp()
    model.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    logger = GradNormLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "does not have any trainable weights"
        history = model.fit(x[:steps * BATCH], y[:steps * BATCH], batch_size=BATCH, verbose=0,
                            epochs=2, callbacks=[logger])
    return {"keys": logger.keys, "rows": int(len(logger.norms)),
            "epoch_end_steps": logger.epoch_end_steps, "history": sorted(history.history)}


def _gradnorm_model_skips(build, x, y, steps=4):
    """GradNormModel under mixed_float16 with a loss scale that overflows at first."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = build()
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0 ** 18),
            loss="sparse_categorical_crossentropy")
        logger = GradNormLogger()
        monitor = GradientMonitor(logger, check_every=1, verbose=0)
        model.fit(x[:steps * BATCH], y[:steps * BATCH], batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[logger, monitor])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"rows": int(len(logger.norms)), "skipped": logger.skipped_steps.tolist(),
            "finite": np.isfinite(logger.norms).all(axis=1).tolist(),
            "findings": [f.kind for f in monitor.report().findings],
            "final_scale": float(to_numpy(model.optimizer.dynamic_scale))}


def _steps_per_execution(x, y, steps=4):
    """The norms with steps_per_execution=2 against those of one step per call.

    Keras calls the batch hooks once per execution, so the weights before
    each step are not at hand here; the one-step-per-call run, checked
    against autograd above, is the reference.
    """
    norms = []
    for per_call in (1, 2):
        keras.utils.set_random_seed(0)
        model = _mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss="sparse_categorical_crossentropy", steps_per_execution=per_call)
        logger = GradNormLogger(include_biases=True)
        model.fit(x[:steps * BATCH], y[:steps * BATCH], batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[logger])
        norms.append(logger.norms)
    return {"steps": int(len(norms[1])),
            "max_rel": float(np.max(np.abs(norms[1] - norms[0]) / np.abs(norms[0])))}


def _mlp():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh",
                                                                   name="h"),
                             keras.layers.Dense(3, activation="softmax", name="out")],
                            name="mlp")


def _shared():
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    h = shared(shared(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(h),
                       name="shared_net")


class _Subclassed(keras.Model):
    """Dense(8) then a softmax Dense(3), subclassed; the models below reuse its body."""

    def __init__(self, name="subclassed", activation="relu"):
        super().__init__(name=name)
        self.h = keras.layers.Dense(8, activation=activation, name="h")
        self.out = keras.layers.Dense(3, activation="softmax", name="out")

    def call(self, x, training=None):
        return self.out(self.h(x))


def _cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax",
                                                                  name="out")], name="cnn")


def _frozen():
    model = _mlp()
    model.get_layer("h").trainable = False
    return model


def _lstm():
    return keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(6, name="lstm"),
                             keras.layers.Dense(3, activation="softmax", name="out")],
                            name="lstm_net")


def _float64():
    """The MLP with float64 variables (a `dtype="float64"` policy on every layer)."""
    return keras.Sequential([keras.Input((6,), dtype="float64"),
                             keras.layers.Dense(16, activation="tanh", dtype="float64", name="h"),
                             keras.layers.Dense(3, activation="softmax", dtype="float64",
                                                name="out")], name="mlp64")


def _embedding():
    return keras.Sequential([keras.Input((5,), dtype="int32"),
                             keras.layers.Embedding(10, 4, name="embed"),
                             keras.layers.GlobalAveragePooling1D(),
                             keras.layers.Dense(3, activation="softmax", name="out")],
                            name="embed_net")


class _CustomStep(_Subclassed):
    """A train_step of one's own, as Keras' guides write it for this backend."""

    def __init__(self):
        super().__init__(name="custom", activation="tanh")

    def _loss_and_updates(self, trainable, non_trainable, x, y):
        y_pred, non_trainable = self.stateless_call(trainable, non_trainable, x, training=True)
        return self.compute_loss(x=x, y=y, y_pred=y_pred), non_trainable

    def train_step(self, *args):
        if BACKEND == "jax":
            import jax

            state, (x, y) = args
            trainable, non_trainable, optimizer_variables, metrics_variables = state
            (loss, non_trainable), grads = jax.value_and_grad(
                self._loss_and_updates, has_aux=True)(trainable, non_trainable, x, y)
            trainable, optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable)
            return {"loss": loss}, (trainable, non_trainable, optimizer_variables,
                                    metrics_variables)
        import torch

        x, y = args[0]
        self.zero_grad()
        loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        loss.backward()
        gradients = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(gradients, self.trainable_weights)
        return {"loss": loss}


def _torch_loop(x, y, steps=4):
    """PyTorch: a loop of one's own under `recording()`, against autograd."""
    import torch

    from keras_gradtools import GradNormRecorder, recording

    keras.utils.set_random_seed(0)
    model = _mlp()
    model.build((None, 6))
    optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    recorder = GradNormRecorder(model.trainable_variables, include_biases=True)
    worst = 0.0
    with recording(optimizer, recorder):
        for step in range(steps):
            xb = torch.as_tensor(x[step * BATCH:(step + 1) * BATCH])
            yb = torch.as_tensor(y[step * BATCH:(step + 1) * BATCH])
            weights = [v.numpy() for v in model.trainable_variables]
            expected = np.array(_reference(model, weights, xb.numpy(), yb.numpy(), loss_fn))
            model.zero_grad()
            loss_fn(yb, model(xb, training=True)).backward()
            grads = [v.value.grad for v in model.trainable_variables]
            with torch.no_grad():
                optimizer.apply(grads, model.trainable_variables)
            worst = max(worst, float(np.max(np.abs(recorder.norms[step] - expected) / expected)))
    return {"steps": int(len(recorder.norms)), "max_rel": worst,
            "apply_left": "apply" in vars(optimizer)}


class _Interrupt(keras.callbacks.Callback):
    """Stops a run with an error at the end of epoch 1 (after BackupAndRestore's backup)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def _checkpoints(tmp):
    """Checkpoints written during fit() with the logger: ModelCheckpoint, BackupAndRestore."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)

    def compiled():
        keras.utils.set_random_seed(0)
        model = _mlp()
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss="sparse_categorical_crossentropy")
        return model

    def values(optimizer):
        return [np.array(keras.ops.convert_to_numpy(v.value)) for v in optimizer.variables]

    model, path = compiled(), os.path.join(tmp, "checkpoint.keras")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[GradNormLogger(), keras.callbacks.ModelCheckpoint(path)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(path)
    backup = os.path.join(tmp, "backup")
    first, resumed = GradNormLogger(), GradNormLogger()
    try:
        compiled().fit(x, y, batch_size=8, epochs=4, verbose=0,
                       callbacks=[first, keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    except RuntimeError:
        pass
    again = compiled()
    again.fit(x, y, batch_size=8, epochs=4, verbose=0,
              callbacks=[resumed, keras.callbacks.BackupAndRestore(backup)])
    return {
        "skipping_warnings": [str(w.message) for w in caught if "Skipping" in str(w.message)],
        "optimizer_equal": len(values(loaded.optimizer)) == len(values(model.optimizer)) and all(
            np.array_equal(a, b) for a, b in zip(values(loaded.optimizer),
                                                 values(model.optimizer))),
        "loaded_iterations": int(keras.ops.convert_to_numpy(loaded.optimizer.iterations.value)),
        "first_steps": int(len(first.norms)),
        "resumed_steps": int(len(resumed.norms)),
        "resumed_epoch_ends": resumed.epoch_end_steps,
        "resumed_iterations": int(keras.ops.convert_to_numpy(again.optimizer.iterations.value)),
        "save_left": any(name in vars(opt) for opt in (model.optimizer, again.optimizer)
                         for name in ("save_own_variables", "load_own_variables")),
    }


@contextlib.contextmanager
def _copy_warnings_from_keras_gradtools():
    """Collects NumPy 2's copy DeprecationWarnings raised while keras_gradtools is on the stack.

    NumPy 2 warns when a JAX or torch tensor is copied through `np.array(x, copy=False)`
    (Keras' `Variable.numpy()`, `convert_to_numpy`, torch `predict_on_batch`). Keras' own
    fit() raises some on torch; those with no keras_gradtools frame are not collected.
    Yields a list of `"file:line <- keras_gradtools frame"` strings.
    """
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        ours = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_stack()
                if f"{os.sep}keras_gradtools{os.sep}" in f.filename]
        if "copy keyword" in str(message) and ours:
            found.append(f"{os.path.basename(filename)}:{lineno} <- {ours[-1]}")

    with warnings.catch_warnings():
        warnings.simplefilter("always", DeprecationWarning)
        warnings.showwarning = show
        yield found


def _tools_run(tmp):
    """Logger with TensorBoard and run_dir, and the monitor, on this backend."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    keras.utils.set_random_seed(0)
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=0.5),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    logger = GradNormLogger(log_dir=os.path.join(tmp, "logs"), update_freq=1,
                            run_dir=os.path.join(tmp, "run"), flush_every=3, histogram_freq=5,
                            probe_data=x[:16], activation_freq=5, update_ratio=True)
    monitor = GradientMonitor(logger, check_every=4, verbose=0)
    weights = _Weights()
    with _copy_warnings_from_keras_gradtools() as copy_warnings:
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
                            callbacks=[logger, monitor, weights])
        logger.save(os.path.join(tmp, "norms.csv"))
        plot_run(os.path.join(tmp, "run"), os.path.join(tmp, "figures"))
        weight_histogram(model, path=os.path.join(tmp, "weights.png"))
    # The out/kernel gradient of each histogram step, by the backend's autograd.
    loss_fn = keras.losses.get("sparse_categorical_crossentropy")
    histogram_steps = [step for step, _ in logger.recorder.histograms()]
    reference = {}
    for step in histogram_steps:
        batch = slice(step % 8 * 8, step % 8 * 8 + 8)
        grads = _gradients(model, weights.before[step], x[batch], y[batch], loss_fn)
        reference[str(step)] = grads[2].ravel().tolist()
    # The probe's statistics of the hidden tanh layer, by a NumPy forward pass at
    # the weights before each probed step; each recorded weight's norm before each step.
    paths = [v.path for v in model.trainable_variables]
    activation_reference = {}
    for step in logger.activations.steps:
        kernel, bias = weights.before[step][paths.index("mlp/h/kernel")], \
            weights.before[step][paths.index("mlp/h/bias")]
        a = np.tanh(x[:16].astype(np.float64) @ kernel + bias)
        activation_reference[str(step)] = [a.mean(), a.std(), np.mean(1 - a * a)]
    weight_norms = [[float(np.linalg.norm(before[paths.index(k)])) for k in logger.keys]
                    for before in weights.before]
    # A later fit without the logger runs the plain train function; save and load.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = os.path.join(tmp, "model.keras")
    model.save(path)
    keras.models.load_model(path)
    return {
        "norms": logger.norms.tolist(), "applied": logger.applied_recorder.norms.tolist(),
        "keys": logger.keys, "epoch_end_steps": logger.epoch_end_steps,
        "history_loss": history.history["loss"],
        "history_grad": history.history["grad_norm/mlp/out/kernel"],
        "findings": monitor.report().to_dict()["findings"],
        "histograms": {str(step): h["mlp/out/kernel"].tolist()
                       for step, h in logger.recorder.histograms()},
        "histogram_reference": reference,
        "update_ratios": np.stack([logger.update_ratios[k] for k in logger.keys], 1).tolist(),
        "weight_norms": weight_norms[:len(logger.norms)],
        "activation_steps": logger.activations.steps,
        "activations": {str(step): [s_["mlp/h"][f] for f in ("mean", "std", "gain")]
                        for step, s_ in zip(logger.activations.steps, logger.activations.stats)},
        "activation_reference": activation_reference,
        "copy_warnings": copy_warnings,
        "figures": sorted(os.listdir(os.path.join(tmp, "figures"))),
    }


def _refusals(tmp):
    """What is not supported on this backend yet: the error each gives, before training."""
    from keras_gradtools import GradNormModel, GradNormRecorder, recording

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16)
    out = {}

    def attempt(name, action):
        try:
            action()
        except ValueError as e:
            out[name] = str(e)
        else:
            out[name] = None

    def gradnorm_model():
        inputs = keras.Input((6,))
        model = GradNormModel(inputs, keras.layers.Dense(3)(inputs))
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, np.zeros((16, 3)), verbose=0)

    if BACKEND == "jax":
        attempt("recording", lambda: recording(keras.optimizers.SGD(0.1),
                                               [GradNormRecorder(_mlp().trainable_variables)]))
        attempt("gradnorm_model", gradnorm_model)
    return out


def _probe(tmp):
    """`compute_weight_gradient_norms` and `gradtools check` against the logger's first step.

    A model with weight and activity regularization and batch normalization: the
    probe's one-batch gradient (training mode) is the first train step's.
    """
    from click.testing import CliRunner

    from keras_gradtools.cli import main as cli
    from keras_gradtools.probe import compute_weight_gradient_norms

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1),
                           activity_regularizer=keras.regularizers.L2(0.01), name="h")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(h),
                        name="reg")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    # np.array: a copy of the test's own, so the check does not rest on to_numpy copying.
    frozen = [np.array(to_numpy(v)) for v in model.non_trainable_variables]
    probe = compute_weight_gradient_norms(model, x, y, batch_size=16, include_biases=True,
                                          training=True)
    # The probe ran batch normalization in training mode; its moving statistics are restored.
    moved = max(float(np.max(np.abs(to_numpy(v) - before)))
                for v, before in zip(model.non_trainable_variables, frozen))
    path, data = os.path.join(tmp, "reg.keras"), os.path.join(tmp, "data.npz")
    model.save(path)
    np.savez(data, x=x, y=y)
    result = CliRunner().invoke(cli, ["--backend", BACKEND, "check", path, "--data", data,
                                      "--batch-size", "16", "--json"])
    logger = GradNormLogger(include_biases=True)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[logger])
    return {"keys": logger.keys, "logged": logger.norms[0].tolist(), "moving_stats_moved": moved,
            "probe": [probe[k] for k in logger.keys], "cli_exit": result.exit_code,
            "cli": json.loads(result.stdout)["norms"] if result.exit_code == 0 else result.output}


def _nested_activations():
    """The activation probe in a model nested in the user's (a base model, a backbone):
    each watched layer's mean against a NumPy forward pass."""
    from keras_gradtools.activations import ActivationProbe

    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(5, activation="tanh", name="t")(inner_in),
                        name="inner")
    model = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(4, activation="relu", name="first"), inner,
                              keras.layers.Dense(3, activation="softmax", name="out")],
                             name="outer")
    probe = ActivationProbe(model, x)
    stats = probe()
    (w1, b1), (w2, b2) = model.get_layer("first").get_weights(), inner.get_layer("t").get_weights()
    a1 = np.maximum(x.astype(np.float64) @ w1 + b1, 0.0)
    a2 = np.tanh(a1 @ w2 + b2)
    return {"names": probe.names,
            "expected_names": [model.get_layer("first").kernel.path.rsplit("/", 1)[0],
                               inner.get_layer("t").kernel.path.rsplit("/", 1)[0]],
            "means": [stats[name]["mean"] for name in probe.names],
            "expected_means": [float(a1.mean()), float(a2.mean())]}


class _Block(keras.layers.Layer):
    """A block of the user's own, its sublayers kept as private attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._up = keras.layers.Dense(6, activation="relu", name="up")
        self._act = keras.layers.Activation("tanh", name="act")

    def call(self, x):
        return self._act(self._up(x))


class _WithBlock(keras.Model):
    def __init__(self):
        super().__init__(name="with_block")
        self.h = keras.layers.Dense(4, activation="sigmoid", name="h")
        self.block = _Block(name="block")
        self.out = keras.layers.Dense(3, activation="softmax", name="out")

    def call(self, x):
        return self.out(self.block(self.h(x)))


def _captured_activations():
    """The probe inside a subclassed model and a custom layer (read as they are called),
    during `fit()`: the probes before step 0 and before step 2 against NumPy forward
    passes with the weights at those steps."""
    x = np.random.default_rng(4).normal(size=(48, 6)).astype("float32")
    y = np.arange(48) % 3
    keras.utils.set_random_seed(0)
    model = _WithBlock()
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model(x[:1])
    layers = (model.h, model.block._up)
    weights = {0: [layer.get_weights() for layer in layers]}

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights[batch + 1] = [layer.get_weights() for layer in self.model.layers[:1]
                                  + [self.model.block._up]]

    logger = GradNormLogger(probe_data=x[:16], activation_freq=2)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[logger, Keep()])

    def means(at):
        (wh, bh), (wu, bu) = weights[at]
        h = 1.0 / (1.0 + np.exp(-(x[:16].astype(np.float64) @ wh + bh)))
        up = np.maximum(h @ wu + bu, 0.0)
        return [float(h.mean()), float(up.mean()), float(np.tanh(up).mean())]

    record = logger.activations
    names = [layer.kernel.path.rsplit("/", 1)[0] for layer in layers] + ["block/act"]
    return {"steps": record.steps, "names": list(record.stats[0]), "expected_names": names,
            "means": [[entry[name]["mean"] for name in names] for entry in record.stats],
            "expected_means": [means(0), means(2)],
            "left_patched": [name for layer in (model, model.h, model.block, *layers,
                                                model.block._act)
                             for name in ("call",) if name in vars(layer)]}


def main(tmp):
    rng = np.random.default_rng(1)
    x6, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    ids = rng.integers(0, 10, (32, 5)).astype("int32")
    ids[:, 1] = ids[:, 0]  # repeated ids within every sample
    result = {"backend": BACKEND, "models": [
        _compare("sequential", _mlp, x6, y),
        _compare("functional_shared", _shared, x6, y),
        _compare("subclassed", _Subclassed, x6, y),
        _compare("cnn_batchnorm", _cnn, rng.normal(size=(32, 8, 8, 1)).astype("float32"), y),
        _compare("frozen", _frozen, x6, y),
        _compare("lstm", _lstm, rng.normal(size=(32, 5, 3)).astype("float32"), y),
        _compare("embedding", _embedding, ids, y),
        _compare("float64", _float64, x6.astype("float64"), y),
    ]}
    result["models"].append(_compare("custom_train_step", _CustomStep, x6, y))
    result["gradient_accumulation"] = gradient_accumulation()
    from keras_gradtools import internals

    clip_mean = internals.keras_clips_accumulated_mean()
    result["gradient_accumulation_clipnorm"] = dict(
        gradient_accumulation(clipnorm=0.5, clip_mean=clip_mean), clip_mean=clip_mean)
    result["nothing_trainable"] = _nothing_trainable(x6, y)
    if BACKEND == "jax":  # Keras' PyTorch trainer takes steps_per_execution=1 only
        result["steps_per_execution"] = _steps_per_execution(x6, y)
    else:
        from keras_gradtools import GradNormModel

        class _Recording(_Subclassed, GradNormModel):  # records in its own train step
            def __init__(self):
                super().__init__(name="gradnorm_model", activation="tanh")

        result["models"].append(_compare("gradnorm_model", _Recording, x6, y))
        result["gradnorm_model_skips"] = _gradnorm_model_skips(_Recording, x6, y)
        result["recording_loop"] = _torch_loop(x6, y)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        result["mixed_float16"] = _compare("mixed_float16", _mlp, x6, y)
        result["mixed_float16_skipped"] = _skipped_steps(x6 * 30, y)
        result["mixed_float16_skipped_clipped"] = _skipped_steps(x6 * 30, y, clip="agc")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    result.update(tools=_tools_run(tmp), refusals=_refusals(tmp), probe=_probe(tmp),
                  checkpoints=_checkpoints(tmp), nested_activations=_nested_activations(),
                  captured_activations=_captured_activations())
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
