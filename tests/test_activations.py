"""Activation statistics, update-to-weight ratios and the findings built on them.

Expected numbers come from NumPy forward passes with the model's own weights, from
hand-computed derivatives, and from the plain-SGD identity ||dw|| = lr * ||g||.
"""

import json
import warnings

import numpy as np
import pytest
import keras
from click.testing import CliRunner

from keras_gradtools import GradientMonitor, GradNormLogger
from keras_gradtools.activations import ActivationProbe, layer_stats
from keras_gradtools.cli import main
from keras_gradtools.diagnose import (dead_units_rule, diagnose_norms, saturation_rule,
                                      update_ratio_rule, vanishing_cause)
from keras_gradtools.runs import load_run


def _data(n=128, features=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype("float32"), rng.integers(0, 3, n)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# --- the statistics ------------------------------------------------------------


@pytest.mark.parametrize("name, values, gain", [
    ("sigmoid", [0.5, 0.9], (0.25 + 0.09) / 2),
    ("tanh", [0.0, 0.6, -0.8], (1 + 0.64 + 0.36) / 3),
    ("relu", [0.0, 2.0, 3.0, 0.0], 0.5),
    ("relu6", [0.0, 6.0, 3.0, 1.0], 0.5),
    ("elu", [-0.5, 2.0], (0.5 + 1.0) / 2),
    ("softplus", [np.log(2.0), np.log(4.0)], (0.5 + 0.75) / 2),
    ("linear", [-3.0, 5.0], 1.0),
])
def test_gain_is_the_mean_local_derivative(name, values, gain):
    stats = layer_stats(np.array([values]), name)
    assert stats["gain"] == pytest.approx(gain, rel=1e-12)
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values))


def test_gelu_gain_is_read_at_the_input_of_an_activation_layer():
    z = np.array([[-1.0, 0.0, 2.0]])
    x = keras.ops.convert_to_tensor(z.astype("float32"))
    # The derivative by finite differences of keras' own gelu.
    eps = 1e-3
    slope = (keras.ops.convert_to_numpy(keras.activations.gelu(x + eps))
             - keras.ops.convert_to_numpy(keras.activations.gelu(x - eps))) / (2 * eps)
    stats = layer_stats(keras.ops.convert_to_numpy(keras.activations.gelu(x)), "gelu",
                        inputs=z)
    assert stats["gain"] == pytest.approx(float(np.mean(slope)), abs=1e-4)
    assert layer_stats(z, "gelu")["gain"] is None  # not from the output alone


def test_saturated_and_dead_fractions():
    sig = layer_stats(np.array([[0.01, 0.5], [0.99, 0.97]]), "sigmoid")
    assert sig["saturated"] == 0.5 and sig["dead"] is None
    tanh = layer_stats(np.array([[-0.99, 0.1, 0.985, 0.2]]), "tanh")
    assert tanh["saturated"] == 0.5
    # Units are the last axis; a unit is dead when 0 for every sample and position.
    relu = np.zeros((2, 3, 4))
    relu[1, 2, 0] = 1.0  # unit 0 alive at one position of one sample
    relu[0, 0, 3] = 0.5
    stats = layer_stats(relu, "relu")
    assert stats["dead"] == 0.5 and stats["saturated"] is None


def _sigmoid_relu_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(5, activation="sigmoid", name="sig"),
        keras.layers.Dense(4, activation="relu", name="rel",
                           bias_initializer=keras.initializers.Constant(-0.3)),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ], name="net")


def test_probe_equals_a_numpy_forward_pass():
    x, _ = _data(32)
    model = _sigmoid_relu_model()
    (w1, b1), (w2, b2) = model.get_layer("sig").get_weights(), model.get_layer("rel").get_weights()
    a1 = _sigmoid(x @ w1 + b1)
    a2 = np.maximum(a1 @ w2 + b2, 0.0)
    probe = ActivationProbe(model, x)
    stats = probe()
    assert probe.names == ["net/sig", "net/rel"]  # the softmax output is not watched
    assert probe.reads == "graph"
    assert stats["net/sig"]["mean"] == pytest.approx(a1.mean(), rel=1e-5)
    assert stats["net/sig"]["std"] == pytest.approx(a1.std(), rel=1e-4)
    assert stats["net/sig"]["gain"] == pytest.approx(np.mean(a1 * (1 - a1)), rel=1e-5)
    assert stats["net/rel"]["gain"] == pytest.approx(np.mean(a2 > 0), abs=1e-9)
    assert stats["net/rel"]["dead"] == pytest.approx(np.mean((a2 <= 0).all(axis=0)))
    assert probe(), "a second call works"


