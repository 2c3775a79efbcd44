"""Low-rank adapters (LoRA) on our Transformer, and the rows of new style tags.

:func:`attach` replaces each targeted ``nn.Linear`` in place by a :class:`LoraLinear` that keeps the original as
``base_layer`` (frozen) and adds ``alpha / rank * B @ A``; every other parameter is frozen. The model stays our
:class:`~midiforge.model.Transformer` (same forward, same KV cache), so training and generation need nothing
else. A LoRA checkpoint's ``model.pth`` holds the adapter tensors only (``blocks.0.attn.qkv.lora_A.weight``
...: the names ``peft``'s ``get_peft_model_state_dict`` gives, so checkpoints written through peft load
unchanged); ``config.json["lora"]`` says which base it adapts (path and fingerprint, checked on load) and how.

Why not peft's layer (the first version used it): its forward adds the adapter's output to the base's as
separate tensors (``base(x) + B(A(x)) * scale``), so every adapted projection allocates three more
activation-sized tensors in the forward pass and two more in the backward pass than a plain ``nn.Linear``; with
the import of ``transformers`` that peft pulls in, a LoRA step took *more* memory than full fine-tuning at
every preset (bench/finetune_memory.py). :class:`LoraFunction` does the same arithmetic with exactly one
output and one input gradient per projection, as the frozen ``nn.Linear`` alone would.

New style tags: the vocabulary reserves MAX_TAGS CTL_TAG rows, and a base model only ever read the rows of
its own tags. A fine-tuning run that brings new tags gives each new slot a fresh row (:func:`new_tag_rows`),
derived from the base alone so that a LoRA checkpoint, which does not store the embedding, gets the same rows
back when it is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from midiforge.errors import UsageError

# attention in/out, SwiGLU gate/up/down projections, and the output head (tied to the embedding: its adapter
# changes the output side only; merged, the head gets its own weights and the embedding stays as it was)
TARGETS = ("qkv", "proj", "gate", "up", "down", "head")
# The attention's input projection (LoRA's own choice: Hu et al. 2021 adapted W_q and W_v) and the head, which
# moves the output distribution towards the new music: at rank 8, 0.4-2.6% of the model at every preset with
# vocabularies up to 2,048 (the MLP's adapters alone are 5% at tiny); bench/bench_finetune.py measures it.
DEFAULT_TARGETS = ("qkv", "head")
DEFAULT_ALPHA_PER_RANK = 2.0  # alpha = 2 x rank when not given: the adapter's update is scaled by 2
# LoRA+ (Hayou et al. 2024): B (zero at the start) learns at 16 x the rate of A; with both at one rate, B grows
# too slowly for a short run (bench/bench_finetune.py: 32 steps). The Trainer puts the B matrices in a group of
# their own (``b_lr_ratio`` in config.json["lora"]; absent in older checkpoints: 1).
DEFAULT_B_LR_RATIO = 16.0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a linear layer in here (``x``'s own outside autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class LoraFunction(torch.autograd.Function):
    """``y = x W^T + scale (x A^T) B^T`` with one activation-sized output and, backward, one input gradient.

    Shapes: x (N, i), W (o, i), A (r, i), B (o, r), y (N, o). Saved for backward: x (which a plain linear
    layer saves too) and x A^T (N, r: small). Runs in autocast's dtype when autocast is on (an in-place
    ``addmm_`` is not autocast, so the casts are explicit) and returns gradients in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, a, b, scale: float):
        dt, ctx.x_dtype = _compute_dtype(x), x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x, w, a_, b_ = (t.to(dt) for t in (x, weight, a, b))
            xa = x @ a_.t()  # (N, r)
            y = (x @ w.t()).addmm_(xa, b_.t(), alpha=scale)  # (N, o)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, xa = ctx.saved_tensors
        dt, scale = g.dtype, ctx.scale
        w, a_, b_ = (t.to(dt) for t in (weight, a, b))
        x, xa = x.to(dt), xa.to(dt)
        gxa = (g @ b_).mul_(scale)  # (N, r)
        gx = gw = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ w).addmm_(gxa, a_).to(ctx.x_dtype)  # (N, i): the base's and the adapter's paths in one
        if ctx.needs_input_grad[1]:
            gw = (g.t() @ x).to(weight.dtype)  # (o, i): only when the base is not frozen
        if ctx.needs_input_grad[2]:
            ga = (gxa.t() @ x).to(a.dtype)  # (r, i)
        if ctx.needs_input_grad[3]:
            gb = (g.t() @ xa).mul_(scale).to(b.dtype)  # (o, r)
        return gx, gw, ga, gb, None


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus ``scale * lora_B(lora_A(x))``; B starts at zero, so the
    layer starts as the base. ``lora_A``/``lora_B`` are bias-free ``nn.Linear`` so that the adapter tensors are
    named ``lora_A.weight`` and ``lora_B.weight``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA here adapts bias-free projections only")
        self.base_layer = base
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init, as peft's
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = LoraFunction.apply(
            x.reshape(-1, x.size(-1)),
            self.base_layer.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scale,
        )  # (N, out)
        return y.view(*lead, y.size(-1))  # (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with ``scale * B @ A`` added to its weight (returned). The weight is a new tensor,
        not changed in place: the head's is the token embedding's as well, which must stay as it was."""
        w = self.base_layer.weight
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale  # (out, in)
        self.base_layer.weight = nn.Parameter(w + delta.to(w.dtype), requires_grad=w.requires_grad)
        return self.base_layer


def attach(model: nn.Module, rank: int, alpha: float, targets) -> nn.Module:
    """Add adapters to ``model`` in place and freeze everything else; returns the same model."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in set(targets) and ".lora_" not in name
    ]
    if not found:
        raise ValueError(f"no projection named {list(targets)} to adapt")
    for name in found:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoraLinear(getattr(owner, child), rank, alpha))
    return model


def _layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def _adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters by their checkpoint names (``blocks.0.attn.qkv.lora_A.weight`` ...)."""
    return {
        f"{name}.{part}.weight": getattr(m, part).weight
        for name, m in _layers(model)
        for part in ("lora_A", "lora_B")
    }


def adapter_state(model: nn.Module) -> dict:
    """The adapter tensors only (what a LoRA checkpoint's model.pth holds)."""
    return {k: p.detach().clone() for k, p in _adapter_params(model).items()}


@torch.no_grad()
def load_adapter(model: nn.Module, state: dict) -> None:
    """Load adapter tensors into an attached model; KeyError/RuntimeError when they do not fit it."""
    params = _adapter_params(model)
    if set(state) != set(params):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise KeyError(f"adapter tensors do not match: unexpected {extra[:3]}, missing {missing[:3]}")
    for name, t in state.items():
        target = params[name]
        if target.shape != t.shape:
            raise RuntimeError(
                f"adapter tensor {name}: shape {tuple(t.shape)}, the model wants {tuple(target.shape)}"
            )
        target.copy_(t)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back; returns the model. A
    merged head adapter unties the head from the embedding (``model.config.tie_head`` follows)."""
    for name, m in _layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    config = getattr(model, "config", None)
    if hasattr(config, "tie_head"):
        config.tie_head = model.head.weight is model.tok_emb.weight
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
