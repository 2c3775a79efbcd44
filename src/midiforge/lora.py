"""Low-rank adapters (LoRA) on our Transformer, through ``peft``, and the rows of new style tags.

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` in place by a LoRA layer that keeps the
original as ``base_layer`` (frozen) and adds ``lora_B @ lora_A`` scaled by ``alpha / rank``; every other
parameter is frozen. The model stays our :class:`~midiforge.model.Transformer` (same forward, same KV cache),
so training and generation need nothing else. A LoRA checkpoint's ``model.pth`` holds the adapter tensors
only (``get_peft_model_state_dict`` names, without the adapter name); ``config.json["lora"]`` says which base
it adapts (path and fingerprint, checked on load) and how.

New style tags: the vocabulary reserves MAX_TAGS CTL_TAG rows, and a base model only ever read the rows of
its own tags. A fine-tuning run that brings new tags gives each new slot a fresh row (:func:`new_tag_rows`),
derived from the base alone so that a LoRA checkpoint, which does not store the embedding, gets the same rows
back when it is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from midiforge.errors import UsageError

TARGETS = ("qkv", "proj", "gate", "up", "down")  # attention in/out, SwiGLU gate/up/down projections
DEFAULT_TARGETS = TARGETS
DEFAULT_ALPHA_PER_RANK = 2.0  # alpha = 2 x rank when not given: the adapter's update is scaled by 2


def lora_config(rank: int, alpha: float, targets):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")


def attach(model: torch.nn.Module, rank: int, alpha: float, targets) -> torch.nn.Module:
    """Add adapters to ``model`` in place (peft freezes everything else); returns the same model."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(lora_config(rank, alpha, targets), model)


def adapter_state(model: torch.nn.Module) -> dict:
    """The adapter tensors only (what a LoRA checkpoint's model.pth holds)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(model: torch.nn.Module, state: dict) -> None:
    """Load adapter tensors into an attached model; KeyError/RuntimeError when they do not fit it."""
    from peft import set_peft_model_state_dict

    want = set(adapter_state(model))
    if set(state) != want:
        extra, missing = sorted(set(state) - want), sorted(want - set(state))
        raise KeyError(f"adapter tensors do not match: unexpected {extra[:3]}, missing {missing[:3]}")
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"unexpected adapter tensors {result.unexpected_keys[:3]}")


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back; returns the model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def assemble(model, rec: dict, tokenizer, adapters: dict, merged: bool, read_weights, where) -> None:
    """A LoRA checkpoint's model (``rec``: its config.json "lora"): the base's weights (``read_weights``:
    checkpoint.read_weights; the base must be where it was, with the same fingerprint), the rows of the tags new
    since the base as training initialised them, the adapters; folded in with ``merged``."""
    base, want = Path(rec["base"]["path"]), rec["base"]["fingerprint"]
    if not base.is_dir():
        raise UsageError(
            f"{where}: its base checkpoint {base} is missing (a LoRA checkpoint holds adapters only)"
        )
    weights, _, fingerprint, _ = read_weights(base)
    if fingerprint != want:
        raise UsageError(
            f"{where}: its base checkpoint {base} changed since the adapters were trained (fingerprint"
            f" {fingerprint}, expected {want})"
        )
    model.load_state_dict(weights)
    slots = tag_token_ids(tokenizer)
    new_tag_rows(model.tok_emb.weight.data, slots, int(rec["base"].get("tags", 0)), len(tokenizer.tags))
    attach(model, int(rec["rank"]), float(rec["alpha"]), rec["targets"])
    load_adapter(model, adapters)
    if merged:
        merge(model)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tag_token_ids(tok) -> list[int]:
    """The token id of every CTL_TAG slot, in slot order (BPE need not keep them contiguous)."""
    import numpy as np

    from midiforge.tokens.controls import MAX_TAGS

    return tok.base_token_ids(np.arange(MAX_TAGS) + tok.vocab.start["ctl_tag"]).tolist()


@torch.no_grad()
def new_tag_rows(emb: torch.Tensor, slot_ids: list[int], old_tags: int, new_tags: int) -> None:
    """Initialise the embedding rows (``emb`` (V, C), in place) of tag slots ``old_tags .. new_tags - 1``.

    ``slot_ids``: :func:`tag_token_ids`. Each new row is the mean of the base's tag rows (of all rows when the
    base had no tags: the "typical token") plus N(0, 0.02) noise seeded by the slot, so that two new tags
    start apart. The base only ever read its own tags' rows; the others were pushed down as outputs and are
    no sensible start. Every other row is left as it is.
    """
    if new_tags <= old_tags:
        return
    anchor = emb[slot_ids[:old_tags]] if old_tags else emb  # (old_tags or V, C)
    mean = anchor.float().mean(0)  # (C,)
    for slot in range(old_tags, new_tags):
        g = torch.Generator().manual_seed(1_000_003 + slot)
        noise = torch.randn(emb.size(1), generator=g) * 0.02  # (C,)
        emb[slot_ids[slot]] = (mean + noise).to(emb.dtype)
