"""Activation statistics per layer, on a fixed probe batch: what the units do.

Gradients say *that* a layer starves; the activations say *why*. Every
`freq` steps an `ActivationProbe` runs the model forward on a fixed batch
(`probe_data`, a few dozen samples the user picks) and reduces each watched
layer's output on the host to:

- `mean`, `std`: of all the layer's output values (Glorot & Bengio 2010,
  Figure 2 follows these per layer over training);
- `saturated`: for bounded activations, the fraction of values in the flat
  tails (sigmoid and hard_sigmoid below 0.02 or above 0.98 of their range,
  tanh and softsign beyond 0.98 in absolute value), `None` otherwise;
- `dead`: for ReLU and ReLU6, the fraction of units (the last axis:
  features, or channels of a convolution) that output 0 for every sample
  and position of the probe batch, `None` otherwise;
- `gain`: the mean local derivative of the activation at the layer's
  values (`a(1-a)` for sigmoid, `1-a^2` for tanh, 1 for linear, ...): the
  factor by which this activation scales the gradient on its way down.
  GELU and SiLU are read at their input: exactly for an `Activation` layer
  of their own, and for one fused into a layer (`Dense(..., "gelu")`) where
  the layer is read as called (below); `None` where only its output is read.

Which layers are watched: every layer that has an `activation` (Dense,
convolutions, ...) or is an activation layer (`Activation`, `ReLU`,
`LeakyReLU`, `ELU`), except the model's output layers and softmax: the
layers of a `Sequential` or Functional model, of the Functional and
Sequential models nested in it (a `keras.applications` base, a keras-hub
backbone), and the layers inside the user's own layers and subclassed
models (a transformer block's dense layers, kept as attributes, private
ones too); or the layers named in `layers`. Only a layer that runs Keras'
own `call` counts by its `activation`: a layer of another library or of the
user's own that stores one may return something else, such as its
normalized residual sum, so its insides are watched instead. An activation
function called inside a custom layer's `call` (not a layer) is not seen.
`outputs_fn(model, x) -> {layer_name: tensor}` chooses the outputs
instead: a function that runs the model's own layers on `x` (the names must
be layers of the model or of a model nested in it).

How the outputs are read, with no change to the train step, on every
backend: where every watched layer sits in a graph, from one
`predict_on_batch` of a model that outputs them (built once, sharing the
weights); else from one forward pass of the model itself,
`model(x, training=False)`, with the watched layers' `call` wrapped on the
instance for that pass only (a layer called twice is read at its first
call). The reduction runs on the host (NumPy). Keras is imported on first
use: reading a run's record (`ActivationRecord`) does not import it.
"""

import contextlib
import functools
import warnings

import numpy as np

_SATURATION = 0.02  # distance from the bound, as a fraction of the range
_BOUNDED = ("sigmoid", "hard_sigmoid", "tanh", "softsign")
_DEAD = ("relu", "relu6")
_FROM_INPUT = ("gelu", "gelu_approximate", "silu", "swish")


def _activation_name(activation):
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def activation_of(layer):
    """`(name, params)` of a layer's activation, or `None` if it has none.

    A layer with an `activation` counts only if it runs Keras' own `call`
    (Keras' layers and subclasses that keep their `call`), whose output is
    the activation's output.

    `name` is the activation's function name (`"sigmoid"`, `"relu"`,
    `"leaky_relu"`, ...); `params` holds what its derivative needs
    (`negative_slope`, `alpha`, `max_value`). An LSTM, GRU or ConvLSTM
    layer is named by its kind (`"lstm"`, ...; see `gated_recurrent`): its
    output is not its activation's, so no gain or saturation is read from it.

    Example:

    >>> import keras
    >>> activation_of(keras.layers.Dense(3, activation="tanh"))
    ('tanh', {})
    >>> activation_of(keras.layers.LeakyReLU(negative_slope=0.1))
    ('leaky_relu', {'negative_slope': 0.1})
    """
    import keras

    kind = type(layer).__name__
    if kind == "ReLU":
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        if slope:
            return "leaky_relu", {"negative_slope": slope}
        max_value = getattr(layer, "max_value", None)
        return ("relu6" if max_value == 6 else "relu"), (
            {"max_value": float(max_value)} if max_value not in (None, 6) else {})
    if kind == "LeakyReLU":
        return "leaky_relu", {"negative_slope": float(layer.negative_slope)}
    if kind == "ELU":
        return "elu", {"alpha": float(getattr(layer, "alpha", 1.0))}
    recurrent = gated_recurrent(layer)
    if recurrent is not None:
        return recurrent, {}
    if isinstance(layer, keras.layers.Layer) and hasattr(layer, "activation") and not isinstance(
            layer, keras.Model) and _keras_call(layer):
        name = _activation_name(layer.activation)
        if name == "leaky_relu":
            return name, {"negative_slope": 0.2}  # keras.activations.leaky_relu's default
        return name, {}
    return None


