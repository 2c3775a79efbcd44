"""`midiforge export CKPT -o DIR`: a checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

Our model already is a Llama (pre-norm RMSNorm blocks, SwiGLU MLP, rotary embeddings, no biases, head tied to
the embedding), so the conversion is renaming and splitting, checked to the last bit by tests/test_export.py:

=============================  ===========================================================================
ours                           Hugging Face Llama
=============================  ===========================================================================
``tok_emb`` (tied ``head``)    ``model.embed_tokens`` with ``tie_word_embeddings: true`` (stored once)
``head`` when untied           ``lm_head`` with ``tie_word_embeddings: false`` (a merged head adapter)
``blocks.i.attn.qkv`` (3C, C)  ``q_proj``, ``k_proj``, ``v_proj``: its three row blocks, in that order
``attn.proj`` / ``mlp.*``      ``o_proj`` / ``gate_proj``, ``up_proj``, ``down_proj``
``norm1`` / ``norm2``          ``input_layernorm`` / ``post_attention_layernorm`` (eps 1e-6)
rotary embeddings              the same layout: we rotate the first half of each head against the second
                               half (``rotate_half``), as Hugging Face does, with the same frequencies, so
                               the q/k rows need no permutation (Meta's original checkpoints rotate
                               interleaved pairs and do need one)
=============================  ===========================================================================

What does not map: our generation slides its window past ``max_seq_len`` (it re-reads the last tokens at
positions 0..), while Hugging Face keeps counting positions (``max_position_embeddings`` is only recorded);
keep ``max_new_tokens`` within the window or expect the model to be off its training positions. Control
prefixes and style tags are plain token ids, written into the folder's README. A LoRA checkpoint is exported
with its adapter merged into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from midiforge import checkpoint as ckpt_io
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.options import add_checkpoint

FORMATS = ("hf",)
MIDIFORGE_TOKENIZER = "midiforge_tokenizer.json"  # ours; "tokenizer.json" is the Hugging Face one


def hf_state_dict(model) -> dict:
    """Our Transformer's weights under Hugging Face Llama names (a tied head is stored once)."""
    c, sd = model.config, model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not c.tie_head:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attn.qkv.weight"].split(c.d_model, dim=0)  # (C, C) each
        names = {
            "self_attn.q_proj": q,
            "self_attn.k_proj": k,
            "self_attn.v_proj": v,
            "self_attn.o_proj": sd[ours + "attn.proj.weight"],
            "mlp.gate_proj": sd[ours + "mlp.gate.weight"],
            "mlp.up_proj": sd[ours + "mlp.up.weight"],
            "mlp.down_proj": sd[ours + "mlp.down.weight"],
            "input_layernorm": sd[ours + "norm1.weight"],
            "post_attention_layernorm": sd[ours + "norm2.weight"],
        }
        out.update({theirs + name + ".weight": t for name, t in names.items()})
    # safetensors refuses views that share memory (q, k, v of one tensor): one contiguous copy each.
    return {k: t.detach().to("cpu").contiguous().clone() for k, t in out.items()}


def llama_shape(model_cfg) -> dict:
    """LlamaConfig fields of our shape (no grouped-query attention, no biases, head tied unless a head adapter
    was merged): the one mapping that the export and the benches' Hugging Face twin (bench/benchlib.hf_llama)
    both use."""
    return {
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.d_ff,
        "num_hidden_layers": model_cfg.n_layer,
        "num_attention_heads": model_cfg.n_head,
        "num_key_value_heads": model_cfg.n_head,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_seq_len,
        "rms_norm_eps": 1e-6,
        "rope_theta": model_cfg.rope_base,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": model_cfg.tie_head,
    }


