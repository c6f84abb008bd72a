"""compute_weight_gradient_norms: batched equals one batch, and pairs with trainable variables."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_gradtools import compute_weight_gradient_norms


def _bn_model():
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, name="d1"),
        keras.layers.BatchNormalization(name="bn"),  # moving stats interleave model.weights
        keras.layers.Activation("relu"),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ], name="m")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def test_batched_equals_one_batch_and_reference_tape():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 5)).astype("float32")
    y = rng.integers(0, 3, 103)
    model = _bn_model()
    full = compute_weight_gradient_norms(model, x, y, batch_size=1000)
    batched = compute_weight_gradient_norms(model, x, y, batch_size=10)
    assert list(full) == ["m/d1/kernel", "m/bn/gamma", "m/bn/beta", "m/out/kernel"]
    for key in full:
        np.testing.assert_allclose(batched[key], full[key], rtol=1e-5)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy()(y, model(x, training=False))
    grads = dict(zip([v.path for v in model.trainable_variables],
                     tape.gradient(loss, model.trainable_variables)))
    for key in full:
        np.testing.assert_allclose(full[key], np.linalg.norm(grads[key]), rtol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_probe_leaves_batchnorm_statistics_untouched(training):
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, size=(20, 5)).astype("float32")
    y = rng.integers(0, 3, 20)
    model = _bn_model()
    before = [w.numpy().copy() for w in model.weights]
    compute_weight_gradient_norms(model, x, y, batch_size=7, training=training)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_probe_errors():
    model = _bn_model()
    x, y = np.zeros((4, 5), "float32"), np.zeros(3)
    with pytest.raises(ValueError, match=r"Received: len\(x\)=4, len\(y\)=3"):
        compute_weight_gradient_norms(model, x, y)
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        compute_weight_gradient_norms(model, x, np.zeros(4), batch_size=0)
