"""What a model is made of, read with public Keras API, for fixes that fit it."""

import keras

from keras_gradtools import norms as norms_lib
from keras_gradtools.activations import gated_recurrent
from keras_gradtools.diagnose import ModelFacts

_NORMALIZATION = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
                  "UnitNormalization", "RMSNormalization")


def input_specs(model):
    """`[(name, shape without the batch axis)]` of a model's inputs."""
    return [(getattr(t, "name", f"input_{i}"), tuple(t.shape[1:]))
            for i, t in enumerate(model.inputs)]


def input_fits(shape, data_shape):
    """Whether samples of `data_shape` fit an input of `shape` (`None`: any size there)."""
    return len(shape) == len(data_shape) and all(
        s is None or s == d for s, d in zip(shape, data_shape))


def _walk(layer, seen):
    """The layer and every layer inside it that Keras lists (`layers`) or it holds."""
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    if gated_recurrent(layer) is not None:
        return  # its cell is part of it, with the same weights
    children = list(getattr(layer, "layers", None) or [])
    for name, value in vars(layer).items():  # sublayers kept as attributes (custom blocks)
        if name.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            children.append(value)
        elif isinstance(value, (list, tuple)):
            children.extend(v for v in value if isinstance(v, keras.layers.Layer))
    for child in children:
        yield from _walk(child, seen)


def _activation_name(activation):
    if activation is None:
        return None
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def layer_path(layer):
    """A layer's path as in the recorded keys (its first weight's, without the weight's name).

    `None` for a layer without weights.

    Example:

    >>> dense = keras.layers.Dense(2, name="d")
    >>> dense.build((None, 3))
    >>> layer_path(dense), layer_path(keras.layers.ReLU())
    ('d', None)
    """
    for variable in layer.weights:
        return norms_lib.variable_key(variable).rsplit("/", 1)[0]
    return None


def model_facts(model):
    """Reads a model's `ModelFacts`: activations, normalization, shortcuts, optimizer.

    Layers are found through `model.layers` and the sublayers a layer
    keeps as public attributes (custom blocks). The learning rate is the
    current one (a schedule's value now). A layer's activation is its own
    `activation`, or that of an `Activation` layer (or a ReLU-family layer)
    that follows it in a `Sequential`; an LSTM, GRU or ConvLSTM layer's is
    its kind (`"lstm"`, ...), its gates being more than its activation.

    Args:
        model: a Keras model (built: layers without weights are not listed).

    Returns:
        A `keras_gradtools.diagnose.ModelFacts`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "sigmoid"),
    ...                           keras.layers.Dense(2, "softmax", name="out")], name="m")
    >>> facts = model_facts(model)
    >>> list(facts.activations.values()), facts.normalization, facts.residual
    (['sigmoid', 'softmax'], [], False)
    """
    activations, normalization, residual = {}, [], False
    last = None
    for layer in _walk(model, set()):
        kind = type(layer).__name__
        if kind in _NORMALIZATION:
            normalization.append(layer_path(layer) or layer.name)
        if isinstance(layer, keras.layers.Add) or "residual" in kind.lower() or (
                "resnet" in kind.lower() and "block" in kind.lower()):
            residual = True
        path = layer_path(layer) if layer is not model else None
        if path is not None and hasattr(layer, "activation"):
            activations[path] = gated_recurrent(layer) or _activation_name(layer.activation)
            last = path
        elif last is not None and isinstance(layer, keras.layers.Activation):
            activations[last] = _activation_name(layer.activation)
        elif last is not None and kind in ("ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax"):
            activations[last] = kind.lower()
    optimizer = getattr(model, "optimizer", None)
    name = learning_rate = None
    if optimizer is not None:
        from keras_gradtools.clipping import layout

        base = layout(optimizer).base
        name = f"keras.optimizers.{type(base).__name__}"
        try:  # the current value, also under a schedule
            learning_rate = float(f"{float(norms_lib.to_numpy(base.learning_rate)):.6g}")
        except (TypeError, ValueError):
            learning_rate = None
    return ModelFacts(activations=activations, normalization=normalization, residual=residual,
                      optimizer=name, learning_rate=learning_rate)
