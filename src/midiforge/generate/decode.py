"""The token loop of generation, kept on the model's device.

:func:`decode` is what :func:`midiforge.generate.core.generate` runs: every token so far lives in one preallocated
buffer on the device, the sampling (:func:`midiforge.generate.sampling.sample`) runs there with a generator of that
device, finished rows are masked there, and the host looks at the tokens only every :data:`SYNC_EVERY` tokens
(EOS), every ``MAX_SECONDS_CHECK_EVERY`` tokens (``max_seconds``, which needs the decoder) and when the window
slides (the cut needs the tokenizer). The prompt is prefilled in one pass; each later step feeds one token.

On the CPU this is the same arithmetic in the same order as the reference loop (``tests/reference_loop.py``)
(which moves every token's logits to the host): the same seed gives the same tokens. It may run
past the point where every row has finished by up to SYNC_EVERY - 1 steps; those tokens are PAD and dropped.

On CUDA, with ``graph``, the one-token step is a CUDA graph (:class:`GraphStep`): one replay launches the whole
forward pass over a static KV cache, instead of ~15 kernel launches per layer from Python.
"""

from __future__ import annotations

import torch

from midiforge.generate.constraints import combine
from midiforge.generate.sampling import MAX_SECONDS_CHECK_EVERY, WINDOW_KEEP, sample, window_cut

SYNC_EVERY = 16  # tokens between the host's looks at the EOS flags (a power of two dividing 32)


class GraphStep:
    """``model.static_step`` captured once as a CUDA graph over fixed input buffers (CUDA only).

    Captured before the prompt is prefilled: the warm-up runs write into the cache, and the prefill then
    overwrites those positions. ``__call__`` copies the token and position in and replays.
    """

    def __init__(self, model, cache, batch: int, device: torch.device):
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, cuBLAS workspaces
            for _ in range(2):
                model.static_step(self.tok, self.pos, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model.static_step(self.tok, self.pos, cache)  # (B, V), refreshed by each replay

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.out


def decode(
    model,
    tokenizer,
    head: list[int],
    B: int,
    max_new_tokens: int,
    max_seconds: float | None,
    use_kv_cache: bool,
    banned,
    sampling: dict,
    device,
    steer=None,
    *,
    graph: bool = True,
) -> tuple[torch.Tensor, list[str]]:
    """The token loop of :func:`~midiforge.generate.core.generate`: (ids (B, N) on the CPU, stop reason per row,
    "" for none). ``graph`` (CUDA, KV cache): replay a captured one-token step (falls back to eager when the
    capture fails). ``steer`` (steer.Steering) masks tokens as in the reference loop; with ``min_seconds`` it
    decodes the rows, so then the tokens are copied to the host every step."""
    device = torch.device(device)
    window = model.config.max_seq_len
    vocab = model.config.vocab_size
    banned_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned_mask[list(banned)] = True
    total = len(head) + max_new_tokens
    buf = torch.full((B, total), tokenizer.pad_id, dtype=torch.long, device=device)  # every token so far
    buf[:, : len(head)] = torch.tensor(head, dtype=torch.long, device=device)
    n = len(head)  # tokens in buf (host int: no device read needed)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # finished rows (EOS or max_seconds)
    stop = [""] * B  # the host's view of the stop reasons, brought up to date at each look
    start = 0  # the model's context is buf[:, start:n]
    cache = model.new_kv_cache(B, max_len=min(window, total)) if use_kv_cache else None
    cached = 0  # buf[:, start:cached] are in the cache
    mask_host, mask_dev = None, None  # steer's last (B, V) mask, and its copy on the device
    rules = steer.constraints(head, B, device) if steer is not None else []  # per-row state masks, on device
    pin = torch.tensor(steer.pinned if steer is not None else [], dtype=torch.long, device=device)
    pin = pin.repeat(B, 1)  # (B, P) the control prefix, kept at the front of a slid context
    step_fn = None
    if graph and cache is not None and device.type == "cuda":
        try:
            step_fn = GraphStep(model, cache, B, device)
        except RuntimeError as e:  # an unsupported op in capture: the eager loop still works
            print(f"note: CUDA graph capture failed ({str(e).splitlines()[0]}); decoding eagerly")
    for step in range(max_new_tokens):
        if n - start + (pin.size(1) if start else 0) > window:  # no room for the next position: slide
            host, active = buf[:, :n].cpu(), ~done.cpu()  # (rare: the host looks now)
            keep = max(1, int(window * WINDOW_KEEP) - pin.size(1))
            cut = n - keep
            start = window_cut(tokenizer, host, cut, min(cut + window // 8, n - 1), active)
            if cache is not None:
                # Rotary positions are relative to the window start, so the kept tokens are prefilled again.
                cache.reset()
                cached = start
        allowed = None
        if steer is not None:  # without min_seconds steer reads only the length of what it is given
            view = buf[:, :n] if steer.min_seconds is None else buf[:, :n].cpu()
            allowed = steer.allowed(view, len(head), step)  # (B, V) on the CPU, or None
            if allowed is not None and (mask_host is None or not torch.equal(allowed, mask_host)):
                mask_host, mask_dev = allowed, allowed.to(device)  # uploaded only when it changes
        if step_fn is not None and cache is not None and n - cached == 1:
            logits = step_fn(buf[:, cached:n], cache.pos)  # (B, V) float32
            cache.pos += 1
        else:
            feed = buf[:, cached if cache is not None else start : n]
            if start and (cache is None or cached == start):  # a slid context starts with the prefix again
                feed = torch.cat([pin, feed], dim=1)
            logits = model(feed, cache, last_only=True)[:, -1, :].float()  # (B, V)
        logits = logits.masked_fill(banned_mask, float("-inf"))  # as next_token, without the host copy
        ok = combine(mask_dev if allowed is not None else None, rules, banned_mask)  # (B, V) or None
        if ok is not None:
            logits = logits.masked_fill(~ok, float("-inf"))
        tok = sample(logits, **sampling)  # (B,), on the device
        for rule in rules:
            rule.update(tok)
        cached = n
        tok = torch.where(done, tokenizer.pad_id, tok)  # finished rows: PAD, ignored
        buf[:, n] = tok
        n += 1
        done |= tok == tokenizer.eos_id
        checks = max_seconds is not None and (step + 1) % MAX_SECONDS_CHECK_EVERY == 0
        if (step + 1) % SYNC_EVERY and not checks and step + 1 < max_new_tokens:
            continue
        for b, d in enumerate(done.tolist()):  # the host looks: rows done since the last look ended at EOS
            if d and not stop[b]:
                stop[b] = "eos"
        if checks:
            host = buf[:, :n].cpu()
            for b in range(B):
                if not stop[b] and tokenizer.decode(host[b].numpy()).to("second").end() > max_seconds:
                    stop[b] = "max_seconds"
                    done[b] = True
        if all(stop):
            break
    return buf[:, :n].cpu(), stop
