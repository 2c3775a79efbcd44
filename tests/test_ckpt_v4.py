"""tests/fixtures/ckpt_v4: a checkpoint of the events v4 tokenizer (tracks, pedals, key signatures, controls),
made by ``train.py 1 CKPT -t TRAIN --n-layer 1 --n-head 2 --d-model 16 --d-ff 32 -e 64 -b 4096 --seed 1`` on the
two pieces ``make_score(seed=i, num_notes=60)``, i = 0, 1. It must keep loading, encoding what it encoded,
generating and resuming whatever the tokenizer code becomes (tests/fixtures/ckpt_v1 covers the format before)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import symusic
from conftest import make_score

from midiforge import checkpoint as ck
from midiforge.cli import main as cli_main
from midiforge.train import command as tr

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ckpt_v4"


def _train_dir(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    d.mkdir()
    for i in range(2):
        make_score(seed=i, num_notes=60).dump_midi(str(d / f"p{i}.mid"))
    return d


def test_v4_checkpoint_loads_and_encodes_as_when_it_was_made(tmp_path):
    model, tok = ck.load_inference(FIXTURE)
    assert tok.events_version == 4 and tok.has_controls and tok.fingerprint == "0274427069fc27a0"
    assert model.config.vocab_size == len(tok) == 1087
    ids = np.asarray(tok.encode(_train_dir(tmp_path) / "p0.mid"), "<i8")
    assert (len(ids), hashlib.sha256(ids.tobytes()).hexdigest()[:16]) == (373, "618b027cc05b5f1c")


def test_v4_checkpoint_generates(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    out = tmp_path / "x.mid"
    assert cli_main(["generate", str(ckpt), "-o", str(out), "--max-tokens", "40", "--seed", "0"]) == 0
    assert symusic.Score(str(out)).ticks_per_quarter > 0


def test_v4_checkpoint_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    train = _train_dir(tmp_path)
    assert tr.main(["2", str(ckpt), "-t", str(train), "-b", "4096", "--seed", "1"]) == 0
    got = ck.load(ckpt)
    assert got.state["train_state"]["epoch"] == 2
    assert [e["epoch"] for e in got.metrics["epochs"]] == [1, 2]
    assert got.config["model"] == ck.load(FIXTURE).config["model"]
