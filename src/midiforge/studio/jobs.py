"""The studio's request handling: generate's own options as form fields, a request → generate's argv, and the
one-worker job queue that runs ``midiforge generate`` on it.

One validator: a request becomes the argv of ``midiforge generate`` and is parsed by the parser that
:func:`midiforge.generate.configure_parser` builds (type errors, unknown options), then run by
:func:`midiforge.generate.command.run` itself, whose UsageError is the one-line message the page shows. So every option
generate gains later (controls, infill, ...) appears in the page and is checked exactly as on the CLI.

Safety: options that name files (the checkpoint, the output, the prompt, -t/--train-dataset, and any later option whose
metavar says PATH/DIR/FILE/... ) are never taken from the client; the server sets its own. Every file goes into
the studio's output folder under names the server makes (random ids), and files are served only by looking
up those ids in memory, never by joining a client string to a path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import queue
import re
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from midiforge.errors import MidiforgeError, UsageError
from midiforge.generate import command as generate_command

# generate options the server owns: file paths, and how the server runs (device, files it renders).
SERVER_ONLY = {"checkpoint", "output", "prompt", "train_dataset", "wav", "pianoroll", "no_kv_cache", "device", "help"}
# A later option whose metavar names a file is hidden too, so that no client string becomes a path.
PATHLIKE_METAVAR = re.compile(r"PATH|DIR|FILE|CKPT|TRAIN|OUT|\.MID|\.JSON", re.IGNORECASE)
MAX_VALUE_CHARS = 200  # longest value of one option a request may carry
ID = re.compile(r"^[0-9a-f]{12}$")


class _Parser(argparse.ArgumentParser):
    """generate's parser, raising UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def generate_parser(configure=None) -> argparse.ArgumentParser:
    """The parser of ``midiforge generate`` (``configure`` defaults to generate.configure_parser)."""
    if configure is None:
        configure = generate_command.configure_parser
    p = _Parser(prog="midiforge generate", add_help=False)
    configure(p)
    return p


def _kind(action: argparse.Action) -> str | None:
    """The form control for an argparse action, None when the page cannot offer it."""
    if isinstance(
        action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._StoreConstAction
    ):
        return "flag"
    if isinstance(action, argparse._AppendAction):
        return "multi"
    if type(action) is argparse._StoreAction and action.nargs in (None, "?"):
        if action.choices is not None:
            return "choice"
        return {int: "int", float: "float"}.get(action.type, "text")
    return None


def exposed(action: argparse.Action) -> bool:
    """Whether the page offers this option (not positional, not server-owned, not a path, a known kind)."""
    if not action.option_strings or action.dest in SERVER_ONLY or action.help == argparse.SUPPRESS:
        return False
    if PATHLIKE_METAVAR.search(str(action.metavar or "")):
        return False
    return _kind(action) is not None


def _help(parser, action) -> str:
    params = dict(vars(action), prog=parser.prog)
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    try:
        return (action.help or "") % params
    except (KeyError, TypeError, ValueError):
        return action.help or ""


def option_fields(parser: argparse.ArgumentParser) -> list[dict]:
    """One field per exposed option, in the parser's order, with its group's title (the page's fieldsets)."""
    group_of = {}
    for g in parser._action_groups:  # argparse keeps no public list of groups
        for a in g._group_actions:
            title = "generation" if g.title in (None, "options", "optional arguments") else g.title
            group_of[id(a)] = re.split(r" \(|;", title)[0]  # "controls (checkpoints trained ...)" → "controls"
    fields = []
    for a in parser._actions:
        if not exposed(a):
            continue
        default = a.default if isinstance(a.default, int | float | str | bool) else None
        fields.append({
            "dest": a.dest,
            "flag": max(a.option_strings, key=len),
            "kind": _kind(a),
            "default": default,
            "help": _help(parser, a),
            "metavar": str(a.metavar or ""),
            "choices": [str(c) for c in a.choices] if a.choices is not None else None,
            "alone": a.nargs == "?",  # nargs="?": the flag may also be given without a value (true)
            "group": group_of.get(id(a), "generation"),
        })  # fmt: skip
    return fields