def test_probe_refuses_what_it_cannot_watch():
    x, _ = _data(8)
    model = _sigmoid_relu_model()
    with pytest.raises(ValueError, match="No layer named 'nope'"):
        ActivationProbe(model, x, layers=["nope"])
    with pytest.raises(ValueError, match=r"does not fit model .*takes samples of shape \(6,\), "
                                         r"the probe data's are \(5,\)"):
        ActivationProbe(model, x[:, :5])
    two = keras.Input((3,), name="a"), keras.Input((2, 2), name="b")
    joined = keras.layers.Concatenate()([two[0], keras.layers.Flatten()(two[1])])
    hidden = keras.layers.Dense(4, activation="tanh")(joined)
    multi = keras.Model(two, keras.layers.Dense(2)(hidden))
    with pytest.raises(ValueError, match=r"input 1 \('b'\) takes samples of shape \(2, 2\)"):
        ActivationProbe(multi, [np.zeros((4, 3)), np.zeros((4, 2, 3))])
    with pytest.raises(ValueError, match=r"input 1 \('b'\)"):
        ActivationProbe(multi, {"a": np.zeros((4, 3)), "b": np.zeros((4, 4))})
    assert ActivationProbe(multi, {"a": np.zeros((4, 3)), "b": np.zeros((4, 2, 2))})()

    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.hidden = keras.layers.Dense(4, activation="tanh", name="hidden")
            self.out = keras.layers.Dense(3, name="out")

        def call(self, x):
            return self.out(self.hidden(x))

    sub = Sub()
    sub(x)
    # Probe data the model cannot run: refused when the probe is made, with the shape.
    with pytest.raises(ValueError, match=r"could not run model 'sub' on `probe_data` .*"
                                         r"Received: probe_data of shape \(8, 5\)"):
        ActivationProbe(sub, x[:, :5])
    # `outputs_fn` still chooses what is watched.
    probe = ActivationProbe(sub, x, outputs_fn=lambda m, data: {"hidden": m.hidden(data)})
    stats = probe()
    a = np.tanh(x @ sub.hidden.get_weights()[0] + sub.hidden.get_weights()[1])
    assert stats["sub/hidden"]["gain"] == pytest.approx(np.mean(1 - a * a), rel=1e-5)

    class Linear(keras.Model):
        def __init__(self):
            super().__init__(name="lin")
            self.out = keras.layers.Dense(3, name="out")

        def call(self, x):
            return self.out(x)

    with pytest.raises(ValueError, match="'lin' has no hidden layer with an activation"):
        ActivationProbe(Linear(), x)


class _Block(keras.layers.Layer):
    """A residual MLP block of the user's own: sublayers kept as private attributes
    (as keras-hub's blocks keep theirs), one of them an `Activation` layer."""

    def __init__(self, units, activation="gelu", **kwargs):
        super().__init__(**kwargs)
        self._up = keras.layers.Dense(2 * units, activation="relu", name="up")
        self._down = keras.layers.Dense(units, name="down")
        self._act = keras.layers.Activation(activation, name="act")

    def call(self, x):
        return self._act(x + self._down(self._up(x)))


class _Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh", name="hidden")
        self.blocks = [_Block(4, name="block_0"), _Block(4, activation="sigmoid",
                                                         name="block_1")]
        self.out = keras.layers.Dense(3, name="out")

    def call(self, x):
        h = self.hidden(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _block_forward(block, h):
    """NumPy: the block's up (ReLU), down (linear), and its activation's input and output."""
    (wu, bu), (wd, bd) = block._up.get_weights(), block._down.get_weights()
    up = np.maximum(h @ wu + bu, 0.0)
    down = up @ wd + bd
    z = h + down
    return up, down, z


def test_probe_reads_the_layers_inside_subclassed_models_and_custom_layers():
    """No graph exposes these outputs: the probe reads each layer's output as the model
    calls it (input to output, the model's output layer excluded), also the sublayers a
    custom layer keeps as private attributes; the model is left as it was."""
    x, _ = _data(16)
    keras.utils.set_random_seed(0)
    net = _Net(name="net")
    before = keras.ops.convert_to_numpy(net(x))
    probe = ActivationProbe(net, x)
    stats = probe()
    assert probe.reads == "calls"
    path = lambda layer: layer.kernel.path.rsplit("/", 1)[0]  # noqa: E731
    b0, b1 = net.blocks
    assert probe.names == [path(net.hidden), path(b0._up), path(b0._down), "block_0/act",
                           path(b1._up), path(b1._down), "block_1/act"], probe.names
    w, b = net.hidden.get_weights()
    h = np.tanh(x.astype(np.float64) @ w + b)
    assert stats[path(net.hidden)]["gain"] == pytest.approx(np.mean(1 - h * h), rel=1e-5)
    up, down, z = _block_forward(b0, h)
    assert stats[path(b0._up)]["gain"] == pytest.approx(np.mean(up > 0), abs=1e-9)
    assert stats[path(b0._up)]["dead"] == pytest.approx(np.mean((up <= 0).all(axis=0)))
    assert stats[path(b0._down)]["mean"] == pytest.approx(down.mean(), rel=1e-5)
    assert stats[path(b0._down)]["gain"] == 1.0
    a = _gelu(z)
    assert stats["block_0/act"]["mean"] == pytest.approx(a.mean(), rel=1e-5)
    # GELU's gain at the Activation layer's input: Phi(z) + z phi(z).
    slope = (_gelu(z + 1e-4) - _gelu(z - 1e-4)) / 2e-4
    assert stats["block_0/act"]["gain"] == pytest.approx(slope.mean(), rel=1e-5)
    up, down, z = _block_forward(b1, a)
    s = _sigmoid(z)
    assert stats["block_1/act"]["gain"] == pytest.approx(np.mean(s * (1 - s)), rel=1e-5)
    assert stats["block_1/act"]["saturated"] == pytest.approx(
        np.mean((s < 0.02) | (s > 0.98)))
    # Nothing of the probe stays on the model's layers; its output is unchanged.
    for layer in (net, net.hidden, net.out, b0, b0._up, b0._act, b1._down):
        assert "call" not in vars(layer)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(net(x)), before)
    assert probe() == stats
    # Layers named in `layers` may sit inside a custom layer; one without an activation,
    # or the custom layer itself, is refused.
    assert ActivationProbe(net, x, layers=["act", "hidden"]).names == ["block_0/act",
                                                                       path(net.hidden)]
    with pytest.raises(ValueError, match="'block_0' has no activation to watch"):
        ActivationProbe(net, x, layers=["block_0"])
    with pytest.raises(ValueError, match="No layer named 'nope'"):
        ActivationProbe(net, x, layers=["nope"])


