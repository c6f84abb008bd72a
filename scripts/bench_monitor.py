"""Benchmark: the monitor's false alarms and misses on labelled training runs.

Trains labelled runs, healthy and failing, each with a `GradNormLogger`
(activation probes on 64 training samples every 200 steps, update-to-weight
ratios) and a per-step loss, keeps everything recorded as a *corpus* (one
directory per run: `recording.npz`, `activations.json`, `meta.json`), and
judges each run with the monitor's rules (`keras_gradtools.diagnose`: the same
findings `GradientMonitor` gives while training). `--rejudge CORPUS` judges
a kept corpus again without training, in seconds: change a rule, re-run.

Per run it reports the label, the findings (kind @ detection step), the step
at which the failure became visible in the loss, and the verdict:

- healthy runs: a *false alarm* is any finding (a spike that the optimizer's
  clipping absorbed is no finding; the table lists those spikes apart);
- failing runs: a *miss* is no failure finding at all; the first one's kind
  is shown, and for an exploding run whether it came before the end of the
  epoch whose loss jumped.

When the failure became visible in the loss (per-step loss, from Keras'
running epoch mean): the earliest of a non-finite loss, a blow-up (the
20-step mean loss above 3x its lowest value so far) and not learning (from
step 100 on, the 100-step mean loss still above 0.95 ln(classes), chance
level). (A NaN input does not always give a NaN loss: on TensorFlow the
cross-entropy's clipping turns NaN probabilities into a finite loss near
chance.)

Runs (`--runs` picks; seeds in the name):

- healthy: `resnet-s0..2` (the article's fix), `clipped-s0..4` (the
  article's clipped deep linear MLP), `relu_mlp` (MNIST, 3 x 256 ReLU, He),
  `mobilenet_v3` (keras.applications.MobileNetV3Small, from scratch, on
  MNIST padded to 32 x 32 x 3: 12,800 samples, 3 epochs), `lstm`
  (an LSTM classifier on synthetic sequences);
- failing: `vanishing` (the article's deep sigmoid MLP), `exploding-s0..4`
  (the article's deep linear MLP), `nan` (relu_mlp with one NaN input
  sample at step 150), `dead_relu` (relu_mlp with its hidden biases at -10),
  `lr_high` (relu_mlp with Adam at 0.1, 100x its 1e-3).

`--scale full` trains the article's runs on all 60,000 MNIST samples
(resnet for `--resnet-epochs`, default 10; clipped 10 epochs; exploding 6,
past its blow-up in epoch 4-5; vanishing 3); `--scale small` on 6,400
samples for a quick look (exploding then does not blow up: it needs
about 7,000 steps).

Run: `python scripts/bench_monitor.py --out corpus` (full scale: about
2 hours on 2 CPU cores with 10 ResNet epochs), then
`python scripts/bench_monitor.py --rejudge corpus` (add `--around-spike`
for the update ratios, global norm and loss around each exploding finding).
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402

HEALTHY = "healthy"


def _relu_mlp(bias=0.0):
    import keras

    layers = [keras.Input((784,))]
    for i in range(3):
        layers.append(keras.layers.Dense(256, activation="relu", kernel_initializer="he_normal",
                                         bias_initializer=keras.initializers.Constant(bias),
                                         name=f"dense_{i}"))
    layers.append(keras.layers.Dense(10, activation="softmax", name="output"))
    return keras.Sequential(layers, name="relu_mlp")


def _mnist_rgb32(n):
    """MNIST digits padded to 32 x 32 and repeated over 3 channels (a small RGB image task)."""
    from keras_gradtools.data import load_mnist

    (x, y), _ = load_mnist(flatten=False, subset=n)
    x = np.pad(x.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    return np.repeat(x[..., None], 3, axis=-1).astype("float32"), y


def _synthetic_sequences(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20, 8)).astype("float32")
    weights = np.random.default_rng(4321).normal(size=(8, 5))
    y = np.argmax(x[:, -5:].mean(axis=1) @ weights, axis=1)
    return x, y


def _spec(name, scale, resnet_epochs):
    """`(label, build, data, epochs, batch, seed, classes)` of a named run."""
    import keras

    from keras_gradtools.cases import get_case
    from keras_gradtools.data import load_mnist
    from keras_gradtools.experiments import build_case

    base, _, seed = name.partition("-s")
    seed = int(seed or 0)
    full = scale == "full"
    mnist = 60000 if full else 6400

    def case(case_name):
        return lambda: build_case(get_case(case_name))

    def mlp(optimizer=1e-3, bias=0.0):
        def build():
            model = _relu_mlp(bias)
            model.compile(keras.optimizers.Adam(optimizer), "sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            return model
        return build

    def flat():
        return load_mnist(subset=mnist)[0]

    if base == "resnet":
        return HEALTHY, case("resnet"), load_mnist(flatten=False, subset=mnist)[0], (
            resnet_epochs if full else 2), 32, seed, 10
    if base in ("clipped", "exploding", "vanishing"):
        epochs = {"clipped": 10, "exploding": 6, "vanishing": 3}[base] if full else 3
        label = HEALTHY if base == "clipped" else base
        return label, case(base), flat(), epochs, 32, seed, 10
    if base == "relu_mlp":
        return HEALTHY, mlp(), flat(), 3, 32, seed, 10
    if base == "nan":
        x, y = flat()
        x = x.copy()
        x[150 * 32] = np.nan  # one sample of the batch of step 150 (no shuffling)
        return "nan", mlp(), (x, y), 1, 32, seed, 10
    if base == "dead_relu":
        return "dead_relu", mlp(bias=-10.0), flat(), 2, 32, seed, 10
    if base == "lr_high":
        return "lr_high", mlp(optimizer=0.1), flat(), 3, 32, seed, 10
    if base == "mobilenet_v3":
        def build():
            model = keras.applications.MobileNetV3Small(
                input_shape=(32, 32, 3), weights=None, classes=10,
                include_preprocessing=False)
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            return model
        return HEALTHY, build, _mnist_rgb32(12800 if full else 3200), 3, 32, seed, 10
    if base == "lstm":
        def build():
            model = keras.Sequential([keras.Input((20, 8)), keras.layers.LSTM(64, name="lstm"),
                                      keras.layers.Dense(32, activation="tanh", name="hidden"),
                                      keras.layers.Dense(5, activation="softmax", name="output")],
                                     name="lstm_classifier")
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            return model
        return HEALTHY, build, _synthetic_sequences(16384 if full else 4096, seed), 5, 32, \
            seed, 5
    raise click.BadParameter(f"unknown run {name!r}; see --help", param_hint="--runs")


ALL_RUNS = ([f"resnet-s{i}" for i in range(3)] + [f"clipped-s{i}" for i in range(5)]
            + ["relu_mlp", "mobilenet_v3", "lstm", "vanishing"]
            + [f"exploding-s{i}" for i in range(5)] + ["nan", "dead_relu", "lr_high"])


def _known(name):
    """A run of ALL_RUNS, or one of their models with another seed: `<run>-s<N>`."""
    base, sep, seed = name.partition("-s")
    bases = {n.partition("-s")[0] for n in ALL_RUNS}
    return base in bases and (not sep or seed.isdigit())


def train(name, scale, resnet_epochs, out):
    """Trains one labelled run and keeps its recording in `out/name`."""
    import keras

    from keras_gradtools import GradNormLogger
    from keras_gradtools.clipping import describe_clipping
    from keras_gradtools.facts import model_facts

    label, build, (x, y), epochs, batch, seed, classes = _spec(name, scale, resnet_epochs)
    path = os.path.join(out, name)
    os.makedirs(path)  # refuses a directory that exists: a kept run is never overwritten
    keras.utils.set_random_seed(seed)
    model = build()
    logger = GradNormLogger(probe_data=np.nan_to_num(x[:64]), update_ratio=True)
    losses = []

    class StepLoss(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append((batch, float(logs["loss"])))

    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0,
                        shuffle=name.split("-")[0] != "nan", callbacks=[logger, StepLoss()])
    wall = time.perf_counter() - start
    np.savez_compressed(
        os.path.join(path, "recording.npz"), norms=logger.norms,
        update_ratios=np.stack([logger.update_ratios[k] for k in logger.keys], 1),
        step_loss=_step_losses(losses), epoch_end_steps=np.array(logger.epoch_end_steps),
        skipped_steps=logger.skipped_steps)
    with open(os.path.join(path, "activations.json"), "w") as f:
        json.dump(logger.activations.to_dict(), f)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"name": name, "label": label, "scale": scale, "keys": logger.keys,
                   "classes": classes, "epochs": epochs, "samples": int(len(x)),
                   "seed": seed, "wall_s": wall, "clipping": describe_clipping(model.optimizer),
                   "facts": model_facts(model).to_dict(),
                   "epoch_loss": [float(v) for v in history.history["loss"]],
                   "keras": keras.__version__, "backend": keras.backend.backend()}, f)
    return path


def _step_losses(batch_logs):
    """Per-step losses from Keras' running epoch means (batch index, mean so far)."""
    out, previous = [], 0.0
    for batch, mean in batch_logs:
        out.append(mean if batch == 0 else (batch + 1) * mean - batch * previous)
        previous = mean
    return np.array(out)


