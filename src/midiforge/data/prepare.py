"""`midiforge prepare`: extract MIDI files into compact, tokenizer-independent JSON note tables.

Each usable MIDI file becomes ``OUT/<stem>-<sha256[:16]>.json`` (see :func:`output_name`), holding
``{"schema", "source", "sha256", **NoteTable.to_json_dict()}``. Files are named by content hash, so duplicate
files are stored once and a re-run skips what is already there without parsing it again.

Parsing runs in worker processes (:func:`map_isolated`): a file that crashes or hangs the parser costs only
that file, which is listed in ``OUT/errors.jsonl`` with every other skipped file and its reason.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from midiforge.data.workers import DEFAULT_FILE_TIMEOUT_S, map_isolated
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes, atomic_write_jsonl, file_sha256
from midiforge.notes.midi import (
    JSON_SCHEMA,
    MidiReadError,
    find_files,
    load_score,
    score_to_notes,
)
from midiforge.notes.shards import (
    DEFAULT_PIECES_PER_SHARD,
    SHARD_SUFFIX,
    encode_piece,
    shard_files,
    write_shard,
)
from midiforge.tokens.tokenizer import MidiTokenizer

ERRORS_FILE = "errors.jsonl"
_HASH_NAME = re.compile(r"(?:^|-)([0-9a-f]{16})\.json$")


def output_name(path: Path, sha256: str) -> str:
    """``<sanitised stem>-<sha256[:16]>.json``; the hash alone when nothing of the stem survives (e.g. CJK)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).strip("._-")[:40]
    return f"{stem}-{sha256[:16]}.json" if stem else f"{sha256[:16]}.json"


def _existing_outputs(out_dir: Path) -> dict[str, Path]:
    """Prepared files already in ``out_dir``, by the first 16 hex digits of their content hash."""
    found = {}
    for entry in os.scandir(out_dir):
        m = _HASH_NAME.search(entry.name)
        # An empty file (a power cut right after a non-fsynced write) is not prepared: it gets rewritten.
        if m and entry.is_file() and entry.stat().st_size > 0:
            found[m.group(1)] = Path(entry.path)
    return found


_SHEET_TOKENIZER = None


def json_document(table, source: str, sha256: str) -> dict:
    """The prepared JSON of one piece: its note table (tokenizer-independent) plus the default tokenizer's
    base events (the "sheet"), which make loading ~2x faster when the tokenizer config matches."""
    global _SHEET_TOKENIZER
    if _SHEET_TOKENIZER is None:
        _SHEET_TOKENIZER = MidiTokenizer()
    doc = {"schema": JSON_SCHEMA, "source": source, "sha256": sha256, **table.to_json_dict()}
    doc["sheet"] = _SHEET_TOKENIZER.sheet(table)
    return doc


def prepare_file(path: str, sha256: str, out_path: str) -> tuple[str | None, int]:
    """Extract one MIDI file into ``out_path``. Returns ``(None, num_notes)``, or ``(reason, 0)`` if unusable."""
    try:
        data = Path(path).read_bytes()
        table = score_to_notes(load_score(data))
    except MidiReadError as e:
        return str(e), 0
    except OSError as e:
        return f"unreadable: {e.strerror or e}", 0
    # The same checks as midi.read_notes, so that every file written here reads back.
    if table.tpq <= 0:
        return f"invalid ticks per quarter note ({table.tpq})", 0
    if len(table) == 0:
        return "no notes", 0
    doc = json_document(table, path, sha256)
    # Not fsynced (derived data; a power cut costs at most a re-run): fsync was ~70% of prepare's time per file.
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(out_path, data, durable=False)
    return None, len(table)


def reason_category(reason: str) -> str:
    """The reason without its particulars: ``"unparsable MIDI: Get program=208"`` → ``"unparsable MIDI"``."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


@dataclass
class PrepareSummary:
    """What one `prepare` run did. ``outputs`` lists a JSON file for every usable input (deduplicated)."""

    out_dir: Path
    num_found: int = 0
    num_written: int = 0
    num_present: int = 0  # already prepared by an earlier run
    num_duplicates: int = 0  # same content as another file of this run
    num_notes: int = 0  # in the files written by this run
    skipped: dict[str, str] = field(default_factory=dict)  # path → reason
    outputs: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_usable(self) -> int:
        return self.num_written + self.num_present

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skipped_by_category(self) -> dict[str, int]:
        return dict(collections.Counter(reason_category(r) for r in self.skipped.values()).most_common())

    def line(self) -> str:
        cats = ", ".join(f"{k}: {v}" for k, v in self.skipped_by_category().items())
        rate = self.num_found / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.num_found} files found: {self.num_written} written, {self.num_present} already prepared, "
            f"{self.num_duplicates} duplicates, {self.num_skipped} skipped"
            + (f" ({cats})" if cats else "")
            + f" in {self.seconds:.1f} s ({rate:.0f} files/s) → {self.out_dir}"
        )


def sources_and_output(sources, out_dir) -> tuple[list[Path], Path]:
    """The MIDI files under ``sources`` and the output folder, created; UsageError when either is unusable.
    Shared by the JSON and the shard writers."""
    files = find_files(sources)
    if not files:
        raise UsageError(f"no .mid/.midi files found in {', '.join(map(str, sources))}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output is not a directory: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {out}: {e.strerror or e}") from e
    return files, out


def hash_unique(
    files: Sequence[Path], summary: PrepareSummary, bar
) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Hash every file (fast, sequential I/O) so that duplicates are never parsed: ``(path, sha256)`` of each
    first copy in order, and ``(str(path), sha256)`` of the later copies. An unreadable file goes to
    ``summary.skipped``; it and each later copy tick ``bar``. Shared by the JSON and the shard writers."""
    firsts: list[tuple[Path, str]] = []
    dups: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in files:
        try:
            sha = file_sha256(path)
        except OSError as e:
            summary.skipped[str(path)] = f"unreadable: {e.strerror or e}"
            bar.update()
            continue
        if sha in seen:
            dups.append((str(path), sha))
            bar.update()
        else:
            seen.add(sha)
            firsts.append((path, sha))
    return firsts, dups