def test_fused_gelu_and_silu_are_read_at_their_input_inside_custom_layers():
    """`Dense(..., activation="gelu")` inside a layer of the user's own: the layer is read as
    called, and so is its activation's input: the gain is GELU's (SiLU's) derivative there."""

    class Mlp(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._a = keras.layers.Dense(5, activation="gelu", name="a")
            self._b = keras.layers.Dense(4, activation="silu", name="b")

        def call(self, x):
            return self._b(self._a(x))

    x, _ = _data(16)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    block = Mlp(name="mlp")
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(block(inputs)))
    stats = ActivationProbe(model, x)()
    (wa, ba), (wb, bb) = block._a.get_weights(), block._b.get_weights()
    za = x.astype(np.float64) @ wa + ba
    zb = _gelu(za) @ wb + bb
    slope = lambda f, z: (f(z + 1e-4) - f(z - 1e-4)) / 2e-4  # noqa: E731
    silu = lambda z: z * _sigmoid(z)  # noqa: E731
    key = lambda layer: layer.kernel.path.rsplit("/", 1)[0]  # noqa: E731
    assert stats[key(block._a)]["gain"] == pytest.approx(slope(_gelu, za).mean(), rel=1e-5)
    assert stats[key(block._b)]["gain"] == pytest.approx(slope(silu, zb).mean(), rel=1e-5)
    assert block._a.activation is keras.activations.get("gelu")  # put back as found


def test_approximate_gelu_gain():
    """The tanh approximation of GELU (keras-hub's `gelu_approximate`): the gain is its
    derivative, against finite differences of the function (which is Keras' own)."""
    def approx(v):
        return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))

    z = np.linspace(-3.0, 3.0, 13)[None, :]
    keras_values = keras.ops.convert_to_numpy(
        keras.activations.gelu(keras.ops.convert_to_tensor(z, "float32"), approximate=True))
    np.testing.assert_allclose(keras_values, approx(z), atol=1e-6)
    slope = (approx(z + 1e-6) - approx(z - 1e-6)) / 2e-6
    stats = layer_stats(approx(z), "gelu_approximate", inputs=z)
    assert stats["gain"] == pytest.approx(float(np.mean(slope)), rel=1e-8)


def test_probe_reads_custom_layers_inside_a_functional_model():
    """A Functional model holding a custom block: the graph's own layers and the
    block's insides, read in one forward pass; the softmax output is not watched."""
    x, _ = _data(16)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    first = keras.layers.Dense(4, activation="sigmoid", name="first")
    block = _Block(4, activation="tanh", name="blk")
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(block(first(inputs)))
    model = keras.Model(inputs, outputs, name="func")
    config = model.get_config()
    probe = ActivationProbe(model, x)
    path = lambda layer: layer.kernel.path.rsplit("/", 1)[0]  # noqa: E731
    assert probe.names == [path(first), path(block._up), path(block._down), "blk/act"]
    stats = probe()
    w, b = first.get_weights()
    h = _sigmoid(x.astype(np.float64) @ w + b)
    assert stats[path(first)]["gain"] == pytest.approx(np.mean(h * (1 - h)), rel=1e-5)
    _up, _down, z = _block_forward(block, h)
    assert stats["blk/act"]["gain"] == pytest.approx(np.mean(1 - np.tanh(z) ** 2), rel=1e-5)
    assert model.get_config() == config