def gated_recurrent(layer):
    """The kind of a Keras gated recurrent layer (`"lstm"`, `"gru"`, `"convlstm2d"`, ...),
    or `None` for any other layer.

    Their output mixes the activation with gates (LSTM: `o * tanh(c)`; GRU:
    `z * h + (1 - z) * tanh(...)`), so it is not their `activation`'s
    output, and its derivative cannot be read from it. `SimpleRNN`'s output
    is its activation's, and it is not one of them.

    Example:

    >>> import keras
    >>> gated_recurrent(keras.layers.LSTM(3)), gated_recurrent(keras.layers.SimpleRNN(3))
    ('lstm', None)
    """
    import keras

    if not isinstance(layer, keras.layers.RNN) or isinstance(layer, keras.layers.SimpleRNN):
        return None
    if not hasattr(layer, "activation"):
        return None  # `keras.layers.RNN(cell)`: the cell's business
    for cls in type(layer).__mro__:  # the Keras class a user's subclass extends
        if (cls.__module__ or "").startswith("keras"):
            return cls.__name__.lower()
    return None


def _keras_call(layer):
    """Whether the layer runs a `call` of Keras' own (Dense, Conv2D, ... or a subclass
    that keeps it), whose output is its `activation`'s output. A layer of another
    library or of the user that stores an `activation` (a transformer block's
    feed-forward activation, say) may return something else: its residual sum,
    normalized."""
    module = getattr(getattr(type(layer), "call", None), "__module__", None) or ""
    return module == "keras" or module.startswith("keras.")


def _gain(values, name, params, inputs=None):
    """The mean local derivative of activation `name` at output `values` (or `inputs`)."""
    a = values
    if inputs is not None and name in _FROM_INPUT:
        z = inputs
        if name == "gelu":  # exact GELU: Phi(z) + z phi(z)
            from math import sqrt, pi
            erf = np.vectorize(__import__("math").erf, otypes=[np.float64])
            cdf = 0.5 * (1.0 + erf(z / sqrt(2.0)))
            return float(np.mean(cdf + z * np.exp(-0.5 * z * z) / sqrt(2.0 * pi)))
        if name == "gelu_approximate":  # 0.5 z (1 + tanh(u)), u = c (z + 0.044715 z^3)
            c = np.sqrt(2.0 / np.pi)
            t = np.tanh(c * (z + 0.044715 * z ** 3))
            return float(np.mean(0.5 * (1.0 + t)
                                 + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)))
        s = 1.0 / (1.0 + np.exp(-z))
        return float(np.mean(s * (1.0 + z * (1.0 - s))))
    if name == "sigmoid":
        return float(np.mean(a * (1.0 - a)))
    if name == "hard_sigmoid":
        return float(np.mean(((a > 0) & (a < 1)) / 6.0))
    if name == "tanh":
        return float(np.mean(1.0 - a * a))
    if name == "softsign":
        return float(np.mean((1.0 - np.abs(a)) ** 2))
    if name == "relu":
        top = params.get("max_value")
        return float(np.mean((a > 0) if top is None else (a > 0) & (a < top)))
    if name == "relu6":
        return float(np.mean((a > 0) & (a < 6)))
    if name == "leaky_relu":
        return float(np.mean(np.where(a > 0, 1.0, params.get("negative_slope", 0.2))))
    if name == "elu":
        return float(np.mean(np.where(a > 0, 1.0, a + params.get("alpha", 1.0))))
    if name == "selu":
        scale, alpha = 1.0507009873554805, 1.6732632423543772
        return float(np.mean(np.where(a > 0, scale, a + scale * alpha)))
    if name == "softplus":
        return float(np.mean(1.0 - np.exp(-a)))
    if name == "exponential":
        return float(np.mean(a))
    if name == "linear":
        return 1.0
    return None


