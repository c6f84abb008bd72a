"""Matplotlib figures of training curves, gradient norms and weights.

Every function returns the `Figure` it drew and, given `path`, also saves it
(PNG, or any format matplotlib infers from the extension). They use the Agg
backend-neutral `Figure` API, so they work headless and never pop a window.
Series with many layers (the article's 22) get a colour map running from the
input (dark) to the output (light) and a legend outside the axes; past
`MAX_LABELS` layers (a keras.applications or keras-hub model has hundreds of
variables) the legend becomes a colour bar labelled at evenly spaced layers,
the per-layer axes label every few layers, and figures stop growing with the
number of layers.
"""

import numpy as np
from matplotlib import cm
from matplotlib.figure import Figure


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _layer_colours(n):
    return [cm.viridis(i / max(n - 1, 1) * 0.9) for i in range(n)]


def short_names(keys):
    """Compact, still unique labels for variable paths.

    Two path parts where that is enough; more where two labels would collide
    (a ResNet has a `conv1/kernel` in every block).

    Args:
        keys: variable paths.

    Returns:
        A list of labels.

    Example:

    >>> short_names(["net/block_0/conv1/kernel", "net/block_1/conv1/kernel", "net/out/kernel"])
    ['block_0/conv1/kernel', 'block_1/conv1/kernel', 'out/kernel']
    """
    labels = []
    for key in keys:
        parts = key.split("/")
        depth = 2
        while depth < len(parts) and sum(
            "/".join(k.split("/")[-depth:]) == "/".join(parts[-depth:]) for k in keys
        ) > 1:
            depth += 1
        labels.append("/".join(parts[-depth:]))
    return labels


MAX_LABELS = 48  # the most layer names one figure lists (a legend, an axis)
_MAX_INCHES = 24  # the most a figure grows with the number of layers


def _labelled(n):
    """The indices of `n` layers that get a label: all, or evenly spaced ones, the last
    included, when there are more than `MAX_LABELS`."""
    if n <= MAX_LABELS:
        return list(range(n))
    every = int(np.ceil(n / MAX_LABELS))
    picked = list(range(0, n, every))
    if picked[-1] != n - 1:
        picked[-1] = n - 1
    return picked


def _legend(ax, labels, extra=0):
    """A legend for the per-layer lines `labels` (input to output) and `extra` other
    entries; past `MAX_LABELS` layers, a colour bar for the layers instead."""
    n = len(labels) + extra
    if len(labels) > MAX_LABELS:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import ListedColormap, Normalize

        layers = set(labels)
        handles = [(h, l) for h, l in zip(*ax.get_legend_handles_labels()) if l not in layers]
        if handles:
            ax.legend(*zip(*handles), fontsize=8)
        mappable = ScalarMappable(norm=Normalize(-0.5, len(labels) - 0.5),
                                  cmap=ListedColormap(_layer_colours(len(labels))))
        bar = ax.figure.colorbar(mappable, ax=ax, pad=0.01, fraction=0.04)
        ticks = _labelled(len(labels))
        bar.set_ticks(ticks)
        bar.set_ticklabels([labels[i] for i in ticks], fontsize=6)
        bar.ax.invert_yaxis()
        bar.set_label(f"{len(labels)} layers, input (top) to output (bottom)")
    elif n > 8:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                  ncol=1 if n <= 24 else 2, frameon=False)
    else:
        ax.legend(fontsize=8)


