"""Matplotlib figures of training curves, gradient norms and weights.

Every function returns the `Figure` it drew and, given `path`, also saves it
(PNG, or any format matplotlib infers from the extension). They use the Agg
backend-neutral `Figure` API, so they work headless and never pop a window.
Series with many layers (the article's 22) get a colour map running from the
input (dark) to the output (light) and a legend outside the axes.
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


def short_name(key):
    """A compact label for a variable path: `deep/dense_3/kernel` -> `dense_3/kernel`.

    Args:
        key: a variable path.

    Returns:
        The last two parts of the path.

    Example:

    >>> short_name("deep_sigmoid/dense_3/kernel")
    'dense_3/kernel'
    """
    return "/".join(key.split("/")[-2:])


def _legend(ax, n):
    if n > 8:
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
    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_norm = fig.subplots(1, 2)
    loss = history.get("loss", [])
    epochs = np.arange(1, len(loss) + 1)
    ax_loss.plot(epochs, loss, marker="o", color="tab:red", label="loss")
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
    for key, colour in zip(keys, _layer_colours(len(keys))):
        values = np.asarray(history[f"grad_norm/{key}"], dtype=float)
        ax_norm.plot(np.arange(1, len(values) + 1), values, color=colour,
                     label=short_name(key))
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("epoch")
    ax_norm.set_ylabel("mean gradient L2 norm")
    ax_norm.set_title("Gradient norm per layer (input dark, output light)")
    ax_norm.grid(alpha=0.3, which="both")
    if keys:
        _legend(ax_norm, len(keys))
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
    from keras_gradtools.norms import select_variables

    variables = select_variables(model.trainable_variables, include_biases)
    n = max(len(variables), 1)
    cols = min(6, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.1 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, variable in zip(axes, variables):
        values = np.asarray(variable.numpy(), dtype=float).ravel()
        ax.hist(values, bins=bins, color="tab:blue")
        ax.set_title(short_name(variable.path), fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(variables):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
