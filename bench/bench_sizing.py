"""Is the model `train` picks without --preset the right size? 40 folk tunes: tiny, small and the choice, one after another.

Converts 40 tunes of Ryan's Mammoth Collection (music21's corpus, as ``demo-data --styles folk`` does) into
one folder, then trains on it with the seed's command and no ``-v`` (the automatic grouped split, the same
for every run: same files, same seed) three times at once, one CPU thread each: ``--preset tiny``,
``--preset small`` and no ``--preset``. Each run is stopped once its epochs add up to ``--seconds`` of
training; the table gives the lowest validation bits per note it reached by then (what CKPT/best holds).
Running them at once gives every run the same share of a shared machine.

    python bench/bench_sizing.py --out /tmp/sizing --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"tiny": ["--preset", "tiny"], "small": ["--preset", "small"], "chosen": []}


def folk_tunes(out: Path, n: int) -> Path:
    """``out/tunes``: the first ``n`` folk tunes that music21 converts (in demo-data's fixed order)."""
    from midiforge.data.demo import build_styles_corpus

    tunes = out / "tunes"
    if tunes.is_dir() and len(list(tunes.glob("*.mid"))) == n:
        return tunes
    summary = build_styles_corpus(out / "styles", ["folk"], n + 5, jobs=None, progress=False)
    del summary
    found = sorted((out / "styles").glob("*/folk/*.mid"), key=lambda p: p.name)[:n]
    if len(found) < n:
        sys.exit(f"only {len(found)} tunes converted")
    shutil.rmtree(tunes, ignore_errors=True)
    tunes.mkdir(parents=True)
    for p in found:
        shutil.copy(p, tunes / p.name)
    return tunes


def training_seconds(ckpt: Path) -> list[tuple[float, dict]]:
    """(training seconds so far, epoch row) of each finished epoch."""
    try:
        rows = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return []
    out, t = [], 0.0
    for r in rows:
        t += r["seconds"]
        out.append((t, r))
    return out


def _stop_after(seconds: float, procs: dict) -> None:
    """Wait for the runs, stopping each once its finished epochs add up to ``seconds`` of training."""
    while any(p.poll() is None for p, _, _ in procs.values()):
        for p, _, ckpt in procs.values():
            done = training_seconds(ckpt)
            if p.poll() is None and done and done[-1][0] >= seconds:
                p.terminate()
        time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tunes", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=60.0, help="training seconds each run gets")
    ap.add_argument("--epochs", type=int, default=400, help="num_epochs (the cosine schedule's length)")
    ap.add_argument("--parallel", action="store_true", help="the three runs at once, one thread each")
    args = ap.parse_args()
    tunes = folk_tunes(args.out, args.tunes)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if args.parallel else dict(os.environ)
    procs = {}
    t0 = time.monotonic()
    for name, flags in RUNS.items():
        ckpt = args.out / f"ckpt-{name}"
        shutil.rmtree(ckpt, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "train.py"), str(args.epochs), str(ckpt), "-t", str(tunes)]
        log = open(args.out / f"{name}.log", "w")  # noqa: SIM115 -- closed when the run ends
        proc = subprocess.Popen([*cmd, *flags, "--device", "cpu"], stdout=log, stderr=log, env=env)
        procs[name] = (proc, log, ckpt)
        if not args.parallel:
            _stop_after(args.seconds, {name: procs[name]})
    _stop_after(args.seconds, procs)
    how = "3 runs at once, 1 thread each" if args.parallel else "one run after another"
    print(
        f"{args.tunes} folk tunes, {args.seconds:.0f} s of training each, {how}"
        f" ({time.monotonic() - t0:.0f} s wall)\n"
    )
    print("| run | preset | epochs | best val bits/note (epoch) |")
    print("|---|---|---|---|")
    for name, (_p, log, ckpt) in procs.items():
        log.close()
        text = (args.out / f"{name}.log").read_text()
        preset = (
            RUNS[name][1]
            if RUNS[name]
            else next((line.split()[1] for line in text.splitlines() if line.startswith("preset ")), "?")
        )
        within = [r for t, r in training_seconds(ckpt) if t <= args.seconds]
        scored = [r for r in within if r.get("val_bits_per_note") is not None]
        best = min(scored, key=lambda r: r["val_bits_per_note"], default=None)
        fig = f"{best['val_bits_per_note']:.3f} ({best['epoch']})" if best else "n/a"
        print(
            f"| {'no --preset' if name == 'chosen' else '--preset ' + name} | {preset} | {len(within)} | {fig} |"
        )
    chosen = [
        line
        for line in (args.out / "chosen.log").read_text().splitlines()
        if line.startswith(("preset ", "validation split"))
    ]
    print("\n" + "\n".join(chosen or ["(no preset line printed)"]))


if __name__ == "__main__":
    main()
