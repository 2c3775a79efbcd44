"""checkpoint.py: consistent atomic saves, crash recovery, weights_only refusal, and load_inference."""

from __future__ import annotations

import json
import os

import pytest
import torch

from midiforge import checkpoint as ck
from midiforge.errors import UsageError
from midiforge.model import ModelConfig, Transformer
from midiforge.tokens.tokenizer import MidiTokenizer


class _RunsCode:
    """A pickle payload that would create a file when unpickled (what weights_only must refuse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _tiny(tok=None):
    tok = tok or MidiTokenizer()
    cfg = ModelConfig(vocab_size=len(tok), n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=32)
    torch.manual_seed(0)
    return Transformer(cfg), tok


def _save(d, model, step=1):
    opt = torch.optim.AdamW(model.parameters())
    ck.save(
        d,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        state={"counters": {"step": step}},
        metrics={"epochs": [], "steps": [[0.5, 1.0 * step]]},
        config={"model": model.config.to_dict(), "train": {}},
    )


def test_save_load_roundtrip_and_prefixes(tmp_path):
    model, tok = _tiny()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    ck.save(
        tmp_path,
        model=wrapped,
        optimizer=opt.state_dict(),
        state={"counters": {"step": 3}},
        metrics={"epochs": []},
        config={"model": model.config.to_dict()},
    )
    got = ck.load(tmp_path)
    assert set(got.model) == set(model.state_dict())  # no module./_orig_mod. prefix on disk
    assert got.state["counters"]["step"] == 3 and got.metrics == {"epochs": []}
    assert not (tmp_path / ck.PENDING_DIR).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert ck.strip_prefixes({"module.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}


def test_interrupted_saves(tmp_path):
    model, _ = _tiny()
    _save(tmp_path, model, step=1)
    # A crash while writing the files of step 2 (no COMMIT marker yet): the step-1 checkpoint stays.
    pending = tmp_path / ck.PENDING_DIR
    pending.mkdir()
    (pending / ck.MODEL_FILE).write_bytes(b"half a file")
    assert ck.load(tmp_path).state["counters"]["step"] == 1
    assert pending.exists()  # a reader cannot tell a dead writer's half save from a live one's: it stays
    with ck.RunLock(tmp_path):  # the writer discards it
        ck.recover(tmp_path)
    assert not pending.exists()
    # A crash after COMMIT, with some files already renamed: the save is rolled forward on the next load.
    _save(tmp_path / "next", model, step=2)
    pending.mkdir()
    for name in ck.SAVE_FILES:
        os.replace(tmp_path / "next" / name, pending / name)
    (pending / ck.COMMIT_MARKER).write_text(json.dumps({"files": list(ck.SAVE_FILES)}))
    os.replace(pending / ck.MODEL_FILE, tmp_path / ck.MODEL_FILE)  # renamed just before the crash
    got = ck.load(tmp_path)  # readers see the committed save whole ...
    assert got.state["counters"]["step"] == 2 and got.metrics["steps"] == [[0.5, 2.0]]
    assert (pending / ck.COMMIT_MARKER).exists()  # ... without finishing it
    with ck.RunLock(tmp_path):
        ck.recover(tmp_path)  # the writer rolls it forward
    assert not pending.exists() and ck.load(tmp_path).state["counters"]["step"] == 2


def test_mixed_files_are_detected(tmp_path):
    model, _ = _tiny()
    _save(tmp_path / "a", model, step=1)
    _save(tmp_path / "b", model, step=2)
    os.replace(tmp_path / "b" / ck.METRICS_FILE, tmp_path / "a" / ck.METRICS_FILE)
    with pytest.raises(UsageError, match="inconsistent checkpoint"):
        ck.load(tmp_path / "a")


@pytest.mark.parametrize("name", [ck.MODEL_FILE, ck.STATE_FILE, ck.OPTIMIZER_FILE])
def test_code_carrying_pickle_is_refused(tmp_path, name):
    model, tok = _tiny()
    _save(tmp_path, model)
    tok.save(tmp_path / ck.TOKENIZER_FILE)
    marker = tmp_path / "pwned"
    torch.save({"weight": _RunsCode(marker)}, tmp_path / name)
    with pytest.raises(UsageError, match="refused"):
        ck.load(tmp_path)
    if name == ck.MODEL_FILE:
        with pytest.raises(UsageError, match="refused"):
            ck.load_inference(tmp_path)
    assert not marker.exists()


def test_load_inference(tmp_path):
    model, tok = _tiny()
    with pytest.raises(UsageError, match="no such checkpoint"):
        ck.load_inference(tmp_path / "missing")
    _save(tmp_path, model)
    with pytest.raises(UsageError, match="no tokenizer.json"):
        ck.load_inference(tmp_path)
    tok.save(tmp_path / ck.TOKENIZER_FILE)
    loaded, tok2 = ck.load_inference(tmp_path)
    assert not loaded.training and len(tok2) == len(tok)
    idx = torch.randint(0, len(tok), (1, 8))
    assert torch.equal(loaded(idx), model.eval()(idx))
    # A config.json edited by hand no longer matches the sum state.pth recorded.
    cfg = json.loads((tmp_path / ck.CONFIG_FILE).read_text())
    cfg["model"]["dropout"] = 0.5
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="inconsistent checkpoint: config.json"):
        ck.load_inference(tmp_path)
    # Without state.pth (an inference-only directory): a model of another shape than config.json says, or a
    # tokenizer of another size, is refused.
    (tmp_path / ck.STATE_FILE).unlink()
    cfg = json.loads((tmp_path / ck.CONFIG_FILE).read_text())
    cfg["model"]["d_model"] = 32
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="does not fit"):
        ck.load_inference(tmp_path)
    cfg["model"]["d_model"], cfg["model"]["vocab_size"] = 16, len(tok) + 1
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="tokens"):
        ck.load_inference(tmp_path)
