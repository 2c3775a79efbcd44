#!/usr/bin/env bash
# The GPU check in one call on a CUDA machine: both speed benches and the test suite, every output kept.
#
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR] [SECONDS]
#
# WHEEL_DIR: wheels of packages the machine lacks (symusic, lz4, ...), installed with --target into /tmp/site.
# SECONDS (default 560): the whole check's budget; each stage also has its own limit, and a stage never gets
# more than what is left, so one stuck stage cannot take the others' time. Stages run in order of importance.
# OUT_DIR gets one text file per stage and stages.txt (the machine; each stage's command, exit code, seconds).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [WHEEL_DIR] [SECONDS]}
wheels=${2:-}
budget=${3:-560}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

stage() {  # stage NAME LIMIT COMMAND...: run with the smaller of LIMIT and the time left
    local name=$1 limit=$2 left=$((budget - SECONDS)) t0=$SECONDS rc
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name skipped: ${left}s left" | tee -a "$out/stages.txt"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$out/stages.txt"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    echo "== $name rc=$rc $((SECONDS - t0))s" | tee -a "$out/stages.txt"
    if ((rc == 0)); then grep -E '^\||passed|failed' "$out/$name.txt" | tail -30; else tail -15 "$out/$name.txt"; fi
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "triton", triton.__version__)'
    nproc
} >>"$out/stages.txt" 2>&1
cat "$out/stages.txt"

gen=(python3 bench/bench_generate.py --device cuda --tokens 512 --batches 1 8)
train=(python3 bench/bench_train.py --mode models --compile-rows --window 2048 --budget 33554432 --steps 20
    --device cuda)
stage ceilings 30 python3 bench/gpu_ceilings.py
stage generate 150 "${gen[@]}" --presets small base --loops decode graph-uncompiled reference hf
# ours eager runs again last: whether the first row of a process pays for first-use costs (issue 22: eager small)
stage train_base 170 "${train[@]}" --presets base --rows ours-eager hf-eager ours-compiled hf-compiled ours-eager
stage train_large 130 "${train[@]}" --presets large --rows ours-compiled ours-eager
stage pytest 140 python3 -m pytest -q -n 12 --timeout 120 -p no:cacheprovider tests
stage train_small 70 "${train[@]}" --presets small --rows ours-eager hf-eager ours-eager --profile
stage generate_hf_static 150 "${gen[@]}" --presets base --loops hf-static
