"""The article's cases at reduced scale, run directories, and reproducibility.

Scales (chosen so that each effect still shows, and the suite stays fast on 2 CPU cores):

- vanishing: 3,000 samples x 4 epochs (376 steps). The sigmoid stack stalls from the first
  step, so accuracy stays at chance every epoch and the monitor names the early layers.
- resnet: 3,000 samples x 2 epochs (188 steps): enough to pass 0.9 train accuracy, where the
  sigmoid net stays at 0.1.
- exploding / clipped: all 60,000 samples but 4 epochs instead of 10, seed 1. The blow-up is a
  matter of optimizer steps (it came at steps 6486-7702 in epochs 4-5 for seeds 0-2 at full
  scale), so fewer samples would not show it; four epochs do, and clipping keeps them calm.
"""

import json
import os

import numpy as np
import pytest

from keras_gradtools import experiments


def test_vanishing_reduced_scale(tmp_path):
    result = experiments.run_experiment(
        "vanishing", epochs=4, subset=3000, out_dir=str(tmp_path), verbose=0,
    )
    acc = result["history"]["accuracy"]
    assert len(acc) == 4 and max(acc) <= 0.12
    finding = result["report"].first("vanishing")
    assert finding is not None and finding.detected_step < 200
    assert finding.layers[0] == "deep_sigmoid/dense_0/kernel"
    run = result["run_dir"]
    for name in ("config.json", "history.json", "history.csv", "grad_norms.csv",
                 "grad_norms.json", "summary.json", "diagnosis.json", "accuracy.png",
                 "loss_and_grad_norms.png", "weight_histogram.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["final_accuracy"] == pytest.approx(acc[-1])


def test_resnet_reduced_scale():
    result = experiments.run_experiment(
        "resnet", epochs=2, subset=3000, out_dir=None, verbose=0,
    )
    assert result["history"]["accuracy"][-1] >= 0.9
    assert not result["report"].kinds() & {"vanishing", "exploding", "nonfinite"}


def test_exploding_and_clipped_four_epochs_full_data():
    exploding = experiments.run_experiment(
        "exploding", epochs=4, seed=1, out_dir=None, verbose=0, write_figures=False,
    )
    s = exploding["summary"]
    loss = s["epoch_loss"]
    ratios = [b / a for a, b in zip(loss[:-1], loss[1:])]
    jump = int(np.argmax(ratios)) + 1  # 0-based epoch of the jump
    assert ratios[jump - 1] >= 5.0
    norms = s["epoch_max_kernel_norm"]
    assert norms[jump] >= 100 * norms[0]
    finding = exploding["report"].first("exploding")
    ends = exploding["logger"].epoch_end_steps
    assert finding is not None and ends[jump - 1] <= finding.detected_step < ends[jump]

    clipped = experiments.run_experiment(
        "clipped", epochs=4, seed=1, out_dir=None, verbose=0, write_figures=False,
    )
    loss = clipped["summary"]["epoch_loss"]
    assert all(b / a < 2.0 for a, b in zip(loss[:-1], loss[1:]))
    assert clipped["summary"]["final_accuracy"] >= 0.80
    assert not clipped["report"].kinds() & {"vanishing", "exploding", "nonfinite"}


def test_same_seed_same_numbers():
    runs = [experiments.run_experiment("exploding", epochs=1, subset=640, seed=3,
                                       out_dir=None, verbose=0) for _ in range(2)]
    np.testing.assert_array_equal(runs[0]["logger"].norms, runs[1]["logger"].norms)
    assert runs[0]["history"] == runs[1]["history"]


def test_run_directories_are_never_reused(tmp_path):
    a = experiments.claim_run_dir(str(tmp_path), "case")
    b = experiments.claim_run_dir(str(tmp_path), "case")
    assert a != b and os.listdir(a) == [] and os.listdir(b) == []
    open(os.path.join(a, "keep.txt"), "w").write("previous run")
    c = experiments.claim_run_dir(str(tmp_path), "case")
    assert open(os.path.join(a, "keep.txt")).read() == "previous run"
    assert sorted(os.listdir(tmp_path)) == ["case-001", "case-002", "case-003"]
    assert c.endswith("case-003")


def test_summarize_by_hand():
    history = {"loss": [1.0, 0.8, 8.0, 7.0], "accuracy": [0.5, 0.6, 0.3, 0.35]}
    keys = ["m/a/kernel", "m/a/gamma", "m/b/kernel"]
    norms = np.array([[1, 99, 2], [3, 99, 1], [500, 99, 4], [5, 99, 6]], float)
    s = experiments.summarize(history, norms, keys, epoch_end_steps=[1, 2, 3, 4])
    assert s["epoch_max_kernel_norm"] == [2.0, 3.0, 500.0, 6.0]  # gamma is not a kernel
    assert s["max_kernel_norm"] == 500.0 and s["max_kernel_norm_epoch"] == 3
    assert s["loss_jump"] == {"epoch": 3, "ratio": 10.0, "from": 0.8, "to": 8.0}
    assert s["final_accuracy"] == 0.35


def test_unknown_case_and_bad_sizes():
    with pytest.raises(ValueError, match="Received: case='explode'"):
        experiments.run_experiment("explode")
    with pytest.raises(ValueError, match="Received: epochs=0"):
        experiments.run_experiment("vanishing", epochs=0)