def layer_stats(values, name, params=None, inputs=None):
    """Statistics of one layer's output on the probe batch.

    Args:
        values: the layer's output, `(batch, ..., units)`.
        name: its activation's name (see `activation_of`).
        params: the activation's parameters. Defaults to `None`.
        inputs: the activation's input, when read (an activation layer of
            its own), or `None`. Defaults to `None`.

    Returns:
        A dict with `activation`, `mean`, `std`, `saturated`, `dead`, `gain`
        (see the module docstring; `None` where it does not apply).

    Example:

    >>> stats = layer_stats(np.array([[0.5, 0.99], [0.5, 0.01]]), "sigmoid")
    >>> stats["mean"], stats["saturated"], round(stats["gain"], 5)  # (.25+.0099)*2/4
    (0.5, 0.5, 0.12995)
    """
    params = params or {}
    a = np.asarray(values, np.float64)
    z = None if inputs is None else np.asarray(inputs, np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        return {"activation": name, "mean": float("nan"), "std": float("nan"),
                "saturated": None, "dead": None, "gain": None}
    saturated = dead = None
    if name in ("sigmoid", "hard_sigmoid"):
        saturated = float(np.mean((a < _SATURATION) | (a > 1.0 - _SATURATION)))
    elif name in ("tanh", "softsign"):
        saturated = float(np.mean(np.abs(a) > 1.0 - _SATURATION))
    if name in _DEAD and a.ndim >= 2:
        units = a.reshape(-1, a.shape[-1])
        dead = float(np.mean(np.all(units <= 0.0, axis=0)))
    return {"activation": name, "mean": float(a.mean()), "std": float(a.std()),
            "saturated": saturated, "dead": dead, "gain": _gain(a, name, params, z)}


def _layer_path(layer):
    """The layer's path as in the recorded keys; a weightless layer's name."""
    from keras_gradtools.facts import layer_path

    return layer_path(layer) or layer.name


class ActivationProbe:
    """Runs a model on a fixed probe batch and reduces each watched layer's output.

    Args:
        model: a built Keras model.
        data: the probe batch: inputs as the model takes them (an array, or
            a list/dict of arrays), a few dozen samples.
        layers: names of the layers to watch, or `None` for every hidden
            layer with an activation (see the module docstring). Defaults to
            `None`.
        outputs_fn: `fn(model, x) -> {layer_name: output}` that returns
            the outputs to watch, named as layers of the model or of a
            model nested in it, or `None` for the layers the probe finds
            (see the module docstring). Defaults to `None`.

    Attributes:
        names: the watched layers' paths (as in the recorded keys, e.g.
            `"deep/dense_3"`), input to output.
        reads: how the outputs are read: `"graph"` (one `predict_on_batch`
            of a model of them), `"calls"` (a forward pass of the model with
            the watched layers' calls wrapped) or `"outputs_fn"`.

    Raises:
        ValueError: for probe data the model does not take, an unknown
            layer name, a layer without an activation, or no layer to watch.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "sigmoid", name="h"),
    ...                           keras.layers.Dense(2, "softmax")], name="net")
    >>> probe = ActivationProbe(model, np.zeros((8, 3)))
    >>> stats = probe()
    >>> list(stats), stats["net/h"]["mean"]
    (['net/h'], 0.5)
    """

    def __init__(self, model, data, layers=None, outputs_fn=None):
        import keras

        self.model = model
        self.data = data
        self.outputs_fn = outputs_fn
        self.last_outputs = {}
        self.reads = "outputs_fn" if outputs_fn is not None else "graph"
        if outputs_fn is not None:
            if not callable(outputs_fn):
                raise ValueError(
                    "`outputs_fn` must be a function `fn(model, x) -> {layer_name: output}`. "
                    f"Received: outputs_fn={outputs_fn!r}")
            self._watched = None  # known at the first call
            self.names = []
            return
        if not model.built:
            # A Sequential without an `Input` or a subclassed model never called
            # (which fit() on TensorFlow builds only in its traced step): built
            # here, on the probe batch.
            _run(model, data, "build")
        graph = _is_graph(model)
        if graph:
            _check_fits(model, data)
        self._captured = None
        if not graph or _hidden_from_graph(model):
            # Layers inside the user's own layers or a subclassed model: read
            # as they are called, once here to know them.
            self._captured = _Captured(model, data, layers)
            self.names, self.reads = self._captured.names, "calls"
            return
        inputs = model.inputs
        self._watched, outputs = self._choose(model, layers)
        self._probe = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs,
                                  name=f"{model.name}_activations")
        self.names = _unique([path for _layer, _name, _params, path in self._watched])
        self._watched = [(layer, name, params) for layer, name, params, _ in self._watched]

    @staticmethod
    def _choose(model, layers):
        """The watched layers, `(layer, activation, params, path)`, and the tensors to read.

        The tensors are in `model`'s graph: each watched layer's output, then,
        for an `Activation` layer of GELU or SiLU, its input. A Functional or
        Sequential model nested in `model` (a `keras.applications` base, a
        keras-hub backbone) is searched too: its layers are read through a
        model of its own, called on the tensor that feeds it in `model`.
        """
        pick, found = _picker(layers)
        watched = _watch(model, pick, {id(t) for t in (model.outputs or [])}, prefix="")
        watched = _settle(model, layers, found, watched,
                          "in the model or in a Functional or Sequential model nested in it")
        return ([item[:4] for item in watched],
                [tensor for item in watched for tensor in item[4]])

    def __call__(self):
        """The statistics now: `{layer_path: stats}` (see `layer_stats`), input to output."""
        import keras

        from keras_gradtools import norms as norms_lib

        if self.outputs_fn is not None:
            return self._call_fn()
        if self._captured is not None:
            stats, self.last_outputs = self._captured(self.model, self.data)
            return stats
        if keras.backend.backend() == "torch":
            # Keras' torch `predict_on_batch` copies through `np.array`, which NumPy 2
            # answers with a DeprecationWarning on every probe; the same inference call:
            import torch

            with torch.no_grad():
                outputs = self._probe(self.data, training=False)
        else:
            outputs = self._probe.predict_on_batch(self.data)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        outputs = [norms_lib.to_numpy(output) for output in outputs]
        stats, self.last_outputs = {}, {}
        for (layer, name, params), path in zip(self._watched, self.names):
            values = np.asarray(outputs.pop(0))
            self.last_outputs[path] = values
            z = None
            if name in _FROM_INPUT and isinstance(layer, keras.layers.Activation):
                z = outputs.pop(0)
            stats[path] = layer_stats(values, name, params, z)
        return stats

    def _call_fn(self):
        from keras_gradtools import norms as norms_lib

        result = self.outputs_fn(self.model, self.data)
        if not isinstance(result, dict):
            raise ValueError(
                "`outputs_fn` must return a dict `{layer_name: output}`. "
                f"Received: {type(result).__name__}")
        stats, self.last_outputs = {}, {}
        for name, value in result.items():
            layer = _find_layer(self.model, name)
            if layer is None:
                raise ValueError(
                    f"`outputs_fn` returned {name!r}, which is not a layer of model "
                    f"{self.model.name!r} or of a model nested in it; its layers are "
                    f"{', '.join(layer.name for layer in self.model.layers)}") from None
            found = activation_of(layer) or ("linear", {})
            value = norms_lib.to_numpy(value)
            self.last_outputs[_layer_path(layer)] = value
            stats[_layer_path(layer)] = layer_stats(value, *found)
        self.names = list(stats)
        return stats