def accuracy_curve(history, title="Training accuracy", path=None):
    """The article's convergence plot: accuracy per epoch.

    Args:
        history: a Keras `History.history` dict, or a dict of such dicts
            (`{label: history}`) to compare runs on one axis.
        title: the figure title. Defaults to `"Training accuracy"`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    runs = history if _is_nested(history) else {"": history}
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, h in runs.items():
        acc = h.get("accuracy", [])
        ax.plot(np.arange(1, len(acc) + 1), acc, marker="o", label=label or "train")
        if "val_accuracy" in h:
            ax.plot(np.arange(1, len(h["val_accuracy"]) + 1), h["val_accuracy"],
                    marker="s", linestyle="--", label=f"{label} validation".strip())
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _is_nested(history):
    return bool(history) and all(isinstance(v, dict) for v in history.values())


def loss_and_grad_norms(history, title="Loss and gradient norms per epoch", path=None):
    """The article's figure: loss (and accuracy) beside per-layer gradient norms.

    Left: loss per epoch (accuracy on a twin axis when present). Right: each
    recorded variable's mean gradient norm per epoch (`grad_norm/<key>`
    entries that `GradNormLogger` adds to `History`), log scale, one line
    per layer from input (dark) to output (light).

    Args:
        history: a Keras `History.history` dict.
        title: the figure title. Defaults to
            `"Loss and gradient norms per epoch"`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    fig = Figure(figsize=(13, 4.5))
    ax_loss, ax_norm = fig.subplots(1, 2, gridspec_kw={"wspace": 0.45})
    loss = history.get("loss", [])
    epochs = np.arange(1, len(loss) + 1)
    ax_loss.plot(epochs, loss, marker="o", color="tab:red", label="loss")
    finite = np.asarray([v for v in loss if np.isfinite(v) and v > 0])
    if finite.size and finite.max() / finite.min() > 100:
        ax_loss.set_yscale("log")  # a blow-up would flatten everything else
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    if "accuracy" in history:
        ax_acc = ax_loss.twinx()
        ax_acc.plot(epochs, history["accuracy"], marker="s", color="tab:blue",
                    label="accuracy")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0.0, 1.0)
        lines = ax_loss.get_lines() + ax_acc.get_lines()
        ax_loss.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="center right")
    keys = [k[len("grad_norm/"):] for k in history if k.startswith("grad_norm/")]
    for key, label, colour in zip(keys, short_names(keys), _layer_colours(len(keys))):
        values = np.asarray(history[f"grad_norm/{key}"], dtype=float)
        ax_norm.plot(np.arange(1, len(values) + 1), values, color=colour, label=label)
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("epoch")
    ax_norm.set_ylabel("mean gradient L2 norm")
    ax_norm.set_title("Gradient norm per layer (input dark, output light)")
    ax_norm.grid(alpha=0.3, which="both")
    if keys:
        _legend(ax_norm, short_names(keys))
    fig.suptitle(title)
    return _save(fig, path)


def weight_histogram(model, title="Weight distribution per layer", bins=60,
                     include_biases=False, path=None):
    """The article's weight histogram: one panel per kernel.

    Args:
        model: a `keras.Model`.
        title: the figure title. Defaults to `"Weight distribution per layer"`.
        bins: histogram bins. Defaults to `60`.
        include_biases: include biases. Defaults to `False`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    from keras_gradtools.norms import select_variables, to_numpy

    variables = select_variables(model.trainable_variables, include_biases)
    n = max(len(variables), 1)
    cols = min(6, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.1 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    labels = short_names([v.path for v in variables])
    for ax, variable, label in zip(axes, variables, labels):
        values = np.asarray(to_numpy(variable), dtype=float).ravel()
        ax.hist(values, bins=bins, color="tab:blue")
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(variables):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _finding_markers(ax, findings, colours=None):
    colours = colours or {"vanishing": "tab:purple", "exploding": "tab:red",
                          "nonfinite": "black", "dead_layer": "tab:gray",
                          "saturation": "tab:brown",
                          "dead_units": "tab:olive", "update_ratio": "tab:cyan"}
    for finding in findings or []:
        kind = finding.kind if hasattr(finding, "kind") else finding["kind"]
        step = finding.step if hasattr(finding, "step") else finding["step"]
        ax.axvline(step, color=colours.get(kind, "tab:red"), linestyle="--", linewidth=1.2,
                   label=f"{kind} (step {step})")


def _lines_per_variable(ax, rows, keys):
    """One line per variable over the steps, zeros left out (for a log axis)."""
    steps = np.arange(len(rows))
    for i, (label, colour) in enumerate(zip(short_names(keys), _layer_colours(len(keys)))):
        series = np.where(rows[:, i] > 0, rows[:, i], np.nan)
        ax.plot(steps, series, color=colour, linewidth=0.7, label=label)


def grad_norms_over_steps(norms, keys, findings=None, epoch_end_steps=None,
                          title="Gradient norm per layer, every step", path=None):
    """Per-layer gradient norms over training steps, log scale, findings marked.

    Args:
        norms: `(steps, len(keys))` per-step norms.
        keys: the variables' keys, input to output.
        findings: `Finding`s (or their dicts) to mark as vertical lines.
            Defaults to `None`.
        epoch_end_steps: epoch boundaries, drawn as light lines. Defaults
            to `None`.
        title: the figure title. Defaults to
            `"Gradient norm per layer, every step"`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    norms = np.asarray(norms, dtype=float)
    fig = Figure(figsize=(12, 5))
    ax = fig.subplots()
    _lines_per_variable(ax, norms, keys)
    for end in epoch_end_steps or []:
        ax.axvline(end, color="0.85", linewidth=0.8, zorder=0)
    _finding_markers(ax, findings)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="major")
    _legend(ax, short_names(keys), len(findings or []))
    return _save(fig, path)


