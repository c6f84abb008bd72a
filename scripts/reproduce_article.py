"""Reproduce the article's four experiments on MNIST, with gradient norms per step.

    python scripts/reproduce_article.py --case all            # full scale
    python scripts/reproduce_article.py --case exploding --seeds 5
    python scripts/reproduce_article.py --case resnet --epochs 2 --subset 20000

Each run writes a new directory under --out (history, per-step gradient norms,
figures, summary); the table of final accuracy, loss, the largest kernel-gradient
norm and the epoch the loss jumped is printed at the end.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402

from keras_gradtools.cli import reproduce_options, run_reproduce  # noqa: E402


@click.command()
@reproduce_options
def main(**kwargs):
    """Reproduce the article's experiments (see the module docstring)."""
    run_reproduce(**kwargs)


if __name__ == "__main__":
    main()
