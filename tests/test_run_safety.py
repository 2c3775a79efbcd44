"""What a second terminal, a swapped file or an old checkpoint can do to a run, and what it must not.

One writer per checkpoint directory (the lock), readers that never write, the tokenizer tied to the model,
fp16 loss-scaler skips that are not divergence, more ranks than GPUs refused at once, the model's context
kept on resume, and checkpoints made before this design still loading.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_score

from midiforge import checkpoint as ck
from midiforge.cli import main as cli_main
from midiforge.errors import UsageError
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import command as tr
from midiforge.train import distributed as dist
from midiforge.train import trainer as trn
from midiforge.train.config import RunConfig, add_arguments, parse_args, value_problems

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ckpt_v1"
VOCAB = len(MidiTokenizer()) + 40  # a BPE a little above the base vocabulary (which grows with the events)
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "-b", "16384"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, seeds in (("train", range(3)), ("other", range(10, 13))):
        (root / name).mkdir()
        for i in seeds:
            make_score(seed=i, num_notes=120).dump_midi(str(root / name / f"p{i}.mid"))
    for name in ("train", "other"):
        tok = MidiTokenizer()
        tok.train_bpe(sorted(str(p) for p in (root / name).iterdir()), VOCAB)
        assert (
            len(tok) == VOCAB
        )  # both reach the size: the usual case where only the fingerprint tells them apart
        tok.save(root / f"tokenizer-{name}.json")
    return root


def _trained(data, ckpt, epochs=1, *extra) -> Path:
    ckpt.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "tokenizer.json").exists():
        shutil.copy(data / "tokenizer-train.json", ckpt / "tokenizer.json")
    assert tr.main([str(epochs), str(ckpt), "-t", str(data / "train"), *TINY, *extra]) == 0
    return ckpt


def _snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "cache" not in p.parts
    }


def _one_error_line(capsys, *fragments):
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("note: ")]
    assert len(err) == 1 and ": error: " in err[0], err
    for f in fragments:
        assert f in err[0], (f, err[0])
    return err[0]


# --- what a run leaves out --------------------------------------------------------------------------------
def test_every_skipped_file_is_listed_with_its_reason(data, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(data / "train", mixed)
    (mixed / "empty.mid").write_bytes(b"")
    (mixed / "garbage.mid").write_bytes(b"MThd garbage")
    (mixed / "other.json").write_text(json.dumps({"schema": "something/else"}))
    val = tmp_path / "val"
    shutil.copytree(data / "other", val)
    (val / "empty.mid").write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(data / "tokenizer-train.json", ckpt / ck.TOKENIZER_FILE)
    capsys.readouterr()
    assert tr.main(["1", str(ckpt), "-t", str(mixed), "-v", str(val), *TINY]) == 0
    rows = [json.loads(line) for line in (ckpt / ck.SKIPPED_FILE).read_text().splitlines()]
    by_name = {(r["set"], Path(r["path"]).name): r["reason"] for r in rows}
    assert by_name.keys() == {("training", "empty.mid"), ("training", "garbage.mid"), ("training", "other.json"),
                              ("validation", "empty.mid")}  # fmt: skip
    assert "empty" in by_name["training", "empty.mid"] and "schema" in by_name["training", "other.json"]
    assert all(Path(r["path"]).is_file() for r in rows)  # the path as found, to go and look at
    notes = [x for x in capsys.readouterr().err.splitlines() if "files skipped" in x]
    assert len(notes) == 2 and notes[0].startswith("note: 3 training files skipped (")
    assert all(str(ckpt / ck.SKIPPED_FILE) in x for x in notes)
    # A run that leaves nothing out writes an empty list.
    assert tr.main(["1", str(tmp_path / "clean"), "-t", str(data / "train"), *TINY]) == 0
    assert (tmp_path / "clean" / ck.SKIPPED_FILE).read_text() == ""


# --- one writer ------------------------------------------------------------------------------------------
_HOLDER = """
import sys
sys.path.insert(0, {src!r})
from midiforge.checkpoint import RunLock
lock = RunLock({ckpt!r}).acquire()
print("locked", flush=True)
sys.stdin.readline()
"""


def test_second_train_on_a_locked_directory_exits_2_naming_the_holder(data, tmp_path, capsys):
    ckpt = _trained(data, tmp_path / "ckpt")
    # A save in flight of the running process: files in .pending, no COMMIT yet.
    (ckpt / ck.PENDING_DIR).mkdir()
    (ckpt / ck.PENDING_DIR / ck.MODEL_FILE).write_bytes(b"half a save")
    before = _snapshot(ckpt)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(src=str(ROOT / "src"), ckpt=str(ckpt))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert tr.main(["2", str(ckpt), "-t", str(data / "train"), *TINY]) == 2
        _one_error_line(capsys, "in use by another training run", f"pid {holder.pid}")
        # The refused run changed nothing: the other run's save in flight is still there.
        after = _snapshot(ckpt)
        assert {k: v for k, v in after.items() if k != ck.LOCK_FILE} == {
            k: v for k, v in before.items() if k != ck.LOCK_FILE
        }
    finally:
        holder.communicate("\n", timeout=30)
    # The holder is gone; its lock file stays behind and does not block (flock died with the process).
    assert (ckpt / ck.LOCK_FILE).exists()
    assert tr.main(["2", str(ckpt), "-t", str(data / "train"), *TINY]) == 0
    assert ck.load(ckpt).state["train_state"]["epoch"] == 2
    assert not (ckpt / ck.PENDING_DIR).exists()  # the new writer discarded the dead one's uncommitted save


def test_read_paths_never_modify_the_directory(data, tmp_path, capsys):
    ckpt = _trained(data, tmp_path / "ckpt")
    (ckpt / ck.PENDING_DIR).mkdir()
    (ckpt / ck.PENDING_DIR / ck.MODEL_FILE).write_bytes(b"a save in flight")
    before = _snapshot(ckpt)
    capsys.readouterr()
    # Argument checks of train (a bad option: nothing may be written, not even recovered).
    assert tr.main(["2", str(ckpt), "-t", str(data / "train"), *TINY, "-l", "-1"]) == 2
    _one_error_line(capsys, "-l/--learning-rate must be positive")
    ck.load(ckpt)
    ck.load_inference(ckpt)
    assert ck.has_checkpoint(ckpt)
    assert cli_main(["plot", str(ckpt), "-o", str(tmp_path / "curves.png")]) == 0
    out = tmp_path / "gen"
    assert cli_main(["generate", str(ckpt), "-o", str(out), "--max-tokens", "16", "--seed", "1"]) == 0
    assert _snapshot(ckpt) == before


def test_readers_see_a_save_that_is_halfway_renamed_as_committed(data, tmp_path):
    """A writer killed (or paused) between COMMIT and its last rename: readers see the new save whole."""
    old = _trained(data, tmp_path / "old", 1)
    new = _trained(data, tmp_path / "new", 2)
    pending = old / ck.PENDING_DIR
    pending.mkdir()
    for name in ck.SAVE_FILES:
        shutil.copy(new / name, pending / name)
    (pending / ck.COMMIT_MARKER).write_text(json.dumps({"files": list(ck.SAVE_FILES)}))
    os.replace(pending / ck.MODEL_FILE, old / ck.MODEL_FILE)  # the first rename happened
    before = _snapshot(old)
    assert ck.load(old).state["train_state"]["epoch"] == 2
    model, _ = ck.load_inference(old)
    want = ck.load(new).model
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert _snapshot(old) == before


def test_generate_and_plot_while_a_run_saves_every_step(data, tmp_path):
    """A real training process saving after every step; every read in the meantime sees one whole save."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(data / "tokenizer-train.json", ckpt / "tokenizer.json")
    argv = ["2", str(ckpt), "-t", str(data / "train"), *TINY, "--save-every-minutes", "1e-9"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    reads = 0
    try:
        while proc.poll() is None:
            if not ck.has_checkpoint(ckpt):
                continue
            got = ck.load(ckpt)  # raises on any mix of two saves
            assert len(got.metrics["steps"]) >= 1
            model, tok = ck.load_inference(ckpt)
            assert model.config.vocab_size == len(tok)
            reads += 1
    finally:
        err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-2000:]
    assert reads >= 1
    assert ck.load(ckpt).state["train_state"]["epoch"] == 2


