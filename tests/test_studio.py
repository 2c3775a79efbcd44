"""`midiforge studio`: request handling over real HTTP on 127.0.0.1 against a tiny checkpoint trained here.

Unit level: generate's options become the page's fields (and a later option appears by itself), a request
becomes generate's argv, every bad request gets one line, uploads (corrupt, oversized, hostile names), paths
that try to leave the output folder, the bounded queue, a crash inside a job. The real-browser test is in
test_studio_browser.py.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import symusic
from conftest import make_score

from midiforge import cli
from midiforge.errors import UsageError
from midiforge.generate.command import configure_parser
from midiforge.studio import jobs as studio_jobs
from midiforge.studio.server import Studio, host_warning, serve_in_thread
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import command as tr

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "-b", "16384"]
JOB_GUARD_S = 600  # a hang guard only: a job that never ends fails the test instead of hanging CI


def train_tiny(root: Path) -> Path:
    """A real checkpoint: BPE on three make_score pieces, one epoch of the tiny model (seconds on a CPU)."""
    for split, seeds in (("train", (0, 1, 2)), ("val", (9,))):
        (root / split).mkdir(parents=True)
        for s in seeds:
            make_score(seed=s, num_notes=120).dump_midi(str(root / split / f"p{s}.mid"))
    ckpt = root / "ckpt"
    ckpt.mkdir()
    tok = MidiTokenizer()
    tok.train_bpe(sorted(str(p) for p in (root / "train").iterdir()), len(tok) + 100)
    tok.save(ckpt / "tokenizer.json")
    argv = ["1", str(ckpt), "-t", str(root / "train"), "-v", str(root / "val"), *TINY]
    assert tr.main(argv) == 0
    return ckpt


@pytest.fixture(scope="module")
def ckpt(studio_ckpt) -> Path:
    return studio_ckpt


@pytest.fixture(scope="module")
def live(ckpt, tmp_path_factory):
    """(studio, base url, output folder) of a studio served on 127.0.0.1 from a thread."""
    out = tmp_path_factory.mktemp("studio_out") / "out"
    studio = Studio([ckpt], out, max_upload_bytes=64 * 1024, max_samples=3)
    server, url = serve_in_thread(studio)
    yield studio, url, out
    server.shutdown()
    server.server_close()
    studio.queue.close()


OWNER = "test-owner-0123456789"  # the page's token: each page sees only the jobs it submitted


def call(url, path, data=None, ctype="application/json", headers=None, owner=OWNER):
    """(status, JSON body) of one request as the page with token ``owner`` sends it; errors are answers too."""
    body = json.dumps(data).encode() if isinstance(data, dict | list) else data
    headers = {"X-Studio-Owner": owner, **(headers or {})} if owner else dict(headers or {})
    req = urllib.request.Request(url.rstrip("/") + path, data=body, headers=headers)
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req) as r:
            raw, status, ctype_back = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype_back = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, (json.loads(raw) if ctype_back.startswith("application/json") else raw)


def wait(studio, job_id) -> dict:
    assert studio.queue.jobs[job_id].done.wait(JOB_GUARD_S)
    return studio.summary(studio.queue.jobs[job_id])


def notes_of(data: bytes) -> list[tuple]:
    s = symusic.Score.from_midi(data)
    return sorted(
        (t.program, t.is_drum, n.time, n.duration, n.pitch, n.velocity) for t in s.tracks for n in t.notes
    )


# --- options and argv (no server) ----------------------------------------------------------------------------


def test_fields_are_generates_options_minus_paths_and_server_settings():
    parser = studio_jobs.generate_parser()
    fields = {f["dest"]: f for f in studio_jobs.option_fields(parser)}
    for action in parser._actions:
        hidden = not action.option_strings or action.dest in studio_jobs.SERVER_ONLY
        assert (action.dest in fields) != hidden, action.dest
    for path_option in ("checkpoint", "output", "prompt", "train"):
        assert path_option not in fields
    assert fields["temperature"]["kind"] == "float" and fields["temperature"]["default"] == 1.0
    assert fields["seed"]["kind"] == "int" and fields["ignore_eos"]["kind"] == "flag"
    assert fields["key"]["group"] == "controls" and fields["max_tokens"]["group"] == "generation"
    assert "(default: 48)" in fields["copy_threshold"]["help"]  # %(default)s expanded like --help does


def test_an_option_added_to_generate_later_appears_and_is_parsed():
    def configure(p):
        configure_parser(p)
        g = p.add_argument_group("editing (a later issue)")
        g.add_argument("--bars-to-redo", metavar="BARS", help="bars")
        g.add_argument("--voice", action="append", metavar="NAME", help="repeatable")
        g.add_argument("--style-file", metavar="PATH", help="a path: never from the client")
        g.add_argument("--voices", nargs="?", const=3, type=int, metavar="N", help="alone or with a value")

    parser = studio_jobs.generate_parser(configure)
    fields = studio_jobs.option_fields(parser)
    by = {f["dest"]: f for f in fields}
    assert by["bars_to_redo"]["group"] == "editing" and by["voice"]["kind"] == "multi"
    assert "style_file" not in by
    argv = studio_jobs.request_argv(fields, {"bars_to_redo": "9-16", "voice": ["bass", "-drums"]})
    args = parser.parse_args(["ck", "-o", "x.mid", *argv])
    assert args.bars_to_redo == "9-16" and args.voice == ["bass", "-drums"]
    assert by["voices"]["alone"] and by["voices"]["kind"] == "int"
    for value, parsed in ((True, 3), ("4", 4)):
        argv = studio_jobs.request_argv(fields, {"voices": value})
        assert parser.parse_args(["ck", "-o", "x.mid", *argv]).voices == parsed
    with pytest.raises(UsageError, match="unknown option 'style_file'"):
        studio_jobs.request_argv(fields, {"style_file": "/etc/passwd"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"output": "/tmp/elsewhere.mid"}, "unknown option 'output'"),
        ({"prompt": "../../secret.mid"}, "unknown option 'prompt'"),
        ({"checkpoint": "/"}, "unknown option 'checkpoint'"),
        ({"train": "/etc"}, "unknown option 'train'"),
        ({"device": "cuda"}, "unknown option 'device'"),
        ({"ignore_eos": "yes"}, "--ignore-eos: expected true or false"),
        ({"temperature": {"a": 1}}, "--temperature: expected a value, not dict"),
        ({"key": "C\nmajor"}, "control characters"),
        ({"tag": "x" * 500}, "value too long"),
    ],
)
def test_request_argv_refuses(options, message):
    fields = studio_jobs.option_fields(studio_jobs.generate_parser())
    with pytest.raises(UsageError, match=message):
        studio_jobs.request_argv(fields, options)


def test_request_argv_keeps_negative_values_as_values():
    fields = studio_jobs.option_fields(studio_jobs.generate_parser())
    argv = studio_jobs.request_argv(fields, {"temperature": "-1", "seed": 3, "ignore_eos": True, "top_k": ""})
    assert argv == ["--temperature=-1", "--seed=3", "--ignore-eos"]


def test_host_warning_only_off_loopback():
    assert (
        host_warning("127.0.0.1") is None
        and host_warning("localhost") is None
        and host_warning("::1") is None
    )
    assert "anyone who can reach it" in host_warning("0.0.0.0")


def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys):
    assert cli.main(["studio", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert cli.main(["studio", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


# --- over HTTP ---------------------------------------------------------------------------------------------


def test_page_and_assets_come_from_the_package_only(live):
    _, url, _ = live
    status, html = call(url, "/")
    assert status == 200 and b"/static/studio.js" in html and b"/static/studio.css" in html
    for name in ("studio.js", "studio.css"):
        status, body = call(url, f"/static/{name}")
        assert status == 200 and len(body) > 500
        assert b"http://" not in body and b"https://" not in body and b"//cdn" not in body
    with urllib.request.urlopen(url) as r:
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    status, config = call(url, "/api/config")
    (info,) = config["checkpoints"]
    assert info["name"] == "ckpt" and info["tags"] == [] and info["infill"] and info["copies_off"] == ""
    assert "train" not in info and config["max_samples"] == 3  # the server's paths stay on the server
    assert "3/4" in info["time_sigs"] and "D minor" in config["choices"]["keys"]
    assert (
        config["choices"]["instruments"][0] == "acoustic grand piano"
        and config["choices"]["levels"][0] == "low"
    )
    assert {f["dest"] for f in config["fields"]} >= {"seed", "temperature", "num_samples", "instruments"}


def test_generate_matches_the_cli_and_continue_from_a_sample(live, ckpt, tmp_path):
    studio, url, out = live
    options = {"seed": "11", "num_samples": "2", "max_tokens": "48", "top_p": "0.95"}
    status, job = call(url, "/api/generate", {"checkpoint": 0, "prompt": None, "options": options})
    assert status == 200 and job["state"] in ("queued", "running") and job["seed"] == 11
    job = wait(studio, job["id"])
    assert job["state"] == "done", job["error"]
    assert len(job["samples"]) == 2 and "--seed=11" in job["command"]
    assert cli.main(["generate", str(ckpt), "-o", str(tmp_path / "cli.mid"), "--seed", "11", "-n", "2",
                     "--max-tokens", "48", "--top-p", "0.95"]) == 0  # fmt: skip
    for s in job["samples"]:
        assert "new tokens (stopped:" in s["report"] and str(out) not in s["report"]
        status, midi = call(url, s["files"]["midi"])
        assert status == 200 and notes_of(midi) == notes_of((tmp_path / f"cli_{s['index']}.mid").read_bytes())
        status, wav = call(url, s["files"]["audio"])
        assert status == 200 and wav[:4] == b"RIFF" and len(wav) > 44
        status, notes = call(url, s["roll"])  # the page's piano roll: the file's notes, in seconds
        assert status == 200 and sum(len(t["notes"]) for t in notes["tracks"]) == len(notes_of(midi))
        assert notes["bars"][0] == 0 and notes["bars"][-1] >= notes["seconds"]
    # "Continue from this": the sample is the next prompt, found by id, never by a path from the client.
    request = {
        "checkpoint": 0,
        "prompt": {"sample": [job["id"], 2]},
        "options": {"max_tokens": "32", "seed": 1},
    }
    status, cont = call(url, "/api/generate", request)
    assert status == 200 and cont["prompt"] == f"sample 2 of {job['id']}"
    assert cont["label"] == f"continue sample 2 of {job['id']}"
    status, other = call(url, "/api/generate", request, owner="another-page-0123456789")
    assert status == 400 and other["error"] == "unknown sample to continue from"  # not that page's job
    cont = wait(studio, cont["id"])
    assert cont["state"] == "done", cont["error"]
    _, first = call(url, job["samples"][1]["files"]["midi"])
    _, continued = call(url, cont["samples"][0]["files"]["midi"])
    assert len(notes_of(continued)) >= len(notes_of(first))  # the prompt's notes come first
    status, history = call(url, "/api/jobs")
    ids = [h["id"] for h in history]
    assert ids.index(cont["id"]) < ids.index(job["id"])  # newest first
    assert history[ids.index(job["id"])]["request"]["options"]["seed"] == "11"


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({"options": {"seed": "x"}}, "argument --seed: invalid int value: 'x'"),
        ({"options": {"num_samples": "9"}}, "at most 3 samples per request"),
        ({"checkpoint": 4}, "checkpoint must be one of 0..0"),
        ({"checkpoint": "../ckpt"}, "checkpoint must be one of 0..0"),
        ({"model": "x"}, "unknown request field 'model'"),
        ({"options": ["--output", "/tmp/x.mid"]}, "options must be an object"),
        ({"options": {"output": "../../x.mid"}}, "unknown option 'output'"),
        ({"prompt": "/etc/passwd"}, "prompt must be null"),
        ({"prompt": {"upload": "../../etc/passwd"}}, "unknown upload"),
        ({"prompt": {"sample": ["../jobs", 1]}}, "unknown sample"),
        ([1, 2], "the request must be a JSON object"),
    ],
)
def test_bad_generate_requests_get_one_line(live, request_body, message):
    studio, url, _ = live
    before = len(studio.queue.jobs)
    status, body = call(url, "/api/generate", request_body)
    assert status == 400 and message in body["error"] and "\n" not in body["error"]
    assert len(studio.queue.jobs) == before  # nothing queued


def test_out_of_range_values_fail_in_generates_own_check(live):
    studio, url, _ = live
    status, job = call(url, "/api/generate", {"options": {"temperature": "-1", "max_tokens": "8"}})
    assert status == 200
    job = wait(studio, job["id"])
    assert job["state"] == "failed" and job["error"] == "temperature must be > 0 (got -1.0)"


def test_malformed_http_requests(live):
    _, url, _ = live
    status, body = call(url, "/api/generate", b"{not json", ctype="application/json")
    assert status == 400 and body["error"] == "the request is not valid JSON"
    status, body = call(url, "/api/generate", b"{}", ctype="text/plain")  # what a cross-site form could send
    assert status == 415
    status, body = call(url, "/api/config", headers={"Host": "evil.example:7860"})
    assert status == 403 and body["error"] == "unexpected Host header"


def test_uploads_corrupt_oversized_and_hostile_names(live, tmp_path):
    studio, url, out = live
    for corrupt in (b"", b"MThd\x00\x00\x00\x06garbage", Path(__file__).read_bytes()[:2000]):
        status, body = call(url, "/api/upload", corrupt, ctype="application/octet-stream")
        assert (
            status == 400
            and body["error"].startswith("not a readable MIDI file")
            and "\n" not in body["error"]
        )
    assert call(url, "/api/config")[0] == 200  # still serving
    status, body = call(url, "/api/upload", b"\0" * (64 * 1024 + 1), ctype="application/octet-stream")
    assert status == 413 and "limit" in body["error"]
    score = make_score(seed=3, num_notes=40)
    midi = score.dumps_midi()
    name = {"X-Filename": "..%2F..%2F..%2Fevil.mid"}
    status, body = call(url, "/api/upload", midi, ctype="application/octet-stream", headers=name)
    assert status == 200 and body["name"] == "evil.mid" and body["notes"] == score.note_num()
    assert (out / "uploads" / f"{body['id']}.mid").read_bytes() == midi
    assert not list(out.parent.parent.rglob("evil.mid"))
    status, job = call(
        url, "/api/generate", {"prompt": {"upload": body["id"]}, "options": {"max_tokens": "8"}}
    )
    assert status == 200 and job["prompt"] == "upload evil.mid" and "--prompt prompt.mid" in job["command"]
    assert wait(studio, job["id"])["state"] == "done"


@pytest.mark.parametrize(
    "path",
    [
        "/files/{job}/../../ckpt/config.json",
        "/files/{job}/..%2F..%2Fuploads",
        "/files/{job}/config.json",
        "/files/../{job}/sample_1.mid",
        "/files/%2e%2e/config.json",
        "/static/../studio.py",
        "/static/..%2Fstudio.py",
        "/api/jobs/../../etc/passwd",
        "//etc/passwd",
    ],
)
def test_paths_never_leave_the_studios_files(live, path):
    studio, url, _ = live
    job = next(iter(studio.queue.jobs), "0" * 12)
    status, body = call(url, path.format(job=job))
    assert status == 404 and body == {"error": "not found"}


def test_bounded_queue_and_a_crashing_job(ckpt, tmp_path):
    started, release = threading.Event(), threading.Event()
    calls = []

    def fake_run(args):  # stands in for generate.run to hold the worker; the HTTP side is the real one
        calls.append(args.seed)
        started.set()
        if args.seed == 1:
            assert release.wait(JOB_GUARD_S)
        if args.seed == 2:
            raise RuntimeError("boom")
        return 0

    studio = Studio([ckpt], tmp_path / "out", max_waiting=1, run=fake_run)
    server, url = serve_in_thread(studio)
    try:
        _, first = call(url, "/api/generate", {"options": {"seed": 1}})
        assert started.wait(JOB_GUARD_S)  # the worker holds the first job
        status, second = call(url, "/api/generate", {"options": {"seed": 2}})
        assert status == 200 and second["queue_position"] == 1
        status, third = call(url, "/api/generate", {"options": {"seed": 3}})
        assert status == 503 and "queue is full (1 waiting)" in third["error"]
        release.set()
        assert wait(studio, first["id"])["state"] == "done"
        crashed = wait(studio, second["id"])
        assert crashed["state"] == "failed" and crashed["error"] == "internal error: RuntimeError: boom"
        _, fourth = call(url, "/api/generate", {"options": {"seed": 4}})
        assert wait(studio, fourth["id"])["state"] == "done" and calls == [1, 2, 4]
    finally:
        server.shutdown()
        server.server_close()
        studio.queue.close()
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert all(p.parts[0] == "out" for p in written)
