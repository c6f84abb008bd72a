"""Benchmark: where the logger's time goes in Keras' PyTorch train step (the deep MLP).

Calls the model's train function directly on one fixed MNIST batch of 32 (no
data pipeline, no callbacks), on the device Keras' PyTorch backend picks (the
GPU when there is one), Adam as in `bench_overhead.py`:

- Keras' own train function against the instrumented one
  (`keras_gradtools.tap.instrument_model` with one recorder, as
  `GradNormLogger` makes it), in `--blocks` alternating blocks of `--steps`
  steps, each block synchronized with the device at its end: the median step
  time of each and the median of the per-pair ratios.
- The recorder's two parts inside the instrumented step, each timed around
  its call (synchronized with the device before and after on a GPU, which
  makes the step itself slower there: read these as the parts' own cost):
  `step_norms` (the norms of the 22 kernels' gradients) and `write` (their
  row into the ring buffer).

Run: `python scripts/bench_step_parts_torch.py` (about a minute on 2 CPU
cores; torch installed).
"""

import os
import statistics
import time

os.environ["KERAS_BACKEND"] = "torch"

import click  # noqa: E402
import keras  # noqa: E402
import torch  # noqa: E402

from keras_gradtools import tap  # noqa: E402
from keras_gradtools.data import load_mnist  # noqa: E402
from keras_gradtools.models import create_deep_linear_model  # noqa: E402
from keras_gradtools.recorder import GradNormRecorder  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _block(train_function, data, steps):
    """Seconds per step of `steps` calls, synchronized at the end."""
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_function([data])
    _sync()
    return (time.perf_counter() - start) / steps


def _timed(method, times):
    """`method`, each call's seconds (device synchronized around it) appended to `times`."""
    def timed(*args, **kwargs):
        _sync()
        start = time.perf_counter()
        result = method(*args, **kwargs)
        _sync()
        times.append(time.perf_counter() - start)
        return result
    return timed


@click.command()
@click.option("--blocks", default=40, show_default=True, type=click.IntRange(min=2))
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Steps per block, and the steps of the parts' timing.")
def main(blocks, steps):
    """Keras' PyTorch step with and without the recorder, and the recorder's parts."""
    (x, y), _ = load_mnist(flatten=True, subset=64)
    keras.utils.set_random_seed(0)
    model = create_deep_linear_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, verbose=0)  # builds the optimizer and the metrics
    device = model.trainable_variables[0].value.device
    data = (torch.as_tensor(x[:32], device=device), torch.as_tensor(y[:32], device=device))
    model.make_train_function(force=True)
    plain = model.train_function
    recorder = GradNormRecorder(model.trainable_variables, capacity=blocks * steps + 4 * steps)
    restore = tap.instrument_model(model, [recorder])
    instrumented = model.train_function
    try:
        for _ in range(3):  # warm-up
            _block(plain, data, steps)
            _block(instrumented, data, steps)
        times = {"plain": [], "recorded": []}
        for block in range(blocks):
            order = ("plain", "recorded") if block % 2 else ("recorded", "plain")
            for name in order:
                times[name].append(_block(plain if name == "plain" else instrumented, data,
                                          steps))
        parts = {"step_norms": [], "write": []}
        recorder.step_norms = _timed(recorder.step_norms, parts["step_norms"])
        recorder.write = _timed(recorder.write, parts["write"])
        _block(instrumented, data, steps)
    finally:
        restore()
    ratios = [r / p for r, p in zip(times["recorded"], times["plain"])]
    click.echo(f"keras {keras.__version__}, torch {torch.__version__}, device {device}, deep "
               f"MLP, batch 32, {blocks} alternating blocks of {steps} steps")
    click.echo(f"  plain train function     {statistics.median(times['plain']) * 1e3:8.3f} "
               "ms/step")
    click.echo(f"  with the recorder        {statistics.median(times['recorded']) * 1e3:8.3f} "
               f"ms/step   ratio median {statistics.median(ratios):.3f} "
               f"({min(ratios):.3f}-{max(ratios):.3f})")
    for name, values in parts.items():
        click.echo(f"  {name:<24} {statistics.median(values) * 1e6:8.1f} us/step (median of "
                   f"{len(values)})")


if __name__ == "__main__":
    main()
