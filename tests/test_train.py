"""train.py end to end on tiny models and small MIDI files written here (CPU, seconds each).

Covers: overfitting, exact resume (epoch boundary and mid-epoch), SIGKILL + re-run, 2-process gloo DDP,
bad arguments (exit 2, nothing written), code-carrying checkpoints, non-finite losses, OOM splitting.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import symusic
import torch
from conftest import corpus_dir, make_score

from midiforge import checkpoint as ck
from midiforge.data.sampler import IGNORE_INDEX
from midiforge.errors import UsageError
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import command as tr
from midiforge.train import setup as train_setup
from midiforge.train import trainer as trn

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(MidiTokenizer()) + 40  # a BPE a little above the base vocabulary (which grows with the events)
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "-b", "16384"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ (3 pieces), val/ (1 piece) and a BPE tokenizer.json trained on train/."""
    root = tmp_path_factory.mktemp("data")
    (root / "train").mkdir()
    (root / "val").mkdir()
    for i in range(3):
        make_score(seed=i, num_notes=120).dump_midi(str(root / "train" / f"p{i}.mid"))
    make_score(seed=9, num_notes=120).dump_midi(str(root / "val" / "v.mid"))
    tok = MidiTokenizer()
    tok.train_bpe(sorted(str(p) for p in (root / "train").iterdir()), VOCAB)
    tok.save(root / "tokenizer.json")
    return root


def _argv(epochs, ckpt, data, *extra):
    return [str(epochs), str(ckpt), "-t", str(data / "train"), "-v", str(data / "val"), *TINY, *extra]


def _run(epochs, ckpt, data, *extra, monkeypatch=None):
    """Run `train` in this process with the shared tokenizer (so runs are comparable); returns the exit code."""
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    if not (Path(ckpt) / "tokenizer.json").exists():
        shutil.copy(data / "tokenizer.json", ckpt)
    return tr.main(_argv(epochs, ckpt, data, *extra))


def _state(ckpt) -> dict:
    return ck.load(ckpt).state["train_state"]


def _metrics(ckpt):
    return json.loads((Path(ckpt) / "metrics.json").read_text())