def _picker(layers):
    """`(pick, found)`: `pick(layer, is_output) -> (activation, params)` for a layer to
    watch, else `None`; `found` collects the names picked from `layers`."""
    found = {}
    if layers is None:
        def pick(layer, is_output):
            activation = activation_of(layer)
            if activation is None or activation[0] == "softmax" or is_output:
                return None
            return activation
        return pick, found
    wanted = list(layers)

    def pick(layer, _is_output):
        if layer.name not in wanted or layer.name in found:
            return None
        activation = activation_of(layer)
        if activation is None:
            raise ValueError(
                f"Layer {layer.name!r} has no activation to watch. Received: "
                f"layers={layers!r}")
        found[layer.name] = True
        return activation
    return pick, found


def _settle(model, layers, found, watched, where):
    """`watched` (items starting with the layer) in the order of `layers` when given;
    refuses a name not found, and nothing to watch."""
    if layers is not None:
        missing = [name for name in layers if name not in found]
        if missing:
            raise ValueError(
                f"No layer named {missing[0]!r} in model {model.name!r}; its layers are "
                f"{', '.join(layer.name for layer in model.layers)}. Received: "
                f"layers={layers!r}")
        order = {name: i for i, name in enumerate(layers)}
        watched = sorted(watched, key=lambda item: order[item[0].name])
    if not watched:
        raise ValueError(
            f"Model {model.name!r} has no hidden layer with an activation to watch (a "
            f"Keras layer with an `activation`, or an activation layer, {where}). Name "
            "the layers to watch, pass `activation_outputs=fn` (`fn(model, x) -> "
            "{layer_name: output}`), or leave `probe_data` unset. Received: "
            f"layers={layers!r}")
    return watched


