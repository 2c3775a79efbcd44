"""Does free generation keep the beat? The grid mask's modes side by side, against real pieces and a floor.

For a checkpoint and a folder of reference pieces (the demo: its validation chorales), ``-n`` free samples with
the grid mask off, on "positions" (any position of the quarter the training set uses) and on "pairs" (the
default: a position only after the positions it follows in the training set), and the same from an untrained
model of the same shape (the floor, grid mask off and pairs at the default strength); and the pair mask at
``--beat-strength`` 0, at generate's default and at each of ``--beat-strengths`` (extra notes at an onset favoured on
a quarter, disfavoured off it: chords on the beat). Per set:

- on-beat share: notes starting on a beat of their time signature, over all notes of the set (midiforge.measure.beat);
- off-grid share: notes starting at a position of the quarter that the training set never uses;
- beatless: pieces with a stretch of at least a quarter of their beats with no note starting on a beat;
- notes per onset, on and off the beat (the chorales attack chords on the beat, single notes off it).

    .venv/bin/python bench/bench_beat.py demo/ckpt demo/json/val -n 20 --seed 1

Prints markdown: the machine, the settings, the table. Needs a checkpoint that recorded its onset grid
(tokenizer.json "onset_grid", written by training); without one every mode is "off".
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from midiforge import checkpoint as ck  # noqa: E402
from midiforge.evaluate import untrained_model  # noqa: E402
from midiforge.generate import generate  # noqa: E402
from midiforge.generate.steer import DEFAULT_BEAT_STRENGTH  # noqa: E402
from midiforge.measure.beat import longest_beatless, note_steps, on_beat  # noqa: E402
from midiforge.notes.midi import find_files, score_to_notes  # noqa: E402
from midiforge.notes.read import read_notes  # noqa: E402

GOALS = {"on_beat": ">= 0.75", "off_grid": "<= 0.01"}


def row(name: str, tables: list, used: np.ndarray, seconds: float | None = None) -> str:
    on = total = off = beatless = 0
    onsets = np.zeros(2, np.int64)  # onsets off / on a beat (an onset is on a beat when its notes are)
    for n in tables:
        if len(n) == 0:
            continue
        b, steps = on_beat(n), note_steps(n)
        on += int(b.sum())
        off += int((~used[steps % 12]).sum())
        total += len(n)
        beatless += longest_beatless(n) >= 0.25
        _, first = np.unique(steps, return_index=True)
        onsets += np.bincount(b[first].astype(np.int64), minlength=2)
    t = "" if seconds is None else f"{seconds:.0f}"
    per = f"{on / max(onsets[1], 1):.2f} / {(total - on) / max(onsets[0], 1):.2f}"
    return (f"| {name} | {len(tables)} | {total} | {on / max(total, 1):.2f} | {off / max(total, 1):.3f} |"
            f" {beatless} of {len(tables)} | {per} | {t} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("reference", type=Path, help="folder of reference pieces (.mid/.json)")
    ap.add_argument("-n", type=int, default=20, help="samples per set (default 20)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--beat-strengths", type=lambda t: [float(x) for x in t.split(",") if x], default=[1.0],
                    help="also the default pair mask with these --beat-strength values (chords on the beat)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(
        int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    )  # OMP_NUM_THREADS=1 on a shared machine
    model, tok = ck.load_inference(args.checkpoint)
    grid = tok.onset_grid
    used = grid.used() if grid is not None else np.ones(12, bool)
    ref = [read_notes(f) for f in find_files([args.reference], suffixes=(".mid", ".midi", ".json"))]
    floor = untrained_model(model, args.seed)
    lines = [row("reference pieces", ref, used)]
    kw = dict(max_new_tokens=args.max_tokens, num_samples=args.n, seed=args.seed, top_p=args.top_p)
    # The pair mask without the texture bias, at generate's default strength and at each one asked for.
    strengths = sorted({0.0, DEFAULT_BEAT_STRENGTH, *args.beat_strengths})
    beats = [(f"model, pairs, --beat-strength {x:g}" + (" (default)" if x == DEFAULT_BEAT_STRENGTH else ""),
              model, "pairs", x) for x in strengths]  # fmt: skip
    for label, m, mode, beat in (("model, grid mask off", model, "off", 0.0),
                                 ("model, positions", model, "positions", 0.0), *beats,
                                 ("untrained floor, off", floor, "off", 0.0),
                                 ("untrained floor, pairs", floor, "pairs", DEFAULT_BEAT_STRENGTH)):  # fmt: skip
        t0 = time.perf_counter()
        gens = generate(m, tok, grid=mode, beat_strength=beat, **kw)
        lines.append(row(label, [score_to_notes(g.score) for g in gens], used, time.perf_counter() - t0))
    print(f"# bench_beat ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__};"
          f" load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(f"checkpoint {args.checkpoint}; reference {args.reference} ({len(ref)} pieces); {args.n} samples per"
          f" set, --seed {args.seed}, --max-tokens {args.max_tokens}, top-p {args.top_p}; training-set positions"
          f" of the quarter (of 12): {np.flatnonzero(used).tolist()}\n")  # fmt: skip
    print(
        "| set | pieces | notes | on-beat share | off-grid share | beatless >= 1/4 of the piece | notes per onset"
        " on / off the beat | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\ngoals (issue 18): on-beat share {GOALS['on_beat']}, off-grid share {GOALS['off_grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