# --- the tokenizer belongs to the model -------------------------------------------------------------------
def test_a_tokenizer_of_another_run_is_refused_everywhere(data, tmp_path, capsys):
    ckpt = _trained(data, tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["tokenizer"] == {
        "fingerprint": MidiTokenizer.load(data / "tokenizer-train.json").fingerprint,
        "size": VOCAB,
    }
    shutil.copy(data / "tokenizer-other.json", ckpt / "tokenizer.json")  # same size, other merges
    capsys.readouterr()
    assert tr.main(["2", str(ckpt), "-t", str(data / "train"), *TINY]) == 2
    _one_error_line(capsys, "not the tokenizer this model was trained with")
    assert cli_main(["generate", str(ckpt), "-o", str(tmp_path / "g"), "--max-tokens", "8"]) == 2
    _one_error_line(capsys, "not the tokenizer this model was trained with")
    assert cli_main(["plot", str(ckpt), "-o", str(tmp_path / "p.png")]) == 2
    _one_error_line(capsys, "not the tokenizer this model was trained with")
    assert not (tmp_path / "p.png").exists()


# --- fp16 loss scaling ------------------------------------------------------------------------------------
def test_loss_scaler_skips_are_not_divergence():
    """Finite loss, overflowing gradients: the scaler lowers its scale and skips; that is no bad step."""
    from midiforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16))
    trainer = trn.Trainer(model, torch.device("cpu"), dist.DistInfo(), learning_rate=1e-3, weight_decay=0.0)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what --amp fp16 sets up on CUDA
    trainer.set_schedule(0, 100)
    overflow = {"on": True}
    model.tok_emb.weight.register_hook(lambda g: g * float("inf") if overflow["on"] else g)
    x = torch.randint(3, 64, (2, 16))
    state = trn.TrainState()
    weights = model.tok_emb.weight.detach().clone()
    for _ in range(trn.MAX_BAD_STEPS + 5):  # more than the divergence limit for bad steps
        loss, status = trainer.train_step(x, x.roll(-1, 1), 32.0)
        assert status == "scaler_skip" and torch.isfinite(loss)
        state.add_step(status, float(loss), 32, "here")
    assert state.bad == 0 and state.scaler_skips == trn.MAX_BAD_STEPS + 5
    assert torch.equal(model.tok_emb.weight, weights)  # nothing was applied
    assert trainer.scaler.get_scale() < 2.0**16 / 2**20
    overflow["on"] = False
    loss, status = trainer.train_step(x, x.roll(-1, 1), 32.0)
    assert status == "ok"
    state.add_step(status, float(loss), 32, "here")
    assert state.scaler_skips == 0 and not torch.equal(model.tok_emb.weight, weights)
    # A NaN loss is still a bad step, and endless skips still end the run.
    assert trainer.train_step(x, x.roll(-1, 1), float("nan"))[1] in ("bad", "scaler_skip")
    with pytest.raises(trn.TrainingDiverged, match="loss scaler skipped"):
        for _ in range(trn.MAX_SCALER_SKIPS):
            state.add_step("scaler_skip", 1.0, 1, "here")


