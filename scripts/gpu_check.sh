#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one run that ends within a time budget, for a
# machine with JAX and PyTorch (CUDA) but no TensorFlow: keras_gradtools needs none on those
# backends.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# PyTorch's per-variable norms, per tensor against all at once (scripts/bench_norm_ops_torch.py);
# where the logger's time goes in PyTorch's step (scripts/bench_step_parts_torch.py). For each of
# JAX and PyTorch (scripts/bench_overhead.py, every figure a ratio to plain fit() interleaved in
# one process): the logger's overhead on the deep MLP and the small CNN; the step time of the four
# article cases (their own models and batch sizes), plain and with the logger and with what
# `gradtools reproduce` attaches; each clipping preset against plain Adam. Between them,
# tests/test_backends.py on the GPU (less its reduced-scale article runs). PyTorch's sections and
# the tests come first: JAX's timings were all taken on the one earlier GPU run (2026-11-26), and
# come last, for what the budget leaves. Prints everything and keeps each section's output in
# OUT_DIR (default $OUT, else gpu-results).
#
# BUDGET_S (default 520): the whole run's seconds; a section is cut short where it would pass them
# and skipped once fewer than 20 are left. QUICK=1: a few steps each, to check the script itself.
# PYTHON (default python3): the interpreter.
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
py=${PYTHON:-python3}
budget=${BUDGET_S:-520}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false
# The checkout first: a script's own folder, not the current one, heads its sys.path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ ${QUICK:-0} == 1 ]]; then
    long="--steps 20 --reps 1"
    parts="--blocks 2 --steps 5"
    declare -A short=([jax]="--steps 20 --reps 1" [torch]="--steps 20 --reps 1")
else
    # PyTorch's eager steps took 6-10 ms on an H100 (JAX's 1-3 ms): fewer of them, so that the
    # whole run fits the budget (on 2026-11-26, 150 x 3 cut its cases and clipping sections short).
    long="--steps 300 --reps 5"
    parts="--blocks 16 --steps 40"
    declare -A short=([jax]="--steps 150 --reps 3" [torch]="--steps 60 --reps 2")
fi
start=$SECONDS
status=0

section() {  # section NAME SECONDS COMMAND...: COMMAND for at most SECONDS, within the budget
    local name=$1 limit=$2 began=$SECONDS rc
    shift 2
    local left=$((budget - (SECONDS - start)))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, the budget is spent" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - began)) s" | tee -a "$out/summary.txt"
    ((rc == 0)) || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    KERAS_BACKEND=jax "$py" -c 'import sys, jax, torch, keras
print("python", sys.version.split()[0], "| keras", keras.__version__, "| jax", jax.__version__,
      jax.devices(), "| torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$out/gpu.txt"

bench=("$py" scripts/bench_overhead.py --probe-samples 0)
clips=clip=value,clip=norm,clip=global_norm,clip=agc,clip=autoclip,clip=zclip
# Most wanted first: a section cut short by the budget loses the least. Seconds: PyTorch's 44
# norms, one call per tensor against one call for all (the recorder's way since 2026-11-26), and
# the recorder's parts inside PyTorch's step.
section norms_torch 30 env KERAS_BACKEND=torch "$py" scripts/bench_norm_ops_torch.py
section step_parts_torch 45 "$py" scripts/bench_step_parts_torch.py $parts
section overhead_torch 100 "${bench[@]}" --backend torch $long \
    --models deep_linear,small_cnn --candidates logger
# The same numbers on the GPU: tests/test_backends.py (each recorded step against jax.grad and
# torch autograd, the clipping presets against NumPy, ...), all but its reduced-scale article runs.
section numbers 150 env KERAS_BACKEND=jax "$py" -m pytest -q -p no:cacheprovider \
    tests/test_backends.py -k "not article_cases"
section clipping_torch 150 "${bench[@]}" --backend torch ${short[torch]} \
    --models deep_linear,small_cnn --candidates "$clips"
section cases_torch 110 "${bench[@]}" --backend torch ${short[torch]} --models "" --cases all
section overhead_jax 100 "${bench[@]}" --backend jax $long \
    --models deep_linear,small_cnn --candidates logger
section cases_jax 110 "${bench[@]}" --backend jax ${short[jax]} --models "" --cases all
section clipping_jax 150 "${bench[@]}" --backend jax ${short[jax]} \
    --models deep_linear,small_cnn --candidates "$clips"
echo "total $((SECONDS - start)) s" | tee -a "$out/summary.txt"
exit $status
