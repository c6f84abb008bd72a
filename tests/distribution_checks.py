"""keras.distribution.DataParallel on JAX over 2 host CPU devices, against one device.

Run by tests/test_backends.py in a fresh process (the device count is fixed
when JAX starts: XLA_FLAGS=--xla_force_host_platform_device_count=2); prints
one `RESULT {json}` line. Each optimizer trains the same model from the same
weights on the same batches, once on one device and once with every batch
split over the two devices: the recorded norms (as received and as applied),
and the weights after training, must agree. Under DataParallel the optimizer
applies the global gradient, so the clipping presets clip the global one.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"  # the host's devices, also where a GPU is visible
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
sys.modules["tensorflow"] = None  # nothing here may need TensorFlow

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradtools import ClippedOptimizer, GradNormLogger, clipped_optimizer  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "global_clipnorm": lambda: clipped_optimizer("sgd", 0.1, clip="global_norm", threshold=0.3),
    "agc": lambda: clipped_optimizer("sgd", 0.1, clip="agc"),
    "zclip": lambda: clipped_optimizer("sgd", 0.1, clip="zclip", threshold=0.5, warmup=2),
    "global_norm_wrapper": lambda: ClippedOptimizer(keras.optimizers.SGD(0.1),
                                                    clip="global_norm", threshold=0.3),
}


def _train(make_optimizer, distribution, x, y):
    keras.utils.set_random_seed(0)

    def run():
        model = keras.Sequential([keras.Input((6,)),
                                  keras.layers.Dense(16, activation="tanh", name="h"),
                                  keras.layers.Dense(3, activation="softmax", name="out")],
                                 name="mlp")
        model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy")
        logger = GradNormLogger(include_biases=True)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
        applied = logger.applied_recorder.norms if logger.applied_recorder else logger.norms
        return logger.norms, applied, [v.numpy() for v in model.trainable_variables]

    if distribution is None:
        return run()
    with distribution.scope():
        return run()


def main():
    rng = np.random.default_rng(0)
    scale = np.repeat(1.0 + 3.0 * (np.arange(4) % 2), 16)[:, None]  # global norm jumps
    x = (rng.normal(size=(64, 6)) * scale).astype("float32")
    y = rng.integers(0, 3, 64)
    data_parallel = keras.distribution.DataParallel(devices=jax.devices())
    result = {"devices": len(jax.devices()), "optimizers": []}
    for name, make in OPTIMIZERS.items():
        one, two = _train(make, None, x, y), _train(make, data_parallel, x, y)
        result["optimizers"].append({
            "name": name, "steps": int(len(two[0])),
            "max_rel": float(np.max(np.abs(two[0] - one[0]) / one[0])),
            "max_rel_applied": float(np.max(np.abs(two[1] - one[1]) / one[1])),
            "clipped": bool(np.any(one[1] < one[0] * (1 - 1e-6))),
            "weights_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(one[2], two[2]))),
        })
    try:
        with keras.distribution.ModelParallel(
                layout_map=keras.distribution.LayoutMap(
                    keras.distribution.DeviceMesh((2,), ["model"], jax.devices())),
                batch_dim_name="model").scope():
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
            model.compile(optimizer="sgd", loss="mse")
            model.fit(x, np.zeros((64, 3)), verbose=0, callbacks=[GradNormLogger()])
        result["model_parallel"] = None
    except ValueError as e:
        result["model_parallel"] = str(e)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
