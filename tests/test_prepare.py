import ctypes
import json
import multiprocessing
import operator
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import conftest
import numpy as np
import pytest
import symusic
from conftest import corpus_dir

from midiforge.cli import main
from midiforge.data.prepare import ERRORS_FILE, output_name, prepare, reason_category
from midiforge.data.workers import map_isolated
from midiforge.notes.midi import JSON_SCHEMA
from midiforge.notes.read import read_notes


def make_midi(path: Path, seed: int, drums: bool = False) -> Path:
    """A small two-track piece whose notes depend on ``seed`` (so files differ in content)."""
    rng = np.random.default_rng(seed)
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 100.0 + seed))
    for program, is_drum in ((0, False), (0, True) if drums else (33, False)):
        track = symusic.Track("drums" if is_drum else f"p{program}", program, is_drum)
        for k in range(12):
            pitch = int(rng.integers(36, 84))
            track.notes.append(
                symusic.Note(k * 240, int(rng.integers(60, 480)), pitch, int(rng.integers(30, 120)))
            )
        score.tracks.append(track)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(score.dumps_midi())
    return path


def assert_same_notes(a, b) -> None:
    assert a.tpq == b.tpq
    for col in ("time", "duration", "pitch", "velocity", "program", "tempo_time", "ts_time"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col), err_msg=col)
    np.testing.assert_allclose(a.tempo_qpm, b.tempo_qpm, rtol=1e-6)