def test_logger_probes_a_subclassed_model_during_fit():
    """`probe_data` on a subclassed model: the first probe (before step 0) equals a
    NumPy forward pass with the initial weights, and probes follow every `freq` steps."""
    x, y = _data(64)
    keras.utils.set_random_seed(0)
    net = _Net(name="net")
    net.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    net(x[:1])
    w, b = net.hidden.get_weights()
    logger = GradNormLogger(probe_data=x[:16], activation_freq=2)
    net.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logger])
    record = logger.activations
    assert record.steps == [0, 2]
    key = net.hidden.kernel.path.rsplit("/", 1)[0]
    h = np.tanh(x[:16].astype(np.float64) @ w + b)
    assert record.stats[0][key]["mean"] == pytest.approx(h.mean(), rel=1e-5)
    assert len(record.stats[0]) == 7


def _gelu(z):
    from math import erf, sqrt

    return 0.5 * z * (1.0 + np.vectorize(erf)(z / sqrt(2.0)))


def test_probe_reads_the_layers_of_nested_models():
    """A base model nested in the user's (transfer learning, a keras-hub backbone):
    its hidden layers are watched in its place, read through the tensor that feeds
    it, and its output layer counts as hidden unless it is the whole model's output."""
    x, _ = _data(16)
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((4,))
    t = keras.layers.Dense(5, activation="tanh", name="t")(inner_in)
    inner = keras.Model(inner_in, keras.layers.Activation("gelu", name="g")(t), name="inner")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu",
                                                                    name="first"),
                              inner, keras.layers.Dense(3, activation="softmax", name="out")],
                             name="outer")
    config = model.get_config()
    probe = ActivationProbe(model, x)
    stats = probe()
    (w1, b1), (wt, bt) = model.get_layer("first").get_weights(), inner.get_layer("t").get_weights()
    a1 = np.maximum(x.astype(np.float64) @ w1 + b1, 0.0)
    z = a1 @ wt + bt
    a2, a3 = np.tanh(z), _gelu(np.tanh(z))
    # Watched layers are named as their weights' recorded keys (weightless ones by the
    # model they sit in).
    first = model.get_layer("first").kernel.path.rsplit("/", 1)[0]
    hidden = inner.get_layer("t").kernel.path.rsplit("/", 1)[0]
    assert probe.names == [first, hidden, "inner/g"], probe.names  # input to output
    assert stats[first]["mean"] == pytest.approx(a1.mean(), rel=1e-5)
    assert stats[hidden]["mean"] == pytest.approx(a2.mean(), rel=1e-5)
    assert stats[hidden]["gain"] == pytest.approx(np.mean(1 - a2 * a2), rel=1e-5)
    assert stats["inner/g"]["mean"] == pytest.approx(a3.mean(), rel=1e-5)
    # GELU's gain at its input, the tanh output: Phi(z) + z phi(z).
    gelu_slope = (_gelu(a2 + 1e-4) - _gelu(a2 - 1e-4)) / 2e-4
    assert stats["inner/g"]["gain"] == pytest.approx(gelu_slope.mean(), rel=1e-5)
    # The user's model is as it was: same config, trains and saves as before.
    assert model.get_config() == config
    assert probe() == stats
    # When the nested model's output is the model's output, it is not watched.
    keras.utils.set_random_seed(0)
    head_in = keras.Input((4,))
    head = keras.Model(head_in, keras.layers.Dense(3, activation="tanh", name="head_out")(
        keras.layers.Dense(5, activation="sigmoid", name="head_h")(head_in)), name="head")
    stacked = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="lin"), head])
    names = ActivationProbe(stacked, x).names
    assert names == [stacked.layers[0].kernel.path.rsplit("/", 1)[0],
                     head.get_layer("head_h").kernel.path.rsplit("/", 1)[0]], names
    # A layer named in `layers` may sit in the nested model.
    assert ActivationProbe(model, x, layers=["g", "first"]).names == ["inner/g", first]


def test_outputs_fn_may_name_a_layer_of_a_nested_model():
    """`activation_outputs` names a layer inside a backbone (a keras-hub task model's
    transformer blocks sit in its backbone); an unknown name is refused, with the layers."""
    x, _ = _data(8)
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((6,))
    backbone = keras.Model(inner_in, keras.layers.Dense(4, activation="tanh", name="h")(inner_in),
                           name="backbone")
    outer_in = keras.Input((6,))
    model = keras.Model(outer_in, keras.layers.Dense(3, name="out")(backbone(outer_in)),
                        name="task")
    probe = ActivationProbe(model, x, outputs_fn=lambda m, data: {
        "h": m.get_layer("backbone")(data)})
    stats = probe()
    w, b = backbone.get_layer("h").get_weights()
    a = np.tanh(x @ w + b)
    key = backbone.get_layer("h").kernel.path.rsplit("/", 1)[0]
    assert list(stats) == [key]
    assert stats[key]["gain"] == pytest.approx(np.mean(1 - a * a), rel=1e-5)
    probe = ActivationProbe(model, x, outputs_fn=lambda m, data: {"nope": data})
    with pytest.raises(ValueError, match="'nope', which is not a layer of model 'task' or of "
                                         "a model nested in it; its layers are .*backbone"):
        probe()


