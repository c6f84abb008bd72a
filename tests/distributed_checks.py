"""Runs keras_gradtools under MirroredStrategy on 2 logical CPUs and on one device.

Logical devices must be configured before TensorFlow starts, so the tests in
`test_distribute.py` run this file in a fresh process; it prints one JSON
object with what each scenario measured. Every comparison starts both runs
from the same initial weights with the same global batches.
"""

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradtools import GradNormLogger, GradientMonitor  # noqa: E402
from keras_gradtools.clipping import clipped_optimizer  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(seed, samples=96, features=6, classes=3, scale=1.0):
    """Random float32 inputs and integer labels, the same for every run of a scenario."""
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(samples, features))).astype("float32")
    return x, rng.integers(0, classes, samples)


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))) if a.size else 0.0


def _rel_nan(a, b):
    """`_rel` where both are finite; infinite if they differ in where they are NaN."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    finite = ~np.isnan(a)
    return _rel(a[finite], b[finite])


def _weights_diff(m1, m2):
    return float(max(np.max(np.abs(p - q)) for p, q in zip(m1.get_weights(), m2.get_weights())))


def _pair(build, compile_model, fit):
    """Builds, trains on one device and under the strategy; returns both (model, result)."""
    keras.utils.set_random_seed(1)
    single = build()
    compile_model(single)
    weights = single.get_weights()
    with STRATEGY.scope():
        keras.utils.set_random_seed(1)
        mirrored = build()
        compile_model(mirrored)
    mirrored.set_weights(weights)
    return (single, fit(single)), (mirrored, fit(mirrored))


def _mlp():
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", name="h1"),
        keras.layers.Dense(8, activation="tanh", name="h2"),
        keras.layers.Dense(3, name="out"),
    ], name="mlp")


def _embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(12, 4, name="emb")(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h), name="embnet")


def logger_scenario():
    rng = np.random.default_rng(0)
    out = {}
    data = {
        "mlp": (_mlp, rng.normal(size=(96, 6)).astype("float32")),
        # Repeated ids in a batch: sparse IndexedSlices gradients, summed per id.
        "embedding": (_embedding, rng.integers(0, 12, size=(96, 5)).astype("int32")),
    }
    y = rng.integers(0, 3, 96)
    for name, (build, x) in data.items():
        def fit(model, x=x):
            logger = GradNormLogger(include_biases=True,
                                    probe_data=x[:16] if name == "mlp" else None,
                                    activation_freq=4, update_ratio=True)
            model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                      callbacks=[logger])
            return logger
        (m1, l1), (m2, l2) = _pair(build, lambda m: m.compile(keras.optimizers.Adam(1e-2), CE),
                                   fit)
        out[name] = {
            "steps": [len(l1.norms), len(l2.norms)],
            "keys_equal": l1.keys == l2.keys,
            "max_rel": _rel(l1.norms, l2.norms),
            "weights": _weights_diff(m1, m2),
            "epoch_means_rel": _rel(
                [m1.history.history[f"grad_norm/{k}"] for k in l1.keys],
                [m2.history.history[f"grad_norm/{k}"] for k in l2.keys]),
            "min_norm": float(np.min(l1.norms)),
            # Update-to-weight ratios: taken in the first replica, of the summed update.
            "ratio_keys_equal": list(l1.update_ratios) == list(l2.update_ratios) == l1.keys,
            "ratio_steps": [len(l1.update_ratios[l1.keys[0]]), len(l2.update_ratios[l2.keys[0]])],
            "ratio_max_rel": _rel_nan([l1.update_ratios[k] for k in l1.keys],
                                      [l2.update_ratios[k] for k in l2.keys]),
            "min_ratio": float(np.nanmin([l1.update_ratios[k] for k in l1.keys])),
        }
        if name == "mlp":  # activation probes: the same statistics as on one device
            stats = [[[entry[layer][f] for layer in entry for f in ("mean", "std", "gain")]
                      for entry in logger.activations.stats] for logger in (l1, l2)]
            out[name]["probe_steps"] = [l1.activations.steps, l2.activations.steps]
            out[name]["probe_max_rel"] = _rel(np.array(stats[0]), np.array(stats[1]))
    return out


def gradnorm_model_scenario():
    from keras_gradtools import GradNormModel

    x, y = _data(4)

    def build():
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, activation="relu", name="h1")(inputs)
        return GradNormModel(inputs, keras.layers.Dense(3, name="out")(h), name="gnm")

    def fit(model):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return model.grad_norm_logger

    (m1, l1), (m2, l2) = _pair(build, lambda m: m.compile(keras.optimizers.SGD(0.1), CE), fit)
    return {"steps": [len(l1.norms), len(l2.norms)], "max_rel": _rel(l1.norms, l2.norms),
            "weights": _weights_diff(m1, m2)}


def tensorboard_scenario():
    """Scalars every step and histograms every 2 steps, read back with TensorBoard's loader."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = _data(5)

    def fit(model):
        log_dir = tempfile.mkdtemp(prefix="gradtools-dist-tb-")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[GradNormLogger(log_dir=log_dir, update_freq=1, histogram_freq=2)])
        events = EventAccumulator(os.path.join(log_dir, "train"),
                                  size_guidance={"tensors": 0})
        events.Reload()
        return {tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
                for tag in events.Tags()["tensors"]}

    (_, t1), (_, t2) = _pair(_mlp, lambda m: m.compile(keras.optimizers.SGD(0.1), CE), fit)
    out = {"tags": [sorted(t1), sorted(t2)], "steps": {}, "scalar_rel": 0.0,
           "edge_diff": 0.0, "same_counts": True, "counts": {}}
    for tag in t1:
        out["steps"][tag] = [[s for s, _ in t1[tag]], [s for s, _ in t2.get(tag, [])]]
        a = np.array([v for _, v in t1[tag]], float)
        b = np.array([v for _, v in t2.get(tag, [])], float)
        if a.shape != b.shape:
            out["same_counts"] = False
            continue
        if tag.startswith("grad_hist/"):
            # Bucket edges against the histogram's range; counts exactly.
            edges_a, edges_b = a[..., :2], b[..., :2]
            out["edge_diff"] = max(out["edge_diff"], float(
                np.max(np.abs(edges_a - edges_b)) / np.max(np.abs(edges_a))))
            out["same_counts"] &= bool(np.array_equal(a[..., 2], b[..., 2]))
            out["counts"][tag] = [int(v[:, 2].sum()) for _, v in t2[tag]]
        else:
            out["scalar_rel"] = max(out["scalar_rel"], _rel(a, b))
    return out


