"""The article's four experiments as data, and one function that runs them.

`run_experiment()` is what the `gradtools reproduce` command, the
`scripts/reproduce_article.py` script and the notebooks call: it trains one
case with `GradNormLogger` and writes a run directory:

```
<out>/<case>-seed<seed>-<NNN>/
  config.json          the case and the overrides used
  history.json/.csv    Keras' per-epoch History, grad_norm/* means included
  grad_norms.csv/.json per-step gradient norms (GradNormLogger.save)
  summary.json         final accuracy and loss, largest norms, loss jump
  diagnosis.json       the GradientMonitor's report (findings)
  accuracy.png, loss_and_grad_norms.png, weight_histogram.png
```

A run directory is never reused: each run claims a new numbered one.
"""

import csv
import dataclasses
import json
import os
import time

import numpy as np
import keras

from keras_gradtools import data as data_lib
from keras_gradtools.cases import CASES  # noqa: F401  (re-exported)
from keras_gradtools.cases import Case  # noqa: F401
from keras_gradtools.cases import get_case
from keras_gradtools import models as models_lib
from keras_gradtools import plots
from keras_gradtools.callbacks import GradNormLogger
from keras_gradtools import runs
from keras_gradtools.clipping import clipped_optimizer
from keras_gradtools.clipping import describe_clipping
from keras_gradtools.facts import model_facts
from keras_gradtools.clipping import parse_clip
from keras_gradtools.callbacks import GradientMonitor


_BUILDERS = {
    "deep_sigmoid": models_lib.create_deep_sigmoid_model,
    "deep_linear": models_lib.create_deep_linear_model,
    "resnet": models_lib.resnet_model,
}


def claim_run_dir(out_dir, prefix):
    """Creates and returns a new, empty run directory `out_dir/prefix-NNN`.

    The number is the smallest not yet taken; creation is atomic, so two
    runs started at once never share a directory and nothing is overwritten.

    Args:
        out_dir: the parent directory (created if missing).
        prefix: the run's name before the number.

    Returns:
        The new directory's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    n = 1
    while True:
        path = os.path.join(out_dir, f"{prefix}-{n:03d}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1


def kernel_keys(keys):
    """The keys that are kernels (weight matrices of Dense/Conv layers)."""
    return [k for k in keys if k.split("/")[-1] == "kernel"]


def summarize(history, norms, keys, epoch_end_steps):
    """The numbers the article reports, from a finished run.

    Args:
        history: Keras' `History.history`.
        norms: `(steps, len(keys))` per-step norms.
        keys: the recorded variables' keys.
        epoch_end_steps: steps done at each epoch's end.

    Returns:
        A dict: `final_accuracy`, `final_loss`, `epoch_max_kernel_norm` (the
        largest per-step kernel-gradient norm in each epoch),
        `max_kernel_norm` and the 1-based epoch where it occurred, and
        `loss_jump` (the largest epoch-over-epoch loss ratio, its 1-based
        epoch, `None` for a single epoch).
    """
    norms = np.asarray(norms, dtype=float)
    kernels = [keys.index(k) for k in kernel_keys(keys)]
    epoch_max = []
    start = 0
    for end in epoch_end_steps:
        block = norms[start:end][:, kernels] if kernels else np.zeros((0, 0))
        epoch_max.append(float(np.nanmax(block)) if block.size and not np.all(np.isnan(block)) else float("nan"))
        start = end
    loss = [float(v) for v in history.get("loss", [])]
    jump = None
    if len(loss) > 1:
        with np.errstate(all="ignore"):
            ratios = np.asarray(loss[1:]) / np.asarray(loss[:-1])
        i = int(np.nanargmax(ratios)) if not np.all(np.isnan(ratios)) else 0
        jump = {"epoch": i + 2, "ratio": float(ratios[i]),
                "from": loss[i], "to": loss[i + 1]}
    finite = [v for v in epoch_max if np.isfinite(v)]
    max_norm = max(finite) if finite else float("nan")
    return {
        "final_accuracy": float(history["accuracy"][-1]) if history.get("accuracy") else None,
        "final_loss": loss[-1] if loss else None,
        "epoch_accuracy": [float(v) for v in history.get("accuracy", [])],
        "epoch_loss": loss,
        "epoch_max_kernel_norm": epoch_max,
        "max_kernel_norm": max_norm,
        "max_kernel_norm_epoch": (epoch_max.index(max_norm) + 1) if finite else None,
        "loss_jump": jump,
    }


def _finite_max(values):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else float("nan")


def device_name():
    """The device the train step runs on: the first GPU if one is visible, on any backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform.upper()}:{device.id} ({device.device_kind})"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"GPU:0 ({torch.cuda.get_device_name(0)})"
        return "CPU"
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "/device:CPU:0"


