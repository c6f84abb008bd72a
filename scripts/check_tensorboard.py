"""Check GradNormLogger's TensorBoard output through a real TensorBoard server.

Trains a small model with `GradNormLogger(log_dir=...)` (or takes an existing
`--logdir`), starts `tensorboard` on 127.0.0.1 on a free port, asks its HTTP
data API for the runs, the scalar tags and every `grad_norm/*` series, checks
them against what the logger recorded (or, for `--logdir`, against the event
files), and stops the server. With `--screenshot FILE.png` and Chromium
installed (`apt-get install chromium`), also saves a headless screenshot of
the scalars dashboard.

    python scripts/check_tensorboard.py
    python scripts/check_tensorboard.py --screenshot tb.png
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def _train(log_dir, steps):
    import keras

    from keras_gradtools import GradNormLogger, create_deep_linear_model
    from keras_gradtools.data import load_mnist

    (x, y), _ = load_mnist(subset=32 * steps)
    keras.utils.set_random_seed(0)
    model = create_deep_linear_model(num_layers=4)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    logger = GradNormLogger(log_dir=log_dir, update_freq=1, histogram_freq=20)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[logger, keras.callbacks.TensorBoard(log_dir)])
    expected = {f"grad_norm/{k}": v for k, v in logger.history.items()}
    expected["grad_norm/global"] = logger.global_norms
    return expected


def _expected_from_events(train_dir):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(train_dir, size_guidance={"tensors": 0})
    ea.Reload()
    return {tag: np.array([tf.make_ndarray(e.tensor_proto) for e in ea.Tensors(tag)])
            for tag in ea.Tags()["tensors"] if tag.startswith("grad_norm/")}


@click.command()
@click.option("--logdir", type=click.Path(exists=True, file_okay=False), default=None,
              help="An existing log_dir written by GradNormLogger (default: train one).")
@click.option("--steps", type=click.IntRange(min=5), default=40, show_default=True,
              help="Steps per epoch of the model trained when --logdir is not given.")
@click.option("--screenshot", type=click.Path(dir_okay=False), default=None,
              help="Save a headless-Chromium screenshot of the scalars dashboard here.")
@click.option("--timeout", type=click.IntRange(min=10), default=90, show_default=True,
              help="Seconds to wait for the server.")
def main(logdir, steps, screenshot, timeout):
    """Serve a GradNormLogger run with TensorBoard and check its scalars over HTTP."""
    tmp = None
    if logdir is None:
        tmp = tempfile.mkdtemp(prefix="gradtools-tb-")
        logdir = os.path.join(tmp, "run1")
        click.echo(f"training a 6-layer linear MLP, {steps} steps x 2 epochs -> {logdir}")
        expected = _train(logdir, steps)
    else:
        expected = _expected_from_events(os.path.join(logdir, "train"))
    if not expected:
        raise click.UsageError(f"no grad_norm/* scalars under {logdir}/train")
    port = _free_port()
    binary = shutil.which("tensorboard") or f"{sys.executable} -m tensorboard.main"
    command = binary.split() + ["--logdir", os.path.dirname(os.path.abspath(logdir)),
                                "--host", "127.0.0.1", "--port", str(port),
                                "--reload_interval", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    failures = 0
    try:
        run = f"{os.path.basename(os.path.abspath(logdir))}/train"
        deadline = time.time() + timeout
        tags = {}
        while time.time() < deadline:
            if server.poll() is not None:
                raise click.ClickException("tensorboard exited: " + server.stderr.read().decode()[-2000:])
            try:
                tags = _get(f"{base}/data/plugin/scalars/tags").get(run, {})
                if all(t in tags for t in expected):
                    break
            except OSError:
                pass
            time.sleep(1)
        runs = _get(f"{base}/data/runs")
        click.echo(f"server {base}: runs {runs}")
        ours = sorted(t for t in tags if t.startswith("grad_norm"))
        click.echo(f"scalar tags of {run}: {len(tags)} in all, {len(ours)} grad_norm/*; "
                   f"Keras' own: {sorted(t for t in tags if not t.startswith('grad_'))}")
        for tag, want in sorted(expected.items()):
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            points = _get(f"{base}/data/plugin/scalars/scalars?{query}")
            steps_seen = [p[1] for p in points]
            values = np.array([p[2] for p in points])
            ok = (len(values) == len(want) and steps_seen == list(range(1, len(want) + 1))
                  and np.allclose(values, want, rtol=1e-6))
            failures += not ok
            click.echo(f"  {'ok  ' if ok else 'FAIL'} {tag}: {len(values)} points, steps "
                       f"{steps_seen[:1]}..{steps_seen[-1:]}, max |diff| "
                       f"{np.max(np.abs(values - want)) if len(values) == len(want) else 'n/a'}")
        if screenshot:
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            if chromium is None:
                click.echo("no chromium on PATH: skipping the screenshot "
                           "(apt-get install chromium)")
            else:
                url = f"{base}/#scalars&tagFilter=grad_norm%2F(global|deep_linear%2Fdense_0)"
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                "--window-size=1400,1000", "--virtual-time-budget=15000",
                                f"--screenshot={os.path.abspath(screenshot)}", url],
                               check=False, capture_output=True, timeout=120)
                click.echo(f"screenshot: {screenshot} "
                           f"({'written' if os.path.exists(screenshot) else 'NOT written'})")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    click.echo(f"{len(expected) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
