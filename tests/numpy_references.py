"""Checks whose reference is NumPy alone, run on every backend.

Imported by the TensorFlow tests (in the pytest process) and by
`backend_checks.py` (a fresh process per backend): nothing here imports a
backend's own package.
"""

import keras
import numpy as np

from keras_gradtools import GradNormLogger


def gradient_accumulation(steps=4, batch=16, accumulate=2, lr=0.1):
    """SGD with `gradient_accumulation_steps` on a linear least-squares model.

    The gradient of the mean squared error of `x @ w` is `2/n x^T (x w - y)`:
    every batch's gradient and the weights the optimizer reaches (the mean
    of each `accumulate` batches' gradients, applied every `accumulate`
    steps) are computed here in float64.

    Returns:
        `{"steps", "max_rel", "weights_max_abs"}`: the steps recorded, the
        largest relative error of a recorded norm against the batch's own
        gradient, and the largest difference of the final weights.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 4)).astype("float32")
    y = rng.normal(size=(steps * batch, 1)).astype("float32")
    w = rng.normal(size=(4, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(w)
    model.compile(keras.optimizers.SGD(lr, gradient_accumulation_steps=accumulate), "mse")
    logger = GradNormLogger()
    model.fit(x, y, batch_size=batch, shuffle=False, verbose=0, callbacks=[logger])
    w, total, expected = w.astype(np.float64), 0.0, []
    for step in range(steps):
        xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
        gradient = 2.0 / batch * xb.T @ (xb @ w - yb)
        expected.append(np.linalg.norm(gradient))
        total = total + gradient
        if (step + 1) % accumulate == 0:
            w, total = w - lr * total / accumulate, 0.0
    recorded = logger.norms[:, 0]
    return {"steps": int(len(recorded)),
            "max_rel": float(np.max(np.abs(recorded - expected) / np.array(expected))),
            "weights_max_abs": float(np.max(np.abs(model.get_weights()[0] - w)))}
