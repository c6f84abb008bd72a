"""The `gradtools` command: thin click wrappers over the library."""

import os
import sys
import zipfile

import click

from keras_gradtools import cases

BACKENDS = ("jax", "tensorflow", "torch")  # each backend's package has its name


def _select_backend(ctx, param, value):
    """`--backend`: sets KERAS_BACKEND before anything imports Keras."""
    if value is None:
        return None
    import importlib.util

    if importlib.util.find_spec(value) is None:
        extra = "" if value == "tensorflow" else f"[{value}]"
        raise click.BadParameter(
            f"the {value} backend needs the {value} package: "
            f"pip install 'keras_gradtools{extra}'", ctx=ctx, param=param)
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend") and keras.backend.backend() != value:
        raise click.BadParameter(
            f"Keras is already running on {keras.backend.backend()!r} in this process; the "
            "backend is fixed when Keras is imported", ctx=ctx, param=param)
    os.environ["KERAS_BACKEND"] = value
    return value


def backend_option(f):
    """`--backend tensorflow|jax|torch`, applied before any other option is read."""
    return click.option(
        "--backend", type=click.Choice(BACKENDS), default=None, is_eager=True,
        expose_value=False, callback=_select_backend,
        help="The Keras backend to train on (default: the KERAS_BACKEND variable, else "
        "Keras' own setting, tensorflow).")(f)


def _parse_cases(value):
    names = list(cases.CASES) if value == "all" else [
        v.strip() for v in value.split(",") if v.strip()
    ]
    for name in names:
        if name not in cases.CASES:
            raise click.BadParameter(
                f"unknown case {name!r}; choose from all, {', '.join(cases.CASES)}",
                param_hint="--case",
            )
    return names


