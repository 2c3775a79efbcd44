#!/usr/bin/env bash
# Does training with infilling examples hurt continuation? Two runs alike except --infill-rate (0.5, the default,
# and 0), same seed, same tokenizer; prints each one's validation loss on ordinary (continuation) windows.
#   bash bench/bench_infill_val.sh CHORALES_DIR [OUT_DIR]     (CHORALES_DIR from `midiforge demo-data`: train/ val/)
# Sized for a 2-core machine: a 0.2M-parameter model, one epoch (99 steps of 8 x 256 tokens on the chorales).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$1
OUT=${2:-/tmp/bench_infill_val}
mkdir -p "$OUT"
for r in 0.5 0; do
    OMP_NUM_THREADS=1 .venv/bin/python train.py 1 "$OUT/r$r" -t "$DATA/train" -v "$DATA/val" --n-layer 2 --n-head 2 \
        --d-model 64 --d-ff 256 --context-length 256 --vocab-size 1024 -e 256 -b $((8 * 256 * 256)) --device cpu \
        --infill-rate "$r" --seed 0 > "$OUT/r$r.log" 2>&1 &
done
wait
echo "| --infill-rate | val loss (nats/token) | val bits/note |"
echo "|---|---|---|"
for r in 0.5 0; do
    .venv/bin/python -c "import json,sys; e=json.load(open(sys.argv[1]))['epochs'][-1]; \
print(f\"| $r | {e['val_loss']:.4f} | {e['val_bits_per_note']:.3f} |\")" "$OUT/r$r/metrics.json"
done
