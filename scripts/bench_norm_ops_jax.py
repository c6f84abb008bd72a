"""Benchmark: ways to take per-variable gradient norms inside a jitted JAX step.

The JAX counterpart of `scripts/bench_norm_ops.py`: in one `jax.jit` function
per formulation, the sums of squares of tensors shaped like the article's deep
linear MLP's 22 kernels (784x256, 20 x 256x256, 256x10; 1.51 M floats),
produced fresh each call as a backward pass makes a kernel's gradient (a
batch of 32 inputs against 32 output gradients, `x.T @ dy`) and consumed as
an optimizer consumes them (Adam-like moments `m = 0.9 m + 0.1 g` and
`v = 0.999 v + 0.001 g**2`, returned), against that step alone:

- `sum_square`: `sum(square(g))` per tensor (what `keras.ops` gives). XLA
  merges this `square(g)` with the moment's; on its CPU backend the squared
  gradient is then written out and read back for the sum;
- `barrier`: the same behind `jax.lax.optimization_barrier(g)`, which keeps
  the square the norm's own, fused into its sum (what
  `keras_gradtools.norms.squared_norm` does on XLA's CPU backend);
- `two_stage`: `square(g)` summed over rows first, then over that vector;
- `vdot`: `vdot(g, g)` per tensor (a dot product);
- `concat`: everything concatenated, one reduction per tensor's segment.

Prints microseconds per call (median of `--reps` interleaved runs of
`--calls` calls) and the extra cost over the step alone.

Run: `python scripts/bench_norm_ops_jax.py` (about a minute; JAX installed).
"""

import statistics
import time

import click
import jax
import jax.numpy as jnp

SHAPES = [(784, 256)] + [(256, 256)] * 20 + [(256, 10)]


def _make(inputs, scale):
    """Fresh gradients each call, made as a backward pass makes a Dense kernel's."""
    return [jnp.dot(x.T, dy * scale) for x, dy in inputs]


def _moments(gs, ms, vs):
    """What an Adam-like optimizer does with the gradients: its two moments."""
    return ([0.9 * m + 0.1 * g for m, g in zip(ms, gs)],
            [0.999 * v + 0.001 * jnp.square(g) for v, g in zip(vs, gs)])


def _alone(gs):
    return None


def _sum_square(gs):
    return jnp.stack([jnp.sum(jnp.square(g)) for g in gs])


def _barrier(gs):
    return jnp.stack([jnp.sum(jnp.square(jax.lax.optimization_barrier(g))) for g in gs])


def _two_stage(gs):
    return jnp.stack([jnp.sum(jnp.sum(jnp.square(g.reshape(-1, g.shape[-1])), axis=0))
                      for g in gs])


def _vdot(gs):
    return jnp.stack([jnp.vdot(g, g) for g in gs])


def _concat(gs):
    flat = jnp.concatenate([jnp.square(g).ravel() for g in gs])
    ends = [0]
    for g in gs:
        ends.append(ends[-1] + g.size)
    return jnp.stack([jnp.sum(flat[a:b]) for a, b in zip(ends[:-1], ends[1:])])


VARIANTS = {"alone": _alone, "sum_square": _sum_square, "barrier": _barrier,
            "two_stage": _two_stage, "vdot": _vdot, "concat": _concat}


@click.command()
@click.option("--calls", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--reps", default=7, show_default=True, type=click.IntRange(min=1))
def main(calls, reps):
    """Per-call time of each norm formulation, interleaved, on the first JAX device."""
    functions = {}
    for name, variant in VARIANTS.items():
        def step(inputs, scale, ms, vs, norms=variant):
            gs = _make(inputs, scale)
            return _moments(gs, ms, vs), norms(gs)

        functions[name] = jax.jit(step)
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(SHAPES))
    inputs = [(jax.random.normal(keys[2 * i], (32, s[0])),
              jax.random.normal(keys[2 * i + 1], (32, s[1])) * 1e-3)
             for i, s in enumerate(SHAPES)]
    scale = jnp.float32(1.5)
    ms = [jnp.zeros(s) for s in SHAPES]
    vs = [jnp.zeros(s) for s in SHAPES]
    reference = functions["sum_square"](inputs, scale, ms, vs)[1]
    for name, f in functions.items():
        out = jax.block_until_ready(f(inputs, scale, ms, vs))[1]
        if name != "alone":
            assert jnp.allclose(out, reference, rtol=1e-4), name
    times = {name: [] for name in functions}
    for rep in range(reps):
        for name in (list(functions) if rep % 2 == 0 else list(functions)[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                out = functions[name](inputs, scale, ms, vs)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    base = statistics.median(times["alone"])
    click.echo(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; producing the "
               f"22 tensors and their moments alone: {base:.0f} us per call")
    for name in functions:
        if name != "alone":
            t = statistics.median(times[name])
            click.echo(f"  {name:<12} {t:8.0f} us   extra {t - base:7.0f} us")


if __name__ == "__main__":
    main()
