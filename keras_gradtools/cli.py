"""The `gradtools` command: thin click wrappers over the library."""

import os
import sys

import click

from keras_gradtools import experiments


def _parse_cases(value):
    names = list(experiments.CASES) if value == "all" else [
        v.strip() for v in value.split(",") if v.strip()
    ]
    for name in names:
        if name not in experiments.CASES:
            raise click.BadParameter(
                f"unknown case {name!r}; choose from all, {', '.join(experiments.CASES)}",
                param_hint="--case",
            )
    return names


def reproduce_options(f):
    """The options shared by `gradtools reproduce` and `scripts/reproduce_article.py`."""
    options = [
        click.option("--case", "case", default="all", show_default=True,
                     help="all, or one or more of: " + ", ".join(experiments.CASES)
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
    import tensorflow as tf

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
    seed_list = [None] if seeds is None else [
        (seed if seed is not None else 0) + i for i in range(seeds)
    ]
    if seeds is None and seed is not None:
        seed_list = [seed]
    gpus = tf.config.list_logical_devices("GPU")
    click.echo(f"Training on {gpus[0].name if gpus else '/device:CPU:0'}"
               f"{'' if gpus else ' (no GPU visible)'}", err=True)
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
def main():
    """keras_gradtools: find and fix vanishing and exploding gradients in Keras."""


@main.command()
@reproduce_options
def reproduce(**kwargs):
    """Reproduce the article's experiments on MNIST (vanishing, resnet, exploding, clipped)."""
    run_reproduce(**kwargs)


def _read_json(path, what):
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise click.UsageError(f"{what} is missing: no file at {path}") from None
    except (OSError, ValueError) as e:
        raise click.UsageError(f"{what} at {path} cannot be read ({e})") from None


def load_run(run_dir):
    """Reads a run directory's recorded norms; a clear error if it is not one.

    Returns `(norms, keys, epoch_end_steps, config)`; `config` (config.json, or
    `{}`) gains `skipped_steps`, the steps a loss-scale optimizer skipped.
    """
    import numpy as np

    if not os.path.isdir(run_dir):
        raise click.UsageError(f"{run_dir} is not a directory")
    norms_path = os.path.join(run_dir, "grad_norms.json")
    if not os.path.exists(norms_path) and not os.path.exists(
        os.path.join(run_dir, "config.json")
    ):
        raise click.UsageError(
            f"{run_dir} is not a keras_gradtools run directory (it has neither "
            "grad_norms.json nor config.json); pass a directory written by "
            "`gradtools reproduce` or run_experiment()"
        )
    data = _read_json(norms_path, "the recorded norms (grad_norms.json)")
    try:
        keys = list(data["keys"])
        norms = np.array([[float(v) for v in row] for row in data["norms"]],
                         dtype=float).reshape(-1, len(keys))
        epoch_end_steps = [int(s) for s in data.get("epoch_end_steps", [])]
        skipped_steps = [int(s) for s in data.get("skipped_steps", [])]
        if any(not 0 <= s < len(norms) for s in skipped_steps):
            raise ValueError("a skipped step outside the recording")
    except (KeyError, TypeError, ValueError) as e:
        raise click.UsageError(
            f"{norms_path} is not a gradient-norm recording ({e!r})"
        ) from None
    config = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
        config = _read_json(os.path.join(run_dir, "config.json"), "config.json")
    config["skipped_steps"] = skipped_steps
    return norms, keys, epoch_end_steps, config


def _clipping_of(config):
    """The clipping of a saved run's optimizer, described as `describe_clipping` does."""
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
    from keras_gradtools.diagnose import diagnose_norms

    norms, keys, epoch_end_steps, config = load_run(run_dir)
    report = diagnose_norms(norms, keys, epoch_end_steps, clipping=_clipping_of(config),
                            skipped_steps=config.get("skipped_steps"))
    click.echo(report.to_json(indent=1) if as_json else str(report))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the figures (default: RUN_DIR/figures).")
def plot(run_dir, out_dir):
    """Write every figure of a saved run (norms over steps, gradient flow, heatmap, curves)."""
    from keras_gradtools.plots import plot_run

    load_run(run_dir)  # a clear error for anything that is not a run
    try:
        paths = plot_run(run_dir, out_dir)
    except FileExistsError as e:
        raise click.UsageError(str(e)) from None
    for path in paths:
        click.echo(path)


@main.command()
@click.argument("model_path", type=click.Path())
@click.option("--data", "data_source", default="mnist", show_default=True,
              help="mnist (the bundled copy), or a path to a keras-style .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(model_path, data_source, batch_size, as_json):
    """Pre-flight check of a saved model: gradient norms at initialization, one batch."""
    import keras

    from keras_gradtools.data import load_mnist
    from keras_gradtools.probe import preflight_check

    if not os.path.isfile(model_path):
        raise click.BadParameter(f"no file at {model_path}", param_hint="MODEL_PATH")
    try:
        model = keras.models.load_model(model_path)
    except Exception as e:  # keras raises many kinds for a bad file
        raise click.BadParameter(
            f"{model_path} cannot be loaded as a Keras model ({type(e).__name__}: {e})",
            param_hint="MODEL_PATH",
        ) from None
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        click.echo("The model was saved without a loss: using "
                   "sparse_categorical_crossentropy.", err=True)
    source = "bundled" if data_source == "mnist" else data_source
    shape = tuple(model.input_shape[1:])
    if shape not in ((784,), (28, 28, 1)):
        raise click.UsageError(
            f"the model takes inputs of shape {shape}; MNIST gives (784,) or (28, 28, 1)"
        )
    try:
        (x, y), _ = load_mnist(source, flatten=shape == (784,),
                               subset=batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--data") from None
    norms, report = preflight_check(model, x, y, batch_size=batch_size)
    if as_json:
        import json

        click.echo(json.dumps({"norms": norms, "report": report.to_dict()}, indent=1))
        return
    click.echo(f"Gradient norms at initialization ({model.name}, one batch of {len(x)}):")
    width = max(len(k) for k in norms)
    for key, value in norms.items():
        click.echo(f"  {key:<{width}}  {value:.3e}")
    click.echo("")
    click.echo(str(report))


if __name__ == "__main__":
    main()
