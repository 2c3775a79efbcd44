"""`midiforge studio CKPT [CKPT ...]`: a local web page to generate, look at and listen to music.

Stack: the standard library's ThreadingHTTPServer and one static page (HTML, JS, CSS shipped in the package under
studio/static/, nothing fetched from a CDN); README "Studio" says why. The request handling lives in
jobs.py (options from generate's parser, the job queue); this module is the HTTP side and the command.

Endpoints: ``GET /`` the page, ``GET /static/NAME``, ``GET /api/config`` (checkpoints and generate's options as
fields), ``POST /api/upload`` (raw MIDI bytes → an upload id), ``POST /api/generate`` (JSON → a queued job),
``GET /api/jobs`` (the caller's history), ``GET /api/jobs/ID``, ``POST /api/jobs/ID/cancel``, ``GET /files/JOB/NAME``
(a job's files), ``GET /api/roll/JOB/NAME`` (a sample's notes for the page's piano roll; an upload's as
``/api/roll/UPLOAD/prompt.mid``).

Each page sends its owner token (a random string it keeps in the tab's session storage) in ``X-Studio-Owner``:
the job list, a job's status and Cancel answer only the jobs that token submitted. Every POST must carry it,
which also makes every POST a request that a page on another site cannot send without a CORS preflight.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from midiforge.device import resolve_device
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.notes.midi import MidiReadError, load_score
from midiforge.options import add_checkpoint, add_device
from midiforge.studio import catalog
from midiforge.studio.fields import generate_parser, option_fields, request_argv
from midiforge.studio.jobs import ACTIVE, ID, Job, JobQueue, edit_label, prune
from midiforge.studio.roll import roll

STATIC = {"index.html": "text/html", "studio.css": "text/css", "studio.js": "text/javascript",
          "form.js": "text/javascript", "roll.js": "text/javascript", "dom.js": "text/javascript"}  # fmt: skip
FILE_TYPES = {".mid": "audio/midi", ".wav": "audio/wav", ".png": "image/png"}
MAX_JSON_BYTES = 64 * 1024
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
OWNER = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # a page's owner token
# The page may load only what this server sends: a stray CDN reference would fail in the page (and in tests).
CSP = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; object-src 'none'"


class Studio:
    """The studio's state: checkpoints, the output folder, uploads, and the job queue (everything but HTTP)."""

    def __init__(self, checkpoints, out, *, device="cpu", max_upload_bytes=4 << 20, max_samples=8,
                 max_waiting=4, run=None, max_job_seconds=120.0, max_tokens_per_job=8192, keep_jobs=50,
                 max_out_bytes=500 << 20):  # fmt: skip
        self.checkpoints = [Path(c) for c in checkpoints]
        for c in self.checkpoints:
            if not (c / "config.json").is_file():
                raise UsageError(f"{c}: not a checkpoint directory (no config.json)")
        self.out = Path(out).resolve()
        try:
            (self.out / "uploads").mkdir(parents=True, exist_ok=True)
            (self.out / "jobs").mkdir(exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {self.out}: {e.strerror}") from e
        self.device = device
        self.max_upload_bytes = max_upload_bytes
        self.max_samples = max_samples
        self.max_tokens_per_job = max_tokens_per_job
        self.keep_jobs, self.max_out_bytes = keep_jobs, max_out_bytes
        self._files_lock = threading.Lock()  # submit/upload against pruning
        self.uploads: dict[str, tuple[Path, str]] = {}  # id → (path, shown name)
        self.fields = option_fields(generate_parser())
        self.queue = JobQueue(max_waiting, run, max_seconds=max_job_seconds, after=self._after)
        names = [c.name or str(c) for c in self.checkpoints]
        self.names = [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
        self.infos = [catalog.checkpoint_info(c, self.names[i], i) for i, c in enumerate(self.checkpoints)]

    def config(self) -> dict:
        return {
            "checkpoints": [{k: v for k, v in info.items() if k != "train"} for info in self.infos],
            "fields": self.fields,
            "choices": catalog.choices(),
            "max_upload_bytes": self.max_upload_bytes,
            "max_samples": self.max_samples,
            "max_tokens_per_job": self.max_tokens_per_job,
            "max_job_seconds": self.queue.max_seconds,
        }

    def _after(self, job: Job) -> None:
        """After each job: keep the newest jobs and uploads within the limits, never a waiting or running job
        or an upload one of them reads (under the lock that submit and upload take: no half-made job)."""
        with self._files_lock:
            active = [j for j in self.queue.jobs.values() if j.state in ACTIVE]
            busy = {j.id for j in active} | {job.id}
            busy |= {
                str(p["sample"][0])
                for j in active
                if isinstance(p := j.request.get("prompt"), dict) and "sample" in p
            }
            created = {j.id: j.created for j in self.queue.jobs.values()}
            for gone in prune(self.out / "jobs", self.keep_jobs, self.max_out_bytes, busy, created):
                self.queue.jobs.pop(gone, None)
            reading = {a for j in active for a in j.argv}
            uploads = [(u, p) for u, (p, _) in self.uploads.items() if str(p) not in reading]  # oldest first
            for uid, path in uploads[: max(0, len(self.uploads) - self.keep_jobs)]:
                path.unlink(missing_ok=True)
                del self.uploads[uid]

    def upload(self, data: bytes, name: str) -> dict:
        """Keep an uploaded MIDI prompt if it reads; UsageError (shown in the page) if it does not."""
        if len(data) > self.max_upload_bytes:
            raise UsageError(f"the file is larger than the upload limit ({self.max_upload_bytes} bytes)")
        try:
            score = load_score(data)
        except MidiReadError as e:
            raise UsageError(f"not a readable MIDI file: {e}") from e
        uid = JobQueue.new_id()
        path = self.out / "uploads" / f"{uid}.mid"  # the client's name is only shown, never a path
        shown = "".join(c for c in Path(name.replace("\\", "/")).name if c.isprintable())[:80] or "upload.mid"
        with self._files_lock:
            atomic_write_bytes(path, data)
            self.uploads[uid] = (path, shown)
        seconds = float(score.to("second").end()) if score.note_num() else 0.0
        return {
            "id": uid,
            "name": shown,
            "notes": score.note_num(),
            "seconds": round(seconds, 1),
            "roll": roll(score),
        }

    def own(self, owner: str | None) -> list[Job]:
        """The owner's jobs, newest first (none without a token)."""
        return [j for j in reversed(list(self.queue.jobs.values())) if owner and j.owner == owner]

    def roll_of(self, job_id: str, name: str) -> dict | None:
        """The piano roll of a job's MIDI file, or of an upload (``/api/roll/UPLOAD/prompt.mid``)."""
        job = self.queue.jobs.get(job_id)
        path = job.files.get(name) if job else None
        if job is None and name == "prompt.mid" and job_id in self.uploads:
            path = self.uploads[job_id][0]
        if path is None or path.suffix != ".mid" or not path.is_file():
            return None
        return roll(load_score(path))

    def _prompt(self, prompt, owner: str = "") -> tuple[Path | None, str | None]:
        """The server path and label of a request's prompt: None, {"upload": ID} or {"sample": [JOB, N]}."""
        if prompt is None:
            return None, None
        if isinstance(prompt, dict) and isinstance(prompt.get("upload"), str):
            hit = self.uploads.get(prompt["upload"])
            if hit is None:
                raise UsageError("unknown upload (upload the prompt again)")
            return hit[0], f"upload {hit[1]}"
        if isinstance(prompt, dict) and isinstance(prompt.get("sample"), list) and len(prompt["sample"]) == 2:
            job_id, n = prompt["sample"]
            job = self.queue.jobs.get(job_id) if isinstance(job_id, str) else None
            job = job if job is not None and job.owner == owner else None
            sample = next((s for s in job.samples if s["index"] == n), None) if job else None
            if sample is None or "midi" not in sample["files"]:
                raise UsageError("unknown sample to continue from")
            return job.files[sample["files"]["midi"].rsplit("/", 1)[1]], f"sample {n} of {job_id}"
        raise UsageError('prompt must be null, {"upload": ID} or {"sample": [JOB, N]}')

    def submit(self, request, owner: str = "") -> Job:
        """Check a Generate request as far as the parser goes and queue it; UsageError for a bad one."""
        if not isinstance(request, dict):
            raise UsageError("the request must be a JSON object")
        unknown = set(request) - {"checkpoint", "prompt", "options"}
        if unknown:
            raise UsageError(f"unknown request field {sorted(unknown)[0][:40]!r}")
        index = request.get("checkpoint", 0)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.checkpoints):
            raise UsageError(f"checkpoint must be one of 0..{len(self.checkpoints) - 1}")
        if not isinstance(request.get("options") or {}, dict):
            raise UsageError("options must be an object of option names and values")
        options = dict(request.get("options") or {})
        seed = options.get("seed")
        if seed is None or (isinstance(seed, str) and not seed.strip()):
            options["seed"] = secrets.randbelow(2**31)  # chosen here so that the page can show it
        user = request_argv(self.fields, options)
        prompt, label = self._prompt(request.get("prompt"), owner)
        job_id = JobQueue.new_id()
        folder = self.out / "jobs" / job_id
        server = [str(self.checkpoints[index]), "-o", str(folder / "sample.mid"), "--wav"]
        server += ["--device", self.device] + (["--prompt", str(prompt)] if prompt else [])
        args = generate_parser().parse_args(server + user)  # argparse's checks now, run()'s in the worker
        self._check_limits(args, self.infos[index])
        if args.check_copies and self.infos[index]["train"]:  # the recorded set, found above the checkpoint
            server += [f"--train-dataset={t}" for t in self.infos[index]["train"]]
        shown = ["midiforge", "generate", self.names[index], "-o", "sample.mid", *user]
        shown += ["--prompt", "prompt.mid"] if prompt else []
        job = Job(job_id, self.names[index], server + user, shown, args.seed, folder, label,
                  {**request, "options": options}, owner, edit_label(args, label))  # fmt: skip
        with self._files_lock:
            folder.mkdir()
            try:
                self.queue.submit(job)
            except UsageError:
                folder.rmdir()  # the queue is full: no folder left behind
                raise
        return job

    def _check_limits(self, args, info: dict) -> None:
        if args.num_samples > self.max_samples:
            raise UsageError(f"at most {self.max_samples} samples per request in the studio")
        tokens = args.max_tokens * max(args.num_samples, 1)
        if tokens > self.max_tokens_per_job:
            raise UsageError(
                f"too long: {args.max_tokens} tokens x {args.num_samples} sample(s) is more than this studio's"
                f" {self.max_tokens_per_job} tokens per job (--max-tokens-per-job); ask for fewer"
            )
        if args.check_copies and info["copies_off"]:
            raise UsageError(f"--check-copies: {info['copies_off']}")

    def summary(self, job: Job) -> dict:
        return job.summary(self.queue.position(job.id))


class Handler(BaseHTTPRequestHandler):
    server_version = "midiforge-studio"
    studio: Studio  # set on the subclass made by make_server
    loopback_only: bool

    def log_message(self, format, *args):  # quiet: the terminal shows the address and errors only
        pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the tab went away mid-answer: nothing to tell anyone

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _host_ok(self) -> bool:
        """On loopback, only requests naming a loopback host: a web page elsewhere cannot reach the studio
        through a DNS name that points at 127.0.0.1 (DNS rebinding)."""
        if not self.loopback_only:
            return True
        host = self.headers.get("Host") or ""
        name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return name.lower() in LOOPBACK_NAMES

    def _owner(self) -> str | None:
        token = self.headers.get("X-Studio-Owner") or ""
        return token if OWNER.match(token) else None

    def _body(self, limit: int) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return None
        if int(length) > limit:
            self.close_connection = True  # the body is not read: this connection cannot be reused
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"larger than the limit ({limit} bytes)")
            return None
        return self.rfile.read(int(length))

    def do_GET(self):
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        st = self.studio
        if path in ("/", "/index.html"):
            return self._static("index.html")
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "static" and parts[1] in STATIC:
            return self._static(parts[1])
        if path == "/api/config":
            return self._json(st.config())
        if path == "/api/jobs":
            return self._json([st.summary(j) for j in st.own(self._owner())])
        if len(parts) == 3 and parts[:2] == ["api", "jobs"]:
            job = next((j for j in st.own(self._owner()) if j.id == parts[2]), None)
            if job is not None:  # another page's job is "not found", as an unknown one
                return self._json(st.summary(job))
        if len(parts) == 4 and parts[:2] == ["api", "roll"] and ID.match(parts[2]):
            notes = st.roll_of(parts[2], parts[3])
            if notes is not None:
                return self._json(notes)
        if len(parts) == 3 and parts[0] == "files" and ID.match(parts[1]):
            job = st.queue.jobs.get(parts[1])
            file = job.files.get(parts[2]) if job else None  # a lookup: no client string reaches a path
            if file is not None:
                disposition = {"Content-Disposition": f'attachment; filename="{job.id}_{file.name}"'}
                return self._send(200, file.read_bytes(), FILE_TYPES[file.suffix],
                                  disposition if file.suffix == ".mid" else None)  # fmt: skip
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET

    def _static(self, name: str) -> None:
        body = resources.files("midiforge").joinpath("studio", "static", name).read_bytes()
        self._send(200, body, STATIC[name] + "; charset=utf-8")

    def do_POST(self):
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        # Content types a cross-site form cannot send without a CORS preflight (which this server never grants).
        owner = self._owner()
        if owner is None:
            self.close_connection = True  # the body is not read
            return self._error(HTTPStatus.BAD_REQUEST, "missing X-Studio-Owner (reload the page)")
        parts = self.path.strip("/").split("/")
        try:
            if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
                job = next((j for j in self.studio.own(owner) if j.id == parts[2]), None)
                if job is None:
                    return self._error(HTTPStatus.NOT_FOUND, "not found")
                self.studio.queue.cancel(job)
                return self._json(self.studio.summary(job))
            if self.path == "/api/upload":
                if ctype != "application/octet-stream":
                    return self._error(
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the file as application/octet-stream"
                    )
                data = self._body(self.studio.max_upload_bytes)
                if data is not None:
                    self._json(self.studio.upload(data, unquote(self.headers.get("X-Filename") or "")))
                return None
            if self.path == "/api/generate":
                if ctype != "application/json":
                    return self._error(
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request as application/json"
                    )
                data = self._body(MAX_JSON_BYTES)
                if data is None:
                    return None
                try:
                    request = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise UsageError("the request is not valid JSON") from None
                return self._json(self.studio.summary(self.studio.submit(request, owner)))
        except UsageError as e:
            status = HTTPStatus.SERVICE_UNAVAILABLE if "queue is full" in str(e) else HTTPStatus.BAD_REQUEST
            return self._error(status, str(e))
        return self._error(HTTPStatus.NOT_FOUND, "not found")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """What to tell the user when the studio listens beyond this machine (None on loopback)."""
    if is_loopback(host):
        return None
    return (
        f"listening on {host}, not only on this machine: anyone who can reach it can use the studio and its"
        " files (there is no login); use --host 127.0.0.1 unless you mean it"
    )


