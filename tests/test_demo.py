import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from midiforge.cli import main
from midiforge.notes.read import read_notes

pytest.importorskip("music21")

from midiforge.data.demo import build_demo_corpus, list_chorales, split_of  # noqa: E402


def test_chorale_list_is_stable_and_split_is_about_80_20():
    chorales = list_chorales()
    names = [n for n, _ in chorales]
    assert 400 <= len(names) <= 420 and len(set(names)) == len(names)
    assert names[:3] == ["bwv1.6", "bwv2.6", "bwv3.6"]  # numbers sort as numbers
    assert "bwv846" not in names  # a piano prelude, not a chorale
    assert dict(chorales)["bwv277"].suffix == ".mxl"  # MusicXML preferred over the unparsable bwv277.krn
    num_val = sum(split_of(n) == "val" for n in names)
    assert 0.12 < num_val / len(names) < 0.28
    # The split is a fixed function of the name: pinned here, so a change of hash (or Python's randomised
    # hash(), or a dependence on order or --limit) would move chorales between train and val and fail this.
    first40 = "".join("v" if split_of(n) == "val" else "t" for n in names[:40])
    assert first40 == "tttttttttttvvttvttttvtttttvttttttttttttt"
    assert [n for n in names[:40] if split_of(n) == "val"] == [
        "bwv12.7",
        "bwv13.6",
        "bwv17.7",
        "bwv20.11",
        "bwv29.8",
    ]
    # ... and so is it in another process with another string hash seed (Python's hash() would differ).
    code = "from midiforge.data.demo import split_of; import sys; print(''.join(split_of(n)[0] for n in sys.argv[1:]))"
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code, *names[:40]], capture_output=True, text=True, env=env,
                              timeout=120, check=True)  # fmt: skip
        assert done.stdout.strip() == first40


def test_demo_data_limit_converts_splits_and_reuses(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo-data", str(out), "--limit", "4", "-j", "2", "-q"]) == 0
    assert "4 chorales: 4 converted, 0 reused, 0 failed" in capsys.readouterr().out
    files = sorted(out.glob("*/*.mid"))
    expected = [n for n, _ in list_chorales()[:4]]
    assert sorted(f.stem for f in files) == sorted(expected)
    # The split by tune is recorded; 20% of 4 chorales is not one chorale, so all four are training pieces.
    record = json.loads((out / "split.json").read_text())
    assert {Path(r["path"]).name: r["split"] for r in record["files"]} == {f.name: f.parent.name for f in files}
    assert [f.parent.name for f in files] == ["train"] * 4
    for f in files:
        notes = read_notes(f)
        assert len(notes) > 50 and len(set(notes.program.tolist())) >= 1
    assert (out / "errors.jsonl").read_text() == ""

    # A second run reuses every file: no conversion is even handed to a worker, and no file is rewritten.
    from midiforge.data import demo

    dispatched = []
    real_map = demo.map_isolated

    def recording_map(fn, tasks, *args, **kwargs):
        dispatched.extend(tasks)
        return real_map(fn, tasks, *args, **kwargs)

    monkeypatch.setattr(demo, "map_isolated", recording_map)
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    s = build_demo_corpus(out, limit=4, progress=False)
    assert dispatched == []
    assert (s.num_converted, s.num_reused, len(s.train) + len(s.val)) == (0, 4, 4)
    assert sorted(s.train + s.val) == files
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    # A file on the wrong side (an older split) is moved where its group goes, not converted again.
    os.replace(files[1], out / "val" / files[1].name)
    s = build_demo_corpus(out, limit=4, progress=False)
    assert dispatched == [] and files[1].is_file() and not (out / "val" / files[1].name).exists()

    # The recorder does see work when there is some: delete one file and it alone is converted again.
    files[0].unlink()
    s = build_demo_corpus(out, limit=4, jobs=1, progress=False)
    assert [Path(target).name for _src, target in dispatched] == [files[0].name]
    assert (s.num_converted, s.num_reused) == (1, 3) and files[0].is_file()


def test_demo_chorale_has_tempo_and_one_track_per_part(tmp_path):
    import symusic

    s = build_demo_corpus(tmp_path, limit=1, jobs=1, progress=False)
    (path,) = s.train + s.val
    score = symusic.Score(str(path))
    assert len(score.tempos) >= 1
    assert len([t for t in score.tracks if len(t.notes)]) >= 4  # soprano, alto, tenor, bass (+ instruments)


@pytest.mark.parametrize(
    "argv", [["demo-data"], ["demo-data", "OUT", "--limit", "0"], ["demo-data", "OUT", "-j", "x"]]
)
def test_demo_bad_arguments(argv, tmp_path, capsys):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("midiforge demo-data: error: ")


def test_errors_jsonl_lists_failures(tmp_path, monkeypatch):
    # A chorale that cannot be converted is reported, not fatal: simulate one with the known-bad bwv277.krn.
    from midiforge.data import demo

    real = demo.list_chorales()
    krn = real[0][1].parent / "bwv277.krn"
    monkeypatch.setattr(demo, "list_chorales", lambda: [("bwv277", krn), real[0]])
    s = demo.build_demo_corpus(tmp_path, progress=False)
    assert list(s.failed) == ["bwv277"] and "music21 could not convert it" in s.failed["bwv277"]
    (entry,) = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert entry["path"].endswith("bwv277.krn") and entry["reason"] == s.failed["bwv277"]
    assert len(s.train) + len(s.val) == 1


def test_without_music21_says_how_to_install(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "music21", None)  # makes `import music21` fail
    assert main(["demo-data", str(tmp_path)]) == 2
    assert "pip install music21" in capsys.readouterr().err
