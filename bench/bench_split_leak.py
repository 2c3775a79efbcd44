"""How much does a validation split leak? The longest run of notes a validation piece shares with any training
piece (the copy check, transposition-invariant), for the chorales split by name hash and split by tune.

    python bench/bench_split_leak.py demo/midi     # a folder of demo-data's chorales (train/ and val/)

The name-hash split is the one demo-data used before (``split_of``, ~20%); the tune split is today's
(:mod:`midiforge.data.split`: groups of pieces sharing a run never straddle it, seed 0, at most 20%).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from midiforge.data.demo import split_of
from midiforge.data.split import make_split
from midiforge.measure import copycheck
from midiforge.notes.read import read_notes
from midiforge.tokens.tokenizer import MidiTokenizer


def leak(tok, cache: Path, train: list[Path], val: list[Path]) -> tuple[int, int]:
    """(longest run in notes, validation pieces sharing more than 24 notes)."""
    index, _ = copycheck.training_index(tok, train, cache)
    runs = [
        r["notes"]
        for r in copycheck.check(index, tok, [tok.encode_notes(read_notes(f)) for f in val], 1 << 30)
    ]
    return max(runs), sum(r > 24 for r in runs)


def main() -> None:
    files = sorted(Path(sys.argv[1]).glob("*/*.mid"), key=lambda p: p.name)
    tok = MidiTokenizer()  # the copy check's symbols come from base events: any tokenizer gives the same runs
    with tempfile.TemporaryDirectory() as cache:
        old_val = [f for f in files if split_of(f.stem) == "val"]
        old = leak(tok, Path(cache), [f for f in files if split_of(f.stem) != "val"], old_val)
        t0 = time.perf_counter()
        from midiforge.data.demo import _natural_key

        ordered = sorted(files, key=lambda p: _natural_key(p.stem))  # demo-data's order
        split = make_split(ordered, 0.2, 0)
        took = time.perf_counter() - t0
        new = leak(tok, Path(cache), split.train_files, split.val_files)
    print(f"{len(files)} chorales\n")
    print("| split | train / val | longest shared run (notes) | val pieces sharing > 24 notes |")
    print("|---|---|---|---|")
    print(f"| by name hash | {len(files) - len(old_val)} / {len(old_val)} | {old[0]} | {old[1]} |")
    print(f"| by tune | {len(split.train_files)} / {len(split.val_files)} | {new[0]} | {new[1]} |")
    print(f"\ngrouping and split: {took:.1f} s; {split.summary()}")


if __name__ == "__main__":
    main()