def gradient_flow(norms, keys, window=None, title="Gradient flow (input -> output)", path=None):
    """One point per layer, input to output: mean and max norm over a window, log scale.

    Where the signal dies (vanishing) the means fall away towards the input;
    where it blows up (exploding) the maxima tower over the means.

    Args:
        norms: `(steps, len(keys))` per-step norms.
        keys: the variables' keys, input to output.
        window: `(first, last)` steps (inclusive-exclusive), or `None` for
            all. Defaults to `None`.
        title: the figure title. Defaults to
            `"Gradient flow (input -> output)"`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    norms = np.asarray(norms, dtype=float)
    if window is not None:
        norms = norms[window[0]:window[1]]
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(norms), norms, np.nan)
        mean = np.nanmean(finite, axis=0) if len(norms) else np.zeros(len(keys))
        top = np.nanmax(finite, axis=0) if len(norms) else np.zeros(len(keys))
    x = np.arange(len(keys))
    fig = Figure(figsize=(min(max(6, 0.45 * len(keys) + 2), _MAX_INCHES), 4.5))
    ax = fig.subplots()
    ax.bar(x, top, color="tab:red", alpha=0.35, label="max over the window")
    ax.bar(x, mean, color="tab:blue", alpha=0.8, label="mean over the window")
    ax.set_yscale("log")
    ticks, names = _labelled(len(keys)), short_names(keys)
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("variable (input -> output)")
    ax.set_ylabel("gradient L2 norm")
    span = "all steps" if window is None else f"steps {window[0]}-{window[1]}"
    ax.set_title(f"{title}, {span}")
    ax.grid(alpha=0.3, axis="y", which="major")
    ax.legend(fontsize=8)
    return _save(fig, path)


def norm_heatmap(norms, keys, title="log10 gradient norm, layers x steps", max_columns=2000,
                 path=None):
    """A heatmap of log10 norm, one row per layer (input at the top), steps across.

    Long runs are averaged into at most `max_columns` columns (in log space).

    Args:
        norms: `(steps, len(keys))` per-step norms.
        keys: the variables' keys, input to output.
        title: the figure title. Defaults to
            `"log10 gradient norm, layers x steps"`.
        max_columns: the most step columns drawn. Defaults to `2000`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    norms = np.asarray(norms, dtype=float)
    with np.errstate(all="ignore"):
        logs = np.log10(np.where(norms > 0, norms, np.nan))
    logs[~np.isfinite(logs)] = np.nan
    steps = len(logs)
    factor = max(1, int(np.ceil(steps / max_columns)))
    if factor > 1:
        cut = steps // factor * factor
        with np.errstate(all="ignore"):
            logs = np.nanmean(logs[:cut].reshape(-1, factor, logs.shape[1]), axis=1)
    fig = Figure(figsize=(12, min(max(3, 0.25 * len(keys) + 1.5), _MAX_INCHES)))
    ax = fig.subplots()
    image = ax.imshow(logs.T, aspect="auto", interpolation="nearest", cmap="magma",
                      extent=(0, factor * len(logs), len(keys) - 0.5, -0.5))
    ticks, names = _labelled(len(keys)), short_names(keys)
    ax.set_yticks(ticks)
    ax.set_yticklabels([names[i] for i in ticks], fontsize=7)
    ax.set_xlabel("training step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 norm")
    return _save(fig, path)