def make_server(studio: Studio, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    handler = type("StudioHandler", (Handler,), {"studio": studio, "loopback_only": is_loopback(host)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


# --- command line --------------------------------------------------------------------------------------------


def configure_parser(p) -> None:
    add_checkpoint(p, "checkpoint folders to choose from", many=True)
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--out", default="studio-out", metavar="DIR",
                   help="the only folder the studio writes to: uploads and generated files (default studio-out)")  # fmt: skip
    add_device(p)
    p.add_argument(
        "--max-upload-mb", type=float, default=4.0, metavar="MB", help="upload size limit (default 4)"
    )
    p.add_argument(
        "--max-samples", type=int, default=8, metavar="N", help="samples per request at most (default 8)"
    )
    p.add_argument("--queue", type=int, default=4, metavar="N", help="requests waiting at most (default 4)")
    p.add_argument("--max-job-seconds", type=float, default=120.0, metavar="S",
                   help="stop a generation running longer than this (default 120)")  # fmt: skip
    p.add_argument("--max-tokens-per-job", type=int, default=8192, metavar="N",
                   help="refuse a request for more new tokens than this, max tokens x samples (default 8192)")  # fmt: skip
    p.add_argument("--keep-jobs", type=int, default=50, metavar="N",
                   help="keep the files of the newest N jobs (and uploads) in --out (default 50)")  # fmt: skip
    p.add_argument("--max-out-mb", type=float, default=500.0, metavar="MB",
                   help="delete the oldest jobs' files while the jobs in --out hold more (default 500)")  # fmt: skip


def run(args) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (got {args.port})")
    if not args.max_upload_mb > 0 or args.max_samples < 1 or args.queue < 1:
        raise UsageError("--max-upload-mb must be > 0, --max-samples and --queue >= 1")
    if (
        not (args.max_job_seconds > 0 and args.max_out_mb > 0)
        or min(args.max_tokens_per_job, args.keep_jobs) < 1
    ):
        raise UsageError(
            "--max-job-seconds, --max-out-mb must be > 0; --max-tokens-per-job, --keep-jobs >= 1"
        )

    resolve_device(args.device)  # once here, not as the same failure of every request
    studio = Studio(args.checkpoints, args.out, device=args.device, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_samples=args.max_samples, max_waiting=args.queue, max_job_seconds=args.max_job_seconds,
                    max_tokens_per_job=args.max_tokens_per_job, keep_jobs=args.keep_jobs,
                    max_out_bytes=int(args.max_out_mb * 2**20))  # fmt: skip
    server = make_server(studio, args.host, args.port)
    warning = host_warning(args.host)
    if warning:
        print(f"midiforge studio: warning: {warning}", file=sys.stderr)
    print(f"midiforge studio: open {url_of(server)} (writes to {studio.out}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def serve_in_thread(studio: Studio, host: str = "127.0.0.1", port: int = 0):
    """(server, url) with the server answering from a daemon thread (tests, scripts); call server.shutdown()."""
    server = make_server(studio, host, port)
    threading.Thread(target=server.serve_forever, name="studio-http", daemon=True).start()
    return server, url_of(server)
