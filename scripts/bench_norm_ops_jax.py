"""Benchmark: ways to take per-variable gradient norms inside a jitted JAX step.

The JAX counterpart of `scripts/bench_norm_ops.py`: in one `jax.jit` function
per formulation, the sums of squares of tensors shaped like the article's deep
linear MLP's 22 kernels (784x256, 20 x 256x256, 256x10; 1.51 M floats),
produced fresh each call (and returned, as a step returns its updates),
against producing them alone:

- `sum_square`: `sum(square(g))` per tensor (what `keras.ops` gives);
- `two_stage`: `square(g)` summed over rows first (a vector of column sums,
  the reduction XLA's CPU backend vectorizes), then over that vector;
- `vdot`: `vdot(g, g)` per tensor (a dot product);
- `concat`: everything concatenated, one reduction per tensor's segment.

Prints microseconds per call (median of `--reps` interleaved runs of
`--calls` calls) and the extra cost over producing the tensors alone.

Run: `python scripts/bench_norm_ops_jax.py` (about a minute; JAX installed).
"""

import statistics
import time

import click
import jax
import jax.numpy as jnp

SHAPES = [(784, 256)] + [(256, 256)] * 20 + [(256, 10)]


def _make(bases, scale):
    """Fresh tensors each call (one multiply each), returned so that they are materialized."""
    return [b * scale for b in bases]


def _alone(gs):
    return None


def _sum_square(gs):
    return jnp.stack([jnp.sum(jnp.square(g)) for g in gs])


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


VARIANTS = {"alone": _alone, "sum_square": _sum_square, "two_stage": _two_stage,
            "vdot": _vdot, "concat": _concat}


@click.command()
@click.option("--calls", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--reps", default=7, show_default=True, type=click.IntRange(min=1))
def main(calls, reps):
    """Per-call time of each norm formulation, interleaved, on the first JAX device."""
    functions = {}
    for name, variant in VARIANTS.items():
        def step(bases, scale, v=variant):
            gs = _make(bases, scale)
            return gs, v(gs)

        functions[name] = jax.jit(step)
    keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
    bases = [jax.random.normal(k, s) * 1e-3 for k, s in zip(keys, SHAPES)]
    scale = jnp.float32(1.5)
    reference = functions["sum_square"](bases, scale)[1]
    for name, f in functions.items():
        out = jax.block_until_ready(f(bases, scale))[1]
        if name != "alone":
            assert jnp.allclose(out, reference, rtol=1e-4), name
    times = {name: [] for name in functions}
    for rep in range(reps):
        for name in (list(functions) if rep % 2 == 0 else list(functions)[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                out = functions[name](bases, scale)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    base = statistics.median(times["alone"])
    click.echo(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; producing the "
               f"22 tensors alone: {base:.0f} us per call")
    for name in functions:
        if name != "alone":
            t = statistics.median(times[name])
            click.echo(f"  {name:<12} {t:8.0f} us   extra {t - base:7.0f} us")


if __name__ == "__main__":
    main()