# --- ranks and GPUs ---------------------------------------------------------------------------------------
def test_more_ranks_than_gpus_is_one_line_not_a_hang(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    for k, v in dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
    ).items():
        monkeypatch.setenv(k, v)
    for device in ([], ["--device", "cuda"]):
        assert tr.main(["1", str(tmp_path / "ckpt"), "-t", str(data / "train"), *device]) == 2
        _one_error_line(capsys, "2 processes on this machine but 1 GPU(s)", "--device cpu")
    assert tr.main(["1", str(tmp_path / "ckpt"), "-t", str(data / "train"), "--device", "cuda:0"]) == 2
    _one_error_line(capsys, "2 processes on this machine but 1 GPU(s)")
    assert not (tmp_path / "ckpt").exists()
    info = dist.DistInfo(rank=0, local_rank=0, world_size=2, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.device_problems(info, torch.device("cuda"), explicit_index=False) == []
    assert (
        "every rank on one GPU" in dist.device_problems(info, torch.device("cuda:1"), explicit_index=True)[0]
    )


# --- window and context -----------------------------------------------------------------------------------
def test_a_larger_batch_budget_on_resume_keeps_the_model_shape(data, tmp_path, capsys):
    ckpt = _trained(data, tmp_path / "ckpt", 1)  # -b 16384: window and context 128
    assert json.loads((ckpt / "config.json").read_text())["model"]["max_seq_len"] == 128
    capsys.readouterr()
    assert tr.main(["2", str(ckpt), "-t", str(data / "train"), *TINY, "-b", "65536"]) == 0
    assert "training window lowered from 256 to the model's context of 128" in capsys.readouterr().err
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model"]["max_seq_len"] == 128 and cfg["run"]["window"] == 128
    assert cfg["train"]["batch_budget"] == 65536
    # A new run may give the model more context than it trains on.
    new = tmp_path / "new"
    _trained(data, new, 1, "--context-length", "512")
    cfg = json.loads((new / "config.json").read_text())
    assert cfg["model"]["max_seq_len"] == 512 and cfg["run"]["window"] == 128


# --- the config is the CLI --------------------------------------------------------------------------------
def test_run_config_is_the_command_line_and_config_json(tmp_path):
    cfg = parse_args(
        ["3", str(tmp_path), "-t", "a", "b", "-t", "c", "-b", "4096", "--no-augment", "--max-steps", "7"]
    )
    assert cfg.num_epochs == 3 and cfg.train_dataset == [Path("a"), Path("b"), Path("c")]
    assert cfg.batch_budget == 4096 and cfg.window == 64 and not cfg.augment and cfg.max_steps == 7
    assert cfg.learning_rate == RunConfig.__dataclass_fields__["learning_rate"].default
    # config.json["train"] reads back into the same config.
    back = json.loads(json.dumps(cfg.to_dict()))
    assert RunConfig(**back).to_dict() == cfg.to_dict()
    # Every field has a flag or is positional, and --help names each.
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    text = p.format_help()
    for flag in (
        "-t",
        "-v",
        "-m",
        "-e",
        "-b",
        "-l",
        "-w",
        "--preset",
        "--context-length",
        "--max-steps",
        "--no-augment",
    ):
        assert f" {flag}" in text, flag
    # Every problem at once.
    bad = RunConfig(
        num_epochs=0,
        ckpt_path=tmp_path,
        train_dataset=[tmp_path],
        batch_budget=-1,
        learning_rate=0.0,
        dropout=1.5,
        weight_decay=-1.0,
        vocab_size=3,
    )
    problems = value_problems(bad, base_vocab=600)
    assert len(problems) == 6, problems


# --- checkpoints made before this design ------------------------------------------------------------------
def test_a_checkpoint_of_the_previous_format_loads_and_resumes(tmp_path):
    """tests/fixtures/ckpt_v1: made by commit b256b70's train.py (stopped after 3 of 16 steps of epoch 1)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    old = ck.load(ckpt)
    assert "counters" in old.state and "train_state" not in old.state
    model, tok = ck.load_inference(ckpt)
    assert model.config.vocab_size == len(tok) == 709
    # The same training data, rebuilt the way the fixture's was (tests/conftest.make_score).
    (tmp_path / "train").mkdir()
    for i in range(2):
        make_score(seed=i, num_notes=60).dump_midi(str(tmp_path / "train" / f"p{i}.mid"))
    argv = ["2", str(ckpt), "-t", str(tmp_path / "train"), "-b", "4096", "--seed", "1"]
    assert tr.main(argv) == 0
    got = ck.load(ckpt)
    assert got.state["train_state"]["epoch"] == 2
    # The files lie elsewhere than when the fixture was made, so the interrupted epoch restarts: 3 + 2 × 16.
    assert [e["step"] for e in got.metrics["epochs"]] == [19, 35]
    assert got.config["model"] == old.config["model"]  # the shape, context included, kept
    # Another tokenizer under the old checkpoint is refused by the fingerprint its state.pth recorded.
    with pytest.raises(UsageError, match="not the tokenizer this model was trained with"):
        ck.check_tokenizer(ckpt, MidiTokenizer(), old.config, old.state)
