"""The studio's job queue: one worker thread runs ``midiforge generate`` on each request in turn.

A job belongs to the page that asked for it (its owner token, kept in that tab's session storage): the HTTP side
lists and cancels only the caller's own jobs. Cancel drops a waiting job at once and stops a running one between
chunks of tokens (:mod:`midiforge.generate.stopping`); the same check ends a job that runs longer than the
studio's limit. After each job the output folder is pruned to the newest jobs and a size cap.
"""

from __future__ import annotations

import collections
import contextlib
import io
import secrets
import shlex
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from midiforge.errors import MidiforgeError, UsageError
from midiforge.generate import command as generate_command
from midiforge.generate import stopping
from midiforge.studio.fields import (  # noqa: F401 -- the form's API, also reached through this module
    ID,
    SERVER_ONLY,
    generate_parser,
    option_fields,
    request_argv,
)

ACTIVE = ("queued", "running")


@dataclass
class Job:
    """One press of Generate: its settings, its state and, once done, its samples."""

    id: str
    checkpoint: str
    argv: list[str]  # generate's argv as run (server paths included)
    shown_argv: list[str]  # the same with the server's paths replaced by names (shown in the page)
    seed: int
    folder: Path
    prompt: str | None  # what the prompt was, for the page ("upload NAME", "sample 2 of JOB")
    request: dict  # the request as sent, so that the page can restore the settings from the history
    owner: str = ""  # the page's token: only that page lists, follows and cancels the job
    label: str = ""  # what the job does, for the history ("infill bars 3-4 of upload x.mid")
    state: str = "queued"  # queued → running → done | failed | cancelled
    error: str = ""
    report: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # served name → path in this job's folder
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)

    def summary(self, position: int | None = None) -> dict:
        now = time.time()
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "command": shlex.join(self.shown_argv),  # pastes into a shell as it reads: --key='D minor'
            "seed": self.seed,
            "prompt": self.prompt,
            "label": self.label,
            "request": self.request,
            "state": self.state,
            "error": self.error,
            "report": self.report,
            "samples": self.samples,
            "queue_position": position,
            "elapsed": round(((self.finished or now) - (self.started or now)), 2),
        }


def edit_label(args, prompt: str | None) -> str:
    """What a job does, in words: the edit and its region, and what it starts from."""
    what = prompt or "nothing"
    if args.infill:
        return f"infill bars {','.join(args.infill)} of {what}"
    if args.add_track:
        return f"add track {', '.join(args.add_track)} to {what}"
    if args.replace_track is not None:
        return f"replace track {args.replace_track} of {what}"
    if args.harmonize is not None:
        return f"harmonize {what} ({args.harmonize} voices)"
    return f"continue {what}" if prompt else "from nothing"


class JobQueue:
    """Generation requests, run one at a time by one worker thread from a bounded queue: two tabs (or two
    users) wait their turn instead of holding two models and two batches in memory at once."""

    def __init__(self, max_waiting: int = 4, run=None, *, max_seconds: float | None = None, after=None):
        self._run = run if run is not None else generate_command.run
        self.max_waiting = max_waiting
        self.max_seconds = max_seconds  # a running job stops (between chunks) after this long
        self._after = after  # called with each finished job, in the worker (pruning)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.jobs: dict[str, Job] = {}  # every job of this session still on disk, oldest first (the history)
        self._worker = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self._worker.start()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise UsageError(
                    f"the queue is full ({self.max_waiting} waiting); try again when a generation finishes"
                )
            self.jobs[job.id] = job
            self._waiting.append(job)
            self._cond.notify()

    def position(self, job_id: str) -> int | None:
        """1 for the next to run, None when not waiting."""
        with self._cond:
            return next((i + 1 for i, j in enumerate(self._waiting) if j.id == job_id), None)

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue now; a running one stops at its next check (between chunks)."""
        with self._cond:
            job.cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job.state, job.error, job.finished = "cancelled", "cancelled", time.time()
                job.done.set()

    def close(self) -> None:
        """Let the running job finish, drop the waiting ones, stop the worker (tests, scripts)."""
        with self._cond:
            while self._waiting:
                job = self._waiting.popleft()
                job.state, job.error = "failed", "the studio stopped"
                job.done.set()
            self._closed = True
            self._cond.notify()
        self._worker.join()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            return self._waiting.popleft() if self._waiting else None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            job.state, job.started = "running", time.time()
            try:
                self._execute(job)
                job.state = "done"
            except stopping.Stopped as e:
                job.state, job.error = ("cancelled" if job.cancel.is_set() else "failed"), str(e)
            except MidiforgeError as e:
                job.state, job.error = "failed", str(e)
            except (
                Exception
            ) as e:  # a bug must not take the studio down: one line for the page, stderr the rest
                traceback.print_exc(file=sys.stderr)
                job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
            finally:
                job.finished = time.time()
                job.done.set()
            if self._after is not None:
                try:
                    self._after(job)
                except Exception:  # pruning is housekeeping: a failure there must not stop the worker
                    traceback.print_exc(file=sys.stderr)

    def _stop_reason(self, job: Job) -> str | None:
        if job.cancel.is_set():
            return "cancelled"
        if self.max_seconds is not None and time.time() - (job.started or time.time()) > self.max_seconds:
            return f"stopped after {self.max_seconds:g} s, this studio's limit per job (--max-job-seconds)"
        return None

    def _execute(self, job: Job) -> None:
        args = generate_parser().parse_args(job.argv)
        buf = io.StringIO()
        # generate's per-sample report is what `run` prints; only this worker thread prints while it runs.
        with contextlib.redirect_stdout(buf), stopping.stop_when(lambda: self._stop_reason(job)):
            self._run(args)
        lines = buf.getvalue().splitlines()
        shown = [ln.replace(str(job.folder) + "/", "") for ln in lines]
        job.report = shown
        for i, path in enumerate(generate_command.output_paths(args.output, args.num_samples), start=1):
            if not path.is_file():
                continue
            sample = {"index": i, "files": {}, "report": ""}
            for kind, suffix in (("midi", ".mid"), ("audio", ".wav")):
                p = path.with_suffix(suffix)
                if p.is_file():
                    job.files[p.name] = p
                    sample["files"][kind] = f"/files/{job.id}/{p.name}"
            if "midi" in sample["files"]:
                sample["roll"] = f"/api/roll/{job.id}/{path.name}"  # the notes, for the page's piano roll
            prefix = f"{path.name}: "
            sample["report"] = next((ln[len(prefix) :] for ln in shown if ln.startswith(prefix)), "")
            job.samples.append(sample)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prune(
    folder: Path, keep: int, max_bytes: int | None, busy: set[str], created: dict | None = None
) -> list[str]:
    """Delete the oldest job folders under ``folder`` beyond the newest ``keep`` and until all of them hold at
    most ``max_bytes``; folders named in ``busy`` (queued, running, just finished) stay. Age: ``created``
    (name → submit time) for this session's jobs, the folder's modification time for older ones. The names
    deleted."""
    created = created or {}
    entries = sorted(
        (p for p in folder.iterdir() if p.is_dir()), key=lambda p: created.get(p.name, p.stat().st_mtime)
    )
    sizes = {p.name: folder_bytes(p) for p in entries}
    total, count, gone = sum(sizes.values()), len(entries), []
    for p in entries:
        over = count > keep or (max_bytes is not None and total > max_bytes)
        if not over:
            break
        if p.name in busy:
            continue
        shutil.rmtree(p, ignore_errors=True)
        total, count = total - sizes[p.name], count - 1
        gone.append(p.name)
    return gone
