"""`midiforge demo-data`: the Bach chorales bundled with music21, converted once to MIDI and split train/val.

The chorales are music21's Bach corpus files (MusicXML, a few Humdrum ``.krn``); where a chorale exists in two
formats the MusicXML one is used. Each becomes ``OUT/{train,val}/<name>.mid`` (a tempo, one track per part,
as music21 writes them). The split is by tune, as `train` splits a folder without -v (:mod:`midiforge.data.split`):
chorales sharing a run of notes (harmonisations of one hymn tune, copies) form a group, and a group is never
split; 20% of the chorales at most go to validation, seeded, recorded in ``OUT/split.json``. It depends on the
chorales converted (``--limit`` changes it). Files already there are reused, moved when the split moved them.

``--styles`` builds a multi-style, tagged corpus from the rest of music21's corpus instead (the second half of this module).

--styles
--------
`midiforge demo-data --styles`: a multi-style corpus from music21's bundled corpus, one folder per style tag.

music21 ships more than the Bach chorales. What its corpus holds (music21 9.x, counted with
``corpus.getComposer``), and the style tags made from it:

=============  ===================================================  ==========  ==============================
tag            music21 source                                       files       format
=============  ===================================================  ==========  ==============================
bach           the chorales (as the default demo)                    409        MusicXML (+3 Humdrum)
palestrina     Palestrina's masses and motets                        1318       Humdrum .krn
monteverdi     Monteverdi madrigals, books 3-5                       48         MusicXML (``*_old`` skipped)
trecento       Italian 14th-century pieces (PMFC)                    102        MusicXML
quartets       Beethoven and Haydn string quartet movements          31         MusicXML / .krn
folk           Ryan's Mammoth Collection (one tune a file)           1059       ABC
=============  ===================================================  ==========  ==============================

Each piece becomes ``OUT/{train,val}/<tag>/<name>.mid``, so ``-t palestrina=OUT/train/palestrina`` (or every
folder at once, see :func:`tag_args`) trains with the tags. The split is the stable name hash of the default
demo, over ``<tag>/<name>``. ``per_style`` keeps the first N pieces of each style in an order fixed by a hash
of their names (a spread over each collection, not its first letters); files already there are reused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from midiforge.data.prepare import ERRORS_FILE, parse_jobs, whole_number, write_reasons
from midiforge.data.workers import map_isolated
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.notes.midi import MidiReadError, load_score, score_to_notes

SPLITS = ("train", "val")
VAL_PERCENT = 20
# Preferred source format when a chorale is bundled twice (bwv277, bwv281 and bwv366 are also .krn files).
_FORMAT_RANK = {".mxl": 0, ".xml": 1, ".krn": 2}
# Bach files in music21's corpus that are not chorales: bwv846 is the C major prelude of the WTC, for piano.
NOT_CHORALES = frozenset({"bwv846"})
CONVERT_TIMEOUT_S = 300.0  # music21 takes ~0.2 s a chorale; this only catches a hung conversion


def _natural_key(name: str) -> tuple:
    """``bwv2.6`` before ``bwv10.7``: numbers compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def list_chorales() -> list[tuple[str, Path]]:
    """``(name, source file)`` for each Bach chorale in music21's corpus, in a stable (natural) order.

    Raises UsageError when music21 is not installed.
    """
    try:
        from music21 import corpus
    except ImportError:
        raise UsageError(
            "the demo corpus needs music21: pip install music21 (or pip install 'midiforge[demo]')"
        ) from None
    best: dict[str, Path] = {}
    for p in corpus.getComposer("bach", fileExtensions=tuple(e[1:] for e in _FORMAT_RANK)):
        p = Path(p)
        name = p.name[: -len(p.suffix)]
        if name in NOT_CHORALES:
            continue
        if name not in best or _FORMAT_RANK[p.suffix] < _FORMAT_RANK[best[name].suffix]:
            best[name] = p
    return sorted(best.items(), key=lambda kv: _natural_key(kv[0]))


