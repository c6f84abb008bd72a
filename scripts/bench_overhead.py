"""Benchmark: the per-step cost of keras_gradtools against plain `fit()`.

Baseline and candidates run in one process, interleaved, on the same model,
for `--reps` repetitions; each run is timed from its second step (the first
traces the train function) to the end of the epoch, with a callback that
uses only batch-*begin* hooks so that timing itself adds no host sync. Each
candidate run sits between two plain runs and its ratio is taken against
their mean (the candidates' order alternates between repetitions), so that a
drift of the machine's speed cancels. The script prints the median
step-time ratio candidate/baseline with its min and max, and the cost of the
article's per-epoch probe (`compute_weight_gradient_norms` over all training
samples) relative to one epoch of training.

Candidates: the logger alone, with the monitor, with TensorBoard scalars
(default `update_freq`), with histograms every 100 steps, with activation
probes (64 samples of the training data, every 200 steps (the default) and
every 50), with update-to-weight ratios, with all that `gradtools reproduce`
attaches (probe, update ratios and the monitor: `reproduce`), and each
clipping preset (its own model, same weights, against plain Adam). The
probes run at batch begin from the first step on: measure them over runs
several times `activation_freq` long (`--steps 1000`). With a probe
candidate, one probe is also timed on its own (median of 20 calls) against
the plain step.

`--cases vanishing,exploding,clipped,resnet` (or `all`) times the article's
cases too: each case's model and batch size, plain fit() (which gives the
case's step time) against the logger and against `reproduce`'s callbacks.
`--models ""` skips the two benchmark models.

`--jit-compile true` compiles every model (baseline included) with XLA.
`--strategy mirrored` runs everything under `tf.distribute.MirroredStrategy`
on the CPU split into 2 logical devices (same global batch): the logger then
records the all-reduced gradient as it leaves the optimizer's own
all-reduce, with no second all-reduce.

`--backend jax|torch|tensorflow` picks the Keras backend (default: the
KERAS_BACKEND variable); JAX always compiles its train step with XLA.

Run: `python scripts/bench_overhead.py` (about 25 minutes on 2 CPU cores; pick
with `--models` and `--candidates`).
"""

import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The backend is fixed when Keras is imported: `--backend` is read here, first.
_BACKEND = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--backend"),
                None)
if _BACKEND in ("tensorflow", "jax", "torch"):
    os.environ["KERAS_BACKEND"] = _BACKEND

import click  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradtools import GradNormLogger  # noqa: E402
from keras_gradtools import GradientMonitor  # noqa: E402
from keras_gradtools.clipping import clipped_optimizer  # noqa: E402
from keras_gradtools import compute_weight_gradient_norms  # noqa: E402
from keras_gradtools.data import load_mnist  # noqa: E402
from keras_gradtools.models import create_deep_linear_model  # noqa: E402


class _StepTimer(keras.callbacks.Callback):
    """Seconds per step from step `skip` to the end of the epoch."""

    def __init__(self, skip=1):
        super().__init__()
        self.skip = skip

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.steps = None, 0

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.skip:
            self.start = time.perf_counter()
            self.first = batch
        self.last = batch

    def on_epoch_end(self, epoch, logs=None):
        self.seconds_per_step = (time.perf_counter() - self.start) / (
            self.last + 1 - self.first
        )


def _small_cnn():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu", name="fc"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ],
        name="small_cnn",
    )


def _small_transformer(blocks=4, dim=64, heads=4):
    """MNIST's 28 rows as a sequence of 28 tokens, through `blocks` post-norm transformer
    encoder blocks of Keras' own layers: many small variables (16 per block)."""
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Dense(dim, name="embed")(keras.layers.Reshape((28, 28))(inputs))
    for i in range(blocks):
        a = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"attention_{i}")(h, h)
        h = keras.layers.LayerNormalization(name=f"norm_{i}a")(h + a)
        f = keras.layers.Dense(2 * dim, activation="gelu", name=f"ffn_{i}a")(h)
        f = keras.layers.Dense(dim, name=f"ffn_{i}b")(f)
        h = keras.layers.LayerNormalization(name=f"norm_{i}b")(h + f)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="output")(h)
    return keras.Model(inputs, outputs, name="small_transformer")


