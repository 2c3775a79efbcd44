#!/usr/bin/env bash
# The main job of the README: from a fresh clone to music that this project trained, on the CPU.
#   1. a virtual environment with midiforge (torch from the CPU wheel, music21 for the corpus)
#   2. Bach's chorales from music21's corpus → MIDI, split 80/20 into train/val
#   3. prepare them as JSON, train the tiny preset for 20 epochs, generate three samples
#   4. evaluate: held-out bits per note and per second, sample statistics, copy check
# Everything goes under ./demo (override with DEMO_DIR); re-running reuses what is there and resumes training.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo}
# 20 epochs with dropout 0.1: 16 minutes on a quiet 2-core CPU, 12 of them training. EPOCHS=9 DROPOUT=0 fits
# in ~9 minutes, but that model asks for D minor and gets it in 30% of samples (90% here) and needs 4.62 bits per
# note (3.78 here): the README says why the longer run stays the default (docs/results.md, "The demo in 9 epochs").
EPOCHS=${EPOCHS:-20}
LR=${LR:-3e-3}
DROPOUT=${DROPOUT:-0.1}
start=$(date +%s)
# Seconds since the start after each step, so that a slow step shows (the whole must stay under 10 minutes).
lap() { echo "[demo] $(( $(date +%s) - start )) s: $1"; }

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0   # the CPU wheel on this project's machines, never a CUDA download
.venv/bin/pip install -q -e ".[demo,audio]"
mf=.venv/bin/midiforge
lap "installed"

$mf demo-data "$DEMO_DIR/midi"
lap "chorales converted"
$mf prepare "$DEMO_DIR/midi/train" -o "$DEMO_DIR/json/train"
$mf prepare "$DEMO_DIR/midi/val" -o "$DEMO_DIR/json/val"
# --vocab-size: the base vocabulary is 961 since events v4 (tracks, keys, pedals, controls, infilling
# sentinels); 1,344 leaves BPE about as many merges as 1,024 did over the old 669 base events.
.venv/bin/python train.py "$EPOCHS" "$DEMO_DIR/ckpt" -t "$DEMO_DIR/json/train" -v "$DEMO_DIR/json/val" \
    --preset tiny --vocab-size 1344 -e 512 -b $((4 * 512 * 512)) -l "$LR" --dropout "$DROPOUT" --device cpu
lap "trained"
$mf generate "$DEMO_DIR/ckpt" -o "$DEMO_DIR/samples/chorale.mid" -n 3 --max-seconds 45 --top-p 0.95 \
    --seed 0 --wav --pianoroll
# Harmonisation (generate/harmonize.py): a validation chorale's soprano; alto, tenor, bass by the model, beside Bach's.
.venv/bin/python scripts/chorale_melody.py "$DEMO_DIR/midi/val" "$DEMO_DIR/samples"
$mf generate "$DEMO_DIR/ckpt" --prompt "$DEMO_DIR/samples/melody.mid" --harmonize \
    -o "$DEMO_DIR/samples/harmonized.mid" --top-p 0.95 --seed 0 --wav --pianoroll
lap "samples and harmonisation written"

echo
echo "  training curves : $DEMO_DIR/ckpt/training.png   (metrics: $DEMO_DIR/ckpt/metrics.json)"
echo "  generated music : $DEMO_DIR/samples/chorale_{1,2,3}.mid  (+ .wav, .png)"
echo "  harmonisation   : $DEMO_DIR/samples/harmonized.mid beside Bach's $DEMO_DIR/samples/bach.mid (+ .wav, .png)"
echo "  evaluation      : $DEMO_DIR/report.json, $DEMO_DIR/report.png"
echo
# Last: what the model makes, measured on the validation chorales -- held-out bits per note and per second,
# sample statistics against the validation set (ceiling: half vs half; floor: an untrained model), copy check.
$mf evaluate "$DEMO_DIR/ckpt" -v "$DEMO_DIR/json/val" -o "$DEMO_DIR/report.json" --samples 8 \
    --max-seconds 30 --top-p 0.95 --seed 0
lap "evaluated"
# The harmonisation measured: 10 held-out chorales' sopranos harmonised, against Bach's and a random-chord floor,
# by the project's judge (../shared/tools/voice_leading.py beside the repository; skipped where it is absent).
judge=../shared/tools/voice_leading.py
if [ -f "$judge" ]; then
    .venv/bin/python bench/bench_harmonize.py "$DEMO_DIR/ckpt" --val "$DEMO_DIR/midi/val" --pieces 10 \
        --out "$DEMO_DIR/harmonize" --judge "$judge"
else
    echo "(harmonisation table skipped: the judge $judge is not beside the repository)"
fi
echo "done in $(( $(date +%s) - start )) s"
echo
echo "listen and generate in the browser:  $mf studio $DEMO_DIR/ckpt   then open http://127.0.0.1:7860/"