def split_of(name: str) -> str:
    """``"val"`` for ~VAL_PERCENT % of names, ``"train"`` otherwise, decided by a hash of the name alone."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return "val" if h % 100 < VAL_PERCENT else "train"


def convert_chorale(src: str, out_path: str) -> str | None:
    """Convert one corpus file to MIDI at ``out_path``; None on success, else the reason it failed.

    The MIDI is checked with the same reader training uses, so every file written is usable.
    """
    from music21 import converter

    try:
        # forceSource: parse the file itself, without reading or writing music21's pickle cache.
        stream = converter.parse(src, forceSource=True)
    except Exception as e:  # music21 raises many types (e.g. ExpanderException on bad repeats)
        return f"music21 could not convert it: {type(e).__name__}: {str(e).strip()[:200]}"
    return write_stream(stream, out_path)


def write_stream(stream, out_path: str) -> str | None:
    """Write a music21 stream as MIDI at ``out_path`` after checking it with the training reader."""
    from music21.midi.translate import streamToMidiFile

    try:
        data = bytes(streamToMidiFile(stream).writestr())
    except Exception as e:
        return f"music21 could not convert it: {type(e).__name__}: {str(e).strip()[:200]}"
    try:
        table = score_to_notes(load_score(data))
    except MidiReadError as e:
        return f"music21 wrote a bad MIDI file: {e}"
    if len(table) == 0:
        return "music21 wrote a MIDI file without notes"
    atomic_write_bytes(out_path, data)
    return None


@dataclass
class DemoSummary:
    out_dir: Path
    num_chorales: int = 0
    num_converted: int = 0
    num_reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # chorale name → reason
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.num_chorales} chorales: {self.num_converted} converted, {self.num_reused} reused, "
            f"{len(self.failed)} failed; {len(self.train)} train / {len(self.val)} val in "
            f"{self.out_dir / 'train'}, {self.out_dir / 'val'} ({self.seconds:.1f} s)"
        )


def build_demo_corpus(
    out_dir: str | os.PathLike, limit: int | None = None, jobs: int | None = None, progress: bool = True
) -> DemoSummary:
    """Convert the chorales (the first ``limit`` in natural order) into ``out_dir/{train,val}/<name>.mid``.

    Existing outputs are reused; failures are listed in ``out_dir/errors.jsonl`` (rewritten by every run).
    """
    t0 = time.perf_counter()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    if jobs is not None and jobs < 1:
        raise UsageError(f"JOBS must be at least 1 (got {jobs})")
    chorales = list_chorales()
    if not chorales:
        raise UsageError("music21's corpus has no Bach chorales (is music21 installed completely?)")
    chorales = chorales[:limit]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output is not a directory: {out}")
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)

    summary = DemoSummary(out_dir=out, num_chorales=len(chorales))
    done: list[tuple[str, Path]] = []
    todo: list[tuple[str, str]] = []
    names: list[str] = []
    sources = dict(chorales)
    for name, src in chorales:
        there = [out / split / f"{name}.mid" for split in SPLITS if (out / split / f"{name}.mid").is_file()]
        if there:
            done.append((name, there[0]))
        else:  # placed in train/ for now: split_by_tune puts it where its group goes
            todo.append((str(src), str(out / "train" / f"{name}.mid")))
            names.append(name)
    summary.num_reused = len(done)

    bar = tqdm(
        total=len(todo), desc="demo-data", unit="chorale", disable=not progress or not todo, file=sys.stderr
    )
    # ok is False only for a crashed/hung worker; either way ``reason`` is None on success or a string.
    for i, _ok, reason in map_isolated(convert_chorale, todo, jobs, timeout=CONVERT_TIMEOUT_S, batch_size=1):
        if reason is None:
            summary.num_converted += 1
            done.append((names[i], Path(todo[i][1])))
        else:
            summary.failed[names[i]] = reason
        bar.update()
    bar.close()

    for path in split_by_tune(out, [p for _n, p in sorted(done, key=lambda kv: _natural_key(kv[0]))], jobs):
        (summary.val if path.parent.name == "val" else summary.train).append(path)
    failed = sorted(summary.failed.items(), key=lambda kv: _natural_key(kv[0]))
    write_reasons(out, [(sources[n], r) for n, r in failed])
    summary.seconds = time.perf_counter() - t0
    return summary


def split_by_tune(out: Path, paths: list[Path], jobs: int | None = None) -> list[Path]:
    """Group the chorales by shared runs of notes and split them (seed 0, at most VAL_PERCENT %); move each file
    into its side's folder (a copy left on the other side is removed) and record ``out/split.json``."""
    from midiforge.data.split import SPLIT_FILE, make_split, write_split

    split = make_split(paths, VAL_PERCENT / 100, seed=0, jobs=jobs)
    placed = []
    for path, val in zip(paths, split.val, strict=True):
        want = out / ("val" if val else "train") / path.name
        other = out / ("train" if val else "val") / path.name
        if not want.is_file():
            os.replace(other, want)
        elif other.is_file():
            other.unlink()
        placed.append(want)
    split.files = [str(p) for p in placed]
    write_split(out / SPLIT_FILE, split)
    return placed