def test_probe_skips_with_a_warning_a_nested_model_it_cannot_read(monkeypatch):
    """Should a nested model's call not be reproducible, its layers are left unwatched
    with a warning that says so; the outer model's are still watched, no error."""
    from keras_gradtools import internals

    x, _ = _data(8)
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(5, activation="tanh")(inner_in),
                        name="inner")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu",
                                                                    name="first"),
                              inner, keras.layers.Dense(3, activation="softmax")], name="outer")
    real = internals.first_call
    monkeypatch.setattr(internals, "first_call",
                        lambda layer: (lambda c: ([], c[1]))(real(layer)))  # no inputs
    with pytest.warns(UserWarning, match="does not watch the layers of 'inner'"):
        probe = ActivationProbe(model, x)
    assert probe.names == [model.get_layer("first").kernel.path.rsplit("/", 1)[0]]


def test_probe_watches_only_layers_whose_output_is_their_activation():
    """A layer that stores an `activation` but runs a `call` of its own (here a
    residual block) is not watched as that activation; a Keras layer's subclass that
    keeps Keras' `call` is."""

    class Residual(keras.layers.Layer):
        def __init__(self, units, activation="relu", **kwargs):
            super().__init__(**kwargs)
            self.activation = keras.activations.get(activation)
            self.dense = keras.layers.Dense(units)

        def call(self, x):
            return x + self.activation(self.dense(x))

    class MyDense(keras.layers.Dense):
        pass

    x, _ = _data(16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), MyDense(4, activation="relu", name="mine"),
                              Residual(4, name="block"),
                              keras.layers.Dense(3, activation="softmax", name="out")],
                             name="net")
    probe = ActivationProbe(model, x)
    block = model.get_layer("block")
    # The block is not watched as ReLU; the Dense inside it (linear) is read in its place.
    assert probe.names == ["net/mine", block.dense.kernel.path.rsplit("/", 1)[0]]
    w, b = model.get_layer("mine").get_weights()
    a = np.maximum(x @ w + b, 0.0)
    assert probe()["net/mine"]["gain"] == pytest.approx(np.mean(a > 0), abs=1e-9)
    with pytest.raises(ValueError, match="'block' has no activation to watch"):
        ActivationProbe(model, x, layers=["block"])


def test_gated_recurrent_layers_are_not_judged_as_their_activation():
    """An LSTM's output is `o * tanh(c)`, a GRU's a gated mix: neither is its `tanh`'s
    output, so no gain or saturation is read from them (only mean and std, of Keras' own
    output); a SimpleRNN's output is its tanh's, and its gain is `1 - h^2`."""
    from keras_gradtools.facts import model_facts

    rng = np.random.default_rng(0)
    x = (3.0 * rng.normal(size=(16, 5, 3))).astype("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 3))
    lstm = keras.layers.LSTM(4, return_sequences=True, name="lstm")(inputs)
    gru = keras.layers.GRU(4, return_sequences=True, name="gru")(lstm)
    rnn = keras.layers.SimpleRNN(4, name="rnn")(gru)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(rnn), name="rec")
    stats = ActivationProbe(model, x)()
    reads = keras.Model(inputs, [lstm, gru, rnn])
    h_lstm, h_gru, h_rnn = (np.asarray(keras.ops.convert_to_numpy(t), np.float64)
                            for t in reads(x))
    key = {name: model.get_layer(name).weights[0].path.rsplit("/", 1)[0]
           for name in ("lstm", "gru", "rnn")}
    for name, h in (("lstm", h_lstm), ("gru", h_gru)):
        assert stats[key[name]]["activation"] == name
        assert stats[key[name]]["gain"] is None and stats[key[name]]["saturated"] is None
        assert stats[key[name]]["mean"] == pytest.approx(h.mean(), rel=1e-5)
    assert stats[key["rnn"]]["activation"] == "tanh"
    assert stats[key["rnn"]]["gain"] == pytest.approx(np.mean(1 - h_rnn ** 2), rel=1e-5)
    # `gradtools check`'s fixes never propose replacing an LSTM's tanh.
    facts = model_facts(model)
    assert [facts.activations[key[n]] for n in ("lstm", "gru", "rnn")] == ["lstm", "gru",
                                                                            "tanh"]
    keys = [f"{key[n]}/kernel" for n in ("lstm", "gru", "rnn")] + ["out/kernel"]
    rows = np.tile([1e-9, 1e-9, 1e-3, 1.0], (60, 1))
    fixes = diagnose_norms(rows, keys, facts=facts).first("vanishing").fixes
    # (Were the LSTM and GRU counted as tanh, all three would be proposed for ReLU; the
    # SimpleRNN alone is one bounded layer of three, too few to compound.)
    assert not any("Replace" in fix for fix in fixes), fixes


