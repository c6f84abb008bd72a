"""The article's per-epoch probe, fixed: gradient norms over a whole data set."""

import keras
import numpy as np

from keras_gradtools._tensorflow import tf

from keras_gradtools import internals
from keras_gradtools import norms as norms_lib


def compute_weight_gradient_norms(
    model, x, y, batch_size=1024, include_biases=False, training=False
):
    """Returns each weight's gradient norm for the mean loss over all of `x`.

    The article's function, fixed in two ways. It pairs each gradient with
    `model.trainable_variables` (the article indexes `model.weights`, which
    goes wrong as soon as non-trainable weights such as batch-norm moving
    statistics sit between trainable ones). And it works in batches of
    `batch_size`, accumulating `sum_b (n_b / N) * grad(mean loss of b)`, so
    that memory stays bounded on 60,000 samples while the result is the
    gradient of the mean loss over all `N` samples: equal, within float
    tolerance, to one batch holding everything.

    The loss is the model's compiled loss (`model.compute_loss`), so
    `compile()` must have been called. By default the model runs in
    inference mode (`training=False`): dropout is off and batch
    normalization uses, and does not update, its moving statistics, so the
    probe leaves the model untouched. This costs a forward and backward pass
    over all of `x`: for per-step norms during training use
    `GradNormLogger`, which costs neither.

    Args:
        model: a compiled `keras.Model`.
        x: inputs, an array (or a structure of arrays) with `N` samples.
        y: targets, with `N` samples.
        batch_size: samples per forward/backward pass. Defaults to `1024`.
        include_biases: whether biases are included. Defaults to `False`.
        training: the `training` flag the model is called with. Defaults to
            `False`.

    Returns:
        A dict `variable.path -> float`, in `trainable_variables` order.

    Raises:
        ValueError: if `batch_size` is not a positive integer, `x` and `y`
            differ in length, `x` is empty, or the model is not compiled.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((2,)),
    ...                           keras.layers.Dense(1, name="out")], name="net")
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> model.set_weights([np.ones((2, 1)), np.zeros(1)])
    >>> x, y = np.ones((4, 2)), np.zeros((4, 1))
    >>> norms = compute_weight_gradient_norms(model, x, y, batch_size=3)
    >>> round(norms["net/out/kernel"], 5)  # d/dW mean (2)^2 = [4, 4]
    5.65685
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            "`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size}"
        )
    if getattr(model, "loss", None) is None and not getattr(
        model, "compiled", False
    ):
        raise ValueError(
            "The model must be compiled with a loss before its gradients "
            f"can be probed. Received: model={model.name!r}"
        )
    n = len(keras.tree.flatten(x)[0])
    if n == 0:
        raise ValueError("`x` must hold at least one sample. Received: len(x)=0")
    if len(keras.tree.flatten(y)[0]) != n:
        raise ValueError(
            "`x` and `y` must hold the same number of samples. "
            f"Received: len(x)={n}, len(y)={len(keras.tree.flatten(y)[0])}"
        )
    variables = norms_lib.select_variables(
        model.trainable_variables, include_biases
    )
    keys = norms_lib.unique_keys(variables)

    batch_gradients = _gradient_function(model, variables, training)

    total = [np.zeros(v.shape, np.float64) for v in variables]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        xb = keras.tree.map_structure(lambda a: a[start:stop], x)
        yb = keras.tree.map_structure(lambda a: a[start:stop], y)
        weight = (stop - start) / n
        for acc, g in zip(total, batch_gradients(xb, yb)):
            acc += weight * np.asarray(g, np.float64)
    return {
        key: float(np.sqrt(np.sum(np.square(g)))) for key, g in zip(keys, total)
    }


def _keeping_state(model, batch_gradients):
    """`batch_gradients`, with the model's non-trainable variables put back after each call.

    Batch normalization's moving statistics (updated in training mode) and
    any other state the forward pass moved stay as they were. JAX's
    stateless gradient needs no such care.
    """
    def call(xb, yb):
        before = [norms_lib.to_numpy(v) for v in model.non_trainable_variables]
        grads = batch_gradients(xb, yb)
        for v, value in zip(model.non_trainable_variables, before):
            v.assign(value)
        return grads

    return call


def _gradient_function(model, variables, training):
    """`(x, y) -> [gradient of the model's loss for each of variables]`, as NumPy arrays.

    Each backend's own autograd on the loss Keras' train step computes:
    `tf.GradientTape`, `jax.grad` of the JAX trainer's
    `compute_loss_and_updates` (the unscaled loss, forward-pass losses
    included), `loss.backward()` on PyTorch. Nothing of the model changes.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        @tf.function(reduce_retracing=True)
        def batch_gradients(xb, yb):
            with tf.GradientTape() as tape:
                y_pred = model(xb, training=training)
                loss = internals.compute_loss(model, xb, yb, y_pred, None, training=training)
            grads = tape.gradient(loss, variables)
            return [
                tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                for g, v in zip(grads, variables)
            ]

        return _keeping_state(model, lambda xb, yb: [g.numpy() for g in batch_gradients(xb, yb)])
    if backend == "jax":
        import jax

        trainable = model.trainable_variables
        positions = [next(i for i, t in enumerate(trainable) if t is v) for v in variables]

        def loss_of(values, non_trainable, metrics, xb, yb):
            _, aux = model.compute_loss_and_updates(
                values, non_trainable, metrics, xb, yb, None, training=training,
                optimizer_variables=[v.value for v in model.optimizer.variables])
            return aux[0]  # the unscaled loss

        grad = jax.jit(jax.grad(loss_of))

        def batch_gradients(xb, yb):
            grads = grad([v.value for v in trainable],
                         [v.value for v in model.non_trainable_variables],
                         [v.value for v in model.metrics_variables], xb, yb)
            return [np.asarray(grads[i]) for i in positions]

        return batch_gradients
    if backend == "torch":
        def batch_gradients(xb, yb):
            xb = keras.tree.map_structure(keras.ops.convert_to_tensor, xb)
            yb = keras.tree.map_structure(keras.ops.convert_to_tensor, yb)
            for v in variables:
                v.value.grad = None
            y_pred = internals.forward(model, xb) if training else model(xb, training=False)
            loss = internals.compute_loss(model, xb, yb, y_pred, None, training=training)
            loss.backward()
            grads = [np.zeros(v.shape) if v.value.grad is None
                     else v.value.grad.detach().cpu().numpy() for v in variables]
            for v in variables:
                v.value.grad = None
            return grads

        return _keeping_state(model, batch_gradients)
    raise ValueError(
        "Gradient probes run on the tensorflow, jax and torch backends of Keras. "
        f"Received: keras.backend.backend()={backend!r}")


