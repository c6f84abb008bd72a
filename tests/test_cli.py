"""The gradtools command: reproduce, diagnose, check; user errors exit 2 with a message."""

import json
import os

import numpy as np
import keras
import pytest
from click.testing import CliRunner

from keras_gradtools import cli, create_deep_sigmoid_model, resnet_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(cli.main, [
        "reproduce", "--case", "vanishing", "--epochs", "2", "--subset", "1600",
        "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    (name,) = os.listdir(out)
    return str(out / name), result.output


def test_reproduce_prints_table_and_writes_run(run_dir):
    path, output = run_dir
    assert "case" in output and "train acc" in output
    assert "vanishing" in output.splitlines()[-1] or any(
        line.startswith("vanishing ") for line in output.splitlines())
    assert os.path.basename(path) == "vanishing-seed0-001"


def test_reproduce_never_overwrites(run_dir, tmp_path):
    path, _ = run_dir
    out = os.path.dirname(path)
    result = CliRunner().invoke(cli.main, [
        "reproduce", "--case", "vanishing", "--epochs", "1", "--subset", "64",
        "--out", out, "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["vanishing-seed0-001", "vanishing-seed0-002"]


def test_reproduce_unknown_case_is_a_usage_error():
    result = CliRunner().invoke(cli.main, ["reproduce", "--case", "exploded"])
    assert result.exit_code == 2
    assert "unknown case 'exploded'" in result.output


def test_reproduce_missing_data_file(tmp_path):
    result = CliRunner().invoke(cli.main, [
        "reproduce", "--case", "vanishing", "--data", str(tmp_path / "none.npz")])
    assert result.exit_code == 2 and "no file at" in result.output


def test_reproduce_damaged_data_file_is_refused_before_any_run(tmp_path):
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(tmp_path / "labels.npz", x_train=np.zeros((2, 28, 28), np.uint8),
             y_train=np.array([1, 12]), x_test=np.zeros((1, 28, 28), np.uint8),
             y_test=np.zeros(1, np.uint8))
    for name, message in [("text.npz", "not a zip archive"),
                          ("labels.npz", "not the digits 0-9 (first at index 1: 12)")]:
        result = CliRunner().invoke(cli.main, [
            "reproduce", "--case", "vanishing", "--data", str(tmp_path / name),
            "--out", str(tmp_path / "runs")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_diagnose_text_and_json(run_dir):
    path, _ = run_dir
    result = CliRunner().invoke(cli.main, ["diagnose", path])
    assert result.exit_code == 0, result.output
    assert "[vanishing] from step 0 (epoch 1)" in result.output
    result = CliRunner().invoke(cli.main, ["diagnose", path, "--json"])
    data = json.loads(result.output)
    assert data["healthy"] is False and data["findings"][0]["kind"] == "vanishing"
    saved = json.load(open(os.path.join(path, "diagnosis.json")))
    assert data["findings"] == saved["findings"]  # the same report as during training


def test_diagnose_rejects_non_runs(tmp_path):
    result = CliRunner().invoke(cli.main, ["diagnose", str(tmp_path)])
    assert result.exit_code == 2 and "is not a keras_gradtools run directory" in result.output
    result = CliRunner().invoke(cli.main, ["diagnose", str(tmp_path / "absent")])
    assert result.exit_code == 2 and "is not a directory" in result.output
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(cli.main, ["diagnose", str(tmp_path)])
    assert result.exit_code == 2 and "grad_norms.json" in result.output and "missing" in result.output
    (tmp_path / "grad_norms.json").write_text("{not json")
    result = CliRunner().invoke(cli.main, ["diagnose", str(tmp_path)])
    assert result.exit_code == 2 and "cannot be read" in result.output
    assert "Traceback" not in result.output


def test_check_calls_sigmoid_vanishing_and_resnet_healthy(tmp_path):
    keras.utils.set_random_seed(0)
    sigmoid = create_deep_sigmoid_model()
    sigmoid.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    sigmoid.save(tmp_path / "sigmoid.keras")
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "sigmoid.keras"),
                                           "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert "[vanishing]" in result.output and "dense_0/kernel" in result.output

    resnet = resnet_model(filters=(16, 16, 32), strides=(1, 1, 2))
    resnet.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    resnet.save(tmp_path / "resnet.keras")
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "resnet.keras"),
                                           "--batch-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"]["findings"] == []


def test_check_states_the_cause_from_the_activations_at_initialization(tmp_path):
    """`gradtools check` probes the activations on the batch (inference mode): their
    statistics equal a NumPy forward pass, and the vanishing finding states its cause.
    A model with batch normalization gets none (its moving statistics are not yet the
    batch's), and says so."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,))]
                             + [keras.layers.Dense(8, activation="sigmoid", name=f"s{i}")
                                for i in range(8)]
                             + [keras.layers.Dense(3, activation="softmax", name="out")],
                             name="deep")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.save(tmp_path / "deep.keras")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    args = ["check", str(tmp_path / "deep.keras"), "--data", str(tmp_path / "data.npz"),
            "--batch-size", "32"]
    result = CliRunner().invoke(cli.main, args + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    a, gains = x.astype(np.float64), []
    for i in range(8):
        w, b = model.get_layer(f"s{i}").get_weights()
        a = 1.0 / (1.0 + np.exp(-(a @ w + b)))
        gains.append(np.mean(a * (1 - a)))
    assert list(data["activations"]) == [f"s{i}" for i in range(8)]
    np.testing.assert_allclose([data["activations"][f"s{i}"]["gain"] for i in range(8)], gains,
                               rtol=1e-5)
    finding = data["report"]["findings"][0]
    assert finding["kind"] == "vanishing" and finding["evidence"]["cause"] == "compounding"
    # The first starved layer's predicted ratio: the gains from it to the output (softmax's
    # layer is the output, not a hidden layer: not in the product).
    first = finding["layers"][0].rsplit("/", 1)[0]
    start = [f"s{i}" for i in range(8)].index(first)
    assert finding["evidence"]["predicted_ratio"] == pytest.approx(np.prod(gains[start:]),
                                                                   rel=1e-5)
    result = CliRunner().invoke(cli.main, args)
    assert "Activations at initialization (inference mode, first 32 samples" in result.output
    assert "Cause: the activations' derivative compounded over depth" in result.output

    keras.utils.set_random_seed(0)
    normed = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                               keras.layers.BatchNormalization(),
                               keras.layers.Dense(3, activation="softmax")])
    normed.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    normed.save(tmp_path / "normed.keras")
    args[1] = str(tmp_path / "normed.keras")
    result = CliRunner().invoke(cli.main, args + ["--json"])
    assert result.exit_code == 0 and json.loads(result.output)["activations"] is None
    result = CliRunner().invoke(cli.main, args)
    assert "No activation statistics: the model has batch normalization" in result.output


def test_check_bad_inputs(tmp_path):
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "none.keras")])
    assert result.exit_code == 2 and "no file at" in result.output
    (tmp_path / "junk.keras").write_bytes(b"junk")
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "junk.keras")])
    assert result.exit_code == 2 and "is not a .keras archive (not a zip file" in result.output
    (tmp_path / "junk.h5").write_bytes(b"junk")
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "junk.h5")])
    assert result.exit_code == 2 and "cannot be loaded as a Keras model" in result.output
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    model.save(tmp_path / "small.keras")
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "small.keras")])
    assert result.exit_code == 2 and "(5,)" in result.output
    # Data that is not an .npz, or holds NaN or Inf: refused before any gradient is taken.
    small = str(tmp_path / "small.keras")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    result = CliRunner().invoke(cli.main, ["check", small, "--data", str(tmp_path / "junk.npz")])
    assert result.exit_code == 2 and "cannot be read as an .npz (not a zip archive" in result.output
    x, y = np.ones((8, 5), "float32"), np.zeros((8, 2), "float32")
    x[3, 4] = np.nan
    np.savez(tmp_path / "nan_x.npz", x=x, y=y)
    result = CliRunner().invoke(cli.main, ["check", small, "--data", str(tmp_path / "nan_x.npz")])
    assert result.exit_code == 2 and "x holds NaN or Inf values (first at index (3, 4))" \
        in result.output
    y[6, 1] = np.inf
    np.savez(tmp_path / "inf_y.npz", x=np.ones((8, 5), "float32"), y=y)
    result = CliRunner().invoke(cli.main, ["check", small, "--data", str(tmp_path / "inf_y.npz")])
    assert result.exit_code == 2 and "y holds NaN or Inf values (first at index (6, 1))" \
        in result.output
    assert "Traceback" not in result.output and "Gradient norms" not in result.output


_LAYERS = """
import keras


@keras.saving.register_keras_serializable(package="gradtools_test_cli")
class Scale(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x
"""


def test_check_loads_a_model_with_the_users_own_layers(tmp_path):
    """`--import` registers the user's layers before loading; `--no-safe-mode` loads a
    Lambda. Without them: what is missing and what to pass, exit code 2."""
    import importlib.util
    import sys

    import tensorflow as tf

    source = tmp_path / "gradtools_test_layers.py"
    source.write_text(_LAYERS)
    spec = importlib.util.spec_from_file_location("gradtools_test_layers", source)
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh"),
                              layers.Scale(), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.save(tmp_path / "own.keras")
    # As in a fresh process: the class is not registered until its module is imported.
    keras.saving.get_custom_objects().pop("gradtools_test_cli>Scale")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    args = ["check", str(tmp_path / "own.keras"), "--data", str(tmp_path / "data.npz"),
            "--batch-size", "16", "--json"]
    try:
        result = CliRunner().invoke(cli.main, args)
        # (Keras 3.3 says it "could not deserialize" the class, newer ones "could not locate")
        assert result.exit_code == 2 and "class 'Scale'" in result.output
        assert "--import" in result.output and "Full object config" not in result.output
        result = CliRunner().invoke(cli.main, args + ["--import", str(tmp_path / "nope.py")])
        assert result.exit_code == 2 and "no file at" in result.output
        result = CliRunner().invoke(cli.main, args + ["--import", "gradtools_no_such_module"])
        assert result.exit_code == 2 and "cannot import gradtools_no_such_module" in result.output
        result = CliRunner().invoke(cli.main, args + ["--import", str(source)])
        assert result.exit_code == 0, result.output
    finally:
        keras.saving.get_custom_objects().pop("gradtools_test_cli>Scale", None)
        sys.modules.pop("gradtools_test_layers", None)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x)))
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    expected = [float(tf.norm(g)) for g in tape.gradient(loss, kernels)]
    norms = json.loads(result.output)["norms"]
    # (A loaded Sequential's paths lack the model's name: Keras builds its layers apart.)
    assert [k.split("/")[-2:] for k in norms] == [v.path.split("/")[-2:] for v in kernels]
    np.testing.assert_allclose(list(norms.values()), expected, rtol=1e-5)

    lam = keras.Sequential([keras.Input((6,)), keras.layers.Lambda(lambda t: 2.0 * t),
                            keras.layers.Dense(3, activation="softmax")])
    lam.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    lam.save(tmp_path / "lambda.keras")
    args = ["check", str(tmp_path / "lambda.keras"), "--data", str(tmp_path / "data.npz")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and "Pass --no-safe-mode" in result.output
    result = CliRunner().invoke(cli.main, args + ["--no-safe-mode"])
    assert result.exit_code == 0, result.output


def _write_norms(directory, skipped):
    rng = np.random.default_rng(0)
    norms = (np.array([0.3, 0.6, 1.0]) * np.exp(rng.normal(0, 0.3, (120, 3)))).tolist()
    for step in skipped:
        norms[step] = ["inf", "nan", "inf"]
    os.makedirs(directory)
    with open(os.path.join(directory, "grad_norms.json"), "w") as f:
        json.dump({"keys": ["m/a/kernel", "m/b/kernel", "m/c/kernel"],
                   "epoch_end_steps": [120], "skipped_steps": list(skipped),
                   "norms": norms}, f)
    return str(directory)


def test_diagnose_leaves_loss_scale_skips_unjudged(tmp_path):
    path = _write_norms(tmp_path / "mp", skipped=range(0, 12))
    result = CliRunner().invoke(cli.main, ["diagnose", path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["findings"] == [] and report["skipped_steps"] == 12 and report["healthy"]


def test_diagnose_rejects_skipped_steps_outside_the_recording(tmp_path):
    path = _write_norms(tmp_path / "bad", skipped=[5])
    with open(os.path.join(path, "grad_norms.json")) as f:
        data = json.load(f)
    data["skipped_steps"] = [500]
    with open(os.path.join(path, "grad_norms.json"), "w") as f:
        json.dump(data, f)
    result = CliRunner().invoke(cli.main, ["diagnose", path])
    assert result.exit_code == 2
    assert "not a gradient-norm recording" in result.output
    assert "skipped step outside the recording" in result.output


def test_report_and_compare_read_a_reproduced_run(run_dir, tmp_path):
    path, _ = run_dir
    result = CliRunner().invoke(cli.main, ["report", path, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.html").read_text()
    assert "vanishing from step 0" in text and "deep_sigmoid/dense_0/kernel" in text
    result = CliRunner().invoke(cli.main, ["compare", path, path])
    assert result.exit_code == 0, result.output
    summary = json.load(open(os.path.join(path, "summary.json")))
    row = [line for line in result.output.splitlines() if line.startswith("| vanishing")][0]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert float(cells[2]) == pytest.approx(summary["final_loss"], rel=1e-3)
    assert float(cells[3]) == pytest.approx(summary["final_accuracy"], rel=1e-3)
    assert cells[7] == "vanishing"


def test_backend_option_refuses_a_second_backend_in_one_process(tmp_path):
    """Keras runs on TensorFlow here: --backend jax cannot take effect, and says so."""
    import importlib.util

    expected = ("already running on 'tensorflow'" if importlib.util.find_spec("jax")
                else "the jax backend needs the jax package: pip install 'keras_gradtools[jax]'")
    for args in (["--backend", "jax", "diagnose", str(tmp_path)],
                 ["reproduce", "--backend", "jax", "--case", "vanishing", "--out", str(tmp_path)]):
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 2, result.output
        assert expected in result.output
    assert os.listdir(tmp_path) == []  # refused before any work
    result = CliRunner().invoke(cli.main, ["--backend", "mxnet", "diagnose", str(tmp_path)])
    assert result.exit_code == 2 and "'mxnet' is not one of" in result.output
