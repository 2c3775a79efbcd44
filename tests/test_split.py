"""`train` without -v: the grouped validation split, CKPT/best, --patience and the preset chosen from the data.

Tiny models on small MIDI files written here (CPU, seconds each).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_score

from midiforge import checkpoint as ck
from midiforge.data import split as sp
from midiforge.train import command as tr
from midiforge.train import loop as loop_mod
from midiforge.train.sizing import choose_preset

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "-e",
    "64",
    "-b",
    "65536",
    "--vocab-size",
    "980",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 different pieces, 2 exact copies of p0 and 2 transpositions of p1: 10 files, 6 groups."""
    root = tmp_path_factory.mktemp("music")
    for i in range(6):
        make_score(seed=i, num_notes=40).dump_midi(str(root / f"p{i}.mid"))
    for name in ("copy_a", "copy_b"):
        shutil.copy(root / "p0.mid", root / f"{name}.mid")
    for shift in (3, -5):
        make_score(seed=1, num_notes=40).shift_pitch(shift).dump_midi(str(root / f"p1_up{shift}.mid"))
    return root


def _family(path: str) -> str:
    stem = Path(path).stem
    return "p0" if stem.startswith("copy") else stem.split("_")[0]


def test_groups_never_straddle_the_split_and_the_seed_decides(folder):
    files = sorted(folder.glob("*.mid"))
    seen_family_in_val = False
    for seed in range(6):
        split = sp.make_split(files, 0.5, seed, jobs=1)
        # Copies and transpositions form one group each; the four other pieces stand alone.
        assert sorted(Counter(split.groups).values()) == [1, 1, 1, 1, 3, 3]
        sides = {}
        for f, g, v in zip(split.files, split.groups, split.val, strict=True):
            assert sides.setdefault(g, v) == v  # every group wholly on one side
            assert _family(f) == _family(split.files[split.groups.index(g)])
        assert 1 <= sum(split.val) <= 5  # floor(0.5 * 10): never more than the share
        seen_family_in_val |= any(
            v and _family(f) in ("p0", "p1") for f, v in zip(split.files, split.val, strict=True)
        )
        again = sp.make_split(files, 0.5, seed, jobs=1)
        assert again.val == split.val and again.groups == split.groups  # seeded: the same every time
    assert seen_family_in_val  # the groups of three do go to validation for some seeds
    assert sp.make_split(files[:4], 0.2, 0, jobs=1).val == [False] * 4  # floor(0.2 * 4) = 0: no validation


def _train(epochs, ckpt, folder, *extra) -> int:
    return tr.main([str(epochs), str(ckpt), "-t", str(folder), *TINY, *extra])


