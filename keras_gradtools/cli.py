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
        click.option("--quiet", is_flag=True, help="No per-epoch progress from Keras."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_reproduce(case, epochs, batch_size, seed, seeds, subset, data_source, out_dir, quiet):
    """Runs the chosen cases, prints progress and the table; returns the results."""
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
    results = []
    for name in names:
        for s in seed_list:
            click.echo(f"== {name}: {experiments.CASES[name].title}"
                       + (f" (seed {s})" if s is not None else ""), err=True)
            result = experiments.run_experiment(
                name, epochs=epochs, batch_size=batch_size, seed=s, subset=subset,
                out_dir=out_dir, data_source=data_source,
                verbose=0 if quiet else (1 if sys.stdout.isatty() else 2),
            )
            click.echo(f"   run directory: {result['run_dir']}", err=True)
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


if __name__ == "__main__":
    main()
