"""Model builders: the article's shapes and parameter counts, and ResNetBlock serialization."""

import numpy as np
import pytest
import keras

from keras_gradtools import models


def test_deep_sigmoid_has_article_shape_and_count():
    model = models.create_deep_sigmoid_model()
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert len(dense) == 12  # 1 + 10 hidden + output
    assert [l.units for l in dense] == [256] * 11 + [10]
    assert all(l.activation.__name__ == "sigmoid" for l in dense[:-1])
    assert dense[-1].activation.__name__ == "softmax"
    # 784*256+256 + 10*(256*256+256) + 256*10+10
    assert model.count_params() == 200960 + 10 * 65792 + 2570


def test_deep_linear_has_article_shape_and_count():
    model = models.create_deep_linear_model()
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert len(dense) == 22
    assert all(l.activation.__name__ == "linear" for l in dense[:-1])
    assert model.count_params() == 200960 + 20 * 65792 + 2570


def test_builder_knobs_try_the_fixes():
    model = models.create_deep_sigmoid_model(
        num_layers=2, units=8, activation="relu", kernel_initializer="he_normal",
        batch_norm=True,
    )
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds == ["Dense", "BatchNormalization", "Activation"] * 3 + ["Dense"]
    assert model.get_layer("dense_0").kernel_initializer.__class__.__name__ == "HeNormal"


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3"])
def test_builder_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match=r"num_layers.*Received: num_layers="):
        models.create_deep_linear_model(num_layers=bad)


def test_resnet_block_identity_and_projection_shapes():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 64)).astype("float32")
    same = models.ResNetBlock(64, 3)
    assert same(x).shape == (2, 8, 8, 64)
    assert same.shortcut is None
    wider = models.ResNetBlock(128, (3, 3))  # the article's block fails here
    assert wider(x).shape == (2, 8, 8, 128)
    assert wider.shortcut is not None and wider.shortcut.strides == (1, 1)
    strided = models.ResNetBlock(128, (3, 3), strides=(2, 2))
    assert strided(x).shape == (2, 4, 4, 128)


def test_resnet_block_adds_the_shortcut():
    # With zero conv kernels the residual branch is relu(0)=0 -> BN(0)=beta=0,
    # so the block returns relu(input) exactly.
    block = models.ResNetBlock(4, 3, kernel_initializer="zeros")
    x = np.random.default_rng(1).normal(size=(1, 5, 5, 4)).astype("float32")
    np.testing.assert_allclose(block(x, training=False), np.maximum(x, 0), atol=1e-6)


def test_resnet_block_get_config_matches_init_and_round_trips(tmp_path):
    block = models.ResNetBlock(
        16, (3, 3), strides=(2, 2), activation="tanh", batch_norm=False,
        kernel_initializer="glorot_uniform", name="blk",
    )
    config = block.get_config()
    import inspect
    params = set(inspect.signature(models.ResNetBlock.__init__).parameters) - {"self", "kwargs"}
    assert params <= set(config)
    clone = models.ResNetBlock.from_config(config)
    assert clone.get_config() == config

    inputs = keras.Input((8, 8, 3))
    outputs = models.ResNetBlock(8, 3, strides=2, name="b")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    path = tmp_path / "block.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("b"), models.ResNetBlock)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def test_resnet_model_round_trips(tmp_path):
    model = models.resnet_model(filters=(8, 16), strides=(1, 2))
    x = np.random.default_rng(3).normal(size=(2, 28, 28, 1)).astype("float32")
    path = tmp_path / "resnet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def test_resnet_model_default_layout():
    model = models.resnet_model()
    blocks = [l for l in model.layers if isinstance(l, models.ResNetBlock)]
    assert [b.num_filters for b in blocks] == [64, 64, 128, 128, 256, 256]
    assert [b.strides for b in blocks] == [(1, 1), (1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    assert model.output_shape == (None, 10)
    assert model.get_layer("flatten").output.shape == (None, 2 * 2 * 256)


def test_bad_block_arguments_are_named():
    with pytest.raises(ValueError, match=r"strides.*Received: strides="):
        models.ResNetBlock(8, 3, strides=(0, 1))
    with pytest.raises(ValueError, match="4-D"):
        models.ResNetBlock(8, 3)(np.zeros((2, 8, 3), "float32"))
    with pytest.raises(ValueError, match=r"filters.*strides"):
        models.resnet_model(filters=(8,), strides=(1, 2))


@pytest.mark.parametrize("builder, shape", [
    (models.create_deep_sigmoid_model, (784,)),
    (models.create_deep_linear_model, (784,)),
    (models.resnet_model, (28, 28, 1)),
])
def test_classifier_activation_none_gives_the_logits_of_the_softmax_model(builder, shape):
    keras.utils.set_random_seed(0)
    softmax = builder()
    logits = builder(classifier_activation=None)
    logits.set_weights(softmax.get_weights())
    x = np.random.default_rng(0).normal(size=(4, *shape)).astype("float32")
    z = keras.ops.convert_to_numpy(logits(x, training=False))
    p = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(softmax(x, training=False)),
                               p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_case_loss_is_the_log_softmax_cross_entropy_also_where_the_softmax_saturates():
    """The article's cases train on logits: no probability clipping, on any backend."""
    from keras_gradtools.experiments import build_case, get_case

    keras.utils.set_random_seed(0)
    model = build_case(get_case("exploding"))
    out = model.get_layer("output")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in out.weights)
    out.kernel.assign(kernel * 1e3)  # logits of order 1e3: softmax is 0 or 1 in float32
    x = np.random.default_rng(1).normal(size=(8, 784)).astype("float32")
    y = np.arange(8) % 10
    z = keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")
    shifted = z - z.max(-1, keepdims=True)
    expected = np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(8), y])
    assert expected > 100  # far beyond -log(1e-7) = 16.1, where clipped probabilities stop
    loss = keras.ops.convert_to_numpy(model.compute_loss(x, y, model(x)))
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
