"""A user's own fit() leaves a run directory; report, compare and check work on any model."""

import html.parser
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_gradtools import GradNormLogger, GradientMonitor, cli, diagnose
from keras_gradtools.plots import plot_run
from keras_gradtools.report import layer_table
from keras_gradtools.runs import FORMAT, load_run


def _data(n=96, features=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype("float32"), rng.integers(0, 3, n)


def _mlp(name="user_mlp"):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="h"),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ], name=name)


def _fit_run(run_dir, optimizer=None, epochs=2, callbacks=(), **logger_kwargs):
    x, y = _data()
    model = _mlp()
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2, clipnorm=1.0),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    logger = GradNormLogger(run_dir=run_dir, **logger_kwargs)
    monitor = GradientMonitor(logger, check_every=5, verbose=0)
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                        callbacks=[logger, monitor, *callbacks])
    return model, logger, monitor, history


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "my-run"
    model, logger, monitor, history = _fit_run(run_dir)
    return str(run_dir), model, logger, monitor, history.history


def test_logger_run_dir_holds_the_whole_run(user_run):
    run_dir, model, logger, monitor, history = user_run
    assert sorted(os.listdir(run_dir)) == ["config.json", "diagnosis.json", "grad_norms.json",
                                           "history.json", "model_summary.txt"]
    run = load_run(run_dir)
    np.testing.assert_array_equal(run.norms, logger.norms)
    assert run.keys == logger.keys and run.epoch_end_steps == [6, 12]
    np.testing.assert_allclose(run.applied_norms, logger.applied_recorder.norms)
    np.testing.assert_allclose(run.history["loss"], history["loss"], rtol=1e-6)
    np.testing.assert_allclose(run.history["accuracy"], history["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(run.history["grad_norm/user_mlp/out/kernel"],
                               [logger.norms[:6, 1].mean(), logger.norms[6:, 1].mean()],
                               rtol=1e-6)
    assert run.config["format"] == FORMAT and run.config["model"] == "user_mlp"
    assert run.config["clipping"] == "clipnorm=1"
    assert run.config["optimizer_config"]["class_name"] == "Adam"
    assert run.findings == monitor.report().to_dict()["findings"]
    summary = open(os.path.join(run_dir, "model_summary.txt")).read()
    assert "user_mlp" in summary and "Dense" in summary


def test_every_run_command_reads_a_logger_run(user_run, tmp_path):
    run_dir = user_run[0]
    runner = CliRunner()
    result = runner.invoke(cli.main, ["diagnose", run_dir, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["steps"] == 12
    result = runner.invoke(cli.main, ["plot", run_dir, "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "fig")) == [
        "accuracy.png", "grad_norms_steps.png", "gradient_flow.png",
        "loss_and_grad_norms.png", "norm_heatmap.png"]
    result = runner.invoke(cli.main, ["report", run_dir, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.main, ["compare", run_dir, run_dir])
    assert result.exit_code == 0, result.output


def test_run_dir_is_never_written_over(user_run):
    run_dir = user_run[0]
    before = {name: open(os.path.join(run_dir, name)).read() for name in os.listdir(run_dir)}
    x, y = _data()
    model = _mlp()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    weights = model.get_weights()
    with pytest.raises(FileExistsError, match="never writes over a run"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[GradNormLogger(run_dir=run_dir)])
    assert int(model.optimizer.iterations.numpy()) == 0  # refused before any step
    # The same logger, reused: the refused fit keeps its earlier recording.
    logger = user_run[2]
    recorded = logger.norms.copy()
    with pytest.raises(FileExistsError):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logger])
    np.testing.assert_array_equal(logger.norms, recorded)
    assert logger.epoch_end_steps == [6, 12]
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert {name: open(os.path.join(run_dir, name)).read()
            for name in os.listdir(run_dir)} == before
    # A file where the run directory should be: named as such, and left as it was.
    path = os.path.join(run_dir, "config.json")
    with pytest.raises(FileExistsError, match="config.json is a file, not a directory"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[GradNormLogger(run_dir=path)])
    assert open(path).read() == before["config.json"]


class _Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 3 and self.model.optimizer.iterations.numpy() > 6:
            raise KeyboardInterrupt


def test_an_interrupted_run_leaves_a_readable_directory(tmp_path):
    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _fit_run(run_dir, epochs=3, callbacks=[_Interrupt()], flush_every=2,
                 run_write_interval=0)
    run = load_run(run_dir)
    # Epoch 1 (6 steps), then epoch 2's flushes (every 2 batches) before the
    # interrupt at its batch 3: steps 0-8 are on disk.
    assert run.epoch_end_steps == [6] and len(run.norms) == 9
    assert len(run.history["loss"]) == 1
    assert not [n for n in os.listdir(run_dir) if n.endswith(".partial")]


# ---------------------------------------------------------------------------
# gradtools report
# ---------------------------------------------------------------------------


class _Html(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.refs, self.cells = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        for name in ("src", "href", "data", "action"):
            if name in attrs:
                self.refs.append(attrs[name])
        if tag == "td":
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(self._cell)
            self._cell = None


def test_report_is_one_self_contained_html_file(user_run):
    run_dir, _, logger, _, _ = user_run
    result = CliRunner().invoke(cli.main, ["report", run_dir])
    assert result.exit_code == 0, result.output
    path = os.path.join(run_dir, "report.html")
    text = open(path, encoding="utf-8").read()
    parser = _Html()
    parser.feed(text)
    assert parser.ids == ["config", "findings", "figures", "layers", "tensorboard"]
    assert parser.tags.count("img") == 5  # norms, flow, heatmap, accuracy, loss
    assert parser.refs and all(ref.startswith("data:image/png;base64,") for ref in parser.refs)
    for external in ("http://", "https://", "url(", "@import", "<script", "<link"):
        assert external not in text
    assert "tensorboard --logdir" in text and "clipnorm=1" in text
    # The per-layer table: first, last and largest norm, steps starved.
    run = load_run(run_dir)
    rows = layer_table(run)
    norms = logger.norms
    starved = diagnose.starved_steps(norms, logger.keys)
    assert [r[0] for r in rows] == logger.keys
    for i, (key, first, last, largest, count) in enumerate(rows):
        assert (first, last, largest) == (norms[0, i], norms[-1, i], norms[:, i].max())
        assert count == starved[:, i].sum()
        assert key in parser.cells
    # Never overwritten.
    result = CliRunner().invoke(cli.main, ["report", run_dir])
    assert result.exit_code == 2 and "never overwrites" in result.output


def test_report_lists_the_spikes_the_clipping_absorbed(tmp_path):
    run_dir = tmp_path / "absorbed"
    x, y = _data(n=8 * 200)
    x[8 * 150:8 * 155] *= 1e4  # five batches of huge inputs: a spike from step 150
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(1e-3, clipnorm=1.0),
                  loss="sparse_categorical_crossentropy")
    logger = GradNormLogger(run_dir=run_dir)
    monitor = GradientMonitor(logger, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[logger, monitor])
    report = monitor.report()
    assert report.findings == [] and [a["step"] for a in report.absorbed_spikes] == [150]
    run = load_run(run_dir)
    assert run.findings == [] and run.absorbed_spikes == report.to_dict()["absorbed_spikes"]
    result = CliRunner().invoke(cli.main, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    parser = _Html()
    parser.feed(open(run_dir / "report.html", encoding="utf-8").read())
    cells = parser.cells
    at = cells.index("spikes absorbed by the clipping")
    assert cells[at + 1] == "1"
    row = cells.index("150")  # the table of absorbed spikes: step, epoch, norm, level, jump
    assert cells[row + 1] == "1"
    assert float(cells[row + 2]) == pytest.approx(report.absorbed_spikes[0]["norm"], rel=1e-3)


# ---------------------------------------------------------------------------
# gradtools compare
# ---------------------------------------------------------------------------


def test_compare_sets_runs_side_by_side(tmp_path):
    plain = tmp_path / "sgd-plain"
    _fit_run(plain, optimizer=keras.optimizers.SGD(0.5))
    clipped = tmp_path / "sgd-clipped"
    # Biases recorded too: global_clipnorm caps the norm of all gradients together.
    _fit_run(clipped, optimizer=keras.optimizers.SGD(0.5, global_clipnorm=0.1),
             include_biases=True)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli.main, ["compare", str(plain), str(clipped), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| sgd")]
    assert [line.split("|")[1].strip() for line in lines] == ["sgd-plain", "sgd-clipped"]
    for line, run_dir in zip(lines, (plain, clipped)):
        run = load_run(run_dir)
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == str(len(run.norms))
        assert float(cells[2]) == pytest.approx(run.history["loss"][-1], rel=1e-3)
        assert float(cells[5]) == pytest.approx(np.nanmax(run.global_norms), rel=1e-3)
    applied = float([c.strip() for c in lines[1].split("|")[1:-1]][6])
    assert applied == pytest.approx(0.1, rel=1e-4)  # global_clipnorm: the applied norm is capped
    assert sorted(os.listdir(out)) == ["comparison.md", "comparison.png"]
    assert open(out / "comparison.md").read().strip() == "\n".join(
        line for line in result.output.splitlines() if line.startswith("|"))
    result = CliRunner().invoke(cli.main, ["compare", str(plain), str(clipped), "--out", str(out)])
    assert result.exit_code == 2 and "never overwrites" in result.output


def test_compare_figure_has_one_line_per_run(user_run):
    from keras_gradtools.plots import compare_runs

    run = load_run(user_run[0])
    fig = compare_runs([run, run])
    loss_ax, norm_ax = fig.axes[:2]
    assert len(loss_ax.get_lines()) == len(norm_ax.get_lines()) == 2
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), run.history["loss"])


# ---------------------------------------------------------------------------
# Bad input: exit 2, a message, nothing written
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["diagnose", "plot", "report", "compare"])
def test_run_commands_refuse_what_is_not_a_readable_run(user_run, tmp_path, command):
    good = user_run[0]

    def invoke(path):
        args = [command, str(path)] + ([good] if command == "compare" else [])
        before = sorted(os.listdir(path)) if os.path.isdir(path) else None
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        if before is not None:
            assert sorted(os.listdir(path)) == before  # nothing written
        return result.output

    assert "is not a directory" in invoke(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert "is not a keras_gradtools run directory" in invoke(tmp_path / "empty")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    text = open(os.path.join(good, "grad_norms.json")).read()
    (truncated / "grad_norms.json").write_text(text[: len(text) // 2])
    assert "cannot be read" in invoke(truncated)
    edited = tmp_path / "edited"
    edited.mkdir()
    data = json.loads(text)
    data["norms"][3] = data["norms"][3][:1]  # a row with a value missing
    (edited / "grad_norms.json").write_text(json.dumps(data))
    assert "not a gradient-norm recording" in invoke(edited)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "grad_norms.json").write_text(text)
    config = json.load(open(os.path.join(good, "config.json")))
    config["format"] = FORMAT + 1
    (newer / "config.json").write_text(json.dumps(config))
    assert "written by a newer keras_gradtools" in invoke(newer)
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "grad_norms.json").write_text(text)
    (probes / "activations.json").write_text(json.dumps({"steps": [0, 5], "stats": [{}]}))
    assert "not an activation record" in invoke(probes)
    (probes / "activations.json").write_text('{"steps": [0')
    assert "activations.json" in invoke(probes) and "cannot be read" in invoke(probes)


def test_compare_needs_two_runs(user_run):
    result = CliRunner().invoke(cli.main, ["compare", user_run[0]])
    assert result.exit_code == 2 and "at least two run directories" in result.output


# ---------------------------------------------------------------------------
# gradtools check on any model and data
# ---------------------------------------------------------------------------


def _layer_and_name(key):
    # A loaded model's paths may lack the model-name prefix: compare layer/variable.
    return "/".join(key.split("/")[-2:])


def _tape_norms(model, x, y):
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return {_layer_and_name(v.path): float(tf.norm(tf.convert_to_tensor(g)))
            for v, g in zip(model.trainable_variables, grads)
            if not v.path.endswith("/bias")}


def test_check_a_cifar_shaped_cnn_on_its_own_data(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="out"),
    ], name="cifar_cnn")
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(tmp_path / "cnn.keras")
    rng = np.random.default_rng(0)
    x = rng.random((40, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 40)
    np.savez(tmp_path / "cifar.npz", x=x, y=y)
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "cnn.keras"), "--data",
                                           str(tmp_path / "cifar.npz"), "--json"])
    assert result.exit_code == 0, result.output
    norms = {_layer_and_name(k): v for k, v in json.loads(result.output)["norms"].items()}
    expected = _tape_norms(model, x, y)
    assert set(norms) == set(expected)
    for key, value in expected.items():
        assert norms[key] == pytest.approx(value, rel=1e-4)
    # The wrong image size: both shapes named.
    np.savez(tmp_path / "mnist_like.npz", x=x[:, :28, :28, :1], y=y)
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "cnn.keras"), "--data",
                                           str(tmp_path / "mnist_like.npz")])
    assert result.exit_code == 2
    assert "(28, 28, 1)" in result.output and "(32, 32, 3)" in result.output
    # MNIST is only the default for MNIST-shaped models.
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "cnn.keras")])
    assert result.exit_code == 2 and "--data" in result.output


