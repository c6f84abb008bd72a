"""Benchmark: PyTorch per-variable gradient norms, one call per tensor or one for all.

The PyTorch counterpart of `scripts/bench_norm_ops_jax.py`: the float32 norms
of tensors shaped like the gradients of the article's deep linear MLP (22
kernels, 784x256, 20 x 256x256, 256x10, and their 22 biases; 1.51 M floats),
stacked into one vector as the recorder does, on the first torch device (the
GPU when there is one):

- `per_tensor`: `torch.linalg.vector_norm(g, dtype=float32)` per tensor (the
  recorder before 2026-11-26, night): one dispatch and one kernel each;
- `torch_norms`: `keras_gradtools.internals.torch_norms` (the recorder now):
  one call for all, a multi-tensor kernel on a GPU;
- `dot`: `sqrt(dot(g, g))` per tensor (BLAS's `sdot` on a CPU), and
  `sum_square`: `sqrt(sum(g * g))` per tensor (a product written out, then
  summed): other ways to read each tensor once, for comparison.

Prints microseconds per call (median of `--reps` interleaved runs of
`--calls` calls, synchronized with the device at the end of each run).

Run: `python scripts/bench_norm_ops_torch.py` (seconds; torch installed).
"""

import statistics
import time

import click
import torch

from keras_gradtools import internals

SHAPES = ([(784, 256), (256,)] + [(256, 256), (256,)] * 20 + [(256, 10), (10,)])


def _per_tensor(gs):
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs])


def _torch_norms(gs):
    return torch.stack(internals.torch_norms(gs))


def _dot(gs):
    return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in gs]).sqrt()


def _sum_square(gs):
    return torch.stack([(g * g).sum() for g in gs]).sqrt()


VARIANTS = {"per_tensor": _per_tensor, "torch_norms": _torch_norms, "dot": _dot,
            "sum_square": _sum_square}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@click.command()
@click.option("--calls", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--reps", default=7, show_default=True, type=click.IntRange(min=1))
def main(calls, reps):
    """Per-call time of each way, interleaved, on the first torch device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    gs = [(torch.randn(s, generator=generator) * 1e-3).to(device) for s in SHAPES]
    reference = _per_tensor(gs)
    times = {name: [] for name in VARIANTS}
    with torch.no_grad():
        for name, f in VARIANTS.items():
            torch.testing.assert_close(f(gs), reference, rtol=1e-6, atol=0)
            for _ in range(20):  # warm-up
                f(gs)
        for rep in range(reps):
            for name in (list(VARIANTS) if rep % 2 == 0 else list(VARIANTS)[::-1]):
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    VARIANTS[name](gs)
                _sync(device)
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    click.echo(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} threads; "
               f"{len(SHAPES)} tensors, {sum(g.numel() for g in gs) / 1e6:.2f} M floats")
    base = statistics.median(times["per_tensor"])
    for name in VARIANTS:
        t = statistics.median(times[name])
        click.echo(f"  {name:<12} {t:8.1f} us per call ({min(times[name]):.1f}-"
                   f"{max(times[name]):.1f})   x{t / base:.3f} of per_tensor")


if __name__ == "__main__":
    main()