def test_bad_probe_data_is_refused_when_the_logger_is_made():
    with pytest.raises(ValueError, match="NaN or Inf"):
        GradNormLogger(probe_data=np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="non-empty"):
        GradNormLogger(probe_data=np.zeros((0, 3)))
    with pytest.raises(ValueError, match="activation_freq"):
        GradNormLogger(probe_data=np.zeros((2, 3)), activation_freq=0)
    with pytest.raises(ValueError, match="update_ratio"):
        GradNormLogger(update_ratio="yes")
    with pytest.raises(ValueError, match="to the GradNormLogger"):
        GradientMonitor(GradNormLogger(), update_ratio=True)


# --- during fit(): probes and update ratios --------------------------------------


def test_probe_builds_a_sequential_without_input_before_fit_does():
    # fit() on TensorFlow builds such a model only in its traced step; the
    # logger's probe builds it on the probe batch and watches its layers.
    def build():
        init = keras.initializers.GlorotUniform
        return keras.Sequential([
            keras.layers.Dense(5, activation="sigmoid", name="sig", kernel_initializer=init(1)),
            keras.layers.Dense(3, activation="softmax", name="out", kernel_initializer=init(2)),
        ], name="late")

    x, y = _data(32)
    model = build()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    logger = GradNormLogger(probe_data=x[:16], activation_freq=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    assert logger.keys == ["late/sig/kernel", "late/out/kernel"]
    assert logger.activations.steps == [0, 2]
    twin = build()  # the same seeded initial weights
    twin(x[:1])
    w, b = twin.get_layer("sig").get_weights()
    a = _sigmoid(x[:16] @ w + b)
    first = logger.activations.stats[0]["late/sig"]
    assert first["mean"] == pytest.approx(a.mean(), rel=1e-5)
    assert first["gain"] == pytest.approx(np.mean(a * (1 - a)), rel=1e-5)


class _Kernels(keras.callbacks.Callback):
    """Each recorded kernel's value before step 0 and after every step."""

    def __init__(self, names):
        super().__init__()
        self.names, self.values = names, []

    def _take(self):
        self.values.append([self.model.get_layer(n).kernel.numpy().copy() for n in self.names])

    def on_train_begin(self, logs=None):
        self._take()

    def on_train_batch_end(self, batch, logs=None):
        self._take()


def test_fit_records_probes_and_sgd_update_ratios(tmp_path):
    x, y = _data(128)
    model = _sigmoid_relu_model()
    lr = 0.5
    model.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy")
    logger = GradNormLogger(probe_data=x[:16], activation_freq=5, update_ratio=True,
                            run_dir=tmp_path / "run", log_dir=tmp_path / "tb")
    kernels = _Kernels(["sig", "rel", "out"])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
              callbacks=[logger, kernels])
    assert logger.activations.steps == [0, 5, 10, 15]
    ratios = np.stack([logger.update_ratios[k] for k in logger.keys], axis=1)
    norms = np.stack([logger.history[k] for k in logger.keys], axis=1)
    before = np.array([[np.linalg.norm(w) for w in step] for step in kernels.values[:-1]])
    moved = np.array([[np.linalg.norm(b - a) for a, b in zip(s0, s1)]
                      for s0, s1 in zip(kernels.values[:-1], kernels.values[1:])])
    np.testing.assert_allclose(ratios, moved / before, rtol=2e-4)
    # Plain SGD: ||dw|| = lr * ||g||.
    np.testing.assert_allclose(ratios * before, lr * norms, rtol=2e-4)
    # The run directory holds both; `gradtools diagnose` judges them like the monitor.
    run = load_run(tmp_path / "run")
    assert run.activations.steps == [0, 5, 10, 15]
    np.testing.assert_allclose(run.update_ratios, ratios, rtol=1e-6)
    first = run.activations.stats[0]["net/sig"]
    assert first == pytest.approx(logger.activations.stats[0]["net/sig"])


def test_tensorboard_gets_activation_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import tensorflow as tf

    x, y = _data(64)
    model = _sigmoid_relu_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    logger = GradNormLogger(probe_data=x[:16], activation_freq=2, log_dir=tmp_path / "tb")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logger])
    ea = EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["tensors"])
    assert {"activation/net/sig/mean", "activation/net/sig/saturated",
            "activation/net/rel/dead", "activation/net/rel/gain",
            "activation_hist/net/sig"} <= tags
    assert "activation/net/sig/dead" not in tags  # does not apply to a sigmoid
    events = ea.Tensors("activation/net/sig/mean")
    assert [e.step for e in events] == [0, 2]
    np.testing.assert_allclose([float(tf.make_ndarray(e.tensor_proto)) for e in events],
                               [s["net/sig"]["mean"] for s in logger.activations.stats],
                               rtol=1e-6)
    hist = tf.make_ndarray(ea.Tensors("activation_hist/net/sig")[0].tensor_proto)
    assert hist[:, 2].sum() == 16 * 5  # every probed value in a bucket


# --- findings -------------------------------------------------------------------


def _entries(field, values, activation):
    return [(100 * i, {"m/d0": {"activation": activation, "mean": 0.1, "std": 0.1,
                                "saturated": v if field == "saturated" else None,
                                "dead": v if field == "dead" else None, "gain": 0.2}})
            for i, v in enumerate(values)]


