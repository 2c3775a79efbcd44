"""How long the copy check's index takes for a 10,000-piece training set, and a query against it.

The 300 POP909 songs are tokenized once (as the token cache would hold them) and turned into copy-check symbols;
10,000 training pieces are then made from them, piece k being song k % 300 rotated by 37 * (k // 300) symbols
(real note sequences, POP909's length distribution; a rotation makes each copy's n-grams at new positions). The
script times building the index (hashing and sorting every 8-gram), writing and reading its cache file, and the
longest-run query of a 600-note excerpt of a training song (planted: must be found) and of unrelated songs.

    .venv/bin/python bench/bench_copycheck.py [--pieces 10000]

Encoding the training files is not included: the training run's token cache already holds them, and reading
10,000 MIDI files costs what it costs anywhere (see bench_tokenizer.py for files per second).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from midiforge.measure import copycheck
from midiforge.tokens.tokenizer import MidiTokenizer

ROOT = Path(__file__).resolve().parents[1]


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "pop909")
    p.add_argument("--pieces", type=int, default=10_000)
    args = p.parse_args()
    files = sorted(args.corpus.glob("*.mid"))
    tok = MidiTokenizer()
    t0 = clock()
    songs = [copycheck.symbols(*copycheck.note_sequence(tok, tok.encode(f))) for f in files]
    t_sym = since(t0)
    seqs = [np.roll(songs[k % len(songs)], 37 * (k // len(songs))) for k in range(args.pieces)]
    names = [f"piece{k}" for k in range(args.pieces)]
    t0 = clock()
    index = copycheck.CopyIndex.build(seqs, names, np.zeros(len(tok), np.int64))
    t_build = since(t0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "index.npz"
        t0 = clock()
        path.write_bytes(index.to_bytes())
        t_save = since(t0)
        t0 = clock()
        loaded = copycheck.CopyIndex.from_file(path)
        t_load = since(t0)
        size = path.stat().st_size
    planted = seqs[1234 % args.pieces][100:700]
    queries = [planted] + [songs[i][:600] for i in range(0, len(songs), 30)]
    t0 = clock()
    runs = [loaded.longest_run(q) for q in queries]
    t_query = tuple(x / len(queries) for x in since(t0))
    load = os.getloadavg()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load {load:.1f}"
    )
    print(
        f"{args.pieces:,} training pieces, {sum(len(s) for s in seqs):,} symbols, {len(index.hashes):,} 8-grams\n"
    )
    print("| step | wall s | CPU s |")
    print("|---|---|---|")
    print(f"| symbols of the {len(files)} songs from their tokens (once) | {t_sym[0]:.2f} | {t_sym[1]:.2f} |")
    print(f"| build the index ({args.pieces:,} pieces) | {t_build[0]:.2f} | {t_build[1]:.2f} |")
    print(f"| write the cache file ({size / 1e6:.0f} MB) | {t_save[0]:.2f} | {t_save[1]:.2f} |")
    print(f"| read the cache file | {t_load[0]:.2f} | {t_load[1]:.2f} |")
    print(f"| one query (600 notes), mean of {len(queries)} | {t_query[0]:.3f} | {t_query[1]:.3f} |")
    print(f"\nplanted excerpt: longest run {runs[0]['notes']} notes (of 601) in {runs[0]['piece']}")
    print(f"songs queried against all 10,000 pieces (they are in it): {[r['notes'] for r in runs[1:4]]} ...")


if __name__ == "__main__":
    main()