def test_check_a_two_input_model_saved_without_a_loss(tmp_path):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((5,), name="tokens")
    extra = keras.Input((3,), name="extra")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(20, 4, name="embed")(tokens))
    joined = keras.layers.Concatenate()([embedded, extra])
    out = keras.layers.Dense(1, name="out")(keras.layers.Dense(8, name="h")(joined))
    model = keras.Model({"tokens": tokens, "extra": extra}, out, name="two_inputs")
    model.save(tmp_path / "two.keras")
    rng = np.random.default_rng(1)
    data = {"x_tokens": rng.integers(0, 20, (30, 5)), "x_extra": rng.random((30, 3)),
            "y": rng.random((30, 1))}
    np.savez(tmp_path / "two.npz", **data)
    args = ["check", str(tmp_path / "two.keras"), "--data", str(tmp_path / "two.npz")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and "--loss" in result.output  # no loss saved, none given
    result = CliRunner().invoke(cli.main, args + ["--loss", "mse", "--json"])
    assert result.exit_code == 0, result.output
    norms = {_layer_and_name(k): v for k, v in json.loads(result.output)["norms"].items()}
    model.compile(optimizer="adam", loss="mse")
    x = {"tokens": data["x_tokens"], "extra": data["x_extra"].astype("float32")}
    expected = _tape_norms(model, x, data["y"].astype("float32"))
    assert set(norms) == set(expected)
    for key, value in expected.items():
        assert norms[key] == pytest.approx(value, rel=1e-4)
    np.savez(tmp_path / "one.npz", x_tokens=data["x_tokens"], y=data["y"])
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "two.keras"), "--data",
                                           str(tmp_path / "one.npz"), "--loss", "mse"])
    assert result.exit_code == 2 and "x_extra" in result.output


