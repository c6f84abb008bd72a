"""Figures: what was drawn (titles, labels, scales, lines, data), never pixels."""

import json
import os
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

from keras_gradtools import cli, plots
from keras_gradtools.diagnose import diagnose_norms

KEYS = [f"deep/dense_{i}/kernel" for i in range(22)]


def _norms(steps=300):
    rng = np.random.default_rng(0)
    levels = np.logspace(-6, 0, len(KEYS))
    return levels * np.exp(rng.normal(0, 0.2, size=(steps, len(KEYS))))


def test_steps_plot_log_scale_lines_and_findings():
    norms = _norms()
    report = diagnose_norms(norms, KEYS)
    fig = plots.grad_norms_over_steps(norms, KEYS, report.findings, epoch_end_steps=[150, 300])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "training step"
    lines = [l for l in ax.get_lines() if l.get_label().startswith("dense_")]
    assert len(lines) == 22
    np.testing.assert_allclose(lines[3].get_ydata(), norms[:, 3])
    marks = [l for l in ax.get_lines() if l.get_label().startswith("vanishing")]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == report.first("vanishing").step
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > 0  # outside the axes


def test_figures_of_a_model_with_hundreds_of_variables_stay_readable():
    """Past plots.MAX_LABELS layers (a keras.applications or keras-hub model): a colour
    bar labelled at evenly spaced layers, first and last included, instead of a legend
    entry per layer; axes label every few layers; figures stop growing."""
    keys = [f"net/block_{i // 2}/{'conv' if i % 2 == 0 else 'bn'}/kernel" for i in range(150)]
    rng = np.random.default_rng(0)
    norms = np.logspace(-3, 0, len(keys)) * np.exp(rng.normal(0, 0.2, size=(40, len(keys))))
    names = plots.short_names(keys)
    finding = {"kind": "exploding", "step": 30}
    fig = plots.grad_norms_over_steps(norms, keys, [finding])
    ax, bar = fig.axes
    layer_lines = [l for l in ax.get_lines() if l.get_label() in set(names)]
    assert len(layer_lines) == 150  # every layer still drawn
    np.testing.assert_allclose(layer_lines[149].get_ydata(), norms[:, 149])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["exploding (step 30)"]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels[0] == names[0] and labels[-1] == names[-1]
    assert 10 <= len(labels) <= plots.MAX_LABELS and set(labels) <= set(names)
    assert "150 layers" in bar.get_ylabel()

    fig = plots.gradient_flow(norms, keys)
    ax = fig.axes[0]
    assert len(ax.containers[1]) == 150
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown[0] == names[0] and shown[-1] == names[-1] and len(shown) <= plots.MAX_LABELS
    assert fig.get_size_inches()[0] <= 24

    fig = plots.norm_heatmap(norms, keys)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown[0] == names[0] and shown[-1] == names[-1] and len(shown) <= plots.MAX_LABELS
    # each label sits on its own layer's row
    assert [names.index(t) for t in shown] == list(ax.get_yticks().astype(int))
    assert fig.get_size_inches()[1] <= 24


def test_gradient_flow_bars_input_to_output():
    norms = _norms()
    fig = plots.gradient_flow(norms, KEYS, window=(100, 200))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == [k[5:] for k in KEYS]
    means = [p.get_height() for p in ax.containers[1]]
    np.testing.assert_allclose(means, norms[100:200].mean(axis=0))
    maxes = [p.get_height() for p in ax.containers[0]]
    np.testing.assert_allclose(maxes, norms[100:200].max(axis=0))
    assert "steps 100-200" in ax.get_title()


def test_heatmap_rows_are_layers_and_values_log10():
    norms = _norms(50)
    fig = plots.norm_heatmap(norms, KEYS)
    image = fig.axes[0].get_images()[0]
    np.testing.assert_allclose(image.get_array(), np.log10(norms).T)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "dense_0/kernel"
    fig = plots.norm_heatmap(_norms(5000), KEYS, max_columns=1000)
    assert fig.axes[0].get_images()[0].get_array().shape == (22, 1000)


def test_article_figures():
    history = {"loss": [0.9, 0.7, 40000.0, 40.0], "accuracy": [0.7, 0.8, 0.75, 0.5],
               "grad_norm/deep/dense_0/kernel": [1, 2, 3e4, 50],
               "grad_norm/deep/output/kernel": [1, 1, 2e5, 60]}
    fig = plots.accuracy_curve(history)
    assert fig.axes[0].get_ylabel() == "accuracy"
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), history["accuracy"])
    fig = plots.loss_and_grad_norms(history)
    loss_ax, acc_ax, norm_ax = fig.axes[0], fig.axes[2], fig.axes[1]
    assert loss_ax.get_yscale() == "log"  # a 40000x blow-up is drawn on a log axis
    assert norm_ax.get_yscale() == "log" and len(norm_ax.get_lines()) == 2
    assert acc_ax.get_ylabel() == "accuracy"