def compare_runs(runs, title="Runs compared", path=None):
    """Overlays several runs: loss per epoch (left) and global norm per step (right).

    Args:
        runs: `keras_gradtools.runs.Run`s (see `runs.load_run`).
        title: the figure title. Defaults to `"Runs compared"`.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`; each axis has one line per run,
        labelled with the run's name.
    """
    fig = Figure(figsize=(13, 4.5))
    loss_ax, norm_ax = fig.subplots(1, 2)
    colours = [cm.tab10(i % 10) for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        loss = [float(v) for v in run.history.get("loss", [])]
        if loss:
            loss_ax.plot(np.arange(1, len(loss) + 1), loss, marker="o", color=colour,
                         label=run.name)
        norms = np.asarray(run.global_norms, dtype=float)
        norm_ax.plot(np.arange(len(norms)), np.where(norms > 0, norms, np.nan),
                     linewidth=0.7, color=colour, label=run.name)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("Loss per epoch")
    norm_ax.set_xlabel("training step")
    norm_ax.set_ylabel("global gradient norm")
    norm_ax.set_title("Global gradient norm, every step")
    for ax, values in ((loss_ax, [v for r in runs for v in r.history.get("loss", [])]),
                       (norm_ax, [v for r in runs for v in r.global_norms])):
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values) & (values > 0)]
        if values.size and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def activations_over_training(activations, title="Activations per hidden layer over training "
                              "(mean +/- std on the probe batch)", path=None):
    """Glorot & Bengio (2010) Figure 2: each hidden layer's activation mean +/- std over steps.

    Args:
        activations: an `keras_gradtools.activations.ActivationRecord`
            (`GradNormLogger.activations`, `Run.activations`).
        title: the figure title. Defaults to the text above.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`: one line per layer (its mean) with a
        shaded band (+/- one std), the probe steps on the x axis.
    """
    steps = np.asarray(activations.steps, dtype=float)
    means, stds = activations.series("mean"), activations.series("std")
    fig = Figure(figsize=(12, 5))
    ax = fig.subplots()
    layers = list(means)
    for layer, colour in zip(layers, _layer_colours(len(layers))):
        label = layer.split("/", 1)[1] if "/" in layer else layer
        ax.plot(steps, means[layer], color=colour, linewidth=1.2, marker=".", label=label)
        ax.fill_between(steps, means[layer] - stds[layer], means[layer] + stds[layer],
                        color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("activation value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, [layer.split("/", 1)[1] if "/" in layer else layer for layer in layers])
    return _save(fig, path)


def update_ratios_over_steps(ratios, keys, band=(1e-5, 1e-1), healthy=1e-3,
                             title="Update-to-weight ratio ||dw|| / ||w|| per layer", path=None):
    """Each variable's update-to-weight ratio over steps, log scale, the healthy band marked.

    Args:
        ratios: `(steps, len(keys))` ratios (`GradNormLogger.update_ratios`).
        keys: the variables' keys, input to output.
        band: the band `update_ratio_rule` judges healthy, shaded. Defaults
            to `(1e-5, 1e-1)`.
        healthy: the usual healthy level, a dashed line. Defaults to `1e-3`.
        title: the figure title. Defaults to the text above.
        path: where to save, or `None`. Defaults to `None`.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    ratios = np.asarray(ratios, dtype=float).reshape(-1, len(keys))
    fig = Figure(figsize=(12, 5))
    ax = fig.subplots()
    _lines_per_variable(ax, ratios, keys)
    ax.axhspan(band[0], band[1], color="tab:green", alpha=0.08, label="healthy band")
    ax.axhline(healthy, color="tab:green", linestyle="--", linewidth=1.0,
               label=f"{healthy:g}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("||dw|| / ||w||")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="major")
    _legend(ax, short_names(keys), 2)
    return _save(fig, path)


def run_figures(run):
    """Every figure of a run: `[(file name, Figure)]`, in a fixed order.

    Args:
        run: a `keras_gradtools.runs.Run`.

    Returns:
        A list of `(name, Figure)`; the per-step figures only when the run
        recorded a step, the curves only when it saved its History (a fit
        that trained nothing has none).
    """
    figures = []
    if len(run.norms):
        figures += [
            ("grad_norms_steps.png",
             grad_norms_over_steps(run.norms, run.keys, run.findings, run.epoch_end_steps)),
            ("gradient_flow.png", gradient_flow(run.norms, run.keys)),
            ("norm_heatmap.png", norm_heatmap(run.norms, run.keys)),
        ]
    if run.activations is not None and run.activations.steps:
        figures.append(("activations.png", activations_over_training(run.activations)))
    if run.update_ratios is not None and len(run.update_ratios):
        figures.append(("update_ratios.png", update_ratios_over_steps(run.update_ratios,
                                                                      run.keys)))
    if "accuracy" in run.history:
        figures.append(("accuracy.png", accuracy_curve(run.history)))
    if run.history.get("loss"):
        figures.append(("loss_and_grad_norms.png", loss_and_grad_norms(run.history)))
    return figures


def plot_run(run_dir, out_dir=None):
    """Writes every figure of a saved run; returns the paths written.

    Args:
        run_dir: a run directory (see `keras_gradtools.runs`).
        out_dir: where to write the figures, or `None` for `run_dir/figures`.
            Defaults to `None`.

    Returns:
        A list of paths; empty for a run that recorded no step and no
        History (nothing is written then).

    Raises:
        keras_gradtools.runs.RunError: if `run_dir` is not a readable run.
        FileExistsError: if a figure already exists there (nothing is
            overwritten).
    """
    import os

    from keras_gradtools.runs import load_run

    run = load_run(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "figures")
    figures = run_figures(run)
    paths = [os.path.join(out_dir, name) for name, _ in figures]
    taken = [p for p in paths if os.path.exists(p)]
    if taken:
        raise FileExistsError(
            f"{taken[0]} already exists; keras_gradtools never overwrites a figure. "
            "Pass another --out directory."
        )
    if not figures:
        return []
    os.makedirs(out_dir, exist_ok=True)
    for (_, fig), path in zip(figures, paths):
        _save(fig, path)
    return paths
