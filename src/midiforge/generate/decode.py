"""The token loop of generation, kept on the model's device.

:func:`decode` is what :func:`midiforge.generate.core.generate` runs. Every tensor a token step reads or writes
lives on the device in a :class:`TokenState` (the token buffer, the last token and its cache position, the
finished rows, the allowed-token mask, the step's uniform numbers), so a step needs nothing from the host: the
host looks at the tokens only every :data:`SYNC_EVERY` tokens (EOS), every ``MAX_SECONDS_CHECK_EVERY`` tokens
(``max_seconds``, which needs the decoder) and when the window slides (the cut needs the tokenizer).

One token step is: the forward pass of the last token, the banned/steer mask, temperature, top-k, top-p, the
draw, PAD for finished rows, the buffer write and the finished-row update (:func:`finish_token`). On CUDA with
``graph`` the whole step is one CUDA graph (:class:`GraphStep`): the forward is the model's fixed-shape
:meth:`~midiforge.model.Transformer.static_step` (the position is data, not a Python int), so every token is
one replay, whatever the position. With ``compile`` the blocks (one compiled block reused for every layer,
:func:`midiforge.model.run_block`) and the sampling tail are compiled before the capture, which fuses the
~40 small kernels of a layer into a few.

Random numbers: one uniform per row per step, drawn from the generator :data:`SYNC_EVERY` steps at a time
(so that a captured step draws nothing); on the CPU a block of draws is the same stream as one draw per step.
On the CPU, without ``static``, this is the same arithmetic in the same order as the reference loop
(``tests/reference_loop.py``): the same seed gives the same tokens. The loop may run past the point where every
row has finished by up to SYNC_EVERY - 1 steps; those tokens are PAD and dropped.
"""

from __future__ import annotations

import torch

from midiforge.generate import stopping
from midiforge.generate.constraints import combine, total_bias
from midiforge.generate.sampling import MAX_SECONDS_CHECK_EVERY, WINDOW_KEEP, sample, uniforms, window_cut
from midiforge.model import run_block

SYNC_EVERY = 16  # tokens between the host's looks at the EOS flags (a power of two dividing 32)
# inductor generates Triton kernels on CUDA; the CPU tests use "aot_eager" (the same tracing, no code generation)
COMPILE_BACKEND = "inductor"


class TokenState:
    """The device side of the token loop, at fixed addresses (what a CUDA graph replays over)."""

    def __init__(self, B: int, total: int, vocab: int, pad_id: int, device: torch.device):
        long = dict(dtype=torch.long, device=device)
        self.buf = torch.full((B, total), pad_id, **long)  # (B, total): every token so far
        self.n = torch.zeros(1, **long)  # (1,): the column the next token goes to
        self.tok = torch.zeros(B, 1, **long)  # (B, 1): the last token, input of the static step
        self.pos = torch.zeros((), **long)  # (): its position in the KV cache
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,): finished rows (EOS, max_seconds)
        self.allow = torch.ones(B, vocab, dtype=torch.bool, device=device)  # (B, V): False = never drawn
        self.bias = torch.zeros(vocab, device=device)  # (V,): added to the logits (steer.logit_bias)
        self.u = torch.zeros(SYNC_EVERY, B, 1, device=device)  # (K, B, 1): uniforms of the next K steps
        self.j = torch.zeros(1, **long)  # (1,): the row of u of the next step

    def rewind(self) -> None:
        """Counters back to zero (between the warm-up runs of a capture, which must stay in bounds)."""
        for t in (self.n, self.pos, self.j, self.tok):
            t.zero_()
        self.done.zero_()

    def start(self, head: list[int], pad_id: int) -> None:
        self.buf.fill_(pad_id)
        self.buf[:, : len(head)] = torch.tensor(head, dtype=torch.long)
        self.rewind()
        self.n.fill_(len(head))


def finish_token(
    st: TokenState, logits: torch.Tensor, pad_id: int, eos_id: int, temperature, top_k, top_p, ok=None
) -> torch.Tensor:
    """The step after the forward pass: logits (B, V) float32 → + ``st.bias`` → masked (``st.allow``, or ``ok``
    (B, V) when per-row rules apply), sampled with this step's uniforms, PAD for finished rows, written at column ``st.n``,
    EOS rows marked done; the counters advance. Returns the sampled tokens (B,) (before PAD)."""
    logits = (logits + st.bias).masked_fill(~(st.allow if ok is None else ok), float("-inf"))  # (B, V)
    u = st.u.index_select(0, st.j).view(-1, 1)  # (B, 1)
    drawn = sample(logits, temperature, top_k, top_p, u=u)  # (B,)
    tok = torch.where(st.done, pad_id, drawn)  # finished rows: PAD, ignored
    st.buf.index_copy_(1, st.n, tok[:, None])
    st.done |= tok == eos_id
    st.tok.copy_(tok[:, None])
    st.n.add_(1)
    st.j.add_(1)
    return drawn


