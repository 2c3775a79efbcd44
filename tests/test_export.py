"""`midiforge export --format hf`: transformers loads the folder, its logits equal ours, generate() decodes.

Needs ``transformers`` (the ``export`` test extra): skipped with the reason when it is missing, except under
``CI=true``, where the test fails instead (the export must be checked in CI).
"""

from __future__ import annotations

import json
import os

import pytest
import symusic
import torch
from conftest import corpus_dir

from midiforge import checkpoint as ck
from midiforge import cli
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import command as tr

TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "-b", "262144", "-e", "256"]


def _transformers():
    try:
        import transformers
    except ImportError:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(
                "transformers is not installed and CI=true: the export must be tested in CI", pytrace=False
            )
        pytest.skip("transformers is not installed (pip install 'midiforge[export]')")
    return transformers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch on 3 POP909 songs; 5 others are held out."""
    songs = sorted(corpus_dir("pop909").glob("*.mid"))
    root = tmp_path_factory.mktemp("export")
    for folder, files in (("train", songs[:3]), ("heldout", songs[200:205])):
        (root / folder).mkdir()
        for f in files:
            (root / folder / f.name).symlink_to(f)
    args = ["1", str(root / "ckpt"), "-t", f"pop={root / 'train'}", *TINY, "--vocab-size", "1000"]
    assert tr.main(args) == 0
    return root


def test_hf_export_has_our_logits_and_generates_midi(trained, tmp_path):
    transformers = _transformers()
    out = tmp_path / "hf"
    assert cli.main(["export", str(trained / "ckpt"), "-o", str(out), "--format", "hf"]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, tok = ck.load_inference(trained / "ckpt")
    assert (
        json.loads((out / "config.json").read_text())["midiforge"]["fingerprint"]
        == ck.provenance(trained / "ckpt")["fingerprint"]
    )
    window = ours.config.max_seq_len
    for f in sorted((trained / "heldout").iterdir()):  # 5 held-out pieces, one window each
        ids = torch.tensor([[tok.bos_id, *tok.encode(f)][:window]])
        with torch.no_grad():
            diff = (hf(input_ids=ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-4, (f.name, diff)
    torch.manual_seed(0)
    gen = hf.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=120, do_sample=True, top_k=0)
    mine = MidiTokenizer.load(out / "midiforge_tokenizer.json")
    path = tmp_path / "hf.mid"
    mine.decode(gen[0].tolist()).dump_midi(str(path))
    back = symusic.Score(str(path))  # valid MIDI: symusic reads back what was written
    assert back.tpq > 0 and sum(len(t.notes) for t in back.tracks) > 0
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert len(fast) == len(tok) and fast.convert_tokens_to_ids("<eos>") == tok.eos_id


def test_export_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such checkpoint directory" in err


def test_a_lora_checkpoint_with_a_head_adapter_exports_an_untied_head(trained, tmp_path):
    """A head adapter, merged, gives the head weights of its own: the folder says tie_word_embeddings false and
    holds lm_head, and transformers' logits still equal ours."""
    transformers = _transformers()
    lora_ckpt = tmp_path / "lora"
    args = ["1", str(lora_ckpt), "-t", f"pop={trained / 'train'}", "-b", "262144", "-e", "256",
            "--init-from", str(trained / "ckpt"), "--lora", "4", "--lora-targets", "qkv", "head", "-l", "1e-2"]  # fmt: skip
    assert tr.main(args) == 0
    out = tmp_path / "hf"
    assert cli.main(["export", str(lora_ckpt), "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ours, tok = ck.load_inference(lora_ckpt)
    assert ours.config.tie_head is False
    assert torch.equal(hf.model.embed_tokens.weight, ck.read_weights(trained / "ckpt")[0]["tok_emb.weight"])
    for f in sorted((trained / "heldout").iterdir())[:2]:
        ids = torch.tensor([[tok.bos_id, *tok.encode(f)][: ours.config.max_seq_len]])
        with torch.no_grad():
            assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4, f.name