def request_argv(fields: list[dict], options: dict) -> list[str]:
    """The generate arguments of a request's options ({dest: value}); UsageError for anything not offered."""
    if not isinstance(options, dict):
        raise UsageError("options must be an object of option names and values")
    by_dest = {f["dest"]: f for f in fields}
    argv = []
    for dest, value in options.items():
        f = by_dest.get(dest)
        if f is None:
            raise UsageError(f"unknown option {str(dest)[:40]!r}")
        if f.get("alone") and value is True:
            argv.append(f["flag"])  # e.g. --harmonize with its const
            continue
        if f["kind"] == "flag":
            if not isinstance(value, bool):
                raise UsageError(f"{f['flag']}: expected true or false")
            argv += [f["flag"]] if value else []
            continue
        values = value if f["kind"] == "multi" and isinstance(value, list) else [value]
        for v in values:
            if v is None or (isinstance(v, str) and not v.strip()):
                continue  # an empty field: the option's default
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise UsageError(f"{f['flag']}: expected a value, not {type(v).__name__}")
            v = str(v).strip()
            if len(v) > MAX_VALUE_CHARS or any(ord(c) < 32 for c in v):
                raise UsageError(f"{f['flag']}: value too long or with control characters")
            argv.append(f"{f['flag']}={v}")  # '=' so a value starting with '-' stays a value
    return argv


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
    state: str = "queued"  # queued → running → done | failed
    error: str = ""
    report: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # served name → path in this job's folder
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def summary(self, position: int | None = None) -> dict:
        now = time.time()
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "command": " ".join(self.shown_argv),
            "seed": self.seed,
            "prompt": self.prompt,
            "request": self.request,
            "state": self.state,
            "error": self.error,
            "report": self.report,
            "samples": self.samples,
            "queue_position": position,
            "elapsed": round(((self.finished or now) - (self.started or now)), 2),
        }


class JobQueue:
    """Generation requests, run one at a time by one worker thread from a bounded queue: two tabs (or two
    users) wait their turn instead of holding two models and two batches in memory at once."""

    def __init__(self, max_waiting: int = 4, run=None):
        if run is None:
            run = generate_command.run
        self._run = run
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_waiting)
        self._waiting: list[str] = []
        self.jobs: dict[str, Job] = {}  # every job of this session, oldest first (the history)
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self._worker.start()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)

    def submit(self, job: Job) -> None:
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise UsageError(
                    f"the queue is full ({self._queue.maxsize} waiting); try again when a generation finishes"
                ) from None
            self.jobs[job.id] = job
            self._waiting.append(job.id)

    def position(self, job_id: str) -> int | None:
        """1 for the next to run, None when not waiting."""
        with self._lock:
            return self._waiting.index(job_id) + 1 if job_id in self._waiting else None

    def close(self) -> None:
        """Let the running job finish, drop the waiting ones, stop the worker (tests, scripts)."""
        with self._lock:
            while not self._queue.empty():
                job = self._queue.get_nowait()
                job.state, job.error = "failed", "the studio stopped"
                job.done.set()
                self._waiting.remove(job.id)
                self._queue.task_done()
        self._queue.put(None)  # type: ignore[arg-type]  # the worker's signal to stop
        self._worker.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job.id)
            job.state, job.started = "running", time.time()
            try:
                self._execute(job)
                job.state = "done"
            except MidiforgeError as e:
                job.state, job.error = "failed", str(e)
            except (
                Exception
            ) as e:  # a bug must not take the studio down: the page gets one line, stderr the rest
                traceback.print_exc(file=sys.stderr)
                job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
            finally:
                job.finished = time.time()
                job.done.set()
                self._queue.task_done()

    def _execute(self, job: Job) -> None:
        args = generate_parser().parse_args(job.argv)
        buf = io.StringIO()
        # generate's per-sample report is what `run` prints; only this worker thread prints while it runs.
        with contextlib.redirect_stdout(buf):
            self._run(args)
        lines = buf.getvalue().splitlines()
        shown = [ln.replace(str(job.folder) + "/", "") for ln in lines]
        job.report = shown
        for i, path in enumerate(generate_command.output_paths(args.output, args.num_samples), start=1):
            if not path.is_file():
                continue
            sample = {"index": i, "files": {}, "report": ""}
            for kind, suffix in (("midi", ".mid"), ("audio", ".wav"), ("pianoroll", ".png")):
                p = path.with_suffix(suffix)
                if p.is_file():
                    job.files[p.name] = p
                    sample["files"][kind] = f"/files/{job.id}/{p.name}"
            prefix = f"{path.name}: "
            sample["report"] = next((ln[len(prefix) :] for ln in shown if ln.startswith(prefix)), "")
            job.samples.append(sample)