# ------------------------------------------------------------------------------------------------ --styles
# tag → (music21 composer/collection directories, file extensions, preferred first)
STYLES = {
    "bach": (("bach",), ()),  # the chorales, chosen by list_chorales
    "palestrina": (("palestrina",), (".krn",)),
    "monteverdi": (("monteverdi",), (".mxl",)),
    "trecento": (("trecento",), (".xml", ".mxl")),
    "quartets": (("beethoven", "haydn"), (".mxl", ".xml", ".krn")),
    "folk": (("ryansMammoth",), (".abc",)),
}
STYLE_CONVERT_TIMEOUT_S = 600.0  # a Beethoven movement takes ~30 s; this only catches a hung conversion


def parse_styles(text: str) -> list[str]:
    names = list(STYLES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STYLES]
    if bad or not names:
        raise UsageError(
            f"--styles: unknown style {', '.join(bad) or repr(text)}; give 'all' or a comma list of"
            f" {', '.join(STYLES)}"
        )
    return list(dict.fromkeys(names))


def list_style(style: str) -> list[tuple[str, Path]]:
    """``(name, source file)`` of every piece of a style, in a stable order (by name)."""
    if style == "bach":
        return list_chorales()
    from music21 import corpus

    root = Path(corpus.__file__).parent
    dirs, exts = STYLES[style]
    best: dict[str, Path] = {}
    for d in dirs:
        for p in map(Path, corpus.getComposer(d)):
            if p.suffix not in exts or p.stem.endswith("_old"):
                continue
            rel = p.relative_to(root / d).with_suffix("")
            name = "-".join(rel.parts).replace(" ", "_")
            if name not in best or exts.index(p.suffix) < exts.index(best[name].suffix):
                best[name] = p
    return sorted(best.items())


def _order(style: str, name: str) -> bytes:
    return hashlib.sha256(f"{style}/{name}".encode()).digest()


def convert_piece(src: str, out_path: str) -> str | None:
    """Like :func:`midiforge.data.demo.convert_chorale`; a file holding several tunes gives its first."""
    from music21 import converter, stream

    try:
        s = converter.parse(src, forceSource=True)
        if isinstance(s, stream.Opus):
            s = s.scores[0]
    except Exception as e:  # music21 raises many types
        return f"music21 could not convert it: {type(e).__name__}: {str(e).strip()[:200]}"
    return write_stream(s, out_path)


@dataclass
class StylesSummary:
    out_dir: Path
    per_style: dict[str, list[int]] = field(default_factory=dict)  # tag → [train, val] pieces
    converted: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # tag/name → reason
    seconds: float = 0.0

    def line(self) -> str:
        parts = ", ".join(f"{t} {a}+{b}" for t, (a, b) in self.per_style.items())
        return (
            f"{self.converted} converted, {self.reused} reused, {len(self.failed)} failed; train+val per tag:"
            f" {parts} in {self.out_dir}/{{train,val}}/<tag> ({self.seconds:.1f} s)"
        )


def tag_args(out_dir, split: str = "train") -> list[str]:
    """``-t``/``-v`` values for every style folder of a corpus built here: ``["bach=OUT/train/bach", ...]``."""
    base = Path(out_dir) / split
    return [f"{d.name}={d}" for d in sorted(base.iterdir()) if d.is_dir() and d.name in STYLES]


