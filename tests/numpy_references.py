"""Checks whose reference is NumPy alone, run on every backend.

Imported by the TensorFlow tests (in the pytest process) and by
`backend_checks.py` (a fresh process per backend): nothing here imports a
backend's own package.
"""

import keras
import numpy as np

from keras_gradtools import GradNormLogger


def gradient_accumulation(steps=4, batch=16, accumulate=2, lr=0.1, clipnorm=None,
                          clip_mean=True):
    """SGD with `gradient_accumulation_steps` on a linear least-squares model.

    The gradient of the mean squared error of `x @ w` is `2/n x^T (x w - y)`:
    every batch's gradient and the weights the optimizer reaches (the mean
    of each `accumulate` batches' gradients, applied every `accumulate`
    steps; with `clipnorm`, that mean clipped to it, or with
    `clip_mean=False` each batch's gradient clipped before it is
    accumulated) are computed here in float64.

    Returns:
        `{"steps", "max_rel", "weights_max_abs", "applied_keys",
        "applied_max_rel"}`: the steps recorded, the largest relative error
        of a recorded norm against the batch's own gradient, the largest
        difference of the final weights, the keys of the logger's
        `applied_history`, and (if any) the largest relative error of an
        applied norm against the batch's clipped gradient.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 4)).astype("float32")
    y = rng.normal(size=(steps * batch, 1)).astype("float32")
    w = rng.normal(size=(4, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(w)
    model.compile(keras.optimizers.SGD(lr, gradient_accumulation_steps=accumulate,
                                       clipnorm=clipnorm), "mse")
    logger = GradNormLogger()
    model.fit(x, y, batch_size=batch, shuffle=False, verbose=0, callbacks=[logger])
    w, total, expected, applied = w.astype(np.float64), 0.0, [], []
    for step in range(steps):
        xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
        gradient = 2.0 / batch * xb.T @ (xb @ w - yb)
        expected.append(np.linalg.norm(gradient))
        if clipnorm is not None and not clip_mean:
            gradient = gradient * min(1.0, clipnorm / np.linalg.norm(gradient))
        applied.append(np.linalg.norm(gradient))
        total = total + gradient
        if (step + 1) % accumulate == 0:
            mean = total / accumulate
            if clipnorm is not None and clip_mean:
                mean = mean * min(1.0, clipnorm / np.linalg.norm(mean))
            w, total = w - lr * mean, 0.0
    recorded = logger.norms[:, 0]
    return {"steps": int(len(recorded)),
            "max_rel": float(np.max(np.abs(recorded - expected) / np.array(expected))),
            "weights_max_abs": float(np.max(np.abs(model.get_weights()[0] - w))),
            "applied_keys": sorted(logger.applied_history),
            "applied_max_rel": float(np.max(np.abs(logger.applied_recorder.norms[:, 0]
                                                   - applied) / np.array(applied)))
            if logger.applied_history else None}