def test_check_refuses_bad_data_files(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="small")
    model.compile(optimizer="sgd", loss="mse")
    model.save(tmp_path / "small.keras")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    np.savez(tmp_path / "no_y.npz", x=np.ones((4, 4)))
    np.savez(tmp_path / "counts.npz", x=np.ones((4, 4)), y=np.ones((3, 2)))
    for name, message in (("absent.npz", "no file at"), ("junk.npz", "cannot be read"),
                          ("no_y.npz", "no 'y' array"), ("counts.npz", "different numbers")):
        result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "small.keras"),
                                               "--data", str(tmp_path / name)])
        assert result.exit_code == 2 and message in result.output, (name, result.output)
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "small.keras"), "--data",
                                           str(tmp_path / "counts.npz"), "--loss", "nonsense"])
    assert result.exit_code == 2 and "is not a Keras loss" in result.output


def test_a_run_is_readable_before_its_first_step(tmp_path):
    class _Stop(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit_run(tmp_path / "early", callbacks=[_Stop()])
    run = load_run(tmp_path / "early")
    assert run.norms.shape == (0, 2) and run.keys == ["user_mlp/h/kernel", "user_mlp/out/kernel"]
    for command in ("diagnose", "report", "plot"):
        result = CliRunner().invoke(cli.main, [command, str(tmp_path / "early")])
        assert result.exit_code == 0, (command, result.output)


def test_a_run_whose_loss_turned_nan_loads_plots_and_reports(tmp_path):
    # NaN inputs in the last batch: that epoch's loss and gradient norms are NaN, stored
    # in the run's JSON as "nan" and read back as floats.
    x, y = _data(32)
    x[-1] = np.nan
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="out")], name="lin")
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        callbacks=[GradNormLogger(run_dir=tmp_path / "nan-run")])
    assert np.isnan(history.history["loss"]).all()
    run = load_run(tmp_path / "nan-run")
    assert np.isnan(run.history["loss"]).all() and len(run.history["loss"]) == 2
    assert np.isnan(run.history["grad_norm/lin/out/kernel"]).all()
    written = plot_run(tmp_path / "nan-run")
    assert "loss_and_grad_norms.png" in {os.path.basename(p) for p in written}
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path / "nan-run"), "--out",
                                           str(tmp_path / "reports" / "nan.html")])
    assert result.exit_code == 0, result.output
    assert "nan-run" in (tmp_path / "reports" / "nan.html").read_text()