def test_probe_rules_need_patience_in_a_row():
    assert saturation_rule(_entries("saturated", [0.9, 0.9, 0.4, 0.9, 0.9], "sigmoid"))[0] == []
    (f,), _ = saturation_rule(_entries("saturated", [0.4, 0.5, 0.6, 0.7], "sigmoid"))
    assert (f.kind, f.step, f.detected_step) == ("saturation", 100, 300)
    assert f.evidence["saturated"] == {"m/d0": 0.7}
    # Fed one probe at a time, the same finding.
    state, found = None, []
    for entry in _entries("saturated", [0.4, 0.5, 0.6, 0.7], "sigmoid"):
        new, state = saturation_rule([entry], state)
        found += new
    assert [(g.step, g.detected_step) for g in found] == [(100, 300)]
    (f,), _ = dead_units_rule(_entries("dead", [1.0, 1.0, 1.0], "relu"))
    assert f.kind == "dead_units" and "leaky_relu" in f.fixes[0]


def test_update_ratio_rule_band_and_patience():
    keys = ["m/a/kernel", "m/b/kernel", "m/bn/gamma"]
    rows = np.tile([1e-3, 1e-3, 5.0], (60, 1))  # gamma is not judged
    assert update_ratio_rule(rows, keys)[0] == []
    rows[5:54, 0] = 0.2  # 49 steps above the band
    assert update_ratio_rule(rows, keys)[0] == []
    rows[54, 0] = 0.2
    (f,), _ = update_ratio_rule(rows, keys)
    assert (f.step, f.detected_step, f.layers) == (5, 54, ["m/a/kernel"])
    assert f.evidence["direction"] == "high"
    rows = np.tile([1e-3, 1e-6, 1e-3], (51, 1))
    rows[20, 1] = 0.0  # a skipped step breaks no run (and does not count)
    (f,), _ = update_ratio_rule(rows, keys)
    assert f.evidence["direction"] == "low" and f.layers == ["m/b/kernel"]


def test_vanishing_cause_compounding_saturation_or_weights():
    gains = {f"m/d{i}": {"activation": "sigmoid", "gain": g, "saturated": 0.0}
             for i, g in enumerate([0.2, 0.25, 0.24])}
    evidence, sentence = vanishing_cause("m/d1/kernel", 0.05, gains)
    assert evidence["predicted_ratio"] == pytest.approx(0.25 * 0.24)
    assert list(evidence["layer_gains"]) == ["m/d1", "m/d2"]
    assert evidence["cause"] == "compounding" and "not saturation" in sentence
    assert vanishing_cause("m/d1/kernel", 1e-4, gains)[0]["cause"] == "weights"
    gains["m/d2"]["saturated"] = 0.8
    assert vanishing_cause("m/d1/kernel", 0.05, gains)[0]["cause"] == "saturation"
    assert vanishing_cause("m/other/kernel", 0.05, gains) == ({}, "")


def test_monitor_states_the_cause_of_the_vanishing_deep_sigmoid_net(tmp_path):
    from keras_gradtools import create_deep_sigmoid_model

    keras.utils.set_random_seed(0)
    model = create_deep_sigmoid_model(num_layers=10, units=32, input_dim=8)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).random((640, 8)), np.random.default_rng(1).integers(0, 10, 640)
    logger = GradNormLogger(probe_data=x[:32], activation_freq=20, update_ratio=True,
                            run_dir=tmp_path / "run")
    monitor = GradientMonitor(logger, check_every=20, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger, monitor])
    finding = monitor.report().first("vanishing")
    evidence = finding.evidence
    start = finding.layers[0].rsplit("/", 1)[0]
    # The last probe at or before the detection step.
    stats = logger.activations.latest(finding.detected_step)
    assert logger.activations.steps[:3] == [0, 20, 40] and finding.detected_step >= 40
    names = list(stats)
    expected = np.prod([stats[n]["gain"] for n in names[names.index(start):]])
    assert evidence["predicted_ratio"] == pytest.approx(expected)
    assert evidence["cause"] in ("compounding", "weights", "saturation")
    assert "Cause" in finding.message or "account for" in finding.message
    # The same report from the run directory, judged afterwards.
    result = CliRunner().invoke(main, ["diagnose", "--json", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    offline = json.loads(result.output)
    assert offline["findings"] == monitor.report().to_dict()["findings"]


def test_dead_relu_network():
    x, y = _data(256)
    keras.utils.set_random_seed(0)
    dead = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu", name="h",
                           bias_initializer=keras.initializers.Constant(-20.0)),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ], name="dead")
    dead.compile("adam", "sparse_categorical_crossentropy")
    logger = GradNormLogger(probe_data=x[:32], activation_freq=8)
    monitor = GradientMonitor(logger, check_every=8, verbose=0)
    dead.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[logger, monitor])
    report = monitor.report()
    assert [s["dead/h"]["dead"] for s in logger.activations.stats[:3]] == [1.0, 1.0, 1.0]
    finding = report.first("dead_units")
    # Dead from the first probe on, told at the first probe after the dead_layer finding
    # (step 49) showed the harm.
    assert (finding.layers, finding.step, finding.detected_step) == (["dead/h"], 0, 56)
    # With every unit of h at 0, neither kernel gets a gradient.
    dead_layer = report.first("dead_layer")
    assert dead_layer.layers == ["dead/h/kernel", "dead/out/kernel"]
    assert any("dead_units" in fix for fix in dead_layer.fixes)



