"""GradientMonitor: findings while training, actions, and the run directory after a stop."""

import json
import os

import numpy as np
import pytest
import keras

from keras_gradtools import (
    GradNormLogger, GradientMonitor, GradientProblemError, create_deep_linear_model,
    create_deep_sigmoid_model,
)
from keras_gradtools.experiments import run_experiment


def _data(n=400, d=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, 10, n)


def _sigmoid_model():
    keras.utils.set_random_seed(0)
    model = create_deep_sigmoid_model(num_layers=10, units=32, input_dim=20)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def test_nan_batch_found_at_its_step_and_training_stops(tmp_path):
    x, y = _data(n=32 * 200, d=784)
    x[32 * 30 + 3, 5] = np.nan  # batch 30
    result = run_experiment(
        "exploding", epochs=1, out_dir=str(tmp_path), data=(x, y), verbose=0, shuffle=False,
        write_figures=False, monitor={"check_every": 10, "verbose": 0},
    )
    finding = result["report"].first("nonfinite")
    assert finding.step == 30 and finding.epoch == 1
    assert finding.layers[0] == "deep_linear/dense_0/kernel"
    steps = len(result["logger"].norms)
    assert 30 < steps <= 41  # stopped at the next check, not after 200 steps
    # The run directory holds everything recorded up to the stop.
    run = result["run_dir"]
    saved = json.load(open(os.path.join(run, "grad_norms.json")))
    assert len(saved["norms"]) == steps
    diagnosis = json.load(open(os.path.join(run, "diagnosis.json")))
    assert diagnosis["findings"][0]["kind"] == "nonfinite"
    assert diagnosis["findings"][0]["step"] == 30
    assert os.path.exists(os.path.join(run, "summary.json"))


def test_vanishing_found_early_with_layers_input_to_output(capsys):
    model = _sigmoid_model()
    x, y = _data()
    monitor = GradientMonitor(check_every=20)
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[monitor], verbose=0)
    finding = monitor.report().first("vanishing")
    assert finding is not None and finding.detected_step < 200
    assert finding.layers[0] == "deep_sigmoid/dense_0/kernel"
    order = [k for k in monitor.logger.keys if k in finding.layers]
    assert finding.layers == order
    out = capsys.readouterr().out
    assert out.count("GradientMonitor (warning): [vanishing]") == 1  # warned once


def test_raise_action_carries_the_finding():
    model = _sigmoid_model()
    x, y = _data()
    monitor = GradientMonitor(actions={"vanishing": "raise"}, check_every=20, verbose=0)
    with pytest.raises(GradientProblemError) as info:
        model.fit(x, y, batch_size=4, epochs=1, callbacks=[monitor], verbose=0)
    assert info.value.finding.kind == "vanishing"
    assert "apply" not in vars(model.optimizer)


def test_monitor_reads_the_given_logger_without_recording_twice():
    model = _sigmoid_model()
    x, y = _data(n=200)
    logger = GradNormLogger(flush_every=500)
    monitor = GradientMonitor(logger=logger, check_every=25, verbose=0)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[logger, monitor], verbose=0)
    assert monitor.logger is logger and logger.flush_every == 25
    assert len(logger.norms) == 50
    assert monitor.report().steps == 50
    assert logger._readers == []  # detached at the end


def test_healthy_model_has_no_findings():
    keras.utils.set_random_seed(1)
    model = create_deep_linear_model(num_layers=2, units=32, input_dim=20,
                                     activation="relu", kernel_initializer="he_normal")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    x, y = _data(n=800)
    monitor = GradientMonitor(verbose=0)
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[monitor], verbose=0)
    assert monitor.report().findings == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Received: check_every=0"):
        GradientMonitor(check_every=0)
    with pytest.raises(ValueError, match="Unknown action"):
        GradientMonitor(actions={"vanishing": "panic"})
    with pytest.raises(ValueError, match="Unknown finding kind"):
        GradientMonitor(actions={"slow": "warn"})
    with pytest.raises(ValueError, match=r"listed in `report\(\).absorbed_spikes`"):
        GradientMonitor(actions={"clipped_spike": "ignore"})
    with pytest.raises(ValueError, match="Unknown rule"):
        GradientMonitor(thresholds={"exploded": {}})


@pytest.mark.parametrize("clip", ["norm", "zclip"])
def test_spike_under_a_clipping_optimizer_is_listed_as_absorbed_not_found(clip):
    from keras_gradtools import clipped_optimizer

    keras.utils.set_random_seed(1)
    model = create_deep_linear_model(num_layers=2, units=16, input_dim=20,
                                     activation="relu", kernel_initializer="he_normal")
    model.compile(optimizer=clipped_optimizer("sgd", 1e-3, clip=clip),
                  loss="sparse_categorical_crossentropy")
    x, y = _data(n=8 * 200)
    x[8 * 150:8 * 155] *= 1e4  # five batches of huge inputs: a gradient spike from step 150
    monitor = GradientMonitor(verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    report = monitor.report()
    assert report.findings == []
    assert [(a["step"], a["epoch"]) for a in report.absorbed_spikes] == [(150, 1)]
    assert report.absorbed_spikes[0]["jump"] > 10
    assert "absorbed 1 spike(s) of the global norm, at step(s) 150" in str(report)
