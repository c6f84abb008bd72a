#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in one run of under 10 minutes, for a machine with
# JAX and PyTorch (CUDA) but no TensorFlow: keras_gradtools needs none on those backends.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# For each of JAX and PyTorch: the logger's overhead against plain fit() on the deep MLP and the
# small CNN (interleaved in one process, see scripts/bench_overhead.py), each clipping preset
# against plain Adam, and the wall time of one reduced epoch of each article case (6,400 samples,
# 200 steps, the first step's compilation included). Prints everything and keeps it in OUT_DIR.
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
python -c "import keras_gradtools" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
status=0
for backend in jax torch; do
    python scripts/bench_overhead.py --backend "$backend" --models deep_linear,small_cnn \
        --candidates logger,clip=value,clip=norm,clip=global_norm,clip=agc,clip=autoclip,clip=zclip \
        --steps 300 --reps 5 --probe-samples 0 2>&1 | tee "$out/overhead_$backend.txt" || status=1
    python -m keras_gradtools.cli --backend "$backend" reproduce --case all --subset 6400 \
        --epochs 1 --out "$out/runs_$backend" --quiet 2>&1 | tee "$out/cases_$backend.txt" || status=1
done
exit $status