def _run(model, data, why):
    """`model(data, training=False)`, gradient-free; a failure is a `ValueError` saying why."""
    import keras

    try:
        if keras.backend.backend() == "torch":
            import torch

            with torch.no_grad():
                return model(data, training=False)
        return model(data, training=False)
    except Exception as error:
        shapes = [tuple(getattr(v, "shape", ())) for v in keras.tree.flatten(data)]
        raise ValueError(
            f"The activation probe could not {why} model {model.name!r} on `probe_data` "
            f"({type(error).__name__}: {_gist(error)}). Received: probe_data "
            f"of shape{'s' if len(shapes) > 1 else ''} "
            f"{', '.join(map(str, shapes))}") from error


def _gist(error):
    """The line of a Keras error that says what went wrong, without its colour codes or
    the "Exception encountered when calling" and "Arguments received" framing."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()]
    lines = [line for line in lines if line]
    if lines and lines[0].startswith("Exception encountered when calling"):
        lines = lines[1:]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _opaque(layer):
    """Whether the layer runs a `call` that no graph exposes: the user's own layer,
    another library's, or a subclassed model."""
    import keras

    return (isinstance(layer, keras.Model) and not _is_graph(layer)) or (
        not isinstance(layer, keras.Model) and not _keras_call(layer))


def _has_activation_inside(layer):
    """Whether a layer with an activation sits inside `layer`, at any depth."""
    from keras_gradtools import internals

    return any(activation_of(child) is not None or (
        _opaque(child) or _is_graph(child)) and _has_activation_inside(child)
        for child in internals.sublayers(layer))


def _hidden_from_graph(model):
    """Whether a layer with an activation sits inside a layer of `model` (or of a graph
    model nested in it) whose insides the graph does not expose."""
    from keras_gradtools import internals

    for layer in internals.sublayers(model):
        if _is_graph(layer):
            if _hidden_from_graph(layer):
                return True
        elif _opaque(layer) and _has_activation_inside(layer):
            return True
    return False