class _EncoderBlock(keras.layers.Layer):
    """`_small_transformer`'s block as a layer of the user's own: no graph exposes its
    sublayers, so the activation probe reads them as the model calls them."""

    def __init__(self, dim, heads, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads, name="attention")
        self.norm_a = keras.layers.LayerNormalization(name="norm_a")
        self.ffn_a = keras.layers.Dense(2 * dim, activation="gelu", name="ffn_a")
        self.ffn_b = keras.layers.Dense(dim, name="ffn_b")
        self.norm_b = keras.layers.LayerNormalization(name="norm_b")

    def call(self, h):
        h = self.norm_a(h + self.attention(h, h))
        return self.norm_b(h + self.ffn_b(self.ffn_a(h)))


def _custom_transformer(blocks=4, dim=64, heads=4):
    """`_small_transformer` with its blocks as custom layers (the same variables)."""
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Dense(dim, name="embed")(keras.layers.Reshape((28, 28))(inputs))
    for i in range(blocks):
        h = _EncoderBlock(dim, heads, name=f"block_{i}")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="output")(h)
    return keras.Model(inputs, outputs, name="custom_transformer")


JIT_COMPILE = "auto"  # set by --jit-compile


def _compile(model, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=JIT_COMPILE,
    )
    return model


def _tb_logger(**kwargs):
    import tempfile

    return GradNormLogger(log_dir=tempfile.mkdtemp(prefix="gradtools-bench-"), **kwargs)


_PROBE = {}  # the probe batch of the model being measured (set by bench_model)


def _probed(**kwargs):
    return [GradNormLogger(probe_data=_PROBE["x"], **kwargs)]


def _monitored(**kwargs):
    logger = GradNormLogger(**kwargs)
    return [logger, GradientMonitor(logger, verbose=0)]


# name: (callbacks factory, optimizer factory or None for the plain Adam)
CANDIDATES = {
    "logger": (lambda: [GradNormLogger()], None),
    "logger+monitor": (_monitored, None),
    "logger+tb_scalars": (lambda: [_tb_logger()], None),
    "logger+tb_scalars+hist100": (lambda: [_tb_logger(histogram_freq=100)], None),
    "logger+probe": (_probed, None),  # 64 samples every 200 steps (the default)
    "logger+probe50": (lambda: _probed(activation_freq=50), None),
    "logger+update_ratio": (lambda: [GradNormLogger(update_ratio=True)], None),
    # What `gradtools reproduce` attaches: probe, update ratios and the monitor.
    "reproduce": (lambda: _monitored(probe_data=_PROBE["x"], update_ratio=True), None),
    "clip=value": (lambda: [], lambda: clipped_optimizer("adam", 1e-3, clip="value")),
    "clip=norm": (lambda: [], lambda: clipped_optimizer("adam", 1e-3, clip="norm")),
    "clip=global_norm": (lambda: [], lambda: clipped_optimizer("adam", 1e-3, clip="global_norm")),
    "clip=agc": (lambda: [], lambda: clipped_optimizer("adam", 1e-3, clip="agc")),
    "clip=autoclip": (lambda: [], lambda: clipped_optimizer("adam", 1e-3, clip="autoclip")),
    "clip=zclip": (lambda: [], lambda: clipped_optimizer("adam", 1e-3, clip="zclip")),
}

MODELS = {
    # name: (builder, flatten inputs, batch size)
    "deep_linear": (create_deep_linear_model, True, 32),
    "small_cnn": (_small_cnn, False, 128),
    "small_transformer": (_small_transformer, False, 64),
    "custom_transformer": (_custom_transformer, False, 64),
}


STRATEGY = None  # set by --strategy


def _scope():
    return STRATEGY.scope() if STRATEGY is not None else contextlib.nullcontext()


def _time_fit(model, x, y, batch_size, callbacks):
    timer = _StepTimer()
    model.fit(
        x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False,
        callbacks=list(callbacks) + [timer],
    )
    return timer.seconds_per_step