def hf_config(model_cfg, tok, provenance: dict) -> dict:
    """config.json of a LlamaForCausalLM of our shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **llama_shape(model_cfg),
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
        "midiforge": provenance,
    }


def generation_config(tok, model_cfg) -> dict:
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_length": model_cfg.max_seq_len,
    }


def hf_tokenizer_files(tok) -> dict[str, bytes]:
    """The BPE as a ``tokenizers`` file that ``AutoTokenizer`` loads (ids ↔ strings of base events, one
    character each; they mean nothing as text: decode ids to MIDI with midiforge)."""
    if not tok.is_trained:
        return {}
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 10**9, **specials}
    return {
        "tokenizer.json": tok._bpe.to_str().encode("utf-8"),
        "tokenizer_config.json": _json(cfg),
        "special_tokens_map.json": _json(specials),
    }


def readme(ckpt: Path, model_cfg, tok, provenance: dict) -> str:
    tags = ", ".join(f"{t}" for t in tok.tags) or "none"
    head = (
        "tied to the embedding"
        if model_cfg.tie_head
        else "`lm_head`, untied (a LoRA adapter of it was merged)"
    )
    return f"""# A midiforge model in the Hugging Face Llama format

Exported from `{ckpt}` (model fingerprint {provenance["fingerprint"]}, step {provenance["step"]}):
{model_cfg.n_layer} layers, width {model_cfg.d_model}, {model_cfg.n_head} heads, {model_cfg.vocab_size}
token ids, trained on windows of {model_cfg.max_seq_len} tokens. Style tags: {tags}.

The token ids are midiforge's MIDI tokens: id {tok.bos_id} starts a piece, {tok.eos_id} ends it, {tok.pad_id}
pads. `tokenizer.json` is the BPE as `tokenizers` reads it (strings of event characters, not text);
`{MIDIFORGE_TOKENIZER}` is midiforge's own tokenizer, which turns ids into MIDI.

## Generate with transformers, write MIDI with midiforge

```python
import torch
from transformers import LlamaForCausalLM
from midiforge.tokens.tokenizer import MidiTokenizer

model = LlamaForCausalLM.from_pretrained("THIS_FOLDER").eval()
ids = model.generate(torch.tensor([[{tok.bos_id}]]), max_new_tokens=500, do_sample=True, top_k=0)
tok = MidiTokenizer.load("THIS_FOLDER/{MIDIFORGE_TOKENIZER}")
tok.decode(ids[0].tolist()).dump_midi("out.mid")  # every id sequence decodes to a valid Score
```

Keep prompt + new tokens within {model_cfg.max_seq_len}: midiforge's own `generate` slides its window
beyond that, Hugging Face keeps counting positions the model never saw in training.

## What was converted

The fused `qkv` projection was split into `q_proj`, `k_proj`, `v_proj`; the rotary embeddings need no
permutation (both rotate the first half of a head against the second); the output head is {head}.
The logits equal midiforge's to float32 rounding.
"""


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def export(ckpt: str | Path, out: str | Path, fmt: str = "hf") -> list[Path]:
    """Write the folder; returns the files written. UsageError for a bad checkpoint or output folder."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: only {', '.join(FORMATS)} is supported")
    try:
        from safetensors.torch import save
    except ImportError:
        raise UsageError("export needs safetensors: pip install 'midiforge[export]'") from None
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a directory")
    model, tok = ckpt_io.load_inference(ckpt)
    provenance = ckpt_io.provenance(ckpt)
    files = {
        "config.json": _json(hf_config(model.config, tok, provenance)),
        "generation_config.json": _json(generation_config(tok, model.config)),
        "model.safetensors": save(hf_state_dict(model), metadata={"format": "pt"}),
        MIDIFORGE_TOKENIZER: (ckpt / ckpt_io.TOKENIZER_FILE).read_bytes(),
        "README.md": readme(ckpt, model.config, tok, provenance).encode("utf-8"),
        **hf_tokenizer_files(tok),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        atomic_write_bytes(out / name, blob)
    return [out / name for name in files]


def configure_parser(p) -> None:
    add_checkpoint(p, "checkpoint folder (a LoRA checkpoint is merged first)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write (created when missing)")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf: LlamaForCausalLM (default)")


def run(args) -> int:
    written = export(args.checkpoint, args.output, args.format)
    print(f"wrote {len(written)} files to {args.output} (LlamaForCausalLM; see its README.md)")
    return 0
