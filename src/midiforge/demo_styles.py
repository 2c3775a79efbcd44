"""`midiforge demo-data --styles`: a multi-style corpus from music21's bundled corpus, one folder per style tag.

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

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from midiforge.errors import UsageError
from midiforge.prepare import write_reasons
from midiforge.workers import map_isolated

# tag → (music21 composer/collection directories, file extensions, preferred first)
STYLES = {
    "bach": (("bach",), ()),  # the chorales, chosen by midiforge.demo.list_chorales
    "palestrina": (("palestrina",), (".krn",)),
    "monteverdi": (("monteverdi",), (".mxl",)),
    "trecento": (("trecento",), (".xml", ".mxl")),
    "quartets": (("beethoven", "haydn"), (".mxl", ".xml", ".krn")),
    "folk": (("ryansMammoth",), (".abc",)),
}
CONVERT_TIMEOUT_S = 600.0  # a Beethoven movement takes ~30 s; this only catches a hung conversion


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
    from midiforge.demo import list_chorales

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
    """Like :func:`midiforge.demo.convert_chorale`; a file holding several tunes gives its first."""
    from music21 import converter, stream

    from midiforge.demo import write_stream

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
    from midiforge.demo import SPLITS, split_of

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
    for i, _ok, reason in map_isolated(convert_piece, todo, jobs, timeout=CONVERT_TIMEOUT_S, batch_size=1):
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
