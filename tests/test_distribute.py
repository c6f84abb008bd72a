"""tf.distribute: the norms recorded are those of the gradient the optimizer applies.

MirroredStrategy runs on the CPU split into 2 logical devices, which must be
set up before TensorFlow starts: `distributed_checks.py` runs in a fresh
process and reports what it measured; each run there is compared with the
same model trained on one device from the same weights on the same global
batches.
"""

import json
import os
import subprocess
import sys

import pytest

from keras_gradtools import internals

HERE = os.path.dirname(os.path.abspath(__file__))

# Older Keras is refused with several replicas (tests/test_internals.py).
pytestmark = pytest.mark.skipif(
    internals.KERAS_VERSION < internals.MINIMUM_KERAS_REPLICAS,
    reason="several replicas need Keras >= 3.8 (refused before that)",
)


def _run(script):
    """Runs a helper script of this directory in a fresh process; its RESULT line, parsed."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, script)],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def results():
    return _run("distributed_checks.py")


@pytest.mark.parametrize("model", ["mlp", "embedding"])
def test_logger_records_the_all_reduced_gradient(results, model):
    r = results["logger"][model]
    assert r["steps"] == [12, 12] and r["keys_equal"]
    # Per-replica norms would be about half these (each replica's loss is
    # scaled by 1/2): 1e-5 tells the summed gradient from a share.
    assert r["max_rel"] <= 1e-5
    assert r["epoch_means_rel"] <= 1e-5
    assert r["weights"] <= 1e-5
    assert r["min_norm"] > 1e-3  # the comparison is not between zeros
    if model == "mlp":
        assert r["probe_steps"] == [[0, 4, 8], [0, 4, 8]]
        assert r["probe_max_rel"] <= 1e-5
    # The update-to-weight ratio of the summed update, as on one device.
    assert r["ratio_keys_equal"] and r["ratio_steps"] == [12, 12]
    assert r["ratio_max_rel"] <= 1e-5 and r["min_ratio"] > 1e-4


def test_gradnorm_model_records_the_sum_not_a_share(results):
    r = results["gradnorm_model"]
    assert r["steps"] == [6, 6]
    assert r["max_rel"] <= 1e-5 and r["weights"] <= 1e-5


def test_tensorboard_events_match_single_device(results):
    r = results["tensorboard"]
    tags, mirrored_tags = r["tags"]
    assert tags == mirrored_tags
    assert "grad_norm/global" in tags and "grad_hist/mlp/h1/kernel" in tags
    for tag, (single, mirrored) in r["steps"].items():
        assert single == mirrored, tag
        # 6 steps; scalars at optimizer steps 1..6, histograms every 2nd step.
        assert single == ([1, 3, 5] if tag.startswith("grad_hist/") else [1, 2, 3, 4, 5, 6])
    # Histogram bucket totals = the kernel's size (6x8, 8x8, 8x3), written once per step.
    assert r["counts"]["grad_hist/mlp/h1/kernel"] == [48, 48, 48]
    assert r["counts"]["grad_hist/mlp/out/kernel"] == [24, 24, 24]
    assert r["scalar_rel"] <= 1e-5
    assert r["edge_diff"] <= 1e-5 and r["same_counts"]


def test_monitor_findings_match_single_device(results):
    single, mirrored = results["monitor"]["vanishing"]
    assert single and single == mirrored
    assert single[0][0] == "vanishing" and single[0][1] == 0
    assert single[0][2][0] == "deep_sigmoid/dense_0/kernel"
    nan_single, nan_mirrored = results["monitor"]["nonfinite"]
    # NaN in sample 37: the batch of step 2; found there, training stopped.
    assert nan_single == nan_mirrored
    assert nan_single["step"] == 2 and nan_single["first_layer"] == "mlp16/h1/kernel"
    assert nan_single["stopped"] and nan_single["steps_recorded"] == 3 + 1


@pytest.mark.parametrize("clip", ["value", "norm", "global_norm", "agc", "autoclip", "zclip"])
def test_clipping_presets_clip_the_summed_gradient(results, clip):
    r = results["clipping"][clip]
    # Under the strategy every preset is a ClippedOptimizer, which clips after
    # the all-reduce: same updates as one device, not per-replica clipping.
    assert r["types"][1] == "ClippedOptimizer"
    assert r["raw_rel"] <= 1e-5 and r["applied_rel"] <= 1e-5
    assert r["weights"] <= 1e-5
    if clip == "global_norm":
        assert r["global_after"][0] == pytest.approx(0.5, rel=1e-5)
        assert r["global_after"][1] == pytest.approx(0.5, rel=1e-5)
    if clip in ("value", "norm", "global_norm", "agc"):
        assert r["clipped_steps"] == r["steps"]  # the thresholds bind at every step


def test_keras_own_clipping_under_replicas_warns(results):
    messages = results["keras_clipping_warning"]
    assert len(messages) == 1
    assert "global_clipnorm to each replica's share" in messages[0]


def test_gradient_accumulation_is_refused_before_training(results):
    # Keras' TF trainer cannot all-reduce inside the accumulation's conditional (plain
    # fit() fails too): refused with a ValueError before any step, the weights untouched.
    r = results["accumulation_refused"]
    assert r["message"] and "gradient_accumulation_steps=2" in r["message"], r
    assert r["untouched"], r


def test_mixed_precision_skipped_steps_are_recorded_not_judged(results):
    r = results["mixed_precision"]
    for run in (r["single"], r["mirrored"]):
        # initial_scale 2**40: every halving is one skipped step.
        assert len(run["skipped"]) == run["halvings"] > 0
        assert run["report_skipped"] == run["halvings"]
        assert run["applied_finite"] and run["skipped_nonfinite"]
        assert run["findings"] == [] and not run["stopped"]
        assert run["weights_finite"]
    assert r["single"]["skipped"] == r["mirrored"]["skipped"]
    # float16 forward/backward: the mixed-precision tolerance.
    assert r["compared_steps"] > 40 and r["applied_rel"] <= 1e-2
    for run in (r["single"], r["mirrored"]):  # update ratios: skipped steps moved nothing
        assert run["ratio_skipped"] == run["skipped"] and run["ratios_on_skipped"] == 0.0
    assert r["ratio_rel"] <= 1e-2


def test_nonfinite_update_past_the_loss_scale_optimizer_is_caught(results):
    r = results["loss_scale_replica"]
    assert r["single"]["weights_finite"] and r["single"]["findings"] == []
    mirrored = r["mirrored"]
    if mirrored["weights_finite"]:
        # Keras judges finiteness on the summed gradient: nothing to catch.
        assert mirrored["findings"] == []
        return
    # Keras 3.15: the first replica's share was finite, the summed update was
    # not; every later step is skipped. The monitor calls it, and stops.
    kind, step, detected, evidence = mirrored["findings"][0]
    assert kind == "nonfinite"
    assert evidence["skipped_in_a_row"] == evidence["limit"] + 1 == 11
    assert detected == step + 10
    assert mirrored["stopped"]


def test_multi_worker_norms_equal_on_both_workers_and_one_process():
    # Two worker processes on 127.0.0.1 with TF_CONFIG (MultiWorkerMirroredStrategy,
    # a custom loop with `keras_gradtools.recording`), then one process alone.
    import numpy as np

    r = _run("multiworker_checks.py")
    first, second = r["workers"]
    assert first["replicas"] == second["replicas"] == 2
    assert [first["is_chief"], second["is_chief"]] == [True, False]
    assert first["keys"] == second["keys"] == r["reference"]["keys"]
    a, b = np.array(first["norms"]), np.array(second["norms"])
    reference = np.array(r["reference"]["norms"])
    assert a.shape == reference.shape == (8, 4)
    np.testing.assert_array_equal(a, b)  # the same all-reduced values on both workers
    np.testing.assert_allclose(a, reference, rtol=1e-5)
    # No second all-reduce: the recorded step holds the same collective ops as
    # the same step traced without the recording (MWMS packs the gradients
    # into one CollectiveReduceV2).
    for worker in (first, second):
        assert worker["collectives"]["recorded"] == worker["collectives"]["plain"]
        assert worker["collectives"]["plain"] == ["CollectiveReduceV2"]
    # Only the chief wrote events into the shared log_dir.
    events = [f for f in r["files"] if "tfevents" in f]
    assert len(events) == 1 and events[0].startswith("logs/train/")
