"""Starting from another run: --init-from, --lora, --freeze and `midiforge merge` (tiny models, real steps).

A tiny base (2 blocks, style tags ``a`` and ``b``) is trained once per module; every test fine-tunes it on
other pieces, mostly with a new tag ``new``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_score

from midiforge import checkpoint as ck
from midiforge import cli, lora
from midiforge.model import ModelConfig, Transformer
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import command as tr
from midiforge.train import finetune

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "-b", "65536", "--seed", "0"]
RUN = ["-b", "65536", "--seed", "0", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained tiny base: ``root/base`` (tags a, b), and ``root/new`` (other pieces, for the tag ``new``)."""
    root = tmp_path_factory.mktemp("ft")
    for i, folder in enumerate(("a", "b", "new", "new", "val")):
        (root / folder).mkdir(exist_ok=True)
        make_score(seed=i, num_notes=100).dump_midi(str(root / folder / f"p{i}.mid"))
    argv = [
        "1",
        str(root / "base"),
        "-t",
        f"a={root / 'a'}",
        "-t",
        f"b={root / 'b'}",
        "-v",
        str(root / "val"),
    ]
    assert tr.main([*argv, *TINY, "--vocab-size", str(len(MidiTokenizer()) + 30)]) == 0
    return root


def _finetune(base, ckpt, *extra, epochs=2):
    argv = [str(epochs), str(ckpt), "-t", f"new={base / 'new'}", "-v", str(base / "val"), *RUN]
    return tr.main([*argv, "--init-from", str(base / "base"), *extra])


def _rows(tok) -> list[int]:
    return lora.tag_token_ids(tok)