def bench_model(name, steps, reps, candidates):
    build, flatten, batch_size = MODELS[name]
    (x, y), _ = load_mnist(flatten=flatten, subset=steps * batch_size)

    def make(optimizer=None):
        keras.utils.set_random_seed(0)
        with _scope():
            return _compile(build(), optimizer)

    base = _interleave(name, make, x, y, batch_size, steps, reps, candidates)
    if any("probe" in c or c == "reproduce" for c in candidates):
        _time_probe(make(), x[:64], base)


def _time_probe(model, x, step_seconds, calls=20):
    """The median time of one activation probe, against a plain step."""
    from keras_gradtools.activations import ActivationProbe

    probe = ActivationProbe(model, x)
    probe()  # the first call builds (graph) or warms up
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        probe()
        seconds.append(time.perf_counter() - start)
    ms, step_ms = statistics.median(seconds) * 1e3, step_seconds * 1e3
    how = {"graph": "from a model of their outputs", "calls": "as the model calls them"}
    click.echo(f"  one activation probe ({len(x)} samples, {len(probe.names)} layers read "
               f"{how[probe.reads]}): {ms:.1f} ms = {ms / step_ms:.2f} plain steps; every "
               f"200 steps {100 * ms / (200 * step_ms):.2f} % of the step time")


def bench_case(name, steps, reps):
    """One article case: plain fit against the logger and against what `reproduce` attaches."""
    from keras_gradtools.experiments import build_case
    from keras_gradtools.experiments import get_case

    case = get_case(name)
    (x, y), _ = load_mnist(flatten=not case.image_input, subset=steps * case.batch_size)

    def make(optimizer=None):
        keras.utils.set_random_seed(case.seed)
        with _scope():
            return build_case(case, optimizer)

    _interleave(f"case {name}", make, x, y, case.batch_size, steps, reps,
                ["logger", "reproduce"])


def _interleave(name, make, x, y, batch_size, steps, reps, candidates):
    """Times `candidates` against plain fit() of `make()`'s model, interleaved; prints them."""
    _PROBE["x"] = x[:64]
    model = make()
    _time_fit(model, x, y, batch_size, [])  # warm-up: trace the plain function
    own = {}  # candidates with an optimizer of their own train their own model
    for c in candidates:
        make_optimizer = CANDIDATES[c][1]
        if make_optimizer is not None:
            own[c] = make(make_optimizer())
            _time_fit(own[c], x, y, batch_size, [])
    # Every candidate run sits between two plain runs and is divided by
    # their mean, so that a drift of the machine's speed (which moves step
    # times by several percent over a minute here) cancels instead of
    # landing on whichever candidate runs farthest from the baseline; the
    # order of the candidates alternates from one repetition to the next.
    times = {"plain": []}
    times.update({c: [] for c in candidates})
    ratios = {c: [] for c in candidates}
    for rep in range(reps):
        before = _time_fit(model, x, y, batch_size, [])
        times["plain"].append(before)
        for c in (candidates if rep % 2 == 0 else candidates[::-1]):
            t = _time_fit(own.get(c, model), x, y, batch_size, CANDIDATES[c][0]())
            after = _time_fit(model, x, y, batch_size, [])
            times["plain"].append(after)
            times[c].append(t)
            ratios[c].append(t / ((before + after) / 2))
            before = after
    base = statistics.median(times["plain"])
    click.echo(
        f"\n{name} (batch {batch_size}, {steps} steps x {reps} reps, each run between "
        f"two plain runs): plain fit {base * 1e3:.2f} ms/step"
    )
    click.echo(f"  {'candidate':<28} {'ms/step':>8} {'median':>8} {'min':>7} {'max':>7}")
    for c in candidates:
        click.echo(
            f"  {c:<28} {statistics.median(times[c]) * 1e3:8.2f} "
            f"{statistics.median(ratios[c]):8.3f} {min(ratios[c]):7.3f} {max(ratios[c]):7.3f}"
        )
    return base


