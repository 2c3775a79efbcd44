"""The Transformer: a decoder-only language model over MIDI token ids (architecture only, nanoGPT-style).

Pre-norm blocks (RMSNorm → attention / SwiGLU MLP → residual add), rotary position embeddings, attention through
``F.scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU), output head tied to the token
embedding (untied only by merging a LoRA adapter of the head). Generation passes a :class:`KVCache` so that
each new token costs one position, not the whole window.

Shapes in comments: B batch, T new positions, S attended positions (cache + new), C d_model, nh heads,
hd head size (C // nh), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Shape of a :class:`Transformer`; saved as ``config.json["model"]`` beside every checkpoint."""

    vocab_size: int
    """Number of token ids (``len(tokenizer)``, specials included)."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; ``d_model`` must be divisible by it (head size even, for rotary embeddings)."""
    d_model: int = 128
    """Width of the residual stream (embedding size)."""
    d_ff: int = 512
    """Hidden width of the SwiGLU feed-forward layer."""
    dropout: float = 0.0
    """Dropout on the attention and MLP outputs before each residual add (training only)."""
    max_seq_len: int = 1024
    """Longest sequence the model sees: the training window, and the sliding window of generation."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    tie_head: bool = True
    """The output head shares the token embedding's weights; False once a LoRA adapter of the head is merged
    (``midiforge merge``): the head then has its own weights and the embedding is left as it was."""

    def __post_init__(self) -> None:
        if (
            self.vocab_size < 1
            or self.n_layer < 1
            or self.n_head < 1
            or self.d_ff < 1
            or self.max_seq_len < 1
        ):
            raise ValueError(f"model sizes must be positive: {self}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) into an even head size"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        """The fields as config.json stores them; ``tie_head`` only when False, so that a tied model's
        config.json is what it always was."""
        d = asdict(self)
        if d["tie_head"]:
            del d["tie_head"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict (e.g. ``config.json["model"]``); unknown keys are an error, not silently dropped."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


# Shape fields only: the vocabulary comes from the tokenizer, the window from the training setup.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128, d_ff=512),  # ~0.8M params + embeddings: minutes on a CPU
    "small": dict(n_layer=6, n_head=4, d_model=256, d_ff=1024),
    "base": dict(n_layer=12, n_head=8, d_model=512, d_ff=2048),
    "large": dict(n_layer=24, n_head=16, d_model=1024, d_ff=4096),
}


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to ``max_len`` positions.

    ``pos`` is the number of positions filled; :meth:`Transformer.forward` writes the new positions at
    ``[pos, pos + T)`` in every layer and then advances ``pos``. Call :meth:`reset` to reuse the memory for a new
    sequence (generation does so when its sliding window moves: rotary positions change, so the kept tokens
    must be prefilled again).
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int | None = None, *, device=None, dtype=None
    ):
        self.max_len = max_len or config.max_seq_len
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, max_len, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at [pos, pos+T) of ``layer``; return all keys/values (B, nh, pos+T, hd)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# The fixed-shape one-token step's view of one layer: (where (1,) long: the position written, visible (1, M) bool:
# the positions attended, k and v (B, nh, M, hd): that layer's preallocated cache). Tensors only, no layer index:
# a compiled block is then one graph for every layer (see run_block).
StaticSlot = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def run_block(block: nn.Module, x: torch.Tensor, cos, sin, kv_cache=None, static=None) -> torch.Tensor:
    """``block(x, cos, sin, kv_cache, static)``: the unit of regional compilation. ``torch.compile`` of this
    function traces one block and reuses the compiled code for every layer (the parameters are inputs of the
    graph, not constants), so compile time does not grow with depth. Pass it as ``block_fn``."""
    return block(x, cos, sin, kv_cache, static)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so that bf16/fp16 autocast does not lose the small mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_len, hd/2), for rotating position p by angle p·base^(-2i/hd)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) pairwise (first half with second half) by the angles of cos/sin (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.proj.is_residual_proj = True  # scaled init, see Transformer._init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        static: StaticSlot | None = None,
    ) -> torch.Tensor:
        """``static``: one token written at ``where`` of this layer's preallocated keys and values, attending to
        the visible positions through a mask (see :class:`StaticSlot`): the fixed-shape step a CUDA graph
        captures. ``kv_cache`` is not read then."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if static is not None:
            where, visible, k_all, v_all = static
            k_all.index_copy_(2, where, k.to(k_all.dtype))  # (B, nh, M, hd): this position written
            v_all.index_copy_(2, where, v.to(v_all.dtype))
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible)  # (B, nh, 1, hd)
            return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, S, hd), S = start + T
        if start == 0:
            # Whole sequence at once (training, or prefill into an empty cache): plain causal attention.
            # Right padding needs no mask: real positions never attend to the padding after them.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            # One new token attends to every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # T new tokens after `start` cached ones. is_causal would align the triangle top-left (wrong
            # here), so spell the mask out: query i (absolute start+i) sees keys 0..start+i.
            mask = (
                torch.arange(start + T, device=x.device)[None, :]
                <= (start + torch.arange(T, device=x.device))[:, None]
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (T, S)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.down.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model)
        self.attn = Attention(config, layer_idx)
        self.norm2 = RMSNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        static: StaticSlot | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache, static)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_head:  # weight tying: fewer parameters, no loss in quality at this size
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
        # Not persistent: derived from the config, so model.pth holds learned tensors only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_proj", False):
                # Each block adds two projections to the residual stream: keep its variance ~constant in depth.
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache on the model's device and dtype, for up to ``max_len`` (default max_seq_len) positions."""
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def cast(self, dtype: torch.dtype) -> Transformer:
        """Weights (and so new KV caches) in ``dtype`` for inference; the rotary tables stay float32 (a bf16
        angle table would be off by ~1e-2 at long positions). Returns self."""
        self.to(dtype=dtype)
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        return self

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        *,
        last_only: bool = False,
        block_fn=run_block,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); (B, 1, V) for the last position only with ``last_only``.

        With ``kv_cache`` the T tokens continue the ``kv_cache.pos`` positions already cached, and the cache
        advances by T. ``block_fn``: how each block is called (a compiled :func:`run_block` for regional
        compilation).
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        end = start + T
        if end > self.config.max_seq_len or (kv_cache is not None and end > kv_cache.max_len):
            limit = min(self.config.max_seq_len, kv_cache.max_len if kv_cache is not None else end)
            raise ValueError(f"sequence of {end} positions exceeds the model's window of {limit}")
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # (T, hd/2)
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block_fn(block, x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos = end
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): generation needs only the next-token distribution
        return self.head(self.norm(x))  # (B, T, V)

    def static_step(
        self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, block_fn=run_block
    ) -> torch.Tensor:
        """One token (B, 1) at position ``pos`` (0-dim long tensor on the device) through the model, writing its
        keys/values into ``cache`` at ``pos`` and attending over the whole preallocated cache with a mask.

        Unlike ``self(tok, cache)`` every shape and address here is the same at every position (the position is
        data, not a Python int), which is what a CUDA graph needs. Returns logits (B, V), float32. The cache's
        ``pos`` is the caller's to advance. ``block_fn`` as in :meth:`forward`.
        """
        where = pos.view(1)  # (1,)
        cos, sin = self.rope_cos.index_select(0, where), self.rope_sin.index_select(0, where)  # (1, hd/2)
        visible = (torch.arange(cache.max_len, device=tok.device) <= pos)[
            None, :
        ]  # (1, M): filled, this one too
        x = self.tok_emb(tok)  # (B, 1, C)
        for i, block in enumerate(self.blocks):
            x = block_fn(block, x, cos, sin, None, (where, visible, cache.k[i], cache.v[i]))
        return self.head(self.norm(x))[:, -1, :].float()  # (B, V)