@pytest.fixture
def mixed(tmp_path):
    """A folder of 3 good files (one with a unicode name), a duplicate and 5 unusable files (2 identical)."""
    src = tmp_path / "src"
    good = [
        make_midi(src / "a.mid", 1),
        make_midi(src / "deep" / "er" / "B.MIDI", 2, drums=True),
        make_midi(src / "曲子 ü.MID", 3),
    ]
    shutil.copy(good[0], src / "deep" / "copy of a.mid")
    data = good[0].read_bytes()
    (src / "truncated.mid").write_bytes(data[: len(data) // 2])
    (src / "empty.midi").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (src / "noise.mid").write_bytes(noise)
    (src / "deep" / "noise again.mid").write_bytes(noise)
    (src / "header-only.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x00\x01\xe0")
    (src / "readme.txt").write_text("not a MIDI file")
    return src, good


def test_prepare_mixed_folder(mixed, tmp_path):
    src, good = mixed
    out = tmp_path / "out"
    s = prepare([src], out, jobs=2, progress=False)
    assert (s.num_found, s.num_written, s.num_present, s.num_duplicates, s.num_skipped) == (9, 3, 0, 1, 5)
    assert s.num_notes == 3 * 24
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text(encoding="utf-8").splitlines()]
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert reasons.keys() == {
        "truncated.mid",
        "empty.midi",
        "noise.mid",
        "noise again.mid",
        "header-only.mid",
    }
    assert reasons["empty.midi"] == "empty file (0 bytes)"
    assert reasons["truncated.mid"].startswith("unparsable MIDI: ")
    assert reasons["noise.mid"].startswith("unparsable MIDI: ")
    assert (
        reasons["noise again.mid"] == reasons["noise.mid"]
    )  # a copy of a bad file is listed, not a "duplicate"
    assert reasons["header-only.mid"] == "no notes"
    assert s.skipped_by_category() == {"unparsable MIDI": 3, "empty file": 1, "no notes": 1}

    # One JSON file per distinct good file, named by content hash, reading back to the MIDI's notes.
    jsons = sorted(out.glob("*.json"))
    assert jsons == s.outputs and len(jsons) == 3
    by_source = {}
    for j in jsons:
        doc = json.loads(j.read_text(encoding="utf-8"))
        assert doc["schema"] == JSON_SCHEMA and j.name == output_name(Path(doc["source"]), doc["sha256"])
        by_source[Path(doc["source"]).name] = j
    assert set(by_source) == {"a.mid", "B.MIDI", "曲子 ü.MID"}  # the first of two copies stands for both
    assert by_source["曲子 ü.MID"].name[0] != "_"  # unicode stem: hash-only name
    for g in good:
        assert_same_notes(read_notes(by_source[g.name]), read_notes(g))
    assert (read_notes(by_source["B.MIDI"]).program == 128).sum() == 12  # drums survive

    # A re-run parses nothing new and rewrites nothing.
    mtimes = {j: j.stat().st_mtime_ns for j in jsons}
    s2 = prepare([src], out, jobs=1, progress=False)
    assert (s2.num_written, s2.num_present, s2.num_duplicates, s2.num_skipped) == (0, 3, 1, 5)
    assert {j: j.stat().st_mtime_ns for j in jsons} == mtimes and s2.outputs == jsons
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_prepare_single_files_and_new_file_is_added(tmp_path):
    a, b = make_midi(tmp_path / "a.mid", 1), make_midi(tmp_path / "b.mid", 2)
    out = tmp_path / "out"
    assert prepare([a], out, progress=False).num_written == 1
    s = prepare([a, b], out, progress=False)
    assert (s.num_found, s.num_written, s.num_present) == (2, 1, 1)
    assert (out / ERRORS_FILE).read_text() == ""


def test_prepare_edge_corpus(tmp_path):
    out = tmp_path / "out"
    s = prepare([corpus_dir("edge")], out, jobs=2, progress=False)
    assert s.num_found == s.num_written + s.num_duplicates + s.num_skipped
    assert s.num_written > 40
    reasons = {Path(p).name: r for p, r in s.skipped.items()}
    assert reasons["Issue104_Bizarre_Love_Triangle2.mid"] == "unparsable MIDI: Get program=208"
    assert "control_value=168" in reasons["ValueError_Control168.mid"]
    assert reasons["negative-ticks-per-beat.mid"].startswith("unparsable MIDI")
    assert reasons["empty.mid"] == "no notes"
    assert "zero-ticks-per-beat.mid" in reasons
    logged = [json.loads(line) for line in (out / ERRORS_FILE).read_text(encoding="utf-8").splitlines()]
    assert {e["path"]: e["reason"] for e in logged} == s.skipped
    for j in s.outputs:
        assert len(read_notes(j)) > 0 and read_notes(j).tpq > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "-o", "OUT"],  # no SRC
        ["prepare", "SRC"],  # no -o
        ["prepare", "does/not/exist", "-o", "OUT"],
        ["prepare", "SRC", "-o", "OUT", "-j", "0"],
        ["prepare", "SRC", "-o", "OUT", "-j", "two"],
        ["prepare", "EMPTY", "-o", "OUT"],  # no MIDI file at all
        ["prepare", "BAD", "-o", "OUT"],  # only unusable files
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, tmp_path, capsys):
    make_midi(tmp_path / "src" / "a.mid", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "z.mid").write_bytes(b"")
    (tmp_path / "bad" / "r.mid").write_bytes(b"RIFF....")
    names = {"SRC": "src", "OUT": "out", "EMPTY": "empty", "BAD": "bad"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("midiforge prepare: error: "), err
    assert "Traceback" not in err
    if "bad" in argv[1]:
        assert len((tmp_path / "out" / ERRORS_FILE).read_text().splitlines()) == 2


def test_cli_ok(tmp_path, capsys):
    make_midi(tmp_path / "src" / "a.mid", 1)
    (tmp_path / "src" / "b.mid").write_bytes(b"")
    assert main(["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "-j", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 files found: 1 written" in out and "1 skipped (empty file: 1)" in out


def test_reason_category():
    assert reason_category("unparsable MIDI: Get program=208") == "unparsable MIDI"
    assert reason_category("empty file (0 bytes)") == "empty file"
    assert reason_category("no notes") == "no notes"


@pytest.mark.skipif(not hasattr(operator, "call"), reason="operator.call needs Python 3.11")
def test_map_isolated_survives_crashes_and_exceptions():
    tasks = [(abs, -i) for i in range(40)]
    tasks[3] = (ctypes.string_at, 0)  # segfault
    tasks[17] = (os._exit, 3)  # a worker that just exits
    tasks[26] = (int, "x")  # raises
    before = set(multiprocessing.active_children())
    # No timeout here: however slow the machine, a healthy task cannot be taken for a hung one.
    results = sorted(map_isolated(operator.call, tasks, jobs=2, timeout=None, batch_size=4))
    assert set(multiprocessing.active_children()) - before == set()  # no worker outlives the call
    assert [i for i, _, _ in results] == list(range(40))  # every task answered exactly once
    failed = {i: v for i, ok, v in results if not ok}
    assert failed == {
        3: "parser crashed (SIGSEGV)",
        17: "parser crashed (worker exit code 3)",
        26: "internal error: ValueError: invalid literal for int() with base 10: 'x'",
    }
    assert all(v == i for i, ok, v in results if ok)  # the tasks behind a crash ran on a new worker


@pytest.mark.skipif(not hasattr(operator, "call"), reason="operator.call needs Python 3.11")
def test_map_isolated_kills_a_task_past_its_timeout():
    before = set(multiprocessing.active_children())
    t0 = time.monotonic()
    # The task never ends by itself, so what stops it is the timeout, however loaded the machine.
    results = list(map_isolated(operator.call, [(time.sleep, 3600)], jobs=1, timeout=1.0))
    assert results == [(0, False, "parser timed out (> 1 s)")]
    assert time.monotonic() - t0 < 300  # killed, not waited for
    assert set(multiprocessing.active_children()) - before == set()  # and gone
    # How long recovery takes is measured by bench/bench_workers.py, not asserted here.


# --- the corpus helper (tests/conftest.py) -----------------------------------------------------------------


def test_corpus_dir_skips_locally_and_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "CORPUS", tmp_path / "no-corpus")
    for value in (None, "", "false", "0"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="shared corpus not found"):
            corpus_dir("pop909")
    for value in ("true", "True"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match=r"shared corpus not found at .*pop909.*CI=true"):
            corpus_dir("pop909")
    (tmp_path / "no-corpus" / "pop909").mkdir(parents=True)
    assert corpus_dir("pop909") == tmp_path / "no-corpus" / "pop909"  # present: no skip, even under CI


def test_corpus_is_found_beside_the_repository():
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "pyproject.toml").is_file()
    assert conftest.CORPUS == repo.parent / "shared" / "corpus"


# --- python -m midiforge -----------------------------------------------------------------------------------


def run_module(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "midiforge", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_python_dash_m_midiforge(tmp_path):
    ok = run_module("--help", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stderr == ""
    assert ok.stdout.startswith("usage: midiforge ")
    for command in ("prepare", "train", "generate", "plot", "demo-data"):
        assert command in ok.stdout

    bad = run_module("frobnicate", cwd=tmp_path)  # rejected by argparse
    assert bad.returncode == 2 and bad.stdout == ""
    errors = [line for line in bad.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("midiforge: error: ") and "frobnicate" in errors[0]
    assert bad.stderr.splitlines()[-1] == errors[0] and "Traceback" not in bad.stderr

    # An error found by the command itself: main() returns 2, and the module must exit with that code.
    missing = run_module(
        "prepare", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), "-q", cwd=tmp_path
    )
    assert missing.returncode == 2 and missing.stdout == ""
    assert len(missing.stderr.splitlines()) == 1 and missing.stderr.startswith("midiforge prepare: error: ")

    make_midi(tmp_path / "src" / "a.mid", 1)  # and a success exits 0
    done = run_module("prepare", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out").glob("*.json"))) == 1