class _Captured:
    """Reads watched layers' outputs as the model calls them, in a forward pass of its own.

    For models whose layers' outputs no graph exposes (a subclassed model,
    the user's own layers, another library's blocks): the candidate layers
    are found through the layers every layer tracks (also those kept as
    private attributes), their `call` is wrapped on the instance while the
    model runs forward on the probe batch (`internals.patch_call`), and each
    one's output of its first call is kept. Watched, input to output (the
    order of the calls): what `ActivationProbe` watches in a graph; a layer
    whose output the model returns is not (unless named in `layers`).
    """

    def __init__(self, model, data, layers):
        pick, found = _picker(layers)
        candidates = []

        def walk(layer, prefix, seen):
            from keras_gradtools import internals

            for child in internals.sublayers(layer):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                activation = pick(child, False)
                if activation is not None:
                    candidates.append((child, *activation, prefix))
                elif _opaque(child) or _is_graph(child):
                    walk(child, f"{prefix}{child.name}/", seen)

        walk(model, "", set())
        self._candidates = {id(item[0]): item for item in candidates}
        outputs, calls, _inputs = self._forward(model, data)
        ends = [output for output in outputs if output is not None]
        watched = []
        for key, value in calls.items():
            layer, name, params, prefix = self._candidates[key]
            if layers is None and any(value is end for end in ends):
                continue  # the model's output
            watched.append((layer, name, params, _layer_path(layer) if layer.weights
                            else prefix + _layer_path(layer)))
        watched = _settle(model, layers, found, watched, "called when the model runs")
        self.names = _unique([item[3] for item in watched])
        self._watched = [(id(layer), name, params) for layer, name, params, _ in watched]

    def _forward(self, model, data):
        """`(model outputs, {id(layer): output}, {id(layer): activation input})` of one
        forward pass, in call order; the activation's input only for GELU and SiLU (an
        `Activation` layer's own input, or the input of one fused into its layer)."""
        import keras

        from keras_gradtools import internals

        calls, inputs = {}, {}

        def keep_call(key, activation_layer):
            def wrap(original):
                @functools.wraps(original)
                def call(*args, **kwargs):
                    output = original(*args, **kwargs)
                    if key not in calls and not isinstance(output, (list, tuple, dict)):
                        calls[key] = output
                        if activation_layer:
                            inputs[key] = args[0] if args else next(iter(kwargs.values()))
                    return output
                return call
            return wrap

        def keep_input(key):
            def wrap(original):
                @functools.wraps(original)
                def activation(z, *args, **kwargs):
                    inputs.setdefault(key, z)
                    return original(z, *args, **kwargs)
                return activation
            return wrap

        with contextlib.ExitStack() as stack:
            for key, (layer, name, *_rest) in self._candidates.items():
                own = isinstance(layer, keras.layers.Activation)
                stack.enter_context(internals.patch_call(
                    layer, keep_call(key, own and name in _FROM_INPUT)))
                if name in _FROM_INPUT and not own:
                    # Fused into the layer (`Dense(..., activation="gelu")`): its
                    # derivative needs its input, read as the layer applies it.
                    stack.enter_context(internals.patch_activation(layer, keep_input(key)))
            outputs = _run(model, data, "run")
        return keras.tree.flatten(outputs), calls, inputs

    def __call__(self, model, data):
        """`({path: stats}, {path: output})` now."""
        from keras_gradtools import norms as norms_lib

        _outputs, calls, inputs = self._forward(model, data)
        stats, values = {}, {}
        for (key, name, params), path in zip(self._watched, self.names):
            if key not in calls:
                continue  # not called this time
            a = np.asarray(norms_lib.to_numpy(calls[key]))
            z = norms_lib.to_numpy(inputs[key]) if key in inputs else None
            values[path] = a
            stats[path] = layer_stats(a, name, params, z)
        return stats, values


def _find_layer(model, name):
    """The layer named `name` in `model`, or in a model nested in it (depth first), or `None`."""
    import keras

    for layer in getattr(model, "layers", None) or []:
        if layer.name == name:
            return layer
    for layer in getattr(model, "layers", None) or []:
        if isinstance(layer, keras.Model):
            found = _find_layer(layer, name)
            if found is not None:
                return found
    return None


def _check_fits(model, data):
    """Refuses probe data whose samples do not have the shape of the model's inputs."""
    from keras_gradtools.facts import input_fits, input_specs

    specs = input_specs(model)
    if isinstance(data, dict):
        pairs = [(spec, data.get(spec[0])) for spec in specs]
    elif isinstance(data, (list, tuple)):
        pairs = list(zip(specs, data)) if len(data) == len(specs) else []
    else:
        pairs = [(specs[0], data)] if len(specs) == 1 else []
    for index, ((name, wanted), values) in enumerate(pairs):
        shape = getattr(values, "shape", None)
        if shape is None:
            continue
        got = tuple(shape[1:])
        if not input_fits(wanted, got):
            which = "" if len(specs) == 1 else f" {index} ({name!r})"
            raise ValueError(
                f"`probe_data` does not fit model {model.name!r}: its input{which} takes "
                f"samples of shape {wanted}, the probe data's are {got}. Received: "
                f"probe_data of shape {tuple(shape)}")