def bench_probe(samples):
    (x, y), _ = load_mnist(subset=samples)
    keras.utils.set_random_seed(0)
    model = _compile(create_deep_linear_model())
    model.fit(x[:320], y[:320], batch_size=32, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    epoch = time.perf_counter() - start
    compute_weight_gradient_norms(model, x[:1024], y[:1024])  # trace
    start = time.perf_counter()
    compute_weight_gradient_norms(model, x, y)
    probe = time.perf_counter() - start
    click.echo(
        f"\nArticle's per-epoch probe, deep_linear, {samples} samples: "
        f"{probe:.2f} s vs one epoch of training {epoch:.2f} s "
        f"= {probe / epoch:.3f} of an epoch"
    )


def _choices(value, known, what, option):
    """Splits a comma-separated option; an unknown name is a usage error (exit 2)."""
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    for name in chosen:
        if name not in known:
            raise click.BadParameter(
                f"unknown {what} {name!r}; choose from {', '.join(known)}", param_hint=option
            )
    return chosen


@click.command()
@click.option("--models", "model_names", default="deep_linear,small_cnn",
              show_default=True,
              help="Comma-separated: deep_linear, small_cnn, small_transformer, "
                   "custom_transformer (empty: none).")
@click.option("--candidates", default=",".join(CANDIDATES), show_default=True,
              help=f"Comma-separated: {', '.join(CANDIDATES)}.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=20),
              help="Training steps per timed run.")
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1),
              help="Interleaved repetitions.")
@click.option("--cases", "case_names", default="", show_default=True,
              help="Comma-separated article cases (vanishing, exploding, clipped, resnet) or "
                   "all: each case's model at its own batch size, plain fit() against the "
                   "logger and against the callbacks `gradtools reproduce` attaches.")
@click.option("--probe-samples", default=60000, show_default=True,
              type=click.IntRange(min=0), help="0 skips the probe benchmark.")
@click.option("--strategy", type=click.Choice(["none", "mirrored"]), default="none",
              show_default=True,
              help="mirrored: MirroredStrategy over 2 logical CPU devices.")
@click.option("--jit-compile", type=click.Choice(["auto", "true", "false"]), default="auto",
              show_default=True,
              help="compile(jit_compile=...) for every model, baseline included (auto: "
                   "Keras' choice, no XLA on CPU for TensorFlow).")
@click.option("--backend", type=click.Choice(["tensorflow", "jax", "torch"]), default=None,
              help="The Keras backend (default: KERAS_BACKEND, else tensorflow).")
def main(model_names, candidates, case_names, steps, reps, probe_samples, strategy, jit_compile,
         backend):
    """Per-step overhead of keras_gradtools against plain fit(), interleaved."""
    global STRATEGY, JIT_COMPILE
    JIT_COMPILE = {"auto": "auto", "true": True, "false": False}[jit_compile]
    running = keras.backend.backend()
    if backend is not None and backend != running:
        raise click.BadParameter(f"Keras runs on {running!r} here", param_hint="--backend")
    if running != "tensorflow" and (strategy != "none" or jit_compile != "auto"):
        raise click.UsageError(
            f"--strategy and --jit-compile are TensorFlow options; received them on {running!r}")
    names = _choices(model_names, MODELS, "model", "--models")
    chosen = _choices(candidates, CANDIDATES, "candidate", "--candidates")
    from keras_gradtools.cases import CASES

    cases = _choices(",".join(CASES) if case_names == "all" else case_names, CASES, "case",
                     "--cases")
    if strategy == "mirrored":
        import tensorflow as tf

        # Before TensorFlow initializes its devices.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        click.echo(f"MirroredStrategy, {STRATEGY.num_replicas_in_sync} replicas "
                   "(logical CPU devices), same global batch")
    from keras_gradtools.experiments import device_name

    click.echo(f"keras {keras.__version__} on {running}, device: {device_name()}")
    for name in names:
        bench_model(name, steps, reps, chosen)
    for name in cases:
        bench_case(name, steps, reps)
    if probe_samples:
        bench_probe(probe_samples)


if __name__ == "__main__":
    main()