def monitor_scenario():
    x, y = _data(1, samples=640, features=16, classes=10)

    def deep_sigmoid():
        layers = [keras.Input((16,))]
        layers += [keras.layers.Dense(16, activation="sigmoid", name=f"dense_{i}")
                   for i in range(8)]
        layers.append(keras.layers.Dense(10, name="output"))
        return keras.Sequential(layers, name="deep_sigmoid")

    def fit(model):
        monitor = GradientMonitor(check_every=10, verbose=0,
                                  thresholds={"vanishing": {"patience": 20}})
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        return monitor.report()

    (_, r1), (_, r2) = _pair(deep_sigmoid, lambda m: m.compile(keras.optimizers.SGD(0.1), CE),
                             fit)
    out = {"vanishing": [[(f.kind, f.step, f.layers) for f in r.findings] for r in (r1, r2)]}

    x_nan = x[:160].copy()
    x_nan[37] = np.nan  # in the batch of step 2 (batch size 16)

    def fit_nan(model):
        logger = GradNormLogger()
        monitor = GradientMonitor(logger, check_every=1, verbose=0)
        model.fit(x_nan, y[:160], batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[logger, monitor])
        return monitor.report(), model.stop_training, len(logger.norms)

    (_, n1), (_, n2) = _pair(_mlp_16, lambda m: m.compile(keras.optimizers.SGD(0.1), CE),
                             fit_nan)
    out["nonfinite"] = [
        {"step": r.first("nonfinite").step, "first_layer": r.first("nonfinite").layers[0],
         "stopped": stopped, "steps_recorded": steps}
        for r, stopped, steps in (n1, n2)
    ]
    return out


def _mlp_16():
    return keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(8, activation="relu", name="h1"),
        keras.layers.Dense(10, name="out"),
    ], name="mlp16")


def clipping_scenario():
    x, y = _data(2, scale=5.0)
    out = {}
    thresholds = {"value": 0.05, "norm": 0.5, "global_norm": 0.5, "agc": 0.01,
                  "autoclip": 10.0, "zclip": 2.5}
    for clip, threshold in thresholds.items():
        kwargs = {"warmup": 3} if clip == "zclip" else {}

        def fit(model):
            logger = GradNormLogger(include_biases=True)
            model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                      callbacks=[logger])
            return logger

        def compile_model(model):
            model.compile(clipped_optimizer("sgd", 0.1, clip=clip, threshold=threshold,
                                            **kwargs), CE)

        (m1, l1), (m2, l2) = _pair(_mlp, compile_model, fit)
        out[clip] = {
            "types": [type(m1.optimizer).__name__, type(m2.optimizer).__name__],
            "raw_rel": _rel(l1.norms, l2.norms),
            "applied_rel": _rel(l1.applied_recorder.norms, l2.applied_recorder.norms),
            "weights": _weights_diff(m1, m2),
            "clipped_steps": int(np.sum(l1.applied_global_norms < l1.global_norms * (1 - 1e-6))),
            "steps": len(l1.norms),
            "global_after": [float(np.max(l.applied_global_norms)) for l in (l1, l2)],
        }
    return out