def settle_duplicates(dups: list[tuple[str, str]], failed: dict[str, str], summary: PrepareSummary) -> None:
    """Count the later copies; a copy of an unusable file (sha in ``failed``) is listed in
    ``summary.skipped`` with the same reason rather than counted as a duplicate."""
    for path, sha in dups:
        if sha in failed:
            summary.skipped[path] = failed[sha]
        else:
            summary.num_duplicates += 1


def prepare(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    jobs: int | None = None,
    progress: bool = True,
    *,
    timeout: float | None = DEFAULT_FILE_TIMEOUT_S,
) -> PrepareSummary:
    """Extract every ``.mid``/``.midi`` file under ``sources`` into JSON files in ``out_dir``.

    Unusable files are skipped and listed in ``out_dir/errors.jsonl`` (rewritten by every run). Raises
    UsageError for a missing source, ``jobs < 1`` or no MIDI file at all; a run where every file was
    unusable returns a summary with ``num_usable == 0`` (the CLI turns that into an error).
    """
    t0 = time.perf_counter()
    if not sources:
        raise UsageError("no source given")
    if jobs is not None and jobs < 1:
        raise UsageError(f"JOBS must be at least 1 (got {jobs})")
    files, out = sources_and_output(sources, out_dir)
    summary = PrepareSummary(out_dir=out, num_found=len(files))
    existing = _existing_outputs(out)

    bar = tqdm(total=len(files), desc="prepare", unit="file", disable=not progress, file=sys.stderr)
    # Hash everything first so duplicates and earlier outputs are never parsed.
    firsts, dups = hash_unique(files, summary, bar)
    todo: list[tuple[str, str, str]] = []
    for path, sha in firsts:
        if sha[:16] in existing:
            summary.num_present += 1
            summary.outputs.append(existing[sha[:16]])
            bar.update()
        else:
            todo.append((str(path), sha, str(out / output_name(path, sha))))

    failed: dict[str, str] = {}  # sha → reason, for the duplicates of a failed file
    for i, ok, value in map_isolated(prepare_file, todo, jobs, timeout=timeout):
        path, sha, out_path = todo[i]
        reason, num_notes = value if ok else (value, 0)
        if reason is None:
            summary.num_written += 1
            summary.num_notes += num_notes
            summary.outputs.append(Path(out_path))
        else:
            summary.skipped[path] = reason
            failed[sha] = reason
        bar.update()
        bar.set_postfix(written=summary.num_written, skipped=summary.num_skipped, refresh=False)
    settle_duplicates(dups, failed, summary)
    bar.close()

    write_errors(out, summary)
    summary.outputs.sort()
    summary.seconds = time.perf_counter() - t0
    return summary


def write_errors(out: Path, summary: PrepareSummary) -> None:
    """``OUT/errors.jsonl``: every skipped file and its reason (rewritten by every run)."""
    write_reasons(out, sorted(summary.skipped.items()))


def write_reasons(out: Path, rows) -> None:
    """``OUT/errors.jsonl``, one ``{"path", "reason"}`` line per (path, reason) of ``rows``, in their order.
    The one writer of that file (prepare, shards, demo-data)."""
    atomic_write_jsonl(out / ERRORS_FILE, ({"path": str(p), "reason": r} for p, r in rows))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC", help="MIDI files or folders (searched recursively)")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="folder for the dataset, and errors.jsonl: every file left out and why")  # fmt: skip
    p.add_argument("-j", "--jobs", metavar="JOBS", help="worker processes (default: number of CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--format",
        default="json",
        choices=("json", "shards"),
        help="json: one file per piece; shards: a few thousand pieces per checksummed binary file, smaller"
        " than the MIDI and faster to load, for large corpora (default: %(default)s)",
    )
    p.add_argument(
        "--shard-size",
        default=None,
        metavar="N",
        help=f"pieces per shard with --format shards (default: {DEFAULT_PIECES_PER_SHARD})",
    )