_MOVING_STATISTICS = ("BatchNormalization",)


def preflight_activations(model, x, samples=64):
    """Activation statistics at initialization, on the first `samples` inputs.

    What `GradNormLogger(probe_data=...)` measures during training (see
    `keras_gradtools.activations`), once, in inference mode. Not taken for
    a model with batch normalization: before training its moving
    statistics are not the batch's, so inference-mode activations would
    not be those of the first training steps.

    Args:
        model: a built `keras.Model`.
        x: inputs (at least one sample).
        samples: how many of them the probe runs on. Defaults to `64`.

    Returns:
        `(stats, None)`, `stats` a dict `{layer_path: layer_stats}` input to
        output; or `(None, why)`, `why` a sentence.
    """
    from keras_gradtools.activations import ActivationProbe

    if any(type(layer).__name__ in _MOVING_STATISTICS
           for layer in internals.sublayers(model, recursive=True)):
        return None, ("the model has batch normalization, whose moving statistics are not "
                      "the batch's before training")
    try:
        probe = ActivationProbe(model, keras.tree.map_structure(lambda a: a[:samples], x))
    except ValueError as error:
        return None, str(error).split(". ")[0]
    return probe(), None


def preflight_check(model, x, y, batch_size=256, include_biases=False, activations=None):
    """Judges a model's gradients at initialization, from one batch.

    Takes the first `batch_size` samples, computes each variable's gradient
    norm in training mode (batch normalization uses batch statistics, as in
    the first training step) and runs the rules of
    `keras_gradtools.diagnose` on that one step: vanishing (relative to the
    output layer, or below the floor), exact zeros, NaN/Inf, and norms over
    the exploding ceiling. A spike against history needs training, so
    `exploding` here only means "over the ceiling already".

    Args:
        model: a compiled `keras.Model`.
        x: inputs (at least one sample).
        y: targets.
        batch_size: samples in the batch. Defaults to `256`.
        include_biases: whether biases are judged too. Defaults to `False`.
        activations: activation statistics at initialization
            (`preflight_activations`), or `None`. With them a `vanishing`
            finding states its cause, and saturated or dead layers that
            explain it are findings too. Defaults to `None`.

    Returns:
        `(norms, report)`: a dict `variable.path -> norm` and a
        `keras_gradtools.diagnose.Report`.
    """
    from keras_gradtools import diagnose

    xb = keras.tree.map_structure(lambda a: a[:batch_size], x)
    yb = keras.tree.map_structure(lambda a: a[:batch_size], y)
    norms = compute_weight_gradient_norms(
        model, xb, yb, batch_size=batch_size, include_biases=include_biases,
        training=True,
    )
    keys = list(norms)
    thresholds = {"vanishing": {"patience": 1}, "dead_layer": {"patience": 1},
                  "exploding": {"warmup": 1}, "saturation": {"patience": 1},
                  "dead_units": {"patience": 1}}
    from keras_gradtools.facts import model_facts

    report = diagnose.diagnose_norms(
        np.array([[norms[k] for k in keys]]), keys, thresholds=thresholds,
        facts=model_facts(model), activations=[(0, activations)] if activations else None,
    )
    return norms, report