class GraphStep:
    """A token step (a function of no arguments over a :class:`TokenState`) captured once as a CUDA graph.

    Warm-up runs (compilation, lazy initialisation, cuBLAS workspaces) go on a side stream first; they write
    into the state and the cache, so the caller fills the state afterwards (:meth:`TokenState.start`).
    """

    WARMUP = 3

    def __init__(self, step, st: TokenState, device: torch.device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                st.rewind()
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        st.rewind()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()

    def __call__(self) -> None:
        self.graph.replay()


def build_step(model, st: TokenState, cache, tokenizer, params: dict, device, graph: bool, compile: bool):
    """The static token step: forward of ``st.tok`` at ``st.pos`` + :func:`finish_token`, advancing the
    position; compiled and/or captured as asked. Falls back (with a note) to the uncompiled or uncaptured
    step when compilation or capture fails, so generation still works."""
    block_fn, finish = run_block, finish_token
    if compile:
        block_fn = torch.compile(run_block, dynamic=False, backend=COMPILE_BACKEND)
        finish = torch.compile(finish_token, dynamic=False, backend=COMPILE_BACKEND)

    def step() -> None:
        logits = model.static_step(st.tok, st.pos, cache, block_fn=block_fn)  # (B, V) float32
        finish(st, logits, tokenizer.pad_id, tokenizer.eos_id, **params)
        st.pos.add_(1)

    if not (graph and device.type == "cuda"):
        return step
    try:
        return GraphStep(step, st, device)
    except Exception as e:  # an op that cannot be compiled or captured: decode uncaptured instead
        print(f"note: CUDA graph of the token step failed ({str(e).splitlines()[0]}); decoding uncaptured")
        torch.cuda.synchronize(device)
        return step if not compile else build_step(model, st, cache, tokenizer, params, device, False, False)


class AllowMask:
    """Keeps ``st.allow`` = not banned and allowed by steer; uploads only when steer's mask changes."""

    def __init__(self, st: TokenState, banned, vocab: int):
        self.st = st
        self.base = torch.ones(vocab, dtype=torch.bool)
        self.base[list(banned)] = False
        self.last = None  # steer's last (B, V) mask
        st.allow.copy_(self.base.expand_as(st.allow))

    def update(self, allowed: torch.Tensor | None) -> None:
        if allowed is None and self.last is None:
            return
        if allowed is not None and self.last is not None and torch.equal(allowed, self.last):
            return
        self.last = allowed
        mask = self.base.expand_as(self.st.allow) if allowed is None else self.base & allowed
        self.st.allow.copy_(mask)


def prefill(model, st: TokenState, cache, start: int, n: int, pin: torch.Tensor) -> None:
    """Before static steps: the context but its last token into the (reset) cache (after the control prefix
    ``pin`` (B, P) once the context has slid), that token into ``st.tok`` at position ``st.pos`` (the first
    static step feeds it)."""
    cache.reset()
    feed = st.buf[:, start : n - 1]
    if start:
        feed = torch.cat([pin, feed], dim=1)
    if feed.size(1):
        model(feed, cache, last_only=True)
    st.tok.copy_(st.buf[:, n - 1 : n])
    st.pos.fill_(feed.size(1))


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
    static: bool | None = None,
    compile: bool | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """The token loop of :func:`~midiforge.generate.core.generate`: (ids (B, N) on the CPU, stop reason per
    row, "" for none). ``static`` (KV cache only; default: on CUDA with ``graph``): run the fixed-shape step,
    captured as a CUDA graph on CUDA with ``graph``; ``compile`` (default: with the graph) compiles it first.
    ``steer`` (steer.Steering) masks tokens as in the reference loop; with ``min_seconds`` it decodes the rows,
    so then the tokens are copied to the host every step. Its per-row rules (onset grid, instrument opening:
    constraints.py) update after every token; a run with rules takes the uncaptured step."""
    device = torch.device(device)
    window = model.config.max_seq_len
    total = len(head) + max_new_tokens
    st = TokenState(B, total, model.config.vocab_size, tokenizer.pad_id, device)
    generator = sampling.get("generator")
    params = {k: sampling.get(k) for k in ("top_k", "top_p")} | {
        "temperature": sampling.get("temperature", 1.0)
    }
    cache = model.new_kv_cache(B, max_len=min(window, total)) if use_kv_cache else None
    rules = steer.constraints(head, B, device) if steer is not None else []  # per-row state masks, on device
    pin = torch.tensor(steer.pinned if steer is not None else [], dtype=torch.long, device=device)
    pin = pin.repeat(B, 1)  # (B, P) the control prefix, kept at the front of a slid context
    graph = graph and device.type == "cuda"
    static = cache is not None and not rules and (graph if static is None else static)
    step_fn = None
    if static:
        compile = graph if compile is None else compile
        step_fn = build_step(model, st, cache, tokenizer, params, device, graph, compile)
    st.start(head, tokenizer.pad_id)
    bias = steer.logit_bias(device) if steer is not None else None
    if bias is not None:
        st.bias.copy_(bias)
    allow = AllowMask(st, banned, model.config.vocab_size)
    banned_mask = (~allow.base).to(device)  # (V,)
    n = len(head)  # tokens in st.buf (host int: no device read needed)
    stop = [""] * B  # the host's view of the stop reasons, brought up to date at each look
    start = 0  # the model's context is buf[:, start:n]
    cached = 0  # buf[:, start:cached] are in the cache (eager path)
    fresh = True  # the static path must prefill the cache first
    for step in range(max_new_tokens):
        if step % SYNC_EVERY == 0:  # the next SYNC_EVERY steps' uniforms, one per row per step
            stopping.check()  # a cancelled or overlong job (the studio) stops here, between chunks
            st.u.copy_(uniforms(generator, SYNC_EVERY, B, device))
            st.j.zero_()
        if n - start + (pin.size(1) if start else 0) > window:  # no room for the next position: slide
            host, active = st.buf[:, :n].cpu(), ~st.done.cpu()  # (rare: the host looks now)
            keep = max(1, int(window * WINDOW_KEEP) - pin.size(1))
            cut = n - keep
            start = window_cut(tokenizer, host, cut, min(cut + window // 8, n - 1), active)
            if cache is not None:
                # Rotary positions are relative to the window start, so the kept tokens are prefilled again.
                cache.reset()
                cached, fresh = start, True
        if steer is not None:  # without min_seconds steer reads only the length of what it is given
            view = st.buf[:, :n] if steer.min_seconds is None else st.buf[:, :n].cpu()
            allow.update(steer.allowed(view, len(head), step))  # (B, V) on the CPU, or None
        if step_fn is not None:
            if fresh:
                prefill(model, st, cache, start, n, pin)
                fresh = False
            step_fn()
        else:
            feed = st.buf[:, cached if cache is not None else start : n]
            if start and (cache is None or cached == start):  # a slid context starts with the prefix again
                feed = torch.cat([pin, feed], dim=1)
            logits = model(feed, cache, last_only=True)[:, -1, :].float()  # (B, V)
            ok = combine(st.allow, rules, banned_mask) if rules else None  # (B, V) or None
            rb = total_bias(rules)  # (B, V) or None: the rules' logit biases (the beat's texture)
            logits = logits if rb is None else logits + rb
            tok = finish_token(st, logits, tokenizer.pad_id, tokenizer.eos_id, **params, ok=ok)
            for rule in rules:
                rule.update(tok)
        cached = n
        n += 1
        if _look(st, stop, tokenizer, step, n, max_new_tokens, max_seconds):
            break
    return st.buf[:, :n].cpu(), stop


def _look(st: TokenState, stop: list[str], tokenizer, step: int, n: int, steps: int, max_seconds) -> bool:
    """Every SYNC_EVERY steps (and the last): bring the stop reasons up to date; True when every row stopped."""
    checks = max_seconds is not None and (step + 1) % MAX_SECONDS_CHECK_EVERY == 0
    if (step + 1) % SYNC_EVERY and not checks and step + 1 < steps:
        return False
    for b, d in enumerate(st.done.tolist()):  # rows done since the last look ended at EOS
        if d and not stop[b]:
            stop[b] = "eos"
    if checks:
        host = st.buf[:, :n].cpu()
        for b in range(len(stop)):
            if not stop[b] and tokenizer.decode(host[b].numpy()).to("second").end() > max_seconds:
                stop[b] = "max_seconds"
                st.done[b] = True
    return all(stop)