def _assert_same_run(a, b):
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma["epochs"]) == len(mb["epochs"])
    for ea, eb in zip(ma["epochs"], mb["epochs"], strict=True):
        for key in ("train_loss", "val_loss", "tokens", "lr", "step"):
            assert eb[key] == pytest.approx(ea[key], rel=1e-6), key
    assert len(ma["steps"]) == len(mb["steps"])
    for sa, sb in zip(ma["steps"], mb["steps"], strict=True):
        assert sb == pytest.approx(sa, rel=1e-6)
    wa, wb = ck.load(a).model, ck.load(b).model
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def _motif_piece(path, motif):
    """A piece that repeats one motif (alternating octaves): easy to learn by heart."""
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, qpm=120.0))
    track = symusic.Track("motif", 0, False)
    for i in range(30 * len(motif)):
        track.notes.append(symusic.Note(i * 240, 240, motif[i % len(motif)] + (i // len(motif)) % 2 * 12, 80))
    score.tracks.append(track)
    score.dump_midi(str(path))


def test_tiny_model_overfits(data, tmp_path):
    (tmp_path / "train").mkdir()
    _motif_piece(tmp_path / "train" / "a.mid", [60, 62, 64, 65, 67, 65, 64, 62])
    _motif_piece(tmp_path / "train" / "b.mid", [55, 59, 62, 67, 62, 59])
    (tmp_path / "ckpt").mkdir()
    shutil.copy(data / "tokenizer.json", tmp_path / "ckpt")
    args = [*TINY, "-b", "4096", "--dropout", "0", "--no-augment", "-l", "1e-2"]
    assert tr.main(["5", str(tmp_path / "ckpt"), "-t", str(tmp_path / "train"), *args]) == 0
    m = _metrics(tmp_path / "ckpt")
    first, last = m["steps"][0][1], m["epochs"][-1]["train_loss"]
    assert last < 0.5 * first, (first, last)
    e = m["epochs"][-1]
    assert e["val_loss"] is None and e["val_perplexity"] is None
    assert e["train_perplexity"] == pytest.approx(math.exp(e["train_loss"]), rel=1e-9)
    png = (tmp_path / "ckpt" / "training.png").read_bytes()
    from midiforge.train.plot import render_png

    assert png == render_png(m)  # the plot drawn at the epoch end is that of the final metrics


def test_resume_is_exact(data, tmp_path, monkeypatch, capsys):
    extra = ["--dropout", "0.1"]  # dropout on: the RNG state must be restored too
    assert _run(2, tmp_path / "full", data, *extra, monkeypatch=monkeypatch) == 0
    per_epoch = _metrics(tmp_path / "full")["epochs"][0]["step"]
    # Stopped at the first epoch's end, in the middle of epoch 1, in the middle of epoch 2: then the same command.
    for name, stop in (("end1", per_epoch), ("mid1", per_epoch // 2), ("mid2", per_epoch + 3)):
        ckpt = tmp_path / name
        assert _run(2, ckpt, data, *extra, "--max-steps", str(stop)) == 0
        assert _state(ckpt)["step"] == stop
        assert _run(2, ckpt, data, *extra, monkeypatch=monkeypatch) == 0
        _assert_same_run(tmp_path / "full", ckpt)
    # Done already: nothing to do, exit 0, nothing changed.
    before = (tmp_path / "full" / "model.pth").read_bytes()
    capsys.readouterr()
    assert _run(2, tmp_path / "full", data, *extra, monkeypatch=monkeypatch) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "full" / "model.pth").read_bytes() == before


def test_extend_and_override(data, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    assert _run(1, ckpt, data, monkeypatch=monkeypatch) == 0
    one = _metrics(ckpt)["epochs"][0]
    capsys.readouterr()
    assert _run(2, ckpt, data, "-l", "5e-4", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "cosine schedule is rebuilt" in err and "-l 0.0005 from the command line replaces" in err
    m = _metrics(ckpt)
    assert len(m["epochs"]) == 2 and m["epochs"][0] == one
    assert json.loads((ckpt / "config.json").read_text())["train"]["learning_rate"] == 5e-4
    assert m["epochs"][1]["lr"] <= 5e-4
    # State dicts carry no wrapper prefixes.
    assert not [k for k in ck.load(ckpt).model if k.startswith(("module.", "_orig_mod."))]
    assert json.loads((ckpt / "config.json").read_text())["train"]["max_steps"] is None


# A process that dies at a chosen instant of its n-th save: while writing .pending (no COMMIT yet), right after
# the COMMIT marker, or halfway through the renames. Deterministic: no sleeps, no timing.
_KILLER = """
import os, signal, sys
sys.path.insert(0, {src!r})
from midiforge import checkpoint
from midiforge.train import command as train
where, nth = {where!r}, {nth}
calls = {{"n": 0}}
real_write, real_replace = checkpoint.atomic_write_bytes, checkpoint.os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def write(path, data, **kw):
    real_write(path, data, **kw)
    name = os.path.basename(str(path))
    if name == checkpoint.MODEL_FILE:
        calls["n"] += 1
    if calls["n"] == nth and ((where == "pending" and name == checkpoint.OPTIMIZER_FILE)
                              or (where == "commit" and name == checkpoint.COMMIT_MARKER)):
        die()
renames = {{"n": 0}}
def replace(src, dst):
    real_replace(src, dst)
    moved = os.path.basename(os.path.dirname(str(src))) == ".pending" and not os.path.basename(str(src)).startswith(".")
    if where == "rename" and calls["n"] == nth and moved:
        renames["n"] += 1
        if renames["n"] == 2:
            die()
checkpoint.atomic_write_bytes, checkpoint.os.replace = write, replace
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["pending", "commit", "rename"])
def test_sigkill_mid_save_then_rerun(data, tmp_path, where):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(data / "tokenizer.json", ckpt)
    argv = _argv(2, ckpt, data, "--save-every-minutes", "1e-9")  # a save after every step
    code = _KILLER.format(src=str(ROOT / "src"), where=where, nth=3)
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Whatever instant the kill hit, one consistent save is what every reader sees: the 2nd before the COMMIT
    # of the 3rd, the 3rd after it.
    assert _state(ckpt)["step"] == (2 if where == "pending" else 3)
    model, tok = ck.load_inference(ckpt)
    assert model.config.vocab_size == len(tok)
    assert (ckpt / ck.PENDING_DIR).exists()  # the readers left the interrupted save alone
    assert tr.main(argv) == 0  # the same command again (in this process: faster) finishes the run
    got = ck.load(ckpt)
    assert got.state["train_state"]["epoch"] == 2 and len(got.metrics["epochs"]) == 2
    assert not (ckpt / ck.PENDING_DIR).exists()


def _two_processes(argv):
    port = str(tr.dist.free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, str(ROOT / "train.py"), *argv]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return outs


def test_two_process_gloo_ddp(data, tmp_path):
    # --device cpu: on a machine with one GPU the default (cuda) is refused for two ranks, see below.
    ckpt = tmp_path / "ckpt"
    _two_processes(_argv(1, ckpt, data, "--vocab-size", str(VOCAB), "--device", "cpu"))
    outs = _two_processes(_argv(2, ckpt, data, "--device", "cpu"))  # resumes on both ranks (rank 1 reseeds)
    assert "resuming" in outs[0]
    got = ck.load(ckpt)
    assert got.config["run"]["world_size"] == 2 and len(got.metrics["epochs"]) == 2
    assert not [k for k in got.model if k.startswith("module.")]
    assert "epoch 2/2: train loss" in outs[0] and "epoch 2/2: train loss" not in outs[1]  # rank 0 speaks
    ck.load_inference(ckpt)


def _expect_usage_error(argv, capsys, *fragments):
    assert tr.main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("midiforge train: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])


def test_bad_arguments_write_nothing(data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    t = ["-t", str(data / "train")]
    _expect_usage_error(
        ["0", str(ckpt), *t, "-b", "-5", "-l", "0", "-m", "0"],
        capsys,
        "num_epochs must be positive",
        "-b/--max-batch-size",
        "-l/--learning-rate",
        "-m/",
    )
    _expect_usage_error(
        ["1", str(ckpt), "-t", str(tmp_path / "missing")], capsys, "no such file or directory"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not music")
    _expect_usage_error(["1", str(ckpt), "-t", str(tmp_path / "empty")], capsys, "no .mid/.midi/.json file")
    _expect_usage_error(["1", str(ckpt), *t, "--d-model", "30", "--n-head", "4"], capsys, "divisible")
    _expect_usage_error(["1", str(ckpt), *t, "--amp", "fp16", "--device", "cpu"], capsys, "fp16")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.mid").write_bytes(b"MThd not really")
    _expect_usage_error(["1", str(ckpt), "-t", str(tmp_path / "broken"), *TINY], capsys, "no usable piece")
    assert not ckpt.exists()


def test_incompatible_checkpoint_and_code_carrying_files(data, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    assert _run(1, ckpt, data, monkeypatch=monkeypatch) == 0
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    capsys.readouterr()
    _expect_usage_error(
        _argv(2, ckpt, data, "--n-layer", "2", "--d-model", "64"),
        capsys,
        "n_layer=1 (asked 2)",
        "d_model=32 (asked 64)",
    )
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    # Weights without the training state are not overwritten by a new run.
    (ckpt / "state.pth").rename(tmp_path / "state.pth")
    _expect_usage_error(_argv(2, ckpt, data), capsys, "not a resumable checkpoint")
    (tmp_path / "state.pth").rename(ckpt / "state.pth")
    torch.save({"tok_emb.weight": RunsCode()}, ckpt / "model.pth")
    _expect_usage_error(_argv(2, ckpt, data), capsys, "refused")
    assert not marker.exists()
    # The root script reports the same way, from a subprocess.
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *_argv(2, ckpt, data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("midiforge train: error: ")
    assert "refused" in lines[0] and not marker.exists()


def test_non_finite_losses_stop_without_touching_the_checkpoint(data, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    assert _run(1, ckpt, data, monkeypatch=monkeypatch) == 0
    files = lambda: {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file() and p.name != ck.LOCK_FILE}  # noqa: E731
    before = files()
    real = trn.token_loss_sum
    monkeypatch.setattr(
        "midiforge.train.trainer.token_loss_sum", lambda m, x, y: real(m, x, y) * float("nan")
    )
    capsys.readouterr()
    assert _run(3, ckpt, data, "--save-every-minutes", "0.0001", monkeypatch=monkeypatch) == 1
    assert f"{trn.MAX_BAD_STEPS} consecutive non-finite steps" in capsys.readouterr().err
    assert files() == before  # (.lock holds the pid of the last run that wrote, nothing of the checkpoint)


def test_out_of_memory_batches_are_split(data):
    """A batch that does not fit is retried in halves; the step equals the unsplit one."""
    from midiforge.model import ModelConfig, Transformer

    class Flaky(Transformer):
        def forward(self, idx, *a, **k):
            if idx.size(0) > 1:
                raise torch.OutOfMemoryError("simulated")
            return super().forward(idx, *a, **k)

    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16)
    x = torch.randint(3, 64, (4, 16))
    y = x.roll(-1, 1)
    y[2:, 10:] = IGNORE_INDEX
    results = []
    for cls in (Transformer, Flaky):
        torch.manual_seed(0)
        trainer = trn.Trainer(
            cls(cfg), torch.device("cpu"), tr.dist.DistInfo(), learning_rate=1e-2, weight_decay=0.0
        )
        trainer.set_schedule(0, 10)
        loss, status = trainer.train_step(x, y, float((y != IGNORE_INDEX).sum()))
        results.append((float(loss), status, [p.detach().clone() for p in trainer.raw.parameters()]))
    assert trainer.pieces == 4
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5) and results[1][1] == "ok"
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][2], results[1][2], strict=True))


def test_real_corpus_quick(tmp_path):
    """A few pop909 songs: the tokenizer is trained into the checkpoint, the loss falls, and generate can load it."""
    corpus = corpus_dir("pop909")
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for name in ("001.mid", "002.mid", "003.mid"):
        shutil.copy(corpus / name, train_dir)
    argv = [
        "2",
        str(tmp_path / "ckpt"),
        "-t",
        str(train_dir),
        "--preset",
        "tiny",
        "-b",
        "65536",
        "--vocab-size",
        str(VOCAB),
        "--no-augment",
        "-l",
        "3e-3",
    ]
    assert tr.main(argv) == 0
    m = _metrics(tmp_path / "ckpt")
    assert m["epochs"][-1]["train_loss"] < m["steps"][0][1] - 0.5
    model, tok = ck.load_inference(tmp_path / "ckpt")
    assert len(tok) <= VOCAB and model.config.max_seq_len == 256


def _spawned_sum(out_dir: str) -> int:
    info = tr.dist.from_env()
    tr.dist.init(info, torch.device("cpu"))
    t = tr.dist.all_reduce_sum(torch.tensor([info.rank + 1.0]))
    Path(out_dir, f"rank{info.rank}").write_text(f"{info.world_size} {float(t)}")
    tr.dist.shutdown()
    return 0


def test_spawn_forms_one_job(tmp_path):
    """The plumbing behind `python train.py` on a multi-GPU machine (here with gloo on CPU)."""
    tr.dist.spawn(_spawned_sum, 2, (str(tmp_path),))
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["2 3.0", "2 3.0"]


def test_dist_timeout_is_long_and_configurable(monkeypatch):
    """Ranks > 0 wait at a barrier while rank 0 trains BPE and encodes: NCCL's 10 minutes is too short."""
    import datetime

    monkeypatch.delenv(tr.dist.TIMEOUT_ENV, raising=False)
    assert tr.dist.timeout() == datetime.timedelta(minutes=360)
    monkeypatch.setenv(tr.dist.TIMEOUT_ENV, "90")
    assert tr.dist.timeout() == datetime.timedelta(minutes=90)
    monkeypatch.setenv(tr.dist.TIMEOUT_ENV, "nonsense")
    assert tr.dist.timeout() == datetime.timedelta(minutes=360)


def _spawned_check(out_dir: str, same: bool) -> int:
    info = tr.dist.from_env()
    tr.dist.init(info, torch.device("cpu"))
    try:
        train_setup.check_same_data(info, torch.device("cpu"), 10 if same else 10 + info.rank, 5)
        result = "ok"
    except UsageError as e:
        result = str(e)
    Path(out_dir, f"rank{info.rank}").write_text(result)
    tr.dist.shutdown()
    return 0


def test_ranks_with_different_datasets_are_refused(tmp_path):
    for same in (True, False):
        out = tmp_path / str(same)
        out.mkdir()
        tr.dist.spawn(_spawned_check, 2, (str(out), same))
        results = [p.read_text() for p in sorted(out.iterdir())]
        if same:
            assert results == ["ok", "ok"]
        else:
            assert all("ranks built different datasets: windows 10..11" in r for r in results)


def test_resumed_ranks_get_distinct_deterministic_seeds():
    """Only rank 0's RNG state is saved: ranks > 0 reseed from (seed, rank, step) on resume."""
    seeds = {train_setup.rank_seed(0, rank, step) for rank in range(1, 9) for step in (0, 1, 500)}
    assert len(seeds) == 24  # every rank and step its own stream
    assert all(0 <= s < 2**63 for s in seeds)  # a valid torch seed
    assert train_setup.rank_seed(1, 1, 0) not in seeds  # and the run's seed matters


def test_epoch_end_saves_despite_trailing_non_finite_steps_and_nan_validation(
    data, tmp_path, capsys, monkeypatch
):
    """Skipped steps leave the weights alone: the epoch end still saves; a NaN validation loss is null."""
    assert _run(1, tmp_path / "probe", data, monkeypatch=monkeypatch) == 0
    steps = _metrics(tmp_path / "probe")["epochs"][0]["step"]
    real, calls = trn.token_loss_sum, []

    def flaky(m, x, y):
        if not m.training:
            return real(m, x, y) * float("nan")
        calls.append(1)
        return real(m, x, y) * (float("nan") if len(calls) > steps - 2 else 1.0)

    monkeypatch.setattr("midiforge.train.trainer.token_loss_sum", flaky)
    capsys.readouterr()
    assert _run(1, tmp_path / "ckpt", data, monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "validation loss is not finite" in err and "saved anyway" in err
    got = ck.load(tmp_path / "ckpt")
    assert got.state["train_state"]["epoch"] == 1 and got.state["train_state"]["bad"] == 2
    assert got.metrics["epochs"][0]["val_loss"] is None
    assert math.isfinite(got.metrics["epochs"][0]["train_loss"])


def test_tokenizer_left_by_an_interrupted_first_run_is_reused_with_a_note(
    data, tmp_path, capsys, monkeypatch
):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(data / "tokenizer.json", ckpt)  # no state.pth: not a resume
    size = len(MidiTokenizer.load(ckpt / "tokenizer.json"))
    assert _run(1, ckpt, data, "--vocab-size", str(size + 1), monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert f"reusing {ckpt / 'tokenizer.json'} ({size} tokens); delete {ckpt}" in err
    assert f"--vocab-size {size + 1} ignored" in err


def test_no_pedal_makes_a_tokenizer_without_the_pedal(tmp_path, capsys):
    """--no-pedal: a new tokenizer writes no PEDAL (tracks stay) and its model's music has none; a tokenizer that
    already exists keeps its own layout, and the run says the option was ignored."""
    from midiforge import cli

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    shutil.copy(corpus_dir("pop909", "001.mid"), train_dir)  # a pedalled piano track, three tracks
    ckpt = tmp_path / "ckpt"
    argv = ["1", str(ckpt), "-t", str(train_dir), *TINY, "--vocab-size", str(VOCAB), "--max-steps", "2"]
    assert tr.main([*argv, "--no-pedal"]) == 0
    tok = MidiTokenizer.load(ckpt / "tokenizer.json")
    assert tok.config.pedals is False and tok.config.tracks is True
    events = tok.base_events(tok.encode(corpus_dir("pop909", "001.mid")))
    kinds = set(tok.vocab.kind[events].tolist())
    assert tok.vocab.k("pedal") not in kinds and tok.vocab.k("track") in kinds
    out = tmp_path / "g.mid"
    assert cli.main(["generate", str(ckpt), "-o", str(out), "--max-tokens", "200", "--seed", "0"]) == 0
    assert sum(len(t.pedals) for t in symusic.Score(str(out)).tracks) == 0
    # A run with a pedalled tokenizer already in its folder keeps it and says so.
    other = tmp_path / "other"
    other.mkdir()
    MidiTokenizer().save(other / "tokenizer.json")
    capsys.readouterr()
    assert tr.main(["1", str(other), "-t", str(train_dir), *TINY, "--max-steps", "1", "--no-pedal"]) == 0
    assert "--no-pedal ignored" in capsys.readouterr().err
    assert MidiTokenizer.load(other / "tokenizer.json").config.pedals is True
