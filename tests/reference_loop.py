"""The reference token loop that midiforge.generate.decode.decode must agree with (tests and bench/bench_generate.py).

Plain and slow on purpose: every step's logits move to the host and are sampled there by ``next_token``.
"""

from __future__ import annotations

import torch

from midiforge.generate.constraints import combine, total_bias
from midiforge.generate.sampling import MAX_SECONDS_CHECK_EVERY, WINDOW_KEEP, next_token, window_cut


def reference_loop(
    model, tokenizer, head, B, max_new_tokens, max_seconds, use_kv_cache, banned, sampling, device, steer=None
) -> tuple[torch.Tensor, list[str]]:
    """The token loop as the plain reference: (ids (B, N) on CPU, stop reason per row, "" for none). Every
    token's logits go to the host (next_token); decode() must give the same tokens on the CPU."""
    window = model.config.max_seq_len
    ids = torch.tensor(head, dtype=torch.long).repeat(B, 1)  # (B, N) every token so far, on CPU
    stop = [""] * B  # stop reason per row; "" while active
    start = 0  # the model's context is ids[:, start:]
    # Only as many positions as this run can fill: the window may be far longer than the generation.
    cache = model.new_kv_cache(B, max_len=min(window, len(head) + max_new_tokens)) if use_kv_cache else None
    cached = 0  # ids[:, start:cached] are in the cache
    rules = steer.constraints(head, B, "cpu") if steer is not None else []
    pin = torch.tensor(steer.pinned if steer is not None else [], dtype=torch.long).repeat(B, 1)  # (B, P)
    bias = steer.logit_bias("cpu") if steer is not None else None  # (V,) or None
    banned_mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    banned_mask[list(banned)] = True
    for step in range(max_new_tokens):
        active = torch.tensor([not s for s in stop])
        if (
            ids.size(1) - start + (pin.size(1) if start else 0) > window
        ):  # no room for the next position: slide
            keep = max(1, int(window * WINDOW_KEEP) - pin.size(1))
            cut = ids.size(1) - keep
            start = window_cut(tokenizer, ids, cut, min(cut + window // 8, ids.size(1) - 1), active)
            if cache is not None:
                # Rotary positions are relative to the window start, so the kept tokens are prefilled again.
                cache.reset()
                cached = start
        feed = ids[:, cached if cache is not None else start :]
        if start and (
            cache is None or cached == start
        ):  # a slid context starts with the control prefix again
            feed = torch.cat([pin, feed], dim=1)
        allowed = steer.allowed(ids, len(head), step) if steer is not None else None  # (B, V) or None
        allowed = combine(allowed, rules, banned_mask)
        rb = total_bias(rules)  # (B, V) or None: the rules' logit biases
        b = bias if rb is None else (rb if bias is None else bias + rb)
        tok = next_token(
            model, feed.to(device), cache, banned=banned, allowed=allowed, bias=b, **sampling
        )  # (B,)
        for rule in rules:
            rule.update(tok)
        cached = ids.size(1)
        tok = torch.where(active, tok, torch.full_like(tok, tokenizer.pad_id))  # finished rows: PAD, ignored
        ids = torch.cat([ids, tok[:, None]], dim=1)
        for b in range(B):
            if not stop[b] and tok[b] == tokenizer.eos_id:
                stop[b] = "eos"
        if max_seconds is not None and (step + 1) % MAX_SECONDS_CHECK_EVERY == 0:
            for b in range(B):
                if not stop[b] and tokenizer.decode(ids[b].numpy()).to("second").end() > max_seconds:
                    stop[b] = "max_seconds"
        if all(stop):
            break
    return ids, stop