def reproduce_options(f):
    """The options shared by `gradtools reproduce` and `scripts/reproduce_article.py`."""
    options = [
        click.option("--case", "case", default="all", show_default=True,
                     help="all, or one or more of: " + ", ".join(cases.CASES)
                     + " (comma-separated)."),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Epochs (default: the case's, 10)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Batch size (default: the case's, 32)."),
        click.option("--seed", type=int, default=None,
                     help="Seed for weights and shuffling (default: the case's)."),
        click.option("--seeds", type=click.IntRange(min=1), default=None,
                     help="Run this many seeds (seed, seed+1, ...) and report in how "
                     "many the loss jumped."),
        click.option("--subset", type=click.IntRange(min=1), default=None,
                     help="Train on the first N of the 60,000 samples."),
        click.option("--data", "data_source", default="bundled", show_default=True,
                     help="MNIST source: bundled, keras (downloads), or a path to a "
                     "keras-style mnist.npz."),
        click.option("--out", "out_dir", default="runs", show_default=True,
                     type=click.Path(file_okay=False),
                     help="Parent directory of the run directories (never overwritten)."),
        click.option("--clip", default=None, metavar="METHOD[:THRESHOLD]",
                     help="Train with a clipping preset (none, value, norm, global_norm, "
                     "agc, autoclip, zclip), e.g. zclip or norm:1.0. Applies to the "
                     "deep-linear cases; --case defaults to exploding with it."),
        click.option("--quiet", is_flag=True, help="No per-epoch progress from Keras."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_reproduce(case, epochs, batch_size, seed, seeds, subset, data_source, out_dir, quiet,
                  clip=None):
    """Runs the chosen cases, prints progress and the table; returns the results."""
    from keras_gradtools import experiments
    from keras_gradtools.clipping import parse_clip

    if clip is not None:
        try:
            parse_clip(clip)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--clip") from None
        if case == "all":
            case = "exploding"
    names = _parse_cases(case)
    if data_source not in ("bundled", "keras") and not os.path.isfile(data_source):
        raise click.BadParameter(
            f"no file at {data_source!r}; pass bundled, keras, or an existing mnist.npz",
            param_hint="--data",
        )
    if data_source != "keras":  # a damaged or non-MNIST file: refused before any run starts
        from keras_gradtools.data import load_mnist

        try:
            load_mnist(data_source, subset=1)
        except (FileNotFoundError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="--data") from None
    seed_list = [None] if seeds is None else [
        (seed if seed is not None else 0) + i for i in range(seeds)
    ]
    if seeds is None and seed is not None:
        seed_list = [seed]
    import keras

    device = experiments.device_name()
    click.echo(f"Training on {device} with Keras {keras.__version__} on "
               f"{keras.backend.backend()}{'' if 'GPU' in device else ' (no GPU visible)'}",
               err=True)
    results = []
    for name in names:
        for s in seed_list:
            click.echo(f"== {name}: {experiments.CASES[name].title}"
                       + (f" (seed {s})" if s is not None else ""), err=True)
            result = experiments.run_experiment(
                name, epochs=epochs, batch_size=batch_size, seed=s, subset=subset,
                out_dir=out_dir, data_source=data_source,
                verbose=0 if quiet else (1 if sys.stdout.isatty() else 2),
                clip=clip,
            )
            click.echo(f"   run directory: {result['run_dir']}", err=True)
            if result["report"] is not None:
                click.echo(str(result["report"]), err=True)
            results.append(result)
    click.echo(experiments.format_table(results))
    if seeds is not None:
        click.echo("")
        for name in names:
            runs = [r for r in results if r["case"].name == name]
            jumped = [r for r in runs
                      if r["summary"]["loss_jump"] and r["summary"]["loss_jump"]["ratio"] >= 2.0]
            click.echo(f"{name}: loss jumped (>= 2x epoch over epoch) in "
                       f"{len(jumped)} of {len(runs)} seeds "
                       f"({', '.join(str(r['case'].seed) for r in jumped) or 'none'})")
    return results


@click.group()
@click.version_option(package_name="keras_gradtools")
@backend_option
def main():
    """keras_gradtools: find and fix vanishing and exploding gradients in Keras."""


@main.command()
@reproduce_options
@backend_option
def reproduce(**kwargs):
    """Reproduce the article's experiments on MNIST (vanishing, resnet, exploding, clipped)."""
    run_reproduce(**kwargs)


def _explained(function, *args):
    """Calls a function that reads runs (and writes files); its refusals become usage errors."""
    from keras_gradtools.runs import RunError

    try:
        return function(*args)
    except (RunError, FileExistsError) as e:
        raise click.UsageError(str(e)) from None


def _clipping_of(config):
    """The clipping of a saved run's optimizer, described as `describe_clipping` does."""
    if "clipping" in config:
        return config["clipping"]
    import keras

    from keras_gradtools.clipping import describe_clipping

    saved = config.get("optimizer_config")
    if not saved:
        return None
    try:
        return describe_clipping(keras.optimizers.deserialize(saved))
    except Exception:  # an optimizer this installation cannot rebuild
        return None


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def diagnose(run_dir, as_json):
    """Judge a saved run's recorded gradient norms and print the report."""
    from keras_gradtools.diagnose import ModelFacts, diagnose_norms
    from keras_gradtools.runs import load_run

    run = _explained(load_run, run_dir)
    report = diagnose_norms(run.norms, run.keys, run.epoch_end_steps,
                            clipping=_clipping_of(run.config), skipped_steps=run.skipped_steps,
                            facts=ModelFacts.from_dict(run.config.get("model_facts")),
                            activations=run.activations, update_ratios=run.update_ratios)
    click.echo(report.to_json(indent=1) if as_json else str(report))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the figures (default: RUN_DIR/figures).")
def plot(run_dir, out_dir):
    """Write every figure of a saved run (norms, gradient flow, heatmap, activations, curves)."""
    from keras_gradtools.plots import plot_run

    paths = _explained(plot_run, run_dir, out_dir)
    if not paths:
        click.echo(f"{run_dir} recorded no step and no History: no figure to draw.")
    for path in paths:
        click.echo(path)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="The HTML file to write (default: RUN_DIR/report.html; never overwritten).")
def report(run_dir, out):
    """Write one self-contained HTML report of a run (config, curves, findings, layers)."""
    from keras_gradtools.report import write_report

    click.echo(_explained(write_report, run_dir, out))


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Also write comparison.md and comparison.png into this directory.")
def compare(run_dirs, out_dir):
    """Compare runs side by side: final loss and accuracy, loss jumps, norms, findings."""
    from keras_gradtools.report import compare_runs

    if len(run_dirs) < 2:
        raise click.UsageError("compare needs at least two run directories. "
                               f"Received: {len(run_dirs)}")
    table, paths = _explained(compare_runs, run_dirs, out_dir)
    click.echo(table)
    for path in paths:
        click.echo(path)


@main.command()
@click.argument("model_path", type=click.Path())
@click.option("--data", "data_source", default="mnist", show_default=True,
              help="mnist (the bundled copy, for MNIST-shaped models), or a .npz holding "
              "x and y (x_<input name> for a model with several inputs).")
@click.option("--loss", default=None,
              help="A Keras loss name, for a model saved without one.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--import", "imports", multiple=True, metavar="MODULE|FILE.py",
              help="A module (dotted name) or .py file that defines the model's own layers, "
              "models or functions (registered with @keras.saving.register_keras_serializable), "
              "imported before the model is loaded. Repeatable.")
@click.option("--safe-mode/--no-safe-mode", default=True, show_default=True,
              help="Keras' safe_mode when loading: --no-safe-mode loads Lambda layers that "
              "hold Python code (only for a file you trust).")
@backend_option
def check(model_path, data_source, loss, batch_size, as_json, imports, safe_mode):
    """Pre-flight check of a saved model: gradient norms at initialization, one batch."""
    import keras

    from keras_gradtools.probe import preflight_activations, preflight_check

    if not os.path.isfile(model_path):
        raise click.BadParameter(f"no file at {model_path}", param_hint="MODEL_PATH")
    if data_source != "mnist" and not os.path.isfile(data_source):
        raise click.BadParameter(f"no file at {data_source}; pass mnist or an .npz",
                                 param_hint="--data")
    if loss is not None:
        try:
            keras.losses.get(loss)
        except (ValueError, TypeError):
            raise click.BadParameter(f"{loss!r} is not a Keras loss", param_hint="--loss") from None
    if model_path.endswith(".keras") and not zipfile.is_zipfile(model_path):
        raise click.BadParameter(
            f"{model_path} is not a .keras archive (not a zip file: corrupt, or saved in "
            "another format)", param_hint="MODEL_PATH")
    _import_user_code(imports)
    try:
        model = keras.models.load_model(model_path, safe_mode=safe_mode)
    except Exception as e:  # keras raises many kinds for a bad file
        raise click.BadParameter(
            f"{model_path} cannot be loaded as a Keras model ({type(e).__name__}: "
            f"{_load_error(e)})", param_hint="MODEL_PATH",
        ) from None
    x, y = _check_data(model, data_source, batch_size)
    if loss is not None:
        model.compile(optimizer="adam", loss=loss)
    elif not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        if data_source != "mnist":
            raise click.UsageError(
                f"{model_path} was saved without a loss: pass one with --loss "
                "(e.g. --loss sparse_categorical_crossentropy)")
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        click.echo("The model was saved without a loss: using "
                   "sparse_categorical_crossentropy.", err=True)
    stats, why_not = preflight_activations(model, x)
    norms, report = preflight_check(model, x, y, batch_size=batch_size, activations=stats)
    if as_json:
        import json

        from keras_gradtools.activations import ActivationRecord

        stats = ActivationRecord([0], [stats]).to_dict()["stats"][0] if stats else None
        click.echo(json.dumps({"norms": norms, "activations": stats,
                               "report": report.to_dict()}, indent=1))
        return
    samples = len(next(iter(x.values())) if isinstance(x, dict) else x)
    click.echo(f"Gradient norms at initialization ({model.name}, one batch of {samples}):")
    width = max(len(k) for k in norms)
    for key, value in norms.items():
        click.echo(f"  {key:<{width}}  {value:.3e}")
    click.echo("")
    if stats:
        click.echo(f"Activations at initialization (inference mode, first {min(samples, 64)} "
                   "samples; gain: the mean local derivative):")
        width = max(len(k) for k in stats)
        kind = max(len("activation"), *(len(s["activation"]) for s in stats.values()))
        click.echo(f"  {'layer':<{width}}  {'activation':<{kind}} {'mean':>9} {'std':>9} "
                   f"{'gain':>7}  saturated/dead")
        for layer, s in stats.items():
            tail = (f"saturated {s['saturated']:.2f}" if s["saturated"] is not None else
                    f"dead {s['dead']:.2f}" if s["dead"] is not None else "")
            gain = "-" if s["gain"] is None else f"{s['gain']:.3g}"
            click.echo(f"  {layer:<{width}}  {s['activation']:<{kind}} {s['mean']:9.3g} "
                       f"{s['std']:9.3g} {gain:>7}  {tail}".rstrip())
    else:
        click.echo(f"No activation statistics: {why_not}.")
    click.echo("")
    click.echo(str(report))


def _import_user_code(imports):
    """Imports each `--import` value: a dotted module name, or a .py file (its folder first on
    `sys.path`, as `python FILE.py` has it), so that its Keras objects are registered."""
    import importlib
    import importlib.util

    for value in imports:
        try:
            if value.endswith(".py"):
                if not os.path.isfile(value):
                    raise click.BadParameter(f"no file at {value}", param_hint="--import")
                folder = os.path.dirname(os.path.abspath(value))
                name = os.path.splitext(os.path.basename(value))[0]
                spec = importlib.util.spec_from_file_location(name, value)
                module = importlib.util.module_from_spec(spec)
                sys.path.insert(0, folder)
                try:
                    sys.modules[name] = module
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
                finally:
                    sys.path.remove(folder)
            else:
                importlib.import_module(value)
        except click.BadParameter:
            raise
        except Exception as e:
            raise click.BadParameter(f"cannot import {value} ({type(e).__name__}: {e})",
                                     param_hint="--import") from None


def _load_error(error):
    """Keras' message on a model it cannot load, without the configs it prints in full,
    and with what to do where the cause is code that was not imported or not trusted."""
    text = str(error)
    if "Exception encountered: " in text:
        text = text.rsplit("Exception encountered: ", 1)[1]
    text = text.split(" Full object config:", 1)[0].split("\n\nconfig=", 1)[0].strip()
    if "Could not locate" in text or "cannot be imported" in text:
        text += (" Import the code that defines it with --import MODULE or --import FILE.py "
                 "(a library's class: install the library).")
    elif "safe_mode" in text:
        text += " Pass --no-safe-mode to load it, if you trust the file."
    return text


def _check_data(model, data_source, batch_size):
    """The batch for `gradtools check`: `(x, y)`, shapes checked against the model's inputs."""
    import numpy as np

    from keras_gradtools.facts import input_fits, input_specs

    from keras_gradtools.data import load_mnist

    try:
        specs = input_specs(model)
    except (AttributeError, ValueError):
        raise click.UsageError(
            "the model's inputs are not known (a subclassed model saved before it was "
            "built?); save a built model") from None
    if data_source == "mnist":
        shapes = [shape for _, shape in specs]
        if len(shapes) != 1 or shapes[0] not in ((784,), (28, 28, 1), (28, 28)):
            raise click.UsageError(
                f"the model takes inputs of shape {', '.join(map(str, shapes))}; MNIST gives "
                "(784,) or (28, 28, 1): pass your own data with --data DATA.npz")
        try:
            (x, y), _ = load_mnist("bundled", flatten=shapes[0] == (784,), subset=batch_size)
        except (FileNotFoundError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="--data") from None
        if shapes[0] == (28, 28):
            x = x.reshape(-1, 28, 28)
        return x, y
    if not zipfile.is_zipfile(data_source):
        raise click.BadParameter(
            f"{data_source} cannot be read as an .npz (not a zip archive; save one with np.savez)",
            param_hint="--data")
    try:
        with np.load(data_source, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a corrupt or non-npz file
        raise click.BadParameter(f"{data_source} cannot be read as an .npz ({e})",
                                 param_hint="--data") from None
    if "y" not in arrays:
        raise click.BadParameter(
            f"{data_source} has no 'y' array (it holds {', '.join(sorted(arrays)) or 'nothing'})",
            param_hint="--data")
    if len(specs) == 1 and "x" in arrays:
        named = {specs[0][0]: arrays["x"]}
    else:
        missing = [f"x_{name}" for name, _ in specs if f"x_{name}" not in arrays]
        if missing:
            raise click.BadParameter(
                f"the model has {len(specs)} input(s) ({', '.join(n for n, _ in specs)}); "
                f"{data_source} needs {', '.join(missing)} "
                f"(it holds {', '.join(sorted(arrays))})", param_hint="--data")
        named = {name: arrays[f"x_{name}"] for name, _ in specs}
    for name, shape in specs:
        data_shape = tuple(named[name].shape[1:])
        if not input_fits(shape, data_shape):
            raise click.UsageError(
                f"the data for input {name!r} has samples of shape {data_shape}, the model "
                f"takes {shape}")
    y = arrays["y"]
    for name, values in [*((f"x_{n}" if f"x_{n}" in arrays else "x", v)
                           for n, v in named.items()), ("y", y)]:
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            bad = np.argwhere(~np.isfinite(values))[0]
            raise click.UsageError(
                f"{data_source}: {name} holds NaN or Inf values (first at index "
                f"{tuple(int(i) for i in bad)}); the check needs finite data")
    counts = {len(a) for a in named.values()} | {len(y)}
    if len(counts) != 1:
        raise click.UsageError(
            f"x and y hold different numbers of samples ({sorted(counts)}) in {data_source}")
    x = named[specs[0][0]] if len(specs) == 1 else named
    return x, y


if __name__ == "__main__":
    main()