def test_init_from_carries_the_weights_and_gives_new_tags_new_rows(base, tmp_path):
    errors: list[str] = []
    b = finetune.read_base(base / "base", errors)
    assert not errors and b.tokenizer.tags == ["a", "b"]
    tok = MidiTokenizer.load(base / "base" / "tokenizer.json")
    tok.tags = ["a", "b", "new"]
    model = Transformer(ModelConfig.from_dict(b.config["model"]))
    finetune.init_weights(model, b, tok)
    got, new_row = model.state_dict(), _rows(tok)[2]
    for name, want in b.weights.items():
        if name in ("tok_emb.weight", "head.weight"):  # tied
            keep = torch.ones(len(want), dtype=torch.bool)
            keep[new_row] = False
            assert torch.equal(got[name][keep], want[keep])  # every old row, bit for bit
            mean = want[_rows(tok)[:2]].mean(0)
            assert not torch.equal(got[name][new_row], want[new_row])
            assert (got[name][new_row] - mean).abs().max() < 0.15  # the old tags' mean, plus a little noise
        else:
            assert torch.equal(got[name], want), name
    # The command: fresh state (one step), the base's tokenizer plus the new tag, provenance in config.json.
    ckpt = tmp_path / "ft"
    assert _finetune(base, ckpt, "--max-steps", "1", "-l", "1e-7", epochs=1) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["init_from"] == {
        "path": str((base / "base").resolve()),
        "fingerprint": b.fingerprint,
        "step": b.step,
        "tags": 2,
    }
    assert ck.load(ckpt).state["train_state"]["step"] == 1
    own = MidiTokenizer.load(ckpt / "tokenizer.json")
    assert own.fingerprint == b.tokenizer.fingerprint and own.tags == ["a", "b", "new"]
    w = ck.load(ckpt).model
    assert (
        max((w[k] - b.weights[k]).abs().max().item() for k in w if k not in ("tok_emb.weight", "head.weight"))
        < 1e-4
    )


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_incompatible_base_is_refused_in_one_line(base, tmp_path, capsys):
    err = _one_line_error(capsys, _finetune(base, tmp_path / "x", "--d-model", "64"))
    assert "another shape" in err and "d_model=32 (asked 64)" in err
    err = _one_line_error(capsys, _finetune(base, tmp_path / "y", "--init-from", str(tmp_path / "nowhere")))
    assert "no such checkpoint directory" in err
    (tmp_path / "z").mkdir()
    other = MidiTokenizer()
    other.train_bpe([str(p) for p in (base / "new").iterdir()], len(MidiTokenizer()) + 10)
    other.save(tmp_path / "z" / "tokenizer.json")
    assert "another tokenizer" in _one_line_error(capsys, _finetune(base, tmp_path / "z"))
    assert "--lora needs --init-from" in _one_line_error(
        capsys, tr.main(["1", str(tmp_path / "w"), "-t", str(base / "new"), "--lora", "4"])
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()


def test_freeze_keeps_the_embedding_and_the_first_blocks(base, tmp_path):
    ckpt = tmp_path / "fz"
    assert _finetune(base, ckpt, "--freeze", "1", "-l", "1e-2", epochs=1) == 0
    b, w = ck.read_weights(base / "base")[0], ck.load(ckpt).model
    new_row = _rows(MidiTokenizer.load(ckpt / "tokenizer.json"))[2]
    frozen = [k for k in w if k.startswith(("tok_emb", "blocks.0."))]
    for k in frozen:
        if k == "tok_emb.weight":
            keep = torch.ones(len(b[k]), dtype=torch.bool)
            keep[new_row] = False
            assert torch.equal(w[k][keep], b[k][keep])
        else:
            assert torch.equal(w[k], b[k]), k
    assert not torch.equal(w["blocks.1.mlp.up.weight"], b["blocks.1.mlp.up.weight"])
    # --freeze 0: the embedding (and the tied head) only
    assert _finetune(base, tmp_path / "fz0", "--freeze", "0", "-l", "1e-2", "--max-steps", "1", epochs=1) == 0
    w0 = ck.load(tmp_path / "fz0").model
    keep = torch.ones(len(b["tok_emb.weight"]), dtype=torch.bool)
    keep[new_row] = False
    assert torch.equal(w0["tok_emb.weight"][keep], b["tok_emb.weight"][keep])
    assert not torch.equal(w0["blocks.0.mlp.up.weight"], b["blocks.0.mlp.up.weight"])


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(base, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in (base / "base").iterdir() if p.is_file()}
    ckpt = tmp_path / "lora"
    assert _finetune(base, ckpt, "--lora", "4", "-l", "1e-2") == 0
    assert {p.name: p.read_bytes() for p in (base / "base").iterdir() if p.is_file()} == before
    saved = ck.load(ckpt).model
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(t.abs().sum() > 0 for k, t in saved.items() if ".lora_B." in k)  # the adapters did train
    adapted, tok = ck.load_inference(ckpt, merged=False)
    base_sd = ck.read_weights(base / "base")[0]
    for name, t in adapted.state_dict().items():
        if name == "head.base_layer.weight":  # the embedding, tied: the base's but for the new tag's row
            assert t.data_ptr() == adapted.tok_emb.weight.data_ptr()
            keep = torch.ones(len(t), dtype=torch.bool)
            keep[_rows(tok)[2]] = False
            assert torch.equal(t[keep], base_sd["tok_emb.weight"][keep])
        elif ".base_layer." in name:  # the base weights, bit-identical after training
            assert torch.equal(t, base_sd[name.replace(".base_layer", "")]), name
    x = torch.tensor(
        [[tok.bos_id, *MidiTokenizer.load(ckpt / "tokenizer.json").encode(base / "val" / "p4.mid")[:60]]]
    )
    rec = ck.read_config(ckpt)["lora"]  # the defaults: the head adapted too, LoRA+
    assert rec["targets"] == list(lora.DEFAULT_TARGETS) and "head" in rec["targets"]
    assert rec["b_lr_ratio"] == lora.DEFAULT_B_LR_RATIO
    assert cli.main(["merge", str(ckpt), "-o", str(tmp_path / "merged")]) == 0
    assert ck.read_config(tmp_path / "merged")["model"]["tie_head"] is False  # the head has its own weights
    merged, _ = ck.load_inference(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(x), adapted(x), atol=1e-5)
        assert torch.equal(ck.load_inference(ckpt)[0](x), merged(x))  # load_inference merges the same way
    # --freeze from the merged base keeps its untied head as well as its embedding
    fz = tmp_path / "fz-merged"
    argv = ["1", str(fz), "-t", f"new={base / 'new'}", "-v", str(base / "val"), *RUN, "--max-steps", "1"]
    assert tr.main([*argv, "--init-from", str(tmp_path / "merged"), "--freeze", "0", "-l", "1e-2"]) == 0
    w, m = ck.load(fz).model, ck.read_weights(tmp_path / "merged")[0]
    assert torch.equal(w["head.weight"], m["head.weight"])
    assert not torch.equal(w["blocks.0.mlp.up.weight"], m["blocks.0.mlp.up.weight"])
    # generate and evaluate take the LoRA checkpoint like any other
    out = tmp_path / "g.mid"
    assert cli.main(["generate", str(ckpt), "-o", str(out), "--max-tokens", "30", "--seed", "1"]) == 0
    assert out.stat().st_size > 0
    assert cli.main(["evaluate", str(ckpt), "-v", str(base / "val")]) == 0
    # and so is its CKPT/best, which holds adapters only too (config.json names the same base)
    best = ckpt / ck.BEST_DIR
    assert ck.read_best(ckpt) and "lora" in ck.read_config(best)
    assert all(".lora_" in k for k in ck.read_weights(best)[0])
    assert cli.main(["generate", str(best), "-o", str(tmp_path / "b.mid"), "--max-tokens", "30"]) == 0
    assert (tmp_path / "b.mid").stat().st_size > 0
    assert cli.main(["evaluate", str(best), "-v", str(base / "val")]) == 0
    # a checkpoint whose base is gone (or changed) is refused in one line
    moved = tmp_path / "lora_copy"
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["lora"]["base"]["path"] = str(tmp_path / "gone")
    # config.json is covered by state.pth's sums: rewrite it the way a save would
    c = ck.load(moved)
    ck.save(moved, model=c.model, optimizer=c.optimizer, state=c.state, metrics=c.metrics, config=cfg)
    capsys.readouterr()
    err = _one_line_error(capsys, cli.main(["generate", str(moved), "-o", str(tmp_path / "h.mid")]))
    assert "base checkpoint" in err and "missing" in err


_KILLER = """
import os, signal, sys
sys.path.insert(0, {src!r})
from midiforge import checkpoint
from midiforge.train import command as train
saves = {{"n": 0}}
real_save = checkpoint.save
def save(*a, **k):
    real_save(*a, **k)
    saves["n"] += 1
    if saves["n"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save
sys.exit(train.main(sys.argv[1:]))
"""


def test_lora_resumes_exactly_after_a_kill(base, tmp_path):
    extra = ["--lora", "4", "-l", "1e-2"]
    assert _finetune(base, tmp_path / "full", *extra) == 0
    ckpt = tmp_path / "killed"
    argv = [
        "2", str(ckpt), "-t", f"new={base / 'new'}", "-v", str(base / "val"), *RUN,
        "--init-from", str(base / "base"), *extra, "--save-every-minutes", "1e-9",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER.format(src=str(ROOT / "src")), *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (
        0
        < ck.load(ckpt).state["train_state"]["step"]
        < ck.load(tmp_path / "full").state["train_state"]["step"]
    )
    assert tr.main(argv) == 0  # the same command again resumes
    a, b = ck.load(tmp_path / "full"), ck.load(ckpt)
    assert len(a.metrics["epochs"]) == len(b.metrics["epochs"]) == 2
    for ea, eb in zip(a.metrics["epochs"], b.metrics["epochs"], strict=True):
        for key in ("train_loss", "val_loss", "tokens", "lr", "step"):
            assert eb[key] == pytest.approx(ea[key], rel=1e-6), key
    assert a.model.keys() == b.model.keys()
    assert all(torch.allclose(a.model[k], b.model[k], atol=1e-6) for k in a.model)
