"""Synthetic large corpora made from real songs, for bench_scale.py (and the sampled-BPE check).

File ``i`` of a corpus is song ``i % S`` of the source folder (sorted; the 300 POP909 songs by default), varied
deterministically by ``v = i // S``: transposed by ``TRANSPOSE[v % 13]`` semitones, its tempos scaled by
``TEMPO[(v // 13) % 7]``, and delayed by ``v // 91`` sixteenth notes. Variant 0 of every song is the song
itself; every file has different content (and so its own hash).

    .venv/bin/python bench/scale_corpus.py 10000 /tmp/scale/midi-10k
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import symusic

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pop909"
TRANSPOSE = (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6)
TEMPO = (1.0, 0.9, 1.1, 0.8, 1.25, 0.95, 1.05)


def variant(score: symusic.Score, v: int) -> symusic.Score:
    out = score.shift_pitch(TRANSPOSE[v % len(TRANSPOSE)])
    factor = TEMPO[(v // len(TRANSPOSE)) % len(TEMPO)]
    if factor != 1.0:
        for t in out.tempos:
            t.qpm = t.qpm * factor
    delay = v // (len(TRANSPOSE) * len(TEMPO))
    if delay:
        out = out.shift_time(delay * max(1, out.ticks_per_quarter // 4))
    return out


def make_corpus(n: int, out_dir: str | os.PathLike, source: Path = CORPUS) -> list[Path]:
    """Write ``n`` MIDI files to ``out_dir`` (kept if already there: the files are deterministic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    songs = sorted(p for p in source.iterdir() if p.suffix.lower() in (".mid", ".midi"))
    if not songs:
        raise SystemExit(f"no MIDI files in {source}")
    scores: dict[int, symusic.Score] = {}
    paths = []
    for i in range(n):
        s, v = i % len(songs), i // len(songs)
        # 1,000 files per folder: large flat folders are slow on some filesystems.
        p = out / f"{i // 1000:04d}" / f"{songs[s].stem}-v{v:04d}.mid"
        paths.append(p)
        if p.exists() and p.stat().st_size > 0:
            continue
        if s not in scores:
            scores[s] = symusic.Score(str(songs[s]))
        p.parent.mkdir(exist_ok=True)
        tmp = p.with_suffix(".tmp")
        variant(scores[s], v).dump_midi(str(tmp))
        os.replace(tmp, p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("out")
    ap.add_argument("--source", type=Path, default=CORPUS)
    args = ap.parse_args(argv)
    paths = make_corpus(args.n, args.out, args.source)
    size = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} files, {size / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