def _linear_regression(lr):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="w")], name="lin")
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def test_update_ratio_finds_learning_rates_far_too_high_or_low():
    x, _ = _data(256)
    y = np.zeros((256, 3), "float32")  # w -> 0: each SGD step multiplies w by (1 - 2 lr H)
    found = {}
    for lr in (1e-6, 1.0):  # 1000x too low; at lr 1.0, |1 - 2 lr H| > 1: each step overshoots
        model = _linear_regression(lr)
        monitor = GradientMonitor(check_every=16, verbose=0, update_ratio=True)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
        found[lr] = monitor.report().first("update_ratio")
        ratios = monitor.logger.update_ratios["lin/w/kernel"]
        assert len(ratios) == 64 and np.isfinite(ratios).all()
    low, high = found[1e-6], found[1.0]
    assert low.evidence["direction"] == "low" and low.detected_step == 49
    assert low.evidence["median_ratios"]["lin/w/kernel"] < 1e-5
    assert "Raise the learning rate from 1e-06" in low.fixes[0]
    assert high.evidence["direction"] == "high" and high.detected_step == 49
    assert high.evidence["median_ratios"]["lin/w/kernel"] > 0.1
    assert "Lower the learning rate from 1 to 0.1" in high.fixes[0]


def test_update_ratio_on_a_model_that_records_in_its_own_train_step():
    from keras_gradtools import GradNormModel

    x, y = _data(64)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh", name="h")(inputs)
    model = GradNormModel(inputs, keras.layers.Dense(3, activation="softmax", name="out")(hidden),
                          name="own")
    model.compile(keras.optimizers.SGD(0.2), "sparse_categorical_crossentropy")
    logger, kernels = GradNormLogger(update_ratio=True), _Kernels(["h", "out"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[logger, kernels])
    ratios = np.stack([logger.update_ratios[k] for k in logger.keys], axis=1)
    norms = np.stack([logger.history[k] for k in logger.keys], axis=1)
    before = np.array([[np.linalg.norm(w) for w in step] for step in kernels.values[:-1]])
    assert ratios.shape == (4, 2)
    np.testing.assert_allclose(ratios * before, 0.2 * norms, rtol=2e-4)
    assert model.gradtools_recorders == []  # nothing left behind


def test_update_ratios_survive_runs_longer_than_the_ring_buffer():
    x, y = _data(256)
    model = _sigmoid_relu_model()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    logger = GradNormLogger(update_ratio=True, flush_every=4)  # a ring buffer of 7 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overwritten before read"
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[logger])
    ratios = np.stack([logger.update_ratios[k] for k in logger.keys], axis=1)
    assert logger.update_recorder.capacity == 7 and ratios.shape == (64, 3)
    assert np.isfinite(ratios).all()  # no row lost (a lost row is NaN)


def test_activation_rules_report_with_the_gradient_harm_they_explain():
    from keras_gradtools.diagnose import Diagnoser

    keys = ["m/d0/kernel", "m/out/kernel"]
    dead = {"m/d0": {"activation": "relu", "mean": 0.0, "std": 0.0, "dead": 0.9, "gain": 0.1,
                     "saturated": None}}
    probes = [(s, dead) for s in range(0, 400, 20)]
    healthy = np.ones((400, 2))
    # 90 % of the units silent on every probe, gradients fine: no finding (MobileNetV3's
    # squeeze-and-excite gates look like this while it learns).
    assert diagnose_norms(healthy, keys, activations=probes).findings == []
    # The gradient of d0 is exactly 0 from step 100: dead_layer told at 149, then the
    # dead units as its cause at the next probe (160).
    starved = healthy.copy()
    starved[100:, 0] = 0.0
    whole = diagnose_norms(starved, keys, activations=probes)
    assert [(f.kind, f.step, f.detected_step) for f in whole.findings] == [
        ("dead_units", 0, 160), ("dead_layer", 100, 149)]
    # Fed in any split, probes before or after the norms: the same findings.
    for cuts in ([0, 7, 160, 161, 400], [0, 149, 150, 400], [0, 400]):
        d = Diagnoser(keys)
        for a, b in zip(cuts[:-1], cuts[1:]):
            d.feed(a, starved[a:b])
            d.feed_activations([p for p in probes if a < p[0] <= b] if a else
                               [p for p in probes if p[0] <= b])
        assert [f.to_dict() for f in d.report().findings] == [f.to_dict() for f in whole.findings]
