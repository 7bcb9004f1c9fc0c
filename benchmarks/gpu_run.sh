#!/usr/bin/env bash
# The GPU rows of the benchmarks, prepared as one short run for a lent GPU machine
# (its image has JAX with CUDA, PyTorch, torchvision, timm, flax, optax and orbax;
# jaxtl runs from this checkout through PYTHONPATH, nothing is installed):
#
#   1. ResNet-50 fine-tuning at 224 px, batch 32: jaxtl bfloat16 against PyTorch eager
#      AMP (bfloat16 autocast) + channels_last, then both in float32 (the issue's
#      target: jaxtl bfloat16 >= 1.2x PyTorch AMP);
#   2. data-parallel scaling of the train step over the machine's GPUs (one GPU: a single row);
#   3. the rest of the bfloat16 table (resnet18, mobilenet_v2, vit_tiny; 224 px; every job).
#
# Each part writes its JSON and log into OUT_DIR as soon as it ends, so a run cut short
# (a lent machine may allow a command only minutes) keeps what finished. QUICK=1: smoke
# settings (32 px, one round), for checking the script on a CPU.
#
#   benchmarks/gpu_run.sh OUT_DIR          # from the repository root; PY=python3 by default
set -uo pipefail
OUT=${1:?"give an output folder: benchmarks/gpu_run.sh OUT_DIR"}
PY=${PY:-python3}
OUT=$(mkdir -p "$OUT" 2>/dev/null && cd "$OUT" && pwd) || { echo "gpu_run.sh: cannot create $1; give a writable folder" >&2; exit 2; }
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then SIZE=32; TIMING=--quick; else SIZE=224; TIMING="--rounds 3 --repeats 5"; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/gpu.txt"
# jaxtl and the libraries it needs import there (its jax may be newer than the one tested here)
if ! $PY -c "import jaxtl, jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())" \
    >>"$OUT/gpu.txt" 2>&1; then
    echo "gpu_run.sh: jaxtl, jax or torch does not import with $PY (see $OUT/gpu.txt)" >&2; exit 1
fi

failed=0
part() {  # part NAME SCRIPT ARGS...: run one benchmark, its log and JSON into OUT
    local name=$1; shift
    echo "== $name" >&2
    local t0=$SECONDS
    if ! $PY "$@" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
        echo "gpu_run.sh: $name failed (see $OUT/$name.log)" >&2; failed=1
    fi
    tail -n 12 "$OUT/$name.log" >&2
    echo "($name: $((SECONDS - t0)) s)" >&2
}
part resnet50_bf16 benchmarks/bench_throughput.py --dtype bfloat16 --models resnet50 --sizes $SIZE --modes finetune $TIMING
part resnet50_fp32 benchmarks/bench_throughput.py --dtype float32 --models resnet50 --sizes $SIZE --modes finetune $TIMING
# before the longest part: on a machine of several GPUs this is the second result that matters
part scaling_bf16 benchmarks/bench_scaling.py --dtype bfloat16 --model resnet50 --size $SIZE $TIMING
part others_bf16 benchmarks/bench_throughput.py --dtype bfloat16 --models resnet18,mobilenet_v2,vit_tiny_patch16_224 \
    --sizes $SIZE $TIMING
exit $failed
