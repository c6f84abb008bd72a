"""Benchmark: ways to take per-variable gradient norms inside a compiled step.

The logger's cost on the article's deep linear MLP is almost all in the norm
reductions (the recording without them measures ~1.00x). This script times,
in one `tf.function` per formulation, the norms of tensors shaped like that
model's 22 kernels (784x256, 20 x 256x256, 256x10; 1.51 M floats, 6 MB),
freshly produced each call as gradients are, against producing them alone:

- `l2_loss`: one fused `tf.nn.l2_loss` per tensor (what keras_gradtools uses);
- `reduce_sum_square`: `reduce_sum(square(g))`, two kernels per tensor;
- `euclidean_norm`: `tf.math.reduce_euclidean_norm`;
- `matmul_dot`: a `[1, n] x [n, 1]` matmul per tensor;
- `stack_same_shape`: the 20 same-shape tensors stacked, one reduction;
- `concat_segment_sum`: everything concatenated, one segment sum;
- `xla`: all norms in one `jit_compile=True` function.

It prints microseconds per call (median of `--reps` runs of `--calls`
calls) and the extra cost over producing the tensors alone.

Run: `python scripts/bench_norm_ops.py` (about a minute).
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import tensorflow as tf  # noqa: E402


def _shapes():
    return [(784, 256)] + [(256, 256)] * 20 + [(256, 10)]


def _l2_loss(gs):
    return tf.sqrt(2.0 * tf.stack([tf.nn.l2_loss(g) for g in gs]))


def _reduce_sum_square(gs):
    return tf.sqrt(tf.stack([tf.reduce_sum(tf.square(g)) for g in gs]))


def _euclidean_norm(gs):
    return tf.stack([tf.math.reduce_euclidean_norm(g) for g in gs])


def _matmul_dot(gs):
    out = []
    for g in gs:
        flat = tf.reshape(g, [1, -1])
        out.append(tf.reshape(tf.matmul(flat, flat, transpose_b=True), []))
    return tf.sqrt(tf.stack(out))


def _stack_same_shape(gs):
    middle = tf.reduce_sum(tf.square(tf.stack(gs[1:-1])), axis=[1, 2])
    ends = [2.0 * tf.nn.l2_loss(gs[0])], [2.0 * tf.nn.l2_loss(gs[-1])]
    return tf.sqrt(tf.concat([ends[0], middle, ends[1]], 0))


def _concat_segment_sum(gs):
    flat = tf.concat([tf.reshape(g, [-1]) for g in gs], 0)
    ids = tf.concat([tf.fill([tf.size(g)], i) for i, g in enumerate(gs)], 0)
    return tf.sqrt(tf.math.segment_sum(flat * flat, ids))


_xla_norms = tf.function(_l2_loss, jit_compile=True)

FORMULATIONS = {
    "none": lambda gs: tf.zeros([len(gs)]),
    "l2_loss": _l2_loss,
    "reduce_sum_square": _reduce_sum_square,
    "euclidean_norm": _euclidean_norm,
    "matmul_dot": _matmul_dot,
    "stack_same_shape": _stack_same_shape,
    "concat_segment_sum": _concat_segment_sum,
    "xla": lambda gs: _xla_norms(gs),
}


@click.command()
@click.option("--calls", default=300, show_default=True, type=click.IntRange(min=10))
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1))
def main(calls, reps):
    """Microseconds per step of each way to take 22 gradient norms."""
    variables = [tf.Variable(tf.random.normal(s)) for s in _shapes()]
    timings = {}
    for name, norms in FORMULATIONS.items():
        @tf.function
        def step():
            return norms([v * 1.0001 for v in variables])  # fresh "gradients" each call

        step()
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                step()
            runs.append((time.perf_counter() - start) / calls * 1e6)
        timings[name] = statistics.median(runs)
    base = timings.pop("none")
    click.echo(f"producing 22 gradient-shaped tensors (6 MB) alone: {base:.0f} us/step")
    click.echo(f"{'formulation':<20} {'us/step':>8} {'extra us':>9}")
    for name, t in timings.items():
        click.echo(f"{name:<20} {t:8.0f} {t - base:9.0f}")


if __name__ == "__main__":
    main()
