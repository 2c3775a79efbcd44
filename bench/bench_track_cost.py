"""What track identity, key signatures and the sustain pedal cost in tokens per note (EVENTS_VERSION 4).

Run from the repository root::

    .venv/bin/python bench/bench_track_cost.py                       # POP909 only
    .venv/bin/python bench/bench_track_cost.py --chorales data/train  # + a `midiforge demo-data` folder

For each corpus, BPE (--vocab) is trained on the first --train files and tokens are counted on the next --test,
once per variant of the event stream:

- ``v3``: the previous events (every program one track, no key signatures, no pedal) — a legacy tokenizer;
- ``+track``: TRACK events (pedals and key signatures removed from the note tables);
- ``+track+keysig``: also KEYSIG;
- ``v4 (all)``: also PEDAL on/off.

Prints a markdown table: base events per note, BPE tokens per note, and the change against ``v3``. Also counts
how often each controller and pitch bends occur in the corpus (are they worth their tokens?).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import symusic  # noqa: E402

from midiforge.notes.midi import find_files  # noqa: E402
from midiforge.notes.read import read_notes  # noqa: E402
from midiforge.tokens.tokenizer import MidiTokenizer  # noqa: E402


def variant(table, name):
    t = copy.copy(table)
    if name in ("v3", "+track", "+track+keysig"):
        t.pedal_time = t.pedal_duration = np.zeros(0, np.int64)
        t.pedal_program = t.pedal_track = np.zeros(0, np.int16)
    if name in ("v3", "+track"):
        t.ks_time, t.ks_key, t.ks_tonality = (
            np.zeros(0, np.int64),
            np.zeros(0, np.int16),
            np.zeros(0, np.int16),
        )
    if name == "v3":
        t.track = np.zeros(len(t), np.int16)
    t.sheet = None
    return t


def measure(files, n_train, n_test, vocab):
    tables = []
    for f in files[: n_train + n_test]:
        try:
            tables.append(read_notes(f))
        except ValueError:
            continue
    train, test = tables[:n_train], tables[n_train : n_train + n_test]
    notes = sum(len(t) for t in test)
    rows = []
    for name in ("v3", "+track", "+track+keysig", "v4 (all)"):
        tok = MidiTokenizer()
        if name == "v3":
            tok.events_version = 3
        base = MidiTokenizer()  # base events only
        seqs = [base.encode_notes(variant(t, name)) - 3 for t in train]
        tok.train_bpe([s + 3 for s in seqs], vocab)
        n_base = sum(len(tok.events(variant(t, name))[0]) for t in test)
        n_bpe = sum(len(tok.encode_notes(variant(t, name))) for t in test)
        rows.append((name, n_base / notes, n_bpe / notes))
    return rows, len(test), notes


def controller_counts(files):
    cc, files_with = Counter(), Counter()
    bends = bend_files = notes = pedal_files = 0
    for f in files:
        try:
            s = symusic.Score(str(f))
        except Exception:
            continue
        seen = set()
        for t in s.tracks:
            notes += len(t.notes)
            bends += len(t.pitch_bends)
            for c in t.controls:
                cc[c.number] += 1
                seen.add(c.number)
        bend_files += any(len(t.pitch_bends) for t in s.tracks)
        pedal_files += any(len(t.pedals) for t in s.tracks)
        files_with.update(seen)
    return cc, files_with, bends, bend_files, notes, pedal_files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pop909", default="../shared/corpus/pop909")
    ap.add_argument("--chorales", default=None, help="a demo-data folder (e.g. data/train)")
    ap.add_argument("--all", default="../shared/corpus", help="corpus for the controller counts")
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=2048)
    a = ap.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    corpora = [("POP909", a.pop909)] + ([("chorales", a.chorales)] if a.chorales else [])
    print("| corpus | variant | base events/note | BPE tokens/note | vs v3 |")
    print("|---|---|---|---|---|")
    for label, root in corpora:
        files = find_files([root])
        n_train = min(a.train, len(files) // 2)
        rows, n_test, notes = measure(files, n_train, a.test, a.vocab)
        ref = rows[0][2]
        for name, b, t in rows:
            print(
                f"| {label} ({n_test} files, {notes} notes) | {name} | {b:.3f} | {t:.3f} | {100 * (t / ref - 1):+.1f}% |"
            )
    cc, fw, bends, bend_files, notes, pedal_files = controller_counts(find_files([a.all]))
    print(f"\ncontrollers in {a.all} ({notes} notes; pedals in {pedal_files} files):")
    print("| controller | events | per note | files |")
    print("|---|---|---|---|")
    for num, n in cc.most_common(8):
        print(f"| CC{num} | {n} | {n / notes:.4f} | {fw[num]} |")
    print(f"| pitch bend | {bends} | {bends / notes:.4f} | {bend_files} |")


if __name__ == "__main__":
    main()