def _write_history(run_dir, history):
    with open(os.path.join(run_dir, "history.json"), "x") as f:
        json.dump(history, f, indent=1)
    keys = list(history)
    n = max((len(v) for v in history.values()), default=0)
    with open(os.path.join(run_dir, "history.csv"), "x", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch"] + keys)
        for i in range(n):
            writer.writerow([i + 1] + [history[k][i] if i < len(history[k]) else "" for k in keys])


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {value!r}")


def build_case(case, optimizer=None):
    """Builds and compiles the model of a case (after seeding).

    The model outputs logits and is trained with
    `SparseCategoricalCrossentropy(from_logits=True)`: the article's softmax
    and cross-entropy, computed as one stable log-softmax on every backend.
    (On TensorFlow this is exactly what Keras does for a softmax output; on
    JAX and PyTorch Keras would clip the probabilities to [1e-7, 1 - 1e-7],
    and a saturated softmax would then pass back a gradient of exactly 0.)

    Args:
        case: a `Case`.
        optimizer: a Keras optimizer to use instead of the case's Adam.
            Defaults to `None`.

    Returns:
        The compiled model.
    """
    model = _BUILDERS[case.model](classifier_activation=None)
    if optimizer is None:
        optimizer = keras.optimizers.Adam(**case.optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def run_experiment(
    case,
    epochs=None,
    batch_size=None,
    seed=None,
    subset=None,
    out_dir="runs",
    data_source="bundled",
    optimizer=None,
    callbacks=(),
    verbose="auto",
    write_figures=True,
    monitor=True,
    data=None,
    shuffle=True,
    clip=None,
    probe=True,
    update_ratio=True,
):
    """Trains one of the article's cases with `GradNormLogger` and saves the run.

    Args:
        case: a `Case` or its name.
        epochs: overrides the case's epochs. Defaults to `None`.
        batch_size: overrides the case's batch size. Defaults to `None`.
        seed: overrides the case's seed. Defaults to `None`.
        subset: train on the first `subset` samples only. Defaults to
            `None` (all 60,000).
        out_dir: parent of the run directory, or `None` to write nothing.
            Defaults to `"runs"`.
        data_source: passed to `load_mnist`. Defaults to `"bundled"`.
        optimizer: a Keras optimizer replacing the case's. Defaults to
            `None`.
        callbacks: more callbacks for `fit()`. Defaults to `()`.
        monitor: judge the norms with a `GradientMonitor` fed by the run's
            logger; its report goes to `diagnosis.json` and into the result
            as `report`. `True` for the default settings, a dict of
            `GradientMonitor` arguments to choose them, `False` for none.
            Defaults to `True`.
        data: `(x, y)` training arrays to use instead of MNIST (shaped for
            the case's model). Defaults to `None`.
        shuffle: shuffle the training data each epoch. Defaults to `True`.
        clip: `(method, threshold)` or `"METHOD[:THRESHOLD]"`: train with
            `clipped_optimizer("adam", <the case's learning rate>, clip=...)`
            instead of the case's optimizer. Defaults to `None`.
        probe: measure the activations of every hidden layer on the first
            64 training samples every 200 steps (`GradNormLogger`'s
            `probe_data`), kept in the run's `activations.json`. Defaults to
            `True`.
        update_ratio: record the update-to-weight ratios
            (`GradNormLogger(update_ratio=True)`). Defaults to `True`.
        verbose: Keras' `verbose` for `fit()`. Defaults to `"auto"`.
        write_figures: save the figures into the run directory. Defaults to
            `True`.

    Returns:
        A dict: `case`, `run_dir`, `config`, `summary`, `history`, `logger`,
        `model` and `report` (the monitor's, or `None`).

    Raises:
        ValueError: for an unknown case or a non-positive epochs, batch size
            or subset.
    """
    if isinstance(case, str):
        case = get_case(case)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("subset", subset)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(
                f"`{name}` must be a positive integer. Received: {name}={value!r}"
            )
    case = dataclasses.replace(
        case,
        epochs=epochs or case.epochs,
        batch_size=batch_size or case.batch_size,
        seed=case.seed if seed is None else seed,
    )
    if data is None:
        (x, y), _ = data_lib.load_mnist(
            data_source, flatten=not case.image_input, subset=subset
        )
    else:
        x, y = data
        if subset is not None:
            x, y = x[:subset], y[:subset]
    tag = case.name
    if clip is not None:
        method, threshold = parse_clip(clip) if isinstance(clip, str) else clip
        optimizer = clipped_optimizer(
            "adam", case.optimizer.get("learning_rate", 1e-3), clip=method,
            threshold=threshold,
        )
        tag = f"{case.name}-clip_{method}"
        case = dataclasses.replace(case, name=tag, title=f"{case.title} [clip={method}]")
    keras.utils.set_random_seed(case.seed)
    model = build_case(case, optimizer)
    config = dataclasses.asdict(case)
    config.update(
        format=runs.FORMAT, model=model.name,
        subset=subset, samples=int(len(x)),
        optimizer_config=runs.optimizer_config(model.optimizer),
        clipping=describe_clipping(model.optimizer),
        model_facts=model_facts(model).to_dict(),
        keras_version=keras.__version__, backend=keras.backend.backend(),
    )
    run_dir = None
    if out_dir is not None:
        run_dir = claim_run_dir(out_dir, f"{tag}-seed{case.seed}")
        with open(os.path.join(run_dir, "config.json"), "x") as f:
            json.dump(config, f, indent=1, default=_json_default)

    logger = GradNormLogger(probe_data=x[:64] if probe else None, update_ratio=update_ratio)
    run_callbacks = [logger]
    if monitor:
        monitor = GradientMonitor(logger=logger, **({} if monitor is True else monitor))
        run_callbacks.append(monitor)
    start = time.perf_counter()
    finished = False
    try:
        fit = model.fit(
            x, y, epochs=case.epochs, batch_size=case.batch_size,
            callbacks=run_callbacks + list(callbacks), verbose=verbose,
            shuffle=shuffle,
        )
        history = fit.history
        finished = True
    finally:
        wall = time.perf_counter() - start
        # Whatever happened (a monitor stopping or raising, an interrupt),
        # what was recorded reaches the disk.
        if run_dir is not None and logger.recorder is not None:
            logger.save(os.path.join(run_dir, "grad_norms.csv"))
            logger.save(os.path.join(run_dir, "grad_norms.json"))
            if logger.activations.steps:
                runs.write_json(os.path.join(run_dir, "activations.json"),
                                logger.activations.to_dict())
            if monitor:
                with open(os.path.join(run_dir, "diagnosis.json"), "x") as f:
                    f.write(monitor.report().to_json(indent=1))
            if not finished and getattr(model, "history", None) is not None:
                _write_history(run_dir, {k: [float(v) for v in vals]
                                         for k, vals in model.history.history.items()})
    history = {k: [float(v) for v in vals] for k, vals in history.items()}
    summary = summarize(history, logger.norms, logger.keys, logger.epoch_end_steps)
    summary.update(
        max_raw_global_norm=_finite_max(logger.global_norms),
        max_applied_global_norm=(_finite_max(logger.applied_global_norms)
                                 if logger.applied_recorder is not None else None),
        device=device_name(),
    )
    summary.update(case=case.name, wall_time_s=wall,
                   steps=int(len(logger.norms)),
                   step_time_ms=1e3 * wall / max(len(logger.norms), 1))
    if run_dir is not None:
        _write_history(run_dir, history)
        with open(os.path.join(run_dir, "summary.json"), "x") as f:
            json.dump(summary, f, indent=1, default=_json_default)
        if write_figures:
            plots.accuracy_curve(history, title=case.title,
                                 path=os.path.join(run_dir, "accuracy.png"))
            plots.loss_and_grad_norms(history, title=case.title,
                                      path=os.path.join(run_dir, "loss_and_grad_norms.png"))
            plots.weight_histogram(model, title=f"{case.title}: weights after training",
                                   path=os.path.join(run_dir, "weight_histogram.png"))
    return {
        "case": case, "run_dir": run_dir, "config": config, "summary": summary,
        "history": history, "logger": logger, "model": model,
        "report": monitor.report() if monitor else None,
    }


def format_table(results):
    """The per-case table the script prints.

    Args:
        results: a list of `run_experiment` results.

    Returns:
        The table, a string.
    """
    width = max([10] + [len(r["case"].name) for r in results])
    header = (f"{'case':<{width}} {'epochs':>6} {'train acc':>9} {'loss':>8} "
              f"{'max kernel |g|':>14} {'at epoch':>8} {'loss jump':>22} {'time':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        s = r["summary"]
        jump = s["loss_jump"]
        jump_text = "-"
        if jump and jump["ratio"] >= 2.0:
            jump_text = f"epoch {jump['epoch']}: x{jump['ratio']:.1f}"
        elif jump:
            jump_text = f"none (max x{jump['ratio']:.2f})"
        acc = s["final_accuracy"]
        lines.append(
            f"{r['case'].name:<{width}} {len(s['epoch_loss']):>6} "
            f"{acc if acc is not None else float('nan'):>9.4f} {s['final_loss']:>8.4f} "
            f"{s['max_kernel_norm']:>14.4g} {str(s['max_kernel_norm_epoch']):>8} "
            f"{jump_text:>22} {s['wall_time_s']:>7.0f}s"
        )
    clipped = [r for r in results if r["summary"].get("max_applied_global_norm") is not None]
    if clipped:
        lines += ["", f"{'run':<28} {'train acc':>9} {'loss':>8} {'max raw |g|':>12} "
                  f"{'max applied |g|':>15}"]
        for r in clipped:
            s = r["summary"]
            lines.append(f"{r['case'].name:<28} {s['final_accuracy']:>9.4f} "
                         f"{s['final_loss']:>8.4f} {s['max_raw_global_norm']:>12.4g} "
                         f"{s['max_applied_global_norm']:>15.4g}")
    return "\n".join(lines)
