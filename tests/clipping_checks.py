"""The seven clipping presets on the JAX or PyTorch backend, against NumPy.

Run by tests/test_backends.py in a fresh process with KERAS_BACKEND set and
TensorFlow made unimportable (nothing here may need it); prints one
`RESULT {json}` line. Each preset wraps plain SGD, so the update of every
step is `-lr * clipped gradient`: the gradient is taken with the backend's
own autograd (`jax.grad`, `loss.backward()`) at the weights before the step,
clipped by a NumPy transcription of the method, and compared with the
weights' actual change (on JAX inside the jitted train step). A save after
three steps, loaded and trained three more, must end where six uninterrupted
steps end (the stateful methods' state is saved with the model).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.modules["tensorflow"] = None  # the backends must run without TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402

from backend_checks import _Weights, _gradients  # noqa: E402  (this directory)
from keras_gradtools import ClippedOptimizer, GradNormLogger, clipped_optimizer  # noqa: E402

BACKEND = keras.backend.backend()
LR, BATCH, STEPS = 2.0, 8, 6
LOSS = keras.losses.get("sparse_categorical_crossentropy")
PRESETS = {  # method -> (threshold, extra arguments): thresholds chosen so that every method clips
    "none": (None, {}), "value": (0.05, {}), "norm": (0.1, {}), "global_norm": (0.2, {}),
    "agc": (0.01, {}), "autoclip": (10.0, {"history_size": 4}),
    "zclip": (0.5, {"warmup": 2, "alpha": 0.9}),
}


def _mlp():
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(8, activation="tanh", name="h"),
                             keras.layers.Dense(3, activation="softmax", name="out")], name="mlp")


def _unitwise(a):
    if a.ndim <= 1:
        return np.sqrt(np.sum(a * a, keepdims=True))
    return np.sqrt(np.sum(a * a, axis=tuple(range(a.ndim - 1)), keepdims=True))


class _Reference:
    """The clipping methods in NumPy, state and all."""

    def __init__(self, method, threshold, extra):
        self.method, self.t, self.extra = method, threshold, extra
        self.history, self.count = [], 0
        self.mean = self.var = self.warm_sum = self.warm_sumsq = 0.0

    def __call__(self, grads, weights):
        m, t = self.method, self.t
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
        if m == "none":
            return grads
        if m == "value":
            return [np.clip(g, -t, t) for g in grads]
        if m == "norm":
            return [g * min(1.0, t / np.linalg.norm(g)) for g in grads]
        if m == "global_norm":
            return [g * min(1.0, t / norm) for g in grads]
        if m == "agc":  # the output layer (its kernel and bias) is left unclipped
            out = []
            for i, (g, w) in enumerate(zip(grads, weights)):
                if i >= 2:
                    out.append(g)
                    continue
                bound = np.maximum(_unitwise(w), 1e-3) * t
                gn = _unitwise(g)
                out.append(g * np.where(gn > bound, bound / np.maximum(gn, 1e-6), 1.0))
            return out
        if m == "autoclip":
            self.history = (self.history + [norm])[-self.extra["history_size"]:]
            limit = np.percentile(self.history, t)
            return [g * min(1.0, limit / norm) for g in grads]
        warmup, alpha = self.extra["warmup"], self.extra["alpha"]  # zclip
        applied = norm
        if self.count < warmup:
            self.warm_sum += norm
            self.warm_sumsq += norm * norm
            self.count += 1
            if self.count == warmup:
                self.mean = self.warm_sum / warmup
                self.var = max(self.warm_sumsq / warmup - self.mean ** 2, 0.0)
        else:
            std = np.sqrt(self.var)
            z = (norm - self.mean) / max(std, 1e-12)
            if z > t:
                applied = self.mean + t * t / z * std
            self.count += 1
            self.mean = alpha * self.mean + (1 - alpha) * applied
            self.var = alpha * self.var + (1 - alpha) * (applied - self.mean) ** 2
        return [g * min(1.0, applied / norm) for g in grads]


def _optimizer(method, wrapper=False):
    threshold, extra = PRESETS[method]
    if wrapper:
        return ClippedOptimizer(keras.optimizers.SGD(LR), clip=method, threshold=threshold, **extra)
    return clipped_optimizer("sgd", learning_rate=LR, clip=method, threshold=threshold, **extra)


def _data():
    rng = np.random.default_rng(3)
    # Batches alternate in scale, so that the global norm jumps every other step.
    scale = np.repeat(1.0 + 3.0 * (np.arange(STEPS) % 2), BATCH)[:, None]
    x = (rng.normal(size=(STEPS * BATCH, 6)) * scale).astype("float32")
    return x, rng.integers(0, 3, STEPS * BATCH)


def _check(method, wrapper=False):
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = _mlp()
    model.compile(optimizer=_optimizer(method, wrapper), loss="sparse_categorical_crossentropy")
    weights, logger = _Weights(), GradNormLogger(include_biases=True)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[weights, logger])
    before = [[np.asarray(w, np.float64) for w in ws] for ws in weights.before]
    after = before[1:] + [[np.array(v.numpy(), np.float64) for v in model.trainable_variables]]
    reference = _Reference(method, *PRESETS[method])
    worst = worst_applied = 0.0
    clipped_steps = 0
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        grads = _gradients(model, weights.before[step], xb, yb, LOSS)
        expected = reference(grads, before[step])
        clipped_steps += any(not np.allclose(e, g, rtol=1e-9, atol=0)
                             for e, g in zip(expected, grads))
        for e, w0, w1 in zip(expected, before[step], after[step]):
            delta = (w0 - w1) / LR
            worst = max(worst, float(np.max(np.abs(delta - e)) / max(np.max(np.abs(e)), 1e-12)))
        if logger.applied_recorder is not None and method != "none":
            applied = logger.applied_recorder.norms[step]
            want = np.array([np.linalg.norm(e) for e in expected])
            worst_applied = max(worst_applied, float(np.max(np.abs(applied - want) / want)))
    return {"method": method, "wrapper": wrapper, "max_rel": worst,
            "max_rel_applied": worst_applied, "clipped_steps": clipped_steps,
            "type": type(model.optimizer).__name__}


def _resume(method, tmp):
    """Six steps in one go against three, save, load, three more."""
    x, y = _data()
    finals = []
    for interrupted in (False, True):
        keras.utils.set_random_seed(0)
        model = _mlp()
        model.compile(optimizer=_optimizer(method), loss="sparse_categorical_crossentropy")
        if not interrupted:
            model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
        else:
            half = STEPS // 2 * BATCH
            model.fit(x[:half], y[:half], batch_size=BATCH, shuffle=False, verbose=0)
            path = os.path.join(tmp, f"{method}.keras")
            model.save(path)
            model = keras.models.load_model(path)
            model.fit(x[half:], y[half:], batch_size=BATCH, shuffle=False, verbose=0)
        finals.append([v.numpy() for v in model.trainable_variables])
    return {"method": method, "type": type(model.optimizer).__name__,
            "max_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(*finals)))}


def main(tmp):
    result = {"backend": BACKEND, "tensorflow_imported": False,
              "presets": [_check(m) for m in PRESETS],
              "wrappers": [_check(m, wrapper=True) for m in ("value", "norm", "global_norm")],
              "resume": [_resume(m, tmp) for m in ("agc", "autoclip", "zclip")]}
    result["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