def whole_number(text: str | None, name: str) -> int | None:
    """An option's text as an int (None stays None); a one-line UsageError naming ``name`` otherwise."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name} must be a whole number (got {text!r})") from None


def parse_jobs(text: str | None) -> int | None:
    """``-j`` as an int >= 1 (None: one per CPU); UsageError otherwise."""
    jobs = whole_number(text, "JOBS")
    if jobs is not None and jobs < 1:
        raise UsageError(f"JOBS must be at least 1 (got {jobs})")
    return jobs


def run(args) -> int:
    fmt = args.format
    if fmt == "shards":
        size = whole_number(args.shard_size, "--shard-size")
        if size is None:
            size = DEFAULT_PIECES_PER_SHARD
        summary = prepare_shards(
            args.sources, args.out, parse_jobs(args.jobs), not args.quiet, pieces_per_shard=size
        )
    else:
        summary = prepare(args.sources, args.out, jobs=parse_jobs(args.jobs), progress=not args.quiet)
    print(f"midiforge prepare: {summary.line()}")
    if summary.num_skipped:
        print(f"midiforge prepare: skipped files and reasons: {summary.out_dir / ERRORS_FILE}")
    if summary.num_usable == 0:
        raise UsageError(
            f"none of the {summary.num_found} files found is usable (see {summary.out_dir / ERRORS_FILE})"
        )
    return 0


# ------------------------------------------------------------------------------------ --format shards
_SHEET_TOKENIZER = None


def shard_piece(path: str, sha256: str) -> tuple[str | None, bytes, int]:
    """Worker task of :func:`prepare_shards`: ``(None, blob, num_notes)`` or ``(reason, b"", 0)``."""
    global _SHEET_TOKENIZER
    try:
        table = score_to_notes(load_score(Path(path).read_bytes()))
    except MidiReadError as e:
        return str(e), b"", 0
    except OSError as e:
        return f"unreadable: {e.strerror or e}", b"", 0
    if table.tpq <= 0:  # the same checks as midi.read_notes and prepare_file, so every piece reads back
        return f"invalid ticks per quarter note ({table.tpq})", b"", 0
    if len(table) == 0:
        return "no notes", b"", 0
    if _SHEET_TOKENIZER is None:
        _SHEET_TOKENIZER = MidiTokenizer()
    events, ws = _SHEET_TOKENIZER.events(table)
    table.sheet = {"config": _SHEET_TOKENIZER.base_fingerprint, "events": events, "word_starts": ws}
    return None, encode_piece(table), len(table)


def prepare_shards(sources, out_dir, jobs=None, progress=True, *, pieces_per_shard=DEFAULT_PIECES_PER_SHARD):
    """`prepare --format shards`: every usable MIDI file under ``sources`` into ``OUT/shard-NNNNN.mfshard``.

    Pieces are stored in sorted path order (duplicates once), so the same inputs give the same shards. Memory
    holds one shard's blobs at a time. A run rewrites the whole set (shards of an earlier, larger run that
    are beyond the new count are removed); readers must not read a set while it is being rewritten.
    """
    t0 = time.perf_counter()
    if pieces_per_shard < 1:
        raise UsageError(f"--shard-size must be at least 1 (got {pieces_per_shard})")
    files, out = sources_and_output(sources, out_dir)
    summary = PrepareSummary(out_dir=out, num_found=len(files))
    bar = tqdm(total=len(files), desc="prepare", unit="file", disable=not progress, file=sys.stderr)
    firsts, dups = hash_unique(files, summary, bar)
    todo = [(str(path), sha) for path, sha in firsts]

    failed: dict[str, str] = {}
    pending: dict[int, tuple] = {}  # results that came back before an earlier task's: written in task order
    buf: list[tuple[str, str, bytes]] = []
    nxt = 0

    def flush(final: bool = False) -> None:
        nonlocal buf
        while len(buf) >= pieces_per_shard or (final and buf):
            name = out / f"shard-{len(summary.outputs):05d}{SHARD_SUFFIX}"
            write_shard(name, buf[:pieces_per_shard])
            summary.outputs.append(name)
            buf = buf[pieces_per_shard:]

    for i, ok, value in map_isolated(shard_piece, todo, jobs):
        pending[i] = value if ok else (value, b"", 0)
        while nxt in pending:
            (path, sha), (reason, blob, num_notes) = todo[nxt], pending.pop(nxt)
            if reason is None:
                buf.append((path, sha, blob))
                summary.num_written += 1
                summary.num_notes += num_notes
            else:
                summary.skipped[path] = reason
                failed[sha] = reason
            nxt += 1
            flush()
        bar.update()
        bar.set_postfix(written=summary.num_written, skipped=summary.num_skipped, refresh=False)
    flush(final=True)
    settle_duplicates(dups, failed, summary)
    bar.close()
    for old in shard_files(out):  # shards of an earlier run with more pieces
        if old not in summary.outputs:
            old.unlink()
    write_errors(out, summary)
    summary.seconds = time.perf_counter() - t0
    return summary