def build_styles_corpus(out_dir, styles: list[str], per_style: int | None = None, jobs: int | None = None,
                        progress: bool = True) -> StylesSummary:  # fmt: skip
    t0 = time.perf_counter()
    if per_style is not None and per_style < 1:
        raise UsageError(f"--per-style must be at least 1 (got {per_style})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output is not a directory: {out}")
    summary = StylesSummary(out_dir=out)
    todo, keys, sources = [], [], {}
    for style in styles:
        pieces = sorted(list_style(style), key=lambda kv, s=style: _order(s, kv[0]))[:per_style]
        if not pieces:
            raise UsageError(f"music21's corpus has no pieces for the style {style!r} (is music21 complete?)")
        for split in SPLITS:
            (out / split / style).mkdir(parents=True, exist_ok=True)
        summary.per_style[style] = [0, 0]
        for name, src in pieces:
            split = split_of(f"{style}/{name}")
            target = out / split / style / f"{name}.mid"
            sources[f"{style}/{name}"] = src
            if target.is_file():
                summary.reused += 1
                summary.per_style[style][SPLITS.index(split)] += 1
            else:
                todo.append((str(src), str(target)))
                keys.append((style, name, split))
    bar = tqdm(
        total=len(todo), desc="demo-data", unit="piece", disable=not progress or not todo, file=sys.stderr
    )
    for i, _ok, reason in map_isolated(
        convert_piece, todo, jobs, timeout=STYLE_CONVERT_TIMEOUT_S, batch_size=1
    ):
        style, name, split = keys[i]
        if reason is None:
            summary.converted += 1
            summary.per_style[style][SPLITS.index(split)] += 1
        else:
            summary.failed[f"{style}/{name}"] = reason
        bar.update()
    bar.close()
    write_reasons(out, [(sources[k], r) for k, r in sorted(summary.failed.items())])
    summary.seconds = time.perf_counter() - t0
    return summary


# ------------------------------------------------------------------------------------------- command line
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="folder for the train/ and val/ MIDI files")
    p.add_argument("--limit", metavar="N", help="convert only the first N chorales (natural order of names)")
    p.add_argument("-j", "--jobs", metavar="JOBS", help="worker processes (default: number of CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--styles",
        metavar="LIST",
        help="instead of the chorales: a multi-style corpus, OUT/{train,val}/<tag>/ per style, from 'all' or"
        " a comma list of bach, palestrina, monteverdi, trecento, quartets, folk (train with"
        " -t palestrina=OUT/train/palestrina ...)",
    )
    p.add_argument("--per-style", metavar="N", help="with --styles: at most N pieces of each style")


def run(args) -> int:
    limit = whole_number(args.limit, "--limit")
    if getattr(args, "styles", None) is not None:
        return _run_styles(args)
    summary = build_demo_corpus(args.out, limit=limit, jobs=parse_jobs(args.jobs), progress=not args.quiet)
    for name, reason in summary.failed.items():
        print(f"midiforge demo-data: skipped {name}: {reason}", file=sys.stderr)
    print(f"midiforge demo-data: {summary.line()}")
    if not summary.train and not summary.val:
        raise UsageError(f"no chorale could be converted (see {summary.out_dir / ERRORS_FILE})")
    return 0


def _run_styles(args) -> int:
    if args.limit is not None:
        raise UsageError("--limit is for the chorales; with --styles use --per-style")
    per = whole_number(args.per_style, "--per-style")
    styles = parse_styles(args.styles)
    summary = build_styles_corpus(args.out, styles, per, jobs=parse_jobs(args.jobs), progress=not args.quiet)
    for name, reason in summary.failed.items():
        print(f"midiforge demo-data: skipped {name}: {reason}", file=sys.stderr)
    print(f"midiforge demo-data: {summary.line()}")
    if not any(sum(n) for n in summary.per_style.values()):
        raise UsageError(f"no piece could be converted (see {summary.out_dir / ERRORS_FILE})")
    print("train with: " + " ".join(f"-t {a}" for a in tag_args(args.out)))
    return 0