def visible_step(label, loss, classes):
    """The first step at which a failure shows in the loss (module docstring), or None.

    The earliest of: a non-finite loss; the 20-step mean loss above 3x its
    lowest value so far (a blow-up); from step 100 on, the 100-step mean still
    above 0.95 ln(classes) (not learning). Healthy runs: None.
    """
    if label == HEALTHY:
        return None
    loss = np.asarray(loss, float)
    candidates = []
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        candidates.append(int(bad[0]))
    low = np.inf
    for step in range(20, len(loss) + 1):
        mean = float(np.mean(loss[step - 20:step]))
        if np.isfinite(mean) and mean > 3 * low:
            candidates.append(step - 1)
            break
        low = min(low, mean) if np.isfinite(mean) else low
    chance = 0.95 * np.log(classes)
    for step in range(100, len(loss) + 1):
        mean = float(np.mean(loss[step - 100:step]))
        if np.isfinite(mean) and mean > chance:
            candidates.append(step - 1)
            break
    return min(candidates) if candidates else None


def judge(path):
    """The monitor's findings on a kept run, and the verdict against its label."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    data = np.load(os.path.join(path, "recording.npz"))
    ends = [int(s) for s in data["epoch_end_steps"]]
    report = judge_report(path)
    findings = report.findings  # every finding is a failure found
    row = {"name": meta["name"], "label": meta["label"], "steps": int(len(data["norms"])),
           "epochs": meta["epochs"], "wall_s": meta["wall_s"],
           "findings": [f"{f.kind}@{f.detected_step}" for f in findings],
           "absorbed": [a["detected_step"] for a in report.absorbed_spikes],
           "visible": visible_step(meta["label"], data["step_loss"], meta["classes"])}
    if meta["label"] == HEALTHY:
        row["verdict"] = "false alarm" if findings else "ok"
    elif not findings:
        row["verdict"] = "MISS"
    else:
        first = findings[0]
        row["verdict"] = f"found ({first.kind})"
        row["detected"] = first.detected_step
        if meta["label"] == "exploding":
            loss = meta["epoch_loss"]
            ratios = [b / a for a, b in zip(loss, loss[1:])]
            if ratios and max(ratios) >= 5:
                spike_epoch = int(np.argmax(ratios)) + 2  # 1-based epoch whose loss jumped
                end = ends[spike_epoch - 1]
                row["verdict"] += (f", before the end of epoch {spike_epoch} (step {end})"
                                   if first.detected_step < end else
                                   f", AFTER epoch {spike_epoch} ended (step {end})")
            else:
                row["verdict"] += ", no 5x loss jump in this run"
    return row


def around_spike(path, window=200):
    """For a run with an exploding finding: update ratios and norms just before and after it.

    Returns a dict: the detection step; over the `window` steps before it and
    after it, the median over kernels of the per-step update-to-weight ratio
    (its median and largest value over the steps), the largest global
    gradient norm, and the per-step loss (median, largest); or `None`.
    """
    data = np.load(os.path.join(path, "recording.npz"))
    found = [f for f in judge_report(path).findings if f.kind == "exploding"]
    if not found:
        return None
    step = found[0].detected_step
    ratios = np.nanmedian(np.where(data["update_ratios"] > 0, data["update_ratios"], np.nan),
                          axis=1)
    norms = np.sqrt(np.nansum(np.square(data["norms"]), axis=1))
    loss = data["step_loss"]
    out = {"detected_step": int(step)}
    for side, part in (("before", slice(step - window, step)), ("after", slice(step, step + window))):
        out[side] = {"update_ratio_median": float(np.nanmedian(ratios[part])),
                     "update_ratio_max": float(np.nanmax(ratios[part])),
                     "global_norm_max": float(np.nanmax(norms[part])),
                     "loss_median": float(np.nanmedian(loss[part])),
                     "loss_max": float(np.nanmax(loss[part]))}
    return out


def judge_report(path):
    """The `Report` of a kept run (what `judge` summarizes)."""
    from keras_gradtools.activations import ActivationRecord
    from keras_gradtools.diagnose import ModelFacts, diagnose_norms

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    data = np.load(os.path.join(path, "recording.npz"))
    with open(os.path.join(path, "activations.json")) as f:
        activations = ActivationRecord.from_dict(json.load(f))
    return diagnose_norms(
        data["norms"], meta["keys"], [int(s) for s in data["epoch_end_steps"]],
        clipping=meta["clipping"], skipped_steps=data["skipped_steps"],
        facts=ModelFacts.from_dict(meta["facts"]), activations=activations,
        update_ratios=data["update_ratios"])


def table(rows):
    lines = ["| run | label | steps | findings (kind@detection step) | spikes absorbed by "
             "the clipping (detection step) | visible in loss | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['label']} | {r['steps']} | "
                     f"{', '.join(r['findings']) or '-'} | "
                     f"{', '.join(str(s) for s in r['absorbed']) or '-'} | "
                     f"{'-' if r['visible'] is None else r['visible']} | {r['verdict']} |")
    healthy = [r for r in rows if r["label"] == HEALTHY]
    failing = [r for r in rows if r["label"] != HEALTHY]
    alarms = sum(r["verdict"] == "false alarm" for r in healthy)
    misses = sum(r["verdict"] == "MISS" for r in failing)
    lines.append("")
    lines.append(f"False alarms: {alarms} of {len(healthy)} healthy runs; misses: {misses} of "
                 f"{len(failing)} failing runs.")
    return "\n".join(lines)


@click.command()
@click.option("--out", default="corpus", show_default=True, type=click.Path(),
              help="The corpus directory to train into (each run a directory of its own).")
@click.option("--runs", default=",".join(ALL_RUNS), show_default=True,
              help="Comma-separated runs to train; `<run>-s<N>` trains a run's model with "
                   "seed N (e.g. exploding-s7, lstm-s1: held-out runs).")
@click.option("--scale", type=click.Choice(["full", "small"]), default="full", show_default=True)
@click.option("--resnet-epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--rejudge", type=click.Path(exists=True, file_okay=False), default=None,
              help="Judge the runs kept in this corpus again; train nothing.")
@click.option("--around-spike", "show_spike", is_flag=True,
              help="With --rejudge: also print, for each run with an exploding finding, the "
                   "update-to-weight ratio, global norm and loss 200 steps before and after it.")
def main(out, runs, scale, resnet_epochs, rejudge, show_spike):
    """Trains the labelled runs (or re-judges a corpus) and prints the table."""
    if show_spike and not rejudge:
        raise click.UsageError("--around-spike reads a kept corpus: give --rejudge CORPUS")
    if rejudge:
        names = sorted(n for n in os.listdir(rejudge)
                       if os.path.exists(os.path.join(rejudge, n, "meta.json")))
        if not names:
            raise click.UsageError(f"{rejudge} holds no kept run (no */meta.json)")
        rows = [judge(os.path.join(rejudge, n)) for n in names]
        if show_spike:
            for n in names:
                found = around_spike(os.path.join(rejudge, n))
                if found is not None:
                    click.echo(f"{n}: {json.dumps(found)}")
    else:
        names = [n.strip() for n in runs.split(",") if n.strip()]
        unknown = [n for n in names if not _known(n)]
        if unknown:
            raise click.BadParameter(f"unknown run(s) {', '.join(unknown)}; the runs are "
                                     f"{', '.join(ALL_RUNS)} (any of them with another "
                                     "seed: -s<N>)", param_hint="--runs")
        taken = [n for n in names if os.path.exists(os.path.join(out, n))]
        if taken:
            raise click.UsageError(f"{out} already holds {', '.join(taken)}: choose another "
                                   "--out (a kept run is never overwritten) or --rejudge it")
        rows = []
        for name in names:
            click.echo(f"training {name} ...", err=True)
            rows.append(judge(train(name, scale, resnet_epochs, out)))
            click.echo(f"  {rows[-1]['verdict']}: {', '.join(rows[-1]['findings']) or '-'} "
                       f"({rows[-1]['wall_s']:.0f} s)", err=True)
    click.echo(table(rows))


if __name__ == "__main__":
    sys.exit(main())