def _watch(model, pick, output_ids, prefix):
    """`(layer, activation, params, path, tensors)` for the layers `pick` accepts, in order.

    `pick(layer, is_output) -> (activation, params) or None`. `tensors` are
    in `model`'s graph (the layer's output, then an `Activation` layer's
    input where read); nested graph models are searched in their place,
    `prefix` naming the weightless layers found inside them.
    """
    import keras

    from keras_gradtools import internals

    watched = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            call = internals.first_call(layer) if _is_graph(layer) else None
            if call is None:
                continue
            call_inputs, call_outputs = call
            inner_output_ids = ({id(t) for t in layer.outputs}
                                if any(id(t) in output_ids for t in call_outputs) else set())
            inner = _watch(layer, pick, inner_output_ids, f"{prefix}{layer.name}/")
            if not inner:
                continue
            tensors = [tensor for item in inner for tensor in item[4]]
            try:
                if len(layer.inputs) == 1:
                    mapped = keras.Model(layer.inputs[0], tensors)(call_inputs[0])
                else:
                    mapped = keras.Model(list(layer.inputs), tensors)(list(call_inputs))
            except Exception as error:  # a call this reading does not reproduce
                warnings.warn(f"The activation probe does not watch the layers of "
                              f"{layer.name!r}, a model nested in {model.name!r}: they could "
                              f"not be read from its call there ({type(error).__name__}: "
                              f"{error})", stacklevel=2)
                continue
            mapped = list(mapped) if isinstance(mapped, (list, tuple)) else [mapped]
            for layer_, name, params, path, own in inner:
                watched.append((layer_, name, params, path, mapped[:len(own)]))
                mapped = mapped[len(own):]
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):  # never called in this graph
            continue
        if isinstance(output, (list, tuple)):
            continue
        found = pick(layer, id(output) in output_ids)
        if found is None:
            continue
        name, params = found
        tensors = [output]
        if name in _FROM_INPUT and isinstance(layer, keras.layers.Activation):
            tensors.append(layer.input)
        path = _layer_path(layer)
        if not layer.weights:
            path = prefix + path
        watched.append((layer, name, params, path, tensors))
    return watched


def _unique(paths):
    """`paths` with a repeated one suffixed `#2`, `#3`, ... (equal layer names in two
    nested models)."""
    seen, unique = {}, []
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        unique.append(path if seen[path] == 1 else f"{path}#{seen[path]}")
    return unique


def _is_graph(model):
    """Whether the model is Sequential or Functional (its layers' outputs are reachable)."""
    import keras

    return isinstance(model, keras.Sequential) or type(model).__name__ == "Functional" or (
        isinstance(model, keras.Model) and isinstance(
            getattr(model, "outputs", None), (list, tuple)) and bool(model.outputs)
        and isinstance(getattr(model, "inputs", None), (list, tuple)) and bool(model.inputs))


class ActivationRecord:
    """Probe statistics over training: one entry per probe step.

    Attributes:
        steps: the 0-based training steps at which the probe ran (before
            that step's update).
        stats: one `{layer_path: stats}` dict per step.
    """

    def __init__(self, steps=None, stats=None):
        self.steps = list(steps or [])
        self.stats = list(stats or [])

    def append(self, step, stats):
        self.steps.append(int(step))
        self.stats.append(stats)

    @property
    def layers(self):
        """The layers seen, in first-seen order."""
        names = []
        for entry in self.stats:
            names.extend(n for n in entry if n not in names)
        return names

    def series(self, field):
        """`{layer: 1-D array over the probe steps}` of one statistic (NaN where absent)."""
        out = {}
        for layer in self.layers:
            out[layer] = np.array([
                np.nan if entry.get(layer, {}).get(field) is None
                else float(entry[layer][field]) for entry in self.stats], float)
        return out

    def latest(self, step=None):
        """The last statistics at or before `step` (all of them for `None`), or `None`."""
        for s, entry in zip(reversed(self.steps), reversed(self.stats)):
            if step is None or s <= step:
                return entry
        return None

    def to_dict(self):
        from keras_gradtools import runs

        return {"steps": self.steps,
                "stats": [{layer: {k: (runs.json_float(v) if isinstance(v, float) else v)
                                   for k, v in s.items()} for layer, s in entry.items()}
                          for entry in self.stats]}

    @classmethod
    def from_dict(cls, data):
        if not data:
            return cls()
        stats = [{layer: {k: (float(v) if isinstance(v, str) and k != "activation" else v)
                          for k, v in s.items()} for layer, s in entry.items()}
                 for entry in data.get("stats", [])]
        return cls(data.get("steps", []), stats)
