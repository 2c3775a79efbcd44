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
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from tqdm import tqdm

from midiforge.errors import UsageError
from midiforge.midi import (
    JSON_SCHEMA,
    MidiReadError,
    atomic_write_bytes,
    file_sha256,
    find_files,
    load_score,
    score_to_notes,
)

ERRORS_FILE = "errors.jsonl"
# A file that keeps one parser busy this long is treated like a crash: symusic parses a typical file in <1 ms.
DEFAULT_FILE_TIMEOUT_S = 120.0
_HASH_NAME = re.compile(r"(?:^|-)([0-9a-f]{16})\.json$")


def default_jobs() -> int:
    """The CPUs this process may run on (the affinity mask, not the machine's count, where known)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# Crash-isolated parallel map
# ---------------------------------------------------------------------------------------------------------


def _mp_context():
    # forkserver: workers fork from a clean single-threaded server (no inherited tqdm/torch threads), cheaply.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["midiforge.prepare"])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_main(conn, fn: Callable) -> None:
    """Run ``fn(*args)`` for each task of each batch received; answer one message per task, in order.

    Answering per task (not per batch) is what lets the parent name the task that killed this process: it is
    the first one of the batch without an answer.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:  # a parser crash is an expected event here: no core dump in the user's folder for it
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for i, args in batch:
            try:
                conn.send((i, True, fn(*args)))
            except Exception as e:  # fn handles expected failures itself; this is a bug or e.g. MemoryError
                conn.send((i, False, f"internal error: {type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
        self.proc.start()
        child.close()
        self.inflight: collections.deque[int] = collections.deque()
        self.since = time.monotonic()  # when the task at the head of ``inflight`` started

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"parser crashed ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"parser crashed (worker exit code {exitcode})"


def map_isolated(
    fn: Callable,
    tasks: Sequence[tuple],
    jobs: int | None = None,
    *,
    timeout: float | None = DEFAULT_FILE_TIMEOUT_S,
    batch_size: int | None = None,
) -> Iterator[tuple[int, bool, object]]:
    """Run ``fn(*tasks[i])`` in ``jobs`` worker processes; yield ``(i, ok, value)`` in completion order.

    ``ok`` is True with ``fn``'s return value, or False with a reason string when the call raised, killed
    its worker (segfault, ``os._exit``) or ran longer than ``timeout`` seconds. A dead worker is replaced and
    the other tasks carry on, so one bad input never costs more than itself. ``fn`` must be a module-level
    function (it is pickled by reference) that handles its own expected errors.
    """
    n = len(tasks)
    if n == 0:
        return
    jobs = max(1, min(jobs or default_jobs(), n))
    # Batches amortise the message round trip; small enough that the last ones finish together.
    batch_size = batch_size or max(1, min(64, n // (jobs * 8)))
    ctx = _mp_context()
    pending = collections.deque(range(n))
    workers: list[_Worker] = []
    remaining = n

    def refill(w: _Worker) -> None:
        # Keep up to two batches queued at each worker, so it never waits for the parent between batches.
        while pending and len(w.inflight) <= batch_size:
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            try:
                w.conn.send([(i, tasks[i]) for i in batch])
            except OSError:  # it just died: the batch goes back, the death is handled by the main loop
                pending.extendleft(reversed(batch))
                return
            if not w.inflight:
                w.since = time.monotonic()
            w.inflight.extend(batch)

    def drain(w: _Worker) -> Iterator[tuple[int, bool, object]]:
        nonlocal remaining
        while w.conn.poll():
            i, ok, value = w.conn.recv()
            w.inflight.remove(i)
            w.since = time.monotonic()
            remaining -= 1
            yield i, ok, value

    finished = False
    try:
        workers = [_Worker(ctx, fn) for _ in range(jobs)]
        for w in workers:
            refill(w)
        while remaining:
            by_handle = {h: w for w in workers for h in (w.conn, w.proc.sentinel)}
            ready = wait(list(by_handle), timeout=1.0 if timeout else None)
            for w in {id(by_handle[h]): by_handle[h] for h in ready}.values():
                try:
                    yield from drain(w)
                except (EOFError, OSError):
                    continue  # died: handled below
                refill(w)
            now = time.monotonic()
            for w in list(workers):
                if w.proc.is_alive():
                    if not (timeout and w.inflight and now - w.since > timeout):
                        continue
                    why = f"parser timed out (> {timeout:g} s)"
                else:
                    why = None
                    try:  # answers sent before it died are still in the pipe
                        yield from drain(w)
                    except Exception:  # EOF, or a message cut short by the crash
                        pass
                w.stop(kill=True)
                workers.remove(w)
                if w.inflight:
                    # Answers come in task order, so the first unanswered task is the one it died on.
                    culprit = w.inflight.popleft()
                    pending.extendleft(reversed(w.inflight))
                    remaining -= 1
                    yield culprit, False, why or _death_reason(w.proc.exitcode)
                if pending:
                    workers.append(_Worker(ctx, fn))
                    refill(workers[-1])
        finished = True
    finally:
        for w in workers:
            w.stop(kill=not finished)


# ---------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------


def output_name(path: Path, sha256: str) -> str:
    """``<sanitised stem>-<sha256[:16]>.json``; the hash alone when nothing of the stem survives (e.g. CJK)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).strip("._-")[:40]
    return f"{stem}-{sha256[:16]}.json" if stem else f"{sha256[:16]}.json"


def _existing_outputs(out_dir: Path) -> dict[str, Path]:
    """Prepared files already in ``out_dir``, by the first 16 hex digits of their content hash."""
    found = {}
    for entry in os.scandir(out_dir):
        m = _HASH_NAME.search(entry.name)
        if m and entry.is_file():
            found[m.group(1)] = Path(entry.path)
    return found


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
    doc = {"schema": JSON_SCHEMA, "source": path, "sha256": sha256, **table.to_json_dict()}
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
    files = find_files(sources)
    if not files:
        raise UsageError(f"no .mid/.midi files found in {', '.join(map(str, sources))}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    summary = PrepareSummary(out_dir=out, num_found=len(files))
    existing = _existing_outputs(out)

    bar = tqdm(total=len(files), desc="prepare", unit="file", disable=not progress, file=sys.stderr)
    # Hash everything first (fast, sequential I/O) so duplicates and earlier outputs are never parsed.
    seen: set[str] = set()  # hashes already stood for by a file of this run
    todo: list[tuple[str, str, str]] = []
    dups: list[tuple[str, str]] = []  # (path, sha) of later copies
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
        elif sha[:16] in existing:
            seen.add(sha)
            summary.num_present += 1
            summary.outputs.append(existing[sha[:16]])
            bar.update()
        else:
            seen.add(sha)
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
    for path, sha in dups:
        # A copy of an unusable file is unusable too: list it with the same reason rather than as a duplicate.
        if sha in failed:
            summary.skipped[path] = failed[sha]
        else:
            summary.num_duplicates += 1
    bar.close()

    lines = [
        json.dumps({"path": p, "reason": r}, ensure_ascii=False) + "\n"
        for p, r in sorted(summary.skipped.items())
    ]
    atomic_write_bytes(out / ERRORS_FILE, "".join(lines).encode("utf-8"))
    summary.outputs.sort()
    summary.seconds = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", metavar="SRC", help="MIDI files or folders (searched recursively)")
    p.add_argument("-o", "--out", metavar="OUT", help="folder for the JSON files and errors.jsonl (required)")
    p.add_argument("-j", "--jobs", metavar="JOBS", help="worker processes (default: number of CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def parse_jobs(text: str | None) -> int | None:
    """``-j`` as an int >= 1 (None: one per CPU); UsageError otherwise."""
    if text is None:
        return None
    try:
        jobs = int(text)
    except ValueError:
        raise UsageError(f"JOBS must be a whole number (got {text!r})") from None
    if jobs < 1:
        raise UsageError(f"JOBS must be at least 1 (got {jobs})")
    return jobs


def run(args) -> int:
    # Arguments are checked here rather than by argparse so that every mistake is one line and exit code 2.
    if not args.sources:
        raise UsageError("give at least one SRC file or folder")
    if not args.out:
        raise UsageError("give the output folder with -o OUT")
    summary = prepare(args.sources, args.out, jobs=parse_jobs(args.jobs), progress=not args.quiet)
    print(f"midiforge prepare: {summary.line()}")
    if summary.num_skipped:
        print(f"midiforge prepare: skipped files and reasons: {summary.out_dir / ERRORS_FILE}")
    if summary.num_usable == 0:
        raise UsageError(
            f"none of the {summary.num_found} files found is usable (see {summary.out_dir / ERRORS_FILE})"
        )
    return 0
