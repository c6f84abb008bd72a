"""Clipping functions against hand and NumPy values; presets, save/load, applied norms."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_gradtools import GradNormLogger
from keras_gradtools import clipping as C


def _np(grads):
    return [np.asarray(g, np.float64) for g in grads]


# --- stateless functions ------------------------------------------------------


def test_keras_style_hand_values():
    assert np.allclose(C.clip_by_norm([tf.constant([3.0, 4.0])], 1.0)[0], [0.6, 0.8])
    assert np.allclose(C.clip_by_norm([tf.constant([0.3, 0.4])], 1.0)[0], [0.3, 0.4])
    assert np.allclose(C.clip_by_value([tf.constant([3.0, -4.0, 0.5])], 1.0)[0], [1, -1, 0.5])
    out = C.clip_by_global_norm([tf.constant([3.0]), tf.constant([4.0])], 1.0)
    assert np.allclose([out[0][0], out[1][0]], [0.6, 0.8])
    assert C.clip_by_norm([None], 1.0) == [None]


@pytest.mark.parametrize("seed", range(5))
def test_properties_of_stateless_methods(seed):
    rng = np.random.default_rng(seed)
    grads = [tf.constant(rng.normal(0, 10, size=s).astype("float32")) for s in [(5, 4), (4,), (3, 3, 2, 6)]]
    variables = [tf.Variable(rng.normal(size=g.shape).astype("float32")) for g in grads]
    clipped = C.clip_by_global_norm(grads, 2.0)
    assert float(C.global_norm(clipped)) <= 2.0 * (1 + 1e-6)
    for fn in (lambda g: C.clip_by_value(g, 0.5), lambda g: C.clip_by_norm(g, 0.5),
               lambda g: C.clip_by_global_norm(g, 0.5),
               lambda g: C.adaptive_clip(g, variables, 0.01)):
        once = fn(grads)
        twice = fn(once)
        for a, b in zip(once, twice):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for g in C.clip_by_norm(grads, 0.5):
        assert float(tf.norm(g)) <= 0.5 * (1 + 1e-6)


def _numpy_agc(g, w, factor, eps):
    axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else None
    gn = np.sqrt(np.sum(g ** 2, axis=axes, keepdims=True))
    wn = np.maximum(np.sqrt(np.sum(w ** 2, axis=axes, keepdims=True)), eps)
    bound = factor * wn
    return np.where(gn > bound, g * bound / np.maximum(gn, 1e-6), g)


def test_agc_unitwise_matches_numpy_for_dense_and_conv():
    rng = np.random.default_rng(0)
    dense = keras.layers.Dense(7)
    dense.build((None, 5))
    conv = keras.layers.Conv2D(6, 3)
    conv.build((None, 8, 8, 4))
    variables = [dense.kernel, dense.bias, conv.kernel]
    grads = [tf.constant(rng.normal(0, s, size=v.shape).astype("float32"))
             for v, s in zip(variables, (0.5, 0.5, 0.05))]
    # Unit-wise norms: one per output unit/channel.
    np.testing.assert_allclose(C.unitwise_norm(dense.kernel)[0],
                               np.linalg.norm(dense.kernel.numpy(), axis=0), rtol=1e-6)
    assert C.unitwise_norm(conv.kernel).shape == (1, 1, 1, 6)
    out = C.adaptive_clip(grads, variables, clip_factor=0.01, eps=1e-3)
    for o, g, v in zip(out, grads, variables):
        np.testing.assert_allclose(o, _numpy_agc(g.numpy(), v.numpy(), 0.01, 1e-3),
                                   rtol=1e-5, atol=1e-8)
    # The zero bias uses the eps floor: its bound is 0.01 * 1e-3.
    assert np.linalg.norm(out[1]) == pytest.approx(1e-5, rel=1e-4)
    # Skipped variables pass untouched.
    skipped = C.adaptive_clip(grads, variables, 0.01, skip=[2])
    np.testing.assert_array_equal(skipped[2], grads[2])


# --- stateful functions vs NumPy re-implementations ---------------------------


def _numpy_autoclip(norms, p, size):
    history, out = [], []
    for n in norms:
        history.append(n)
        history = history[-size:]
        t = np.percentile(history, p)
        out.append((t, min(n, t) if n > 0 else n))
    return out


def test_autoclip_step_by_step_matches_numpy():
    rng = np.random.default_rng(1)
    scales = np.exp(rng.normal(0, 1, size=30))
    state = C.autoclip_init(history_size=8)
    expected = _numpy_autoclip([3 * s * np.sqrt(2) for s in scales], 10.0, 8)
    for s, (threshold, applied) in zip(scales, expected):
        grads = [tf.constant([3.0 * s]), tf.constant([3.0 * s])]  # global norm 3*s*sqrt(2)
        out, state = C.autoclip(grads, state, percentile=10.0)
        assert float(C.global_norm(out)) == pytest.approx(applied, rel=1e-5)


def _numpy_zclip(norms, z_thr, alpha, warmup):
    mean = var = 0.0
    warm = []
    applied = []
    for i, g in enumerate(norms):
        if i < warmup:
            warm.append(g)
            applied.append(g)
            if i == warmup - 1:
                mean, var = np.mean(warm), np.var(warm)
            continue
        std = np.sqrt(var)
        z = (g - mean) / max(std, 1e-12)
        a = mean + z_thr ** 2 / z * std if z > z_thr else g
        applied.append(a)
        mean = alpha * mean + (1 - alpha) * a
        var = alpha * var + (1 - alpha) * (a - mean) ** 2
    return applied


def test_zclip_step_by_step_matches_numpy():
    rng = np.random.default_rng(2)
    norms = list(np.exp(rng.normal(0, 0.2, size=60)))
    norms[40] *= 30  # a spike
    norms[50] *= 8
    expected = _numpy_zclip(norms, 2.5, 0.97, 25)
    state = C.zclip_init()
    for n, want in zip(norms, expected):
        out, state = C.zclip([tf.constant([n])], state, zscore=2.5, alpha=0.97, warmup=25)
        assert float(out[0][0]) == pytest.approx(want, rel=1e-4)
    assert expected[40] < norms[40] / 10  # the spike really was scaled back


# --- presets ------------------------------------------------------------------


def test_presets_return_keras_optimizers_or_the_wrapper():
    assert C.clipped_optimizer("adam", 1e-3, clip="norm", threshold=1.0).clipnorm == 1.0
    assert C.clipped_optimizer("sgd", 0.1, clip="value", threshold=0.5).clipvalue == 0.5
    assert C.clipped_optimizer("adam", clip="global_norm").global_clipnorm == 1.0
    opt = C.clipped_optimizer("adam", clip="agc", threshold=0.02)
    assert isinstance(opt, C.ClippedOptimizer) and opt.threshold == 0.02
    assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)
    assert C.clipped_optimizer("adam", clip="none").clipnorm is None


def test_mixing_clip_options_is_an_error_in_keras_wording():
    with pytest.raises(ValueError, match="Only one of clipnorm, clipvalue and global_clipnorm"):
        C.clipped_optimizer("adam", clip="norm", global_clipnorm=1.0)
    with pytest.raises(ValueError, match="Only one of clip and clipnorm"):
        C.clipped_optimizer("adam", clip="zclip", clipnorm=1.0)
    with pytest.raises(ValueError, match="Received: clip='l2'"):
        C.clipped_optimizer("adam", clip="l2")
    with pytest.raises(ValueError, match="Received: threshold=150"):
        C.clipped_optimizer("adam", clip="autoclip", threshold=150)
    with pytest.raises(ValueError, match=r"Received: clip='norm:x'"):
        C.parse_clip("norm:x")


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ], name="net")


@pytest.mark.parametrize("clip", ["value", "norm", "global_norm", "agc", "autoclip", "zclip"])
def test_save_load_round_trip_resumes_with_the_same_clipping(clip, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = _model()
    model.compile(C.clipped_optimizer("adam", 1e-2, clip=clip, **({"warmup": 3} if clip == "zclip" else {})),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, loaded):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_logger_records_raw_and_applied_norms():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = _model()
    model.compile(C.clipped_optimizer("sgd", 0.01, clip="norm", threshold=0.5),
                  "sparse_categorical_crossentropy")
    logger = GradNormLogger()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    for key in logger.keys:
        np.testing.assert_allclose(logger.applied_history[key],
                                   np.minimum(logger.history[key], 0.5), rtol=1e-5)
    assert logger.history["net/h/kernel"].max() > 0.5  # the raw norms do exceed it

    model = _model()
    model.compile(C.clipped_optimizer("sgd", 0.01, clip="zclip", warmup=3),
                  "sparse_categorical_crossentropy", jit_compile=True)
    logger = GradNormLogger(include_biases=True)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    assert logger.applied_global_norms.shape == logger.global_norms.shape
    assert np.all(logger.applied_global_norms <= logger.global_norms * (1 + 1e-5))
    np.testing.assert_allclose(logger.applied_global_norms[-1],
                               float(model.optimizer.last_applied_norm.numpy()), rtol=1e-5)

    model = _model()
    model.compile("adam", "sparse_categorical_crossentropy")
    logger = GradNormLogger()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    assert logger.applied_history == {}


@pytest.mark.parametrize("clip,wrapped", [
    ("value", False), ("norm", False), ("global_norm", False), ("agc", False),
    ("autoclip", False), ("zclip", False),
    # The ClippedOptimizer form of Keras' methods (what clipped_optimizer
    # gives under a multi-replica strategy).
    ("value", True), ("norm", True), ("global_norm", True),
])
def test_every_preset_under_jit_compile_trains_as_without(clip, wrapped):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    threshold = {"value": 0.05, "norm": 0.5, "global_norm": 0.5}.get(clip)
    runs = []
    for jit in (False, True):
        model = _model()
        if wrapped:
            optimizer = C.ClippedOptimizer(keras.optimizers.SGD(0.1), clip=clip,
                                           threshold=threshold)
        else:
            optimizer = C.clipped_optimizer("sgd", 0.1, clip=clip, threshold=threshold,
                                            **({"warmup": 3} if clip == "zclip" else {}))
        model.compile(optimizer, "sparse_categorical_crossentropy", jit_compile=jit)
        logger = GradNormLogger(include_biases=True)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[logger])
        runs.append((model.get_weights(), logger.norms, logger.applied_recorder.norms))
    (w0, n0, a0), (w1, n1, a1) = runs
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n0, n1, rtol=1e-5)
    np.testing.assert_allclose(a0, a1, rtol=1e-5)
    if clip in ("norm", "global_norm", "value"):
        assert np.all(a0 <= n0 * (1 + 1e-6)) and np.any(a0 < n0 * (1 - 1e-3))


@pytest.mark.parametrize("wrapped", [False, True])
def test_under_mixed_float16_clipping_acts_on_unscaled_gradients(wrapped):
    # One SGD step: the weights move by lr * (the applied gradient), so the
    # update's global norm / lr is the clipped norm. Clipping the loss-scaled
    # gradients (x 256) would give threshold / 256 instead.
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, size=(8, 6)).astype("float32")
    y = rng.integers(0, 3, 8)
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    if wrapped:
        optimizer = C.ClippedOptimizer(keras.optimizers.SGD(0.1), clip="global_norm",
                                       threshold=0.05)
    else:
        optimizer = C.clipped_optimizer("sgd", 0.1, clip="global_norm", threshold=0.05)
    # Keras' default initial scale (2**15) overflows float16 on these inputs
    # at the first step, which is then skipped: start lower.
    model.compile(keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=256.0),
                  "sparse_categorical_crossentropy")
    logger = GradNormLogger(include_biases=True)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    assert float(model.optimizer.dynamic_scale.numpy()) == 256.0  # scaled, not skipped
    assert logger.skipped_steps.size == 0
    step = np.sqrt(sum(np.sum((a - b).astype(np.float64) ** 2)
                       for a, b in zip(model.get_weights(), before)))
    assert logger.global_norms[0] > 0.5  # the raw, unscaled gradient is well above 0.05
    np.testing.assert_allclose(step / 0.1, 0.05, rtol=1e-2)
    np.testing.assert_allclose(logger.applied_global_norms[0], 0.05, rtol=1e-3)


def _fit_and_measure_moves(model, x, y, logger, lr):
    """One epoch of `fit()` in batches of 8, in order: each step's global weight move / lr.

    Under plain SGD that is the global norm of the gradient the step applied.
    """
    before = []

    class Weights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            before.append([v.numpy() for v in self.model.trainable_variables])

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[logger, Weights()])
    after = before[1:] + [[v.numpy() for v in model.trainable_variables]]
    return np.array([np.sqrt(sum(np.sum((a - b).astype(np.float64) ** 2)
                                 for a, b in zip(w0, w1))) / lr
                     for w0, w1 in zip(before, after)])


@pytest.fixture
def float64_floatx():
    policy = keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize("clip", ["agc", "autoclip", "zclip"])
def test_stateful_presets_train_a_float64_model(clip, float64_floatx):
    # Under floatx float64 the presets' own state stays float32 (the norms' dtype). One
    # plain-SGD step per batch: the weights move by lr * the clipped gradient, so the
    # update's global norm / lr is the applied global norm the logger recorded.
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 3, size=(32, 6)), rng.integers(0, 3, 32)
    model = _model()
    assert {v.dtype for v in model.trainable_variables} == {"float64"}
    model.compile(C.clipped_optimizer("sgd", 0.1, clip=clip,
                                      **({"warmup": 2} if clip == "zclip" else {})),
                  "sparse_categorical_crossentropy")
    logger = GradNormLogger(include_biases=True)
    moved = _fit_and_measure_moves(model, x, y, logger, lr=0.1)
    np.testing.assert_allclose(logger.applied_global_norms, moved, rtol=1e-6)
    assert np.all(logger.applied_global_norms <= logger.global_norms * (1 + 1e-6))
    state = [v for v in model.optimizer.variables if "count" not in v.name
             and v.name in ("last_applied_norm", "clip_history", "z_mean", "z_var")]
    assert state and {v.dtype for v in state} == {"float32"}


@pytest.mark.parametrize("clip", ["norm", "zclip", "agc"])
def test_skipped_loss_scale_steps_keep_the_applied_rows_in_step(clip):
    # mixed_float16 with a loss scale that overflows float16 for the first steps: the
    # loss-scale optimizer skips them (the scale halves each time). The applied
    # recording has one row per step like the raw one: NaN on a skipped step, and on
    # every applied step the global norm of the weights' move / lr (plain SGD).
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 3, size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        optimizer = C.clipped_optimizer("sgd", 0.1, clip=clip, threshold=0.5 if clip == "norm"
                                        else None, **({"warmup": 2} if clip == "zclip" else {}))
        model.compile(keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0 ** 19),
                      "sparse_categorical_crossentropy")
        logger = GradNormLogger(include_biases=True)
        moved = _fit_and_measure_moves(model, x, y, logger, lr=0.1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    skipped = logger.skipped_steps
    assert 0 < len(skipped) < 8 and list(skipped) == list(range(len(skipped)))
    assert logger.applied_global_norms.shape == logger.global_norms.shape == (8,)
    applied = np.setdiff1d(np.arange(8), skipped)
    assert np.all(moved[skipped] == 0) and np.all(np.isnan(logger.applied_global_norms[skipped]))
    np.testing.assert_allclose(logger.applied_global_norms[applied], moved[applied], rtol=2e-3)