def test_without_v_the_split_is_recorded_validated_and_reused(folder, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert _train(1, ckpt, folder, "--val-share", "0.3") == 0
    out = capsys.readouterr().out
    assert "validation split in" in out and "7 training / 3 validation files" in out
    record = json.loads((ckpt / "split.json").read_text())
    assert record["val_share"] == 0.3 and record["seed"] == 0
    val = [r["path"] for r in record["files"] if r["split"] == "val"]
    assert len(val) == 3
    rows = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    assert rows[0]["val_loss"] is not None and rows[0]["val_bits_per_note"] is not None
    # The tokenizer learned from the training side only; the validation files are not in the training set.
    assert all(str(v) not in ck.load(ckpt).state["data"]["files"] for v in val)
    # Resume: another share and a new file change nothing; the split is read back as it was.
    (tmp_path / "more").mkdir()
    extra = tmp_path / "more" / "late.mid"
    make_score(seed=42, num_notes=40).dump_midi(str(extra))
    before = (ckpt / "split.json").read_bytes()
    assert tr.main(["2", str(ckpt), "-t", str(folder), "-t", str(extra), *TINY, "--val-share", "0.5"]) == 0
    captured = capsys.readouterr()
    assert (ckpt / "split.json").read_bytes() == before
    assert "kept from the run's start" in captured.out
    assert (
        "1 file(s) under -t/--train-dataset are not in" in captured.err
        and "--val-share 0.5 ignored" in captured.err
    )
    assert len(json.loads((ckpt / "metrics.json").read_text())["epochs"]) == 2
    # CKPT/best holds an inference checkpoint of the lowest validation epoch.
    rows = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    best = min(rows, key=lambda r: r["val_bits_per_note"])
    assert ck.read_best(ckpt)["epoch"] == best["epoch"]
    model, tok = ck.load_inference(ckpt / "best")
    assert model.config.vocab_size == len(tok)
    # The copy check's training set is the training side of the split, not the whole -t folder.
    from midiforge.measure.copycheck import training_files

    files, origin = training_files(ck.read_config(ckpt / "best"), None, ckpt / "best")
    assert "split.json" in origin and not {str(f) for f in files} & set(val)
    # evaluate without -v measures exactly the held-out side, from CKPT and from CKPT/best alike.
    from midiforge import cli

    for where in (ckpt, ckpt / "best"):
        report = tmp_path / f"report_{where.name}.json"
        assert cli.main(["evaluate", str(where), "-o", str(report), "--device", "cpu"]) == 0
        got = json.loads(report.read_text())
        assert "validation side of" in got["data"] and "split.json" in got["data"]
        assert sorted(r["name"] for r in got["likelihood"]["pieces"]) == sorted(val)
    explicit = tmp_path / "report_v.json"
    assert cli.main(["evaluate", str(ckpt), "-v", *val, "-o", str(explicit), "--device", "cpu"]) == 0
    want = json.loads(explicit.read_text())["likelihood"]["total"]["bits_per_note"]
    assert json.loads((tmp_path / "report_ckpt.json").read_text())["likelihood"]["total"]["bits_per_note"] == want


def test_val_share_0_trains_without_validation(folder, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert _train(1, ckpt, folder, "--val-share", "0") == 0
    (row,) = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    assert row["val_loss"] is None and row["val_bits_per_note"] is None
    assert not (ckpt / "split.json").exists() and not (ckpt / "best").exists()
    assert len(ck.load(ckpt).state["data"]["files"]) == 10
    # Nothing held out: evaluate without -v says so in one line.
    from midiforge import cli

    capsys.readouterr()
    assert cli.main(["evaluate", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records no validation set (give -v)" in err


def _scripted_validation(monkeypatch, losses):
    """Validation returns these losses, one per epoch: which epoch is best is then known in advance."""
    calls = iter(losses)
    monkeypatch.setattr(loop_mod, "evaluate", lambda trainer, loader: (next(calls), 100))


def test_patience_stops_at_the_right_epoch_and_best_holds_that_epoch(folder, tmp_path, monkeypatch, capsys):
    _scripted_validation(monkeypatch, [5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 2.0])
    ckpt = tmp_path / "ckpt"
    assert _train(7, ckpt, folder, "--patience", "3") == 0
    out = capsys.readouterr().out
    rows = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    assert len(rows) == 5  # epoch 2 is the best; 3, 4 and 5 are not better: stop after 5
    assert "stopped early after epoch 5" in out and "best: epoch 2" in out
    assert ck.read_best(ckpt)["epoch"] == 2
    # The same run stopped at the end of epoch 2 (--max-steps): its weights are CKPT/best's.
    _scripted_validation(monkeypatch, [5.0, 4.0])
    other = tmp_path / "other"
    assert _train(7, other, folder, "--max-steps", str(rows[1]["step"])) == 0
    best, at2 = ck.load_inference(ckpt / "best")[0].state_dict(), ck.load(other).model
    assert all(torch.equal(best[k], at2[k]) for k in at2)
    # Run again: it says it stopped early instead of training on.
    assert _train(7, ckpt, folder, "--patience", "3") == 0
    assert "stopped early before (--patience 3)" in capsys.readouterr().out


_KILL_IN_BEST = """
import os, signal, sys
sys.path.insert(0, {src!r})
from midiforge import checkpoint
from midiforge.train import command
where = {where!r}
real_write, real_replace = checkpoint.atomic_write_bytes, checkpoint.os.replace
best_saves = {{"n": 0}}
def write(path, data, **kw):
    real_write(path, data, **kw)
    p = str(path)
    if "/best/.pending/" in p and os.path.basename(p) == checkpoint.MODEL_FILE:
        best_saves["n"] += 1
    if best_saves["n"] == 2 and "/best/.pending/" in p:
        if (where == "pending" and p.endswith(checkpoint.MODEL_FILE)) or (where == "commit" and p.endswith(checkpoint.COMMIT_MARKER)):
            os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst):
    real_replace(src, dst)
    if where == "rename" and best_saves["n"] == 2 and "/best/.pending/" in str(src) and str(src).endswith(checkpoint.MODEL_FILE):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.atomic_write_bytes, checkpoint.os.replace = write, replace
sys.exit(command.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["pending", "commit", "rename"])
def test_best_survives_a_kill_during_its_save(folder, tmp_path, where):
    ckpt = tmp_path / "ckpt"
    argv = ["3", str(ckpt), "-t", str(folder), *TINY, "-l", "1e-3"]
    code = _KILL_IN_BEST.format(src=str(ROOT / "src"), where=where)
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Killed in the second save of CKPT/best (epoch 2 better than 1): readers see epoch 1 before the COMMIT
    # and epoch 2 after it, whole either way.
    assert ck.read_best(ckpt)["epoch"] == (1 if where == "pending" else 2)
    model, tok = ck.load_inference(ckpt / "best")
    assert model.config.vocab_size == len(tok)
    assert tr.main(argv) == 0  # the same command finishes the run
    rows = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    assert ck.read_best(ckpt)["epoch"] == min(rows, key=lambda r: r["val_bits_per_note"])["epoch"]
    assert not (ckpt / "best" / ck.PENDING_DIR).exists()


def test_preset_from_training_tokens_and_device(folder, tmp_path, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_preset(10_000, cpu)[0] == "tiny" and choose_preset(10**9, cpu)[0] == "small"
    assert [choose_preset(n, cuda)[0] for n in (10**5, 10**7, 10**8, 10**9)] == [
        "tiny",
        "small",
        "base",
        "large",
    ]
    # No shape option: the run says which preset it chose and why; an explicit --preset wins.
    argv = [
        "1",
        str(tmp_path / "a"),
        "-t",
        str(folder),
        "-b",
        "16384",
        "--vocab-size",
        "980",
        "--max-steps",
        "1",
    ]
    assert tr.main(argv) == 0
    assert "preset tiny chosen:" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["d_model"] == 128
    argv[1] = str(tmp_path / "b")
    assert tr.main([*argv, "--preset", "small"]) == 0
    assert "chosen" not in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["d_model"] == 256


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--val-share", "1"], "--val-share must be in [0, 1)"),
        (["--val-share", "0", "--patience", "2"], "--patience needs"),
    ],
)
def test_bad_split_options_are_one_line(folder, tmp_path, capsys, extra, fragment):
    assert _train(1, tmp_path / "c", folder, *extra) == 2
    assert fragment in capsys.readouterr().err and not (tmp_path / "c").exists()
