"""`midiforge studio`'s jobs over real HTTP: each page's own jobs (owner tokens), Cancel of a waiting or a running
job, the per-job limits (tokens refused in one line, seconds stopped between chunks, also in a real generation),
output-folder pruning, the --check-copies training set, the shell-quoted command and history labels, and the
piano roll's notes. The page itself is tested in test_studio_browser.py.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from pathlib import Path

import pytest
import symusic
from conftest import make_score
from test_studio import JOB_GUARD_S, OWNER, call, wait

from midiforge.errors import UsageError
from midiforge.generate import stopping
from midiforge.studio import catalog
from midiforge.studio.jobs import prune
from midiforge.studio.roll import roll
from midiforge.studio.server import Studio, serve_in_thread


@pytest.fixture(scope="module")
def ckpt(studio_ckpt) -> Path:
    return studio_ckpt


# --- owners, cancel, limits, pruning, copies, the piano roll -----------------------------------------------


def hold_worker(calls: list, started: threading.Event, release: threading.Event):
    """A stand-in for generate.run that holds the worker for seed 1 and checks for a stop between "chunks"
    (stopping.check, as the token loops do); the HTTP side and the queue are the real ones."""

    def fake_run(args):
        calls.append(args.seed)
        started.set()
        while args.seed == 1 and not release.is_set():
            stopping.check()
            time.sleep(0.01)
        return 0

    return fake_run


def test_each_page_sees_and_cancels_only_its_own_jobs(ckpt, tmp_path):
    started, release, calls = threading.Event(), threading.Event(), []
    studio = Studio([ckpt], tmp_path / "out", max_waiting=1, run=hold_worker(calls, started, release))
    server, url = serve_in_thread(studio)
    a, b = "page-a-0123456789abcdef", "page-b-0123456789abcdef"
    try:
        _, first = call(url, "/api/generate", {"options": {"seed": 1}}, owner=a)
        assert started.wait(JOB_GUARD_S)
        _, queued = call(url, "/api/generate", {"options": {"seed": 2}}, owner=a)
        status, full = call(url, "/api/generate", {"options": {"seed": 3}}, owner=b)
        assert status == 503 and "queue is full (1 waiting)" in full["error"]
        assert [j["id"] for j in call(url, "/api/jobs", owner=a)[1]] == [queued["id"], first["id"]]
        assert call(url, "/api/jobs", owner=b)[1] == [] and call(url, "/api/jobs", owner=None)[1] == []
        assert call(url, f"/api/jobs/{first['id']}", owner=b)[0] == 404  # another page's job: not found
        assert call(url, f"/api/jobs/{first['id']}/cancel", b"", owner=b)[0] == 404
        assert call(url, f"/api/jobs/{first['id']}/cancel", b"", owner=None)[0] == 400
        # Cancel a waiting job: it leaves the queue at once and frees its place.
        status, gone = call(url, f"/api/jobs/{queued['id']}/cancel", b"", owner=a)
        assert status == 200 and gone["state"] == "cancelled"
        status, mine = call(url, "/api/generate", {"options": {"seed": 4}}, owner=b)
        assert status == 200 and mine["queue_position"] == 1
        # Cancel the running job: it stops at its next check, and the next job runs.
        status, _ = call(url, f"/api/jobs/{first['id']}/cancel", b"", owner=a)
        stopped = wait(studio, first["id"])
        assert stopped["state"] == "cancelled" and stopped["error"] == "cancelled"
        assert wait(studio, mine["id"])["state"] == "done" and calls == [1, 4]
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        studio.queue.close()


def test_limits_refuse_an_oversized_job_in_one_line_and_stop_a_long_one(ckpt, tmp_path):
    started, release, calls = threading.Event(), threading.Event(), []
    studio = Studio([ckpt], tmp_path / "out", run=hold_worker(calls, started, release), max_job_seconds=0.3,
                    max_tokens_per_job=4096)  # fmt: skip
    server, url = serve_in_thread(studio)
    try:
        request = {"options": {"max_tokens": "12000", "ignore_eos": True}}
        status, body = call(url, "/api/generate", request)
        assert status == 400 and "\n" not in body["error"] and studio.queue.jobs == {}
        assert body["error"].startswith(
            "too long: 12000 tokens x 1 sample(s) is more than this studio's 4096"
        )
        status, body = call(url, "/api/generate", {"options": {"max_tokens": "2048", "num_samples": "3"}})
        assert status == 400 and "too long: 2048 tokens x 3 sample(s)" in body["error"]
        _, job = call(url, "/api/generate", {"options": {"seed": 1}})
        job = wait(studio, job["id"])
        assert job["state"] == "failed" and "stopped after 0.3 s, this studio's limit" in job["error"]
        assert 0.3 <= job["elapsed"] < 5
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        studio.queue.close()


def test_a_real_generation_stops_between_chunks(ckpt):
    from midiforge.checkpoint import load_inference
    from midiforge.generate.core import generate

    model, tok = load_inference(ckpt, "cpu")
    looks = []

    def reason():
        looks.append(1)
        return "cancelled" if len(looks) > 2 else None

    with stopping.stop_when(reason), pytest.raises(stopping.Stopped, match="cancelled"):
        generate(model, tok, None, max_new_tokens=400, ignore_eos=True, seed=0)
    assert len(looks) == 3  # checked every SYNC_EVERY tokens: stopped after the third look
    stopping.check()  # outside stop_when nothing stops


def test_command_is_shell_quoted_and_history_names_the_edit(ckpt, tmp_path):
    studio = Studio([ckpt], tmp_path / "out")
    server, url = serve_in_thread(studio)
    score = make_score(seed=4, num_notes=60)
    _, up = call(url, "/api/upload", score.dumps_midi(), ctype="application/octet-stream",
                 headers={"X-Filename": "my%20song.mid"})  # fmt: skip
    assert up["roll"]["tracks"][0]["number"] == 1 and len(up["roll"]["bars"]) >= 2  # drawn at once
    assert call(url, f"/api/roll/{up['id']}/prompt.mid") == (200, up["roll"])  # and again after a reload
    request = {"prompt": {"upload": up["id"]}, "options": {"infill": ["2-3"], "seed": 5, "max_tokens": 16}}
    status, job = call(url, "/api/generate", request)
    assert status == 200 and job["label"] == "infill bars 2-3 of upload my song.mid"
    status, quoted = call(url, "/api/generate", {"options": {"key": "D minor", "max_tokens": 16}})
    assert status == 200 and quoted["label"] == "from nothing"
    assert "--key=D minor" in shlex.split(quoted["command"]) and "'--key=D minor'" in quoted["command"]
    assert wait(studio, job["id"])["state"] == "done" and wait(studio, quoted["id"])["state"] == "done"
    server.shutdown()
    server.server_close()
    studio.queue.close()


def test_prune_keeps_the_newest_jobs_under_a_size_cap(tmp_path):
    folder = tmp_path / "jobs"
    for i in range(6):
        (folder / f"job{i}").mkdir(parents=True)
        (folder / f"job{i}" / "sample.wav").write_bytes(b"x" * 1000)
        os.utime(folder / f"job{i}", (1000 + i, 1000 + i))
    assert prune(folder, keep=4, max_bytes=None, busy=set()) == ["job0", "job1"]
    assert prune(folder, keep=10, max_bytes=2500, busy={"job2"}) == ["job3", "job4"]  # job2 runs: kept
    assert sorted(p.name for p in folder.iterdir()) == ["job2", "job5"]


def test_studio_prunes_its_output_folder_after_each_job(ckpt, tmp_path):
    def fake_run(args):
        Path(args.output).write_bytes(b"MThd" + b"\0" * 2000)  # a job's files, without a model
        return 0

    studio = Studio([ckpt], tmp_path / "out", run=fake_run, keep_jobs=2)
    try:
        jobs = [studio.submit({"options": {"seed": i}}, OWNER) for i in range(4)]
        ids = [j.id for j in jobs]
        assert all(j.done.wait(JOB_GUARD_S) for j in jobs)  # (a pruned job has left studio.queue.jobs)
        folders = lambda: sorted(p.name for p in (tmp_path / "out" / "jobs").iterdir())  # noqa: E731
        deadline = time.monotonic() + 10
        while (folders(), list(studio.queue.jobs)) != (
            sorted(ids[2:]),
            ids[2:],
        ) and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker prunes just after marking a job done
        assert folders() == sorted(ids[2:])
        assert list(studio.queue.jobs) == ids[2:]  # pruned jobs leave the history too
    finally:
        studio.queue.close()


def test_check_copies_finds_a_relative_training_set_or_says_why_not(ckpt, tmp_path):
    project = tmp_path / "project"
    (project / "data" / "train").mkdir(parents=True)
    make_score(seed=1, num_notes=40).dump_midi(str(project / "data" / "train" / "a.mid"))
    run = project / "runs" / "mine"
    run.mkdir(parents=True)
    config = {"train": {"train_dataset": ["data/train"]}}  # recorded where training ran: the project folder
    train, why = catalog.copy_source(run, config)
    assert train == [str(project / "data" / "train")] and why == ""
    train, why = catalog.copy_source(run, {"train": {"train_dataset": ["gone/train"]}})
    assert (
        train is None and why.startswith("the checkpoint's training set is not here") and "gone/train" in why
    )
    studio = Studio([ckpt], tmp_path / "out")
    try:
        studio.infos[0]["copies_off"] = why  # as if the checkpoint's set had gone
        with pytest.raises(UsageError, match="--check-copies: the checkpoint's training set is not here"):
            studio.submit({"options": {"check_copies": True}}, OWNER)
    finally:
        studio.queue.close()


def test_roll_numbers_bars_and_tracks_as_the_edits_do():
    s = symusic.Score(480)
    s.time_signatures.append(symusic.TimeSignature(0, 3, 4))
    s.tempos.append(symusic.Tempo(0, 60.0))
    for program, pitch in ((40, 70), (0, 60), (0, 48)):
        t = symusic.Track(program=program)
        t.notes.append(symusic.Note(0, 480 * 7, pitch, 80))
        s.tracks.append(t)
    r = roll(s)
    assert r["bars"] == [0.0, 3.0, 6.0, 9.0] and r["seconds"] == 7.0  # 3/4 at 60 bpm: 3 s a bar
    assert [(t["number"], t["name"]) for t in r["tracks"]] == [(3, "violin"), (1, "acoustic grand piano"),
                                                               (2, "acoustic grand piano #2")]  # fmt: skip
    assert r["tracks"][0]["notes"] == [[0.0, 7.0, 70, 80]]
