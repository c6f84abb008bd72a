"""TensorBoard output read back with TensorBoard's own EventAccumulator."""

import glob

import numpy as np
import pytest
import keras
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from keras_gradtools import GradNormLogger, GradientMonitor, create_deep_sigmoid_model


def _read(train_dir):
    ea = EventAccumulator(str(train_dir), size_guidance={"tensors": 0})
    ea.Reload()
    return ea


def _values(ea, tag):
    events = ea.Tensors(tag)
    return [e.step for e in events], [tf.make_ndarray(e.tensor_proto) for e in events]


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ], name="net")


def _data(n=96):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def test_scalars_and_histograms_read_back(tmp_path):
    x, y = _data()
    model = _model()
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    logger = GradNormLogger(log_dir=tmp_path / "run", update_freq=3, histogram_freq=5,
                            flush_every=4)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        logger, keras.callbacks.TensorBoard(str(tmp_path / "run"))])
    ea = _read(tmp_path / "run" / "train")
    tags = set(ea.Tags()["tensors"])
    ours = {t for t in tags if t.startswith("grad_")}
    assert ours == {"grad_norm/net/h/kernel", "grad_norm/net/out/kernel", "grad_norm/global",
                    "grad_hist/net/h/kernel", "grad_hist/net/out/kernel"}
    assert "epoch_loss" in tags  # Keras' own scalars share the run
    recorded = 24  # 12 steps x 2 epochs
    for key in logger.keys:
        steps, values = _values(ea, f"grad_norm/{key}")
        # every 3rd recorded step, tagged with the optimizer step after it (1-based)
        assert steps == [i + 1 for i in range(0, recorded, 3)]
        np.testing.assert_allclose(values, logger.history[key][::3], rtol=1e-6)
    steps, values = _values(ea, "grad_norm/global")
    np.testing.assert_allclose(values, logger.global_norms[::3], rtol=1e-6)
    steps, hists = _values(ea, "grad_hist/net/h/kernel")
    assert steps == [i + 1 for i in range(0, recorded, 5)]
    for h in hists:
        assert h.shape == (30, 3)
        assert h[:, 2].sum() == 6 * 8  # every element of the kernel counted once
        assert np.all(h[:-1, 1] == h[1:, 0])  # contiguous buckets


def test_histogram_values_match_the_gradient(tmp_path):
    x, y = _data(8)
    model = _model()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    model.compile(keras.optimizers.SGD(0.5), loss_fn)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grad = tape.gradient(loss, model.get_layer("out").kernel).numpy()
    logger = GradNormLogger(log_dir=tmp_path / "r", histogram_freq=1, histogram_buckets=4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    (_, (h,)) = _values(_read(tmp_path / "r" / "train"), "grad_hist/net/out/kernel")
    assert h[0, 0] == pytest.approx(grad.min(), abs=1e-5)
    assert h[-1, 1] == pytest.approx(grad.max(), abs=1e-5)
    counts, _ = np.histogram(grad, bins=4, range=(h[0, 0], h[-1, 1]))
    np.testing.assert_array_equal(h[:, 2], counts)


def test_monitor_findings_become_text_and_stop_leaves_flushed_files(tmp_path):
    keras.utils.set_random_seed(0)
    model = create_deep_sigmoid_model(num_layers=10, units=16, input_dim=6)
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = _data(400)
    logger = GradNormLogger(log_dir=tmp_path / "run", update_freq=1)
    monitor = GradientMonitor(logger, actions={"vanishing": "stop"}, check_every=10, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[logger, monitor])
    steps_done = len(logger.norms)
    assert steps_done < 100  # stopped
    ea = _read(tmp_path / "run" / "train")
    (event,) = ea.Tensors("gradtools/findings")
    assert b"[vanishing]" in tf.make_ndarray(event.tensor_proto).item()
    steps, _ = _values(ea, "grad_norm/global")
    assert steps == list(range(1, steps_done + 1))


def test_interrupted_run_leaves_readable_events(tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 9:
                raise KeyboardInterrupt

    x, y = _data()
    model = _model()
    model.compile("adam", "sparse_categorical_crossentropy")
    logger = GradNormLogger(log_dir=tmp_path / "run", update_freq=1, flush_every=4)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger, Interrupt()])
    steps, values = _values(_read(tmp_path / "run" / "train"), "grad_norm/global")
    # Nine steps ran; the events hold every step up to the last host read (every 4 steps
    # at the latest), readable and in order; the rest is still in the logger's recording.
    assert len(logger.norms) == 9
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 9 - 4
    np.testing.assert_allclose(values, logger.global_norms[:len(steps)], rtol=1e-6)


def test_a_log_dir_holding_a_run_is_refused(tmp_path):
    x, y = _data(16)
    model = _model()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[GradNormLogger(log_dir=tmp_path / "run")])
    before = sorted(glob.glob(str(tmp_path / "run" / "train" / "*")))
    with pytest.raises(FileExistsError, match="already holds the gradient summaries"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[GradNormLogger(log_dir=tmp_path / "run")])
    assert sorted(glob.glob(str(tmp_path / "run" / "train" / "*"))) == before
    assert "apply" not in vars(model.optimizer)
    # A file where the log directory should be: named, and left as it was.
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt is a file, not a directory"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[GradNormLogger(log_dir=tmp_path / "notes.txt")])
    assert (tmp_path / "notes.txt").read_text() == "mine"


class _Reader(keras.callbacks.Callback):
    """A user's callback that reads the logger's results at every batch."""

    def __init__(self, logger):
        super().__init__()
        self.logger = logger
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((len(self.logger.history["net/out/kernel"]),
                          self.logger.norms.shape[0], len(self.logger.global_norms)))


def test_reading_during_fit_loses_no_step_for_tensorboard_monitor_or_save(tmp_path):
    # 64 samples, batch 2: 32 steps, every one written (update_freq=1) and
    # histogrammed every 4th; a callback reads history, norms and global_norms
    # after every batch.
    x = np.random.RandomState(0).rand(64, 6).astype("float32")
    y = np.arange(64) % 3
    model = _model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    logger = GradNormLogger(log_dir=tmp_path / "run", update_freq=1, histogram_freq=4)
    monitor = GradientMonitor(logger, check_every=10, verbose=0)
    steps_seen_by_monitor = []
    original = monitor._on_rows

    def counting(first, rows, skipped=None):
        steps_seen_by_monitor.extend(range(first, first + len(rows)))
        return original(first, rows, skipped)

    monitor._on_rows = counting
    reader = _Reader(logger)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[logger, monitor, reader])
    # The reads saw every step as it came (step i after batch i).
    assert reader.seen == [(i + 1, i + 1, i + 1) for i in range(32)]
    ea = _read(tmp_path / "run" / "train")
    steps, values = _values(ea, "grad_norm/net/out/kernel")
    assert steps == list(range(1, 33))
    np.testing.assert_allclose(np.ravel(values), logger.history["net/out/kernel"], rtol=1e-6)
    hist_steps, _ = _values(ea, "grad_hist/net/out/kernel")
    assert hist_steps == [1, 5, 9, 13, 17, 21, 25, 29]
    assert steps_seen_by_monitor == list(range(32))
    assert monitor.report().steps == 32
    path = logger.save(tmp_path / "norms.json")
    import json
    with open(path) as f:
        assert len(json.load(f)["norms"]) == 32