def test_weight_histogram_panels():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(2, name="b")], name="m")
    fig = plots.weight_histogram(model)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["a/kernel", "b/kernel"]
    counts = sum(p.get_height() for p in fig.axes[0].patches)
    assert counts == 12


def test_plot_command_writes_all_and_never_overwrites(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    norms = _norms(120)
    json.dump({"keys": KEYS, "epoch_end_steps": [60, 120], "norms": norms.tolist()},
              open(run / "grad_norms.json", "w"))
    json.dump({"loss": [1.0, 0.5], "accuracy": [0.5, 0.7]}, open(run / "history.json", "w"))
    result = CliRunner().invoke(cli.main, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    written = sorted(os.listdir(run / "figures"))
    assert written == ["accuracy.png", "grad_norms_steps.png", "gradient_flow.png",
                       "loss_and_grad_norms.png", "norm_heatmap.png"]
    result = CliRunner().invoke(cli.main, ["plot", str(run)])
    assert result.exit_code == 2 and "never overwrites" in result.output
    result = CliRunner().invoke(cli.main, ["plot", str(tmp_path / "nothing")])
    assert result.exit_code == 2


def test_a_run_that_recorded_no_step_says_so_instead_of_empty_figures(tmp_path):
    """A fit that trained nothing (`initial_epoch == epochs`) leaves a run with no step:
    `plot` writes nothing and says why, `report` says so; no empty axes, no warnings."""
    import warnings

    from keras_gradtools.report import write_report

    run = tmp_path / "empty"
    run.mkdir()
    json.dump({"keys": KEYS, "epoch_end_steps": [], "norms": []},
              open(run / "grad_norms.json", "w"))
    json.dump({}, open(run / "history.json", "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a log scale of no data
        result = CliRunner().invoke(cli.main, ["plot", str(run)])
        assert result.exit_code == 0, result.output
        assert "recorded no step and no History: no figure to draw" in result.output
        assert not (run / "figures").exists()
        page = pathlib.Path(write_report(str(run))).read_text()
    assert "The run recorded no step: no figure to draw." in page and "<img" not in page


def test_labels_stay_unique_for_repeated_block_layers():
    keys = ["resnet/block_0/conv1/kernel", "resnet/block_1/conv1/kernel", "resnet/output/kernel"]
    fig = plots.gradient_flow(np.ones((3, 3)), keys)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "block_0/conv1/kernel", "block_1/conv1/kernel", "output/kernel"]


def test_activations_figure_draws_mean_and_std_band_per_layer():
    from keras_gradtools.activations import ActivationRecord

    record = ActivationRecord()
    for step, top in ((0, 0.5), (200, 0.1), (400, 0.05)):
        record.append(step, {"deep/dense_0": {"mean": 0.5, "std": 0.1},
                             "deep/dense_1": {"mean": top, "std": 0.02}})
    fig = plots.activations_over_training(record)
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert sorted(lines) == ["dense_0", "dense_1"]
    np.testing.assert_allclose(lines["dense_1"].get_xdata(), [0, 200, 400])
    np.testing.assert_allclose(lines["dense_1"].get_ydata(), [0.5, 0.1, 0.05])
    band = ax.collections[1].get_paths()[0].vertices[:, 1]  # dense_1's mean +/- std
    assert band.min() == pytest.approx(0.03) and band.max() == pytest.approx(0.52)


def test_update_ratio_figure_log_scale_with_the_band():
    ratios = np.tile([1e-3, 2e-2], (50, 1))
    ratios[10, 0] = 0.0  # a skipped step is not drawn at 0 on a log axis
    fig = plots.update_ratios_over_steps(ratios, KEYS[:2])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "||dw|| / ||w||"
    lines = [l for l in ax.get_lines() if l.get_label().startswith("dense_")]
    assert len(lines) == 2 and np.isnan(lines[0].get_ydata()[10])
    band = [p for p in ax.patches if p.get_label() == "healthy band"]
    assert len(band) == 1


def test_plot_command_adds_activation_and_update_figures(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    json.dump({"keys": KEYS[:2], "epoch_end_steps": [20], "norms": np.ones((20, 2)).tolist(),
               "update_ratios": np.full((20, 2), 1e-3).tolist()}, open(run / "grad_norms.json", "w"))
    json.dump({"steps": [0, 10], "stats": [{"deep/dense_0": {"mean": 0.5, "std": 0.1}}] * 2},
              open(run / "activations.json", "w"))
    result = CliRunner().invoke(cli.main, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert {"activations.png", "update_ratios.png"} <= set(os.listdir(run / "figures"))
