"""Render a run's HTML report in a real headless browser and save a screenshot.

`gradtools report` writes one self-contained HTML file; this script opens it
in headless Chromium (Debian's `chromium` package: `apt-get install
chromium`), with networking off, and saves what the browser drew as a PNG.
It then checks the screenshot: the page was drawn (not blank), and it is as
tall as a report with its figures.

    python scripts/check_report.py                      # a small run of its own, in a temp dir
    python scripts/check_report.py runs/my-run --screenshot report.png

Exit code 0 when every check passes, 1 when one fails, 2 for bad arguments.
"""

import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402


def _small_run(directory):
    """Trains a small model with a logger and a monitor into `directory/run`."""
    import keras

    from keras_gradtools import GradNormLogger, GradientMonitor

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(512, 20)).astype("float32"), rng.integers(0, 4, 512)
    model = keras.Sequential([keras.Input((20,))]
                             + [keras.layers.Dense(32, activation="sigmoid", name=f"d{i}")
                                for i in range(6)]
                             + [keras.layers.Dense(4, activation="softmax", name="out")],
                             name="sigmoid_stack")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    run_dir = os.path.join(directory, "run")
    logger = GradNormLogger(run_dir=run_dir)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0,
              callbacks=[logger, GradientMonitor(logger, check_every=20, verbose=0)])
    return run_dir


def _browser(name):
    for candidate in ([name] if name else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(candidate)
        if path:
            return path
    raise click.UsageError("no Chromium found: install it (apt-get install chromium) or pass "
                           "--browser PATH")


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--screenshot", default="report.png", show_default=True,
              type=click.Path(dir_okay=False), help="Where to save the screenshot (never "
              "overwritten).")
@click.option("--browser", default=None, help="The Chromium binary (default: found on PATH).")
@click.option("--width", default=1200, show_default=True, type=click.IntRange(min=320))
@click.option("--height", default=4000, show_default=True, type=click.IntRange(min=320))
def main(run_dir, screenshot, browser, width, height):
    """Render RUN_DIR's report (or a fresh small run's) and check the screenshot."""
    from matplotlib import image

    from keras_gradtools.report import write_report
    from keras_gradtools.runs import RunError

    if os.path.exists(screenshot):
        raise click.UsageError(f"{screenshot} already exists; pass another --screenshot")
    binary = _browser(browser)
    with tempfile.TemporaryDirectory() as tmp:
        if run_dir is None:
            run_dir = _small_run(tmp)
            click.echo(f"trained a small run: {run_dir}")
        try:
            html_path = write_report(run_dir, os.path.join(tmp, "report.html"))
        except RunError as e:
            raise click.UsageError(str(e)) from None
        profile = os.path.join(tmp, "profile")
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu",
                   "--hide-scrollbars", f"--user-data-dir={profile}",
                   "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                   f"--window-size={width},{height}",
                   f"--screenshot={os.path.abspath(screenshot)}",
                   "file://" + os.path.abspath(html_path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not os.path.exists(screenshot):
            click.echo(done.stderr[-2000:], err=True)
            click.echo("FAIL: the browser did not write a screenshot", err=True)
            sys.exit(1)
    pixels = image.imread(screenshot)[..., :3]
    rows = np.flatnonzero((pixels < 0.97).any(axis=(1, 2)))  # rows with anything drawn
    checks = {
        "the page was drawn (not blank)": pixels.std() > 0.02,
        "the drawn content is over 2000 px tall (the figures are there)":
            rows.size and rows.max() - rows.min() > 2000,
    }
    for name, ok in checks.items():
        click.echo(f"{'ok  ' if ok else 'FAIL'} {name}")
    click.echo(f"screenshot: {screenshot} ({pixels.shape[1]}x{pixels.shape[0]})")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