def keras_clipping_warning_scenario():
    with STRATEGY.scope():
        model = _mlp()
        model.compile(keras.optimizers.SGD(0.1, global_clipnorm=1.0), CE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.ones((32, 6), "float32"), np.zeros(32, "int32"), batch_size=16,
                  verbose=0, callbacks=[GradNormLogger()])
    return [str(w.message) for w in caught if "GradNormLogger" in str(w.message)]


def accumulation_refused_scenario():
    """gradient_accumulation_steps under the strategy: refused before the first step."""
    with STRATEGY.scope():
        model = _mlp()
        model.compile(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), CE)
    weights = [w.copy() for w in model.get_weights()]
    try:
        model.fit(np.ones((32, 6), "float32"), np.zeros(32, "int32"), batch_size=16,
                  verbose=0, callbacks=[GradNormLogger()])
    except ValueError as error:
        message = str(error)
    else:
        message = None
    return {"message": message, "untouched": all(
        np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))}


def mixed_precision_scenario(samples=640):
    """A loss scale far too high: the loss-scale optimizer skips steps and halves it."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = _data(3, samples=samples)

        def build():
            return keras.Sequential([
                keras.Input((6,)),
                keras.layers.Dense(16, activation="relu", name="h"),
                keras.layers.Dense(3, name="out"),
                keras.layers.Activation("linear", dtype="float32"),
            ], name="mp")

        def compile_model(model):
            model.compile(keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1), initial_scale=2.0 ** 40), CE)

        def fit(model):
            logger = GradNormLogger(update_ratio=True)
            monitor = GradientMonitor(logger, check_every=8, verbose=0)
            model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                      callbacks=[logger, monitor])
            norms = logger.norms
            skipped = logger.skipped_steps
            applied = np.setdiff1d(np.arange(len(norms)), skipped)
            return {
                "steps": len(norms),
                "skipped": [int(s) for s in skipped],
                "halvings": int(round(40 - np.log2(float(model.optimizer.dynamic_scale.numpy())))),
                "applied_finite": bool(np.isfinite(norms[applied]).all()),
                "skipped_nonfinite": bool((~np.isfinite(norms[skipped])).any(axis=1).all()),
                "stopped": bool(model.stop_training),
                "findings": [(f.kind, f.step, f.detected_step, f.evidence)
                             for f in monitor.report().findings],
                "weights_finite": bool(all(np.isfinite(w).all() for w in model.get_weights())),
                "report_skipped": monitor.report().skipped_steps,
                "norms": norms.tolist(),
                "ratio_skipped": [int(s) for s in np.flatnonzero(logger.update_recorder.skipped)],
                "ratios_on_skipped": float(np.nanmax(np.abs(
                    logger.update_recorder.norms[logger.update_recorder.skipped]), initial=0.0)),
                "ratios": logger.update_recorder.norms.tolist(),
            }

        (_, r1), (_, r2) = _pair(build, compile_model, fit)
        both = np.setdiff1d(np.arange(min(r1["steps"], r2["steps"])),
                            r1["skipped"] + r2["skipped"])
        applied_rel = _rel(np.array(r1["norms"])[both], np.array(r2["norms"])[both])
        ratio_rel = _rel_nan(np.array(r1["ratios"])[both], np.array(r2["ratios"])[both])
        for r in (r1, r2):
            del r["norms"], r["ratios"]
        return {"single": r1, "mirrored": r2, "applied_rel": applied_rel,
                "ratio_rel": ratio_rel, "compared_steps": len(both)}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def loss_scale_replica_scenario():
    """Keras 3.15's LossScaleOptimizer under MirroredStrategy judges finiteness on the
    first replica's share only: with these data a non-finite share of the other replica
    reaches the weights, and every later step is skipped."""
    return mixed_precision_scenario(samples=384)


SCENARIOS = {
    "logger": logger_scenario,
    "gradnorm_model": gradnorm_model_scenario,
    "tensorboard": tensorboard_scenario,
    "monitor": monitor_scenario,
    "clipping": clipping_scenario,
    "keras_clipping_warning": keras_clipping_warning_scenario,
    "accumulation_refused": accumulation_refused_scenario,
    "mixed_precision": mixed_precision_scenario,
    "loss_scale_replica": loss_scale_replica_scenario,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SCENARIOS)
    print("RESULT " + json.dumps({name: SCENARIOS[name]() for name in names}))
