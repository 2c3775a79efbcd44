"""Turning logits into tokens: :func:`sample` (temperature, top-k, top-p, one uniform number per row),
:func:`next_token` (one model call, sampled on the host) and where a sliding window may be cut.

Determinism: one seeded ``torch.Generator`` supplies exactly one uniform number per sample per step, and
sampling runs in float32; so a seed gives the same music on every run on one kind of device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MAX_SECONDS_CHECK_EVERY = 32  # tokens between checks of the decoded length against max_seconds
WINDOW_KEEP = 0.75  # fraction of the window kept when the context slides (the rest is dropped, oldest first)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids (B,) drawn from logits (B, V) with temperature, then top-k, then nucleus (top-p) filtering.

    Draws exactly one uniform number per row from ``generator`` (a torch.Generator, or a streams.RowStreams with
    one stream per row) by inverse-CDF sampling, so the random stream
    advances the same way whatever the logits are; or takes those numbers as ``u`` (B, 1) in [0, 1), drawn
    ahead (decode.py draws a block of steps at once, so that a captured step draws nothing).
    """
    logits = logits.float() / temperature  # (B, V)
    V = logits.size(-1)
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already hold top_p (so the top token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)  # (B, V), unnormalised after filtering
    if u is None:
        u = uniforms(generator, 1, probs.size(0), probs.device)[0]
    u = u * cdf[:, -1:]  # (B, 1)
    # First index whose cdf exceeds u: always a token of positive probability...
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,)
    # ...unless rounding put u at the total: then the last token of positive probability.
    last = V - 1 - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(idx, last)


def uniforms(generator, steps: int, rows: int, device) -> torch.Tensor:
    """(steps, rows, 1) uniforms in [0, 1): the next ``steps`` steps' draws, the same numbers as ``steps``
    draws of one step each (a torch.Generator on the CPU, or a streams.RowStreams, which is counter-based)."""
    if hasattr(generator, "uniform"):  # streams.RowStreams: row k's own stream (seed, k)
        return torch.stack([generator.uniform(rows, device) for _ in range(steps)])
    return torch.rand(steps, rows, 1, generator=generator, device=device)


@torch.inference_mode()
def next_token(
    model: torch.nn.Module,
    idx: torch.Tensor,
    kv_cache=None,
    *,
    banned: Sequence[int] = (),
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **sampling,
) -> torch.Tensor:
    """The next token (B,) after ``idx`` (B, T): the new tokens when ``kv_cache`` holds the ones before.
    ``allowed``: (B, V) or (V,) bool, False = never drawn (steer.py: --instruments, EOS before the minimum);
    ``bias``: (V,) or (B, V) float added to the logits first (steer.py: the key's pull; the beat's texture)."""
    logits = model(idx, kv_cache, last_only=True)[:, -1, :].float().cpu()  # (B, V), sampled on CPU
    if bias is not None:
        logits = logits + bias.cpu()
    if banned:
        logits[:, list(banned)] = float("-inf")
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return sample(logits, generator=generator, **sampling)


def window_cut(tokenizer, ids: torch.Tensor, start: int, stop: int, active: torch.Tensor) -> int:
    """Where the slid window starts: the first position in [start, stop) where every still-active row begins a
    new onset (so no note is cut in half), or ``start`` itself when there is no such position."""
    rows = ids[active] if bool(active.any()) else ids
    ok = np.logical_and.reduce([tokenizer.word_starts(r[start:stop].numpy()) for r in rows])
    hits = np.flatnonzero(ok)
    return start + int(hits[0]) if len(hits) else start
