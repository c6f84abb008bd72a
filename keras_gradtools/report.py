"""Reports of saved runs: one self-contained HTML file, and runs compared side by side.

`write_report(run_dir)` is what `gradtools report` calls; `compare_runs(...)`
is what `gradtools compare` calls. Both read run directories with
`keras_gradtools.runs.load_run` and never overwrite a file.
"""

import base64
import html
import io
import os

import numpy as np

from keras_gradtools import diagnose
from keras_gradtools import plots
from keras_gradtools import runs as runs_lib

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
.finding { border-left: 4px solid #c33; padding: .3em .8em; margin: .8em 0; background: #fdf3f3; }
.healthy { border-left: 4px solid #393; padding: .3em .8em; background: #f1f8f1; }
code, pre { background: #f4f4f4; padding: .1em .3em; }
@media print { body { max-width: none; } figure { break-inside: avoid; } }
"""


def _png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if not np.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _table(header, rows, numeric=()):
    out = ["<table><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            out.append(f"<td{cls}>{html.escape(_fmt(cell))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def layer_table(run):
    """Per-variable rows: key, first, last and largest norm, steps starved.

    "Steps starved" counts the steps at which the variable's norm was below
    the vanishing rule's thresholds (`diagnose.starved_steps` with its
    defaults).

    Args:
        run: a `keras_gradtools.runs.Run`.

    Returns:
        A list of `(key, first, last, largest, steps_starved)`.
    """
    defaults = diagnose.DEFAULTS["vanishing"]
    starved = diagnose.starved_steps(run.norms, run.keys, defaults["ratio"],
                                     defaults["floor"], defaults["skip"])
    rows = []
    for i, key in enumerate(run.keys):
        column = run.norms[:, i]
        finite = column[np.isfinite(column)]
        rows.append((key,
                     float(column[0]) if len(column) else None,
                     float(column[-1]) if len(column) else None,
                     float(finite.max()) if finite.size else None,
                     int(starved[:, i].sum())))
    return rows


def render_report(run):
    """The HTML text of a run's report (see `write_report`).

    Args:
        run: a `keras_gradtools.runs.Run`.

    Returns:
        A string: a whole HTML document, every figure embedded as a PNG
        data URI, no reference to any other file or address.
    """
    config = run.config
    outcome = runs_lib.outcome(run)
    title = f"keras_gradtools report: {run.name}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    has_diagnosis = os.path.exists(os.path.join(run.path, "diagnosis.json"))
    # Configuration
    settings = [
        ("model", config.get("model") or config.get("name")),
        ("steps recorded", outcome["steps"]),
        ("epochs", outcome["epochs"]),
        ("variables recorded", len(run.keys)),
        ("optimizer", (config.get("optimizer_config") or {}).get("class_name")),
        ("clipping", config.get("clipping") or "none"),
        ("skipped steps (loss scaling)", len(run.skipped_steps)),
        ("spikes absorbed by the clipping", len(run.absorbed_spikes)
         if config.get("clipping") and has_diagnosis else None),
        ("backend", config.get("backend")),
        ("Keras", config.get("keras_version")),
        ("keras_gradtools", config.get("keras_gradtools_version")),
    ]
    parts.append('<h2 id="config">Configuration</h2>')
    parts.append(_table(["setting", "value"], [(k, v) for k, v in settings if v is not None]))
    parts.append(_table(
        ["final loss", "final accuracy", "largest epoch-over-epoch loss ratio",
         "largest raw global norm", "largest applied global norm"],
        [(outcome["final_loss"], outcome["final_accuracy"],
          None if outcome["loss_jump"] is None
          else f"{outcome['loss_jump']:.4g} (epoch {outcome['loss_jump_epoch']})",
          outcome["max_global_norm"], outcome["max_applied_global_norm"])],
        numeric=(0, 1, 3, 4)))
    # Findings
    parts.append('<h2 id="findings">Findings</h2>')
    if not run.findings:
        parts.append('<p class="healthy">' + (
            "No finding: the monitor saw nothing wrong." if has_diagnosis else
            "No monitor ran with this recording: run <code>gradtools diagnose "
            f"{html.escape(run.path)}</code> to judge it.") + "</p>")
    if run.absorbed_spikes:
        parts.append(f"<p>The optimizer's clipping ({html.escape(str(config.get('clipping')))}) "
                     f"absorbed {len(run.absorbed_spikes)} spike(s) of the global norm: no "
                     "finding, nothing to do while the loss keeps falling.</p>")
        parts.append(_table(
            ["step", "epoch", "global norm", "recent level", "jump"],
            [(a.get("step"), a.get("epoch"), a.get("norm"), a.get("recent_level"),
              a.get("jump")) for a in run.absorbed_spikes],
            numeric=(0, 2, 3, 4)))
    for finding in run.findings:
        kind = str(finding.get("kind", "?"))
        parts.append(f'<div class="finding {html.escape(kind)}">')
        parts.append(f"<h3>{html.escape(kind)} from step {html.escape(str(finding.get('step')))}"
                     f" (epoch {html.escape(str(finding.get('epoch')))})</h3>")
        parts.append(f"<p>{html.escape(str(finding.get('message', '')))}</p>")
        layers = finding.get("layers") or []
        if layers:
            parts.append("<p>Variables: " + ", ".join(
                f"<code>{html.escape(str(k))}</code>" for k in layers) + "</p>")
        evidence = finding.get("evidence") or {}
        if evidence:
            parts.append(_table(["evidence", "value"],
                                [(k, _evidence(v)) for k, v in evidence.items()]))
        fixes = finding.get("fixes") or []
        if fixes:
            parts.append("<p>Fixes to try:</p><ul>" + "".join(
                f"<li>{html.escape(str(f))}</li>" for f in fixes) + "</ul>")
        parts.append("</div>")
    # Figures
    parts.append('<h2 id="figures">Figures</h2>')
    captions = {
        "grad_norms_steps.png": "Every recorded variable's gradient norm at every step (log scale).",
        "gradient_flow.png": "Gradient flow: mean and largest norm per layer, input to output.",
        "norm_heatmap.png": "log10 gradient norm, layers x steps.",
        "activations.png": ("Each hidden layer's activations on the probe batch over training: "
                            "mean +/- std (Glorot & Bengio 2010, Figure 2)."),
        "update_ratios.png": ("Each weight's update-to-weight ratio ||dw|| / ||w|| per step "
                              "(log scale; healthy band shaded)."),
        "accuracy.png": "Accuracy per epoch.",
        "loss_and_grad_norms.png": "Loss and gradient norms per epoch.",
    }
    figures = plots.run_figures(run)
    if not figures:
        parts.append("<p>The run recorded no step: no figure to draw.</p>")
    for name, fig in figures:
        parts.append(f'<figure><img alt="{html.escape(captions[name])}" '
                     f'src="data:image/png;base64,{_png(fig)}">'
                     f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
    # Per-layer table
    parts.append('<h2 id="layers">Per layer</h2>')
    ratio = diagnose.DEFAULTS["vanishing"]["ratio"]
    parts.append(f"<p>Steps starved: steps at which the norm was below {ratio:g} times the "
                 "output layer's (or below 1e-7), as the vanishing rule judges.</p>")
    parts.append(_table(["variable", "first norm", "last norm", "largest norm", "steps starved"],
                        layer_table(run), numeric=(1, 2, 3, 4)))
    # TensorBoard
    parts.append('<h2 id="tensorboard">In TensorBoard</h2>')
    log_dir = (config.get("logger") or {}).get("log_dir")
    if log_dir:
        parts.append(f"<p>This run wrote TensorBoard events: <code>tensorboard --logdir "
                     f"{html.escape(str(log_dir))}</code></p>")
    else:
        parts.append("<p>Record with <code>GradNormLogger(run_dir=..., log_dir=\"logs/run1\")"
                     "</code> to get TensorBoard events too, then <code>tensorboard --logdir "
                     "logs</code>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _evidence(value):
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return value


def write_report(run_dir, out=None):
    """Writes a run's report as one self-contained HTML file.

    Args:
        run_dir: the run directory.
        out: the file to write (its directory is created), or `None` for
            `run_dir/report.html`. Defaults to `None`.

    Returns:
        The path written.

    Raises:
        keras_gradtools.runs.RunError: if `run_dir` is not a readable run.
        FileExistsError: if `out` exists (nothing is overwritten).
    """
    run = runs_lib.load_run(run_dir)
    out = os.fspath(out) if out is not None else os.path.join(run.path, "report.html")
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; keras_gradtools never overwrites a "
                              "report. Pass another --out file.")
    text = render_report(run)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "x", encoding="utf-8") as f:
        f.write(text)
    return out


def comparison_table(runs):
    """A markdown table of the runs side by side (see `runs.outcome`).

    Args:
        runs: `keras_gradtools.runs.Run`s.

    Returns:
        The table, a string.
    """
    header = ["run", "steps", "final loss", "final accuracy", "largest loss jump (epoch)",
              "largest raw global norm", "largest applied global norm", "findings"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        o = runs_lib.outcome(run)
        jump = "-" if o["loss_jump"] is None else f"{o['loss_jump']:.4g} ({o['loss_jump_epoch']})"
        cells = [run.name, str(o["steps"]), _fmt(o["final_loss"]), _fmt(o["final_accuracy"]),
                 jump, _fmt(o["max_global_norm"]), _fmt(o["max_applied_global_norm"]),
                 ", ".join(o["findings"]) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_runs(run_dirs, out_dir=None):
    """Compares runs: the markdown table, and (with `out_dir`) the table and figure as files.

    Args:
        run_dirs: two or more run directories.
        out_dir: a directory to write `comparison.md` and `comparison.png`
            into, or `None` to write nothing. Defaults to `None`.

    Returns:
        `(table, paths)`: the markdown table and the paths written.

    Raises:
        keras_gradtools.runs.RunError: if a directory is not a readable run.
        FileExistsError: if a file to write exists already.
    """
    runs = [runs_lib.load_run(d) for d in run_dirs]
    table = comparison_table(runs)
    paths = []
    if out_dir is not None:
        paths = [os.path.join(out_dir, "comparison.md"), os.path.join(out_dir, "comparison.png")]
        taken = [p for p in paths if os.path.exists(p)]
        if taken:
            raise FileExistsError(f"{taken[0]} already exists; keras_gradtools never "
                                  "overwrites. Pass another --out directory.")
        os.makedirs(out_dir, exist_ok=True)
        with open(paths[0], "x") as f:
            f.write(table + "\n")
        plots.compare_runs(runs, title=" vs ".join(r.name for r in runs), path=paths[1])
    return table, paths
