"""Generate music with a trained model: sampling, prompts, a sliding context window, and the CLI command.

Layered like litgpt: :func:`sample` turns logits into token ids, :func:`generate` runs the loop (decode.py: batch
of samples, prompt, per-sample stopping, sliding window, all on the model's device; ``_decode_loop`` with
:func:`next_token` is the reference loop it must agree with), and ``run`` is the ``midiforge generate`` command.
Determinism: one seeded ``torch.Generator`` of the model's device supplies exactly one uniform number per sample
per step, and sampling runs in float32; so a seed gives the same music on every run on one kind of device, and
the KV cache and full recomputation give the same tokens (their logits agree to float rounding).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic
import torch

from midiforge.decode import decode
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.midi import MidiReadError, load_score
from midiforge.scoretime import clip_seconds

MAX_SECONDS_CHECK_EVERY = 32  # tokens between checks of the decoded length against max_seconds
WINDOW_KEEP = 0.75  # fraction of the window kept when the context slides (the rest is dropped, oldest first)


@dataclass
class Generation:
    """One generated piece and how it came about."""

    score: symusic.Score
    """The music: decoded prompt followed by the continuation (clipped to max_seconds when given)."""
    ids: list[int]
    """All token ids: BOS, the prompt, the new tokens (up to and including EOS when it was sampled)."""
    num_prompt_tokens: int
    """Prompt tokens, BOS included."""
    num_events: int
    """Base events decoded (from the tokenizer's decode_with_stats)."""
    num_skipped: int
    """Events the decoder skipped as invalid (e.g. state events with no note after them)."""
    stop_reason: str
    """"eos", "max_tokens" or "max_seconds"."""

    @property
    def num_new_tokens(self) -> int:
        return len(self.ids) - self.num_prompt_tokens

    @property
    def seconds(self) -> float:
        return float(self.score.to("second").end()) if self.score.note_num() else 0.0


def argument_problems(
    *,
    max_new_tokens: int = 1,
    max_seconds: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    prompt_bars: int | None = None,
) -> list[str]:
    """Every out-of-range generation setting, as messages (empty when all are fine)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max tokens must be >= 1 (got {max_new_tokens})")
    if max_seconds is not None and not max_seconds > 0:
        problems.append(f"max seconds must be > 0 (got {max_seconds})")
    if not (temperature > 0 and math.isfinite(temperature)):
        problems.append(f"temperature must be > 0 (got {temperature})")
    if top_k is not None and top_k < 1:
        problems.append(f"top-k must be >= 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top-p must be in (0, 1] (got {top_p})")
    if num_samples < 1:
        problems.append(f"number of samples must be >= 1 (got {num_samples})")
    if prompt_bars is not None and prompt_bars < 1:
        problems.append(f"prompt bars must be >= 1 (got {prompt_bars})")
    return problems


# --- sample → next_token → generate --------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids (B,) drawn from logits (B, V) with temperature, then top-k, then nucleus (top-p) filtering.

    Draws exactly one uniform number per row from ``generator`` (inverse-CDF sampling), so the random stream
    advances the same way whatever the logits are.
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
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]  # (B, 1)
    # First index whose cdf exceeds u: always a token of positive probability...
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,)
    # ...unless rounding put u at the total: then the last token of positive probability.
    last = V - 1 - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(idx, last)


@torch.inference_mode()
def next_token(
    model: torch.nn.Module,
    idx: torch.Tensor,
    kv_cache=None,
    *,
    banned: Sequence[int] = (),
    allowed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **sampling,
) -> torch.Tensor:
    """The next token (B,) after ``idx`` (B, T): the new tokens when ``kv_cache`` holds the ones before.
    ``allowed``: (B, V) or (V,) bool, False = never drawn (steer.py: --instruments, EOS before the minimum)."""
    logits = model(idx, kv_cache, last_only=True)[:, -1, :].float().cpu()  # (B, V), sampled on CPU
    if banned:
        logits[:, list(banned)] = float("-inf")
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return sample(logits, generator=generator, **sampling)


def prompt_ids(tokenizer, prompt, prompt_bars: int | None = None) -> list[int]:
    """[BOS] + the tokens of ``prompt`` (a MIDI path, bytes, a Score, or a list of token ids; None = no prompt).

    ``prompt_bars`` keeps only the prompt's first N bars, measured with its first time signature (4/4 if none).
    Raises MidiReadError (a ValueError) for an unreadable prompt file.
    """
    if prompt is None:
        return [tokenizer.bos_id]
    if isinstance(prompt, Sequence) and not isinstance(prompt, str | bytes | bytearray):
        ids = [int(i) for i in prompt]
        return ids if ids[:1] == [tokenizer.bos_id] else [tokenizer.bos_id, *ids]
    score = load_score(prompt)
    if prompt_bars is not None:
        ts = score.time_signatures
        num, den = (ts[0].numerator, ts[0].denominator) if len(ts) else (4, 4)
        bar = score.ticks_per_quarter * 4 * num // den
        score = score.clip(0, prompt_bars * bar)
    return [tokenizer.bos_id, *tokenizer.encode(score)]


def _window_cut(tokenizer, ids: torch.Tensor, start: int, stop: int, active: torch.Tensor) -> int:
    """Where the slid window starts: the first position in [start, stop) where every still-active row begins a
    new onset (so no note is cut in half), or ``start`` itself when there is no such position."""
    rows = ids[active] if bool(active.any()) else ids
    ok = np.logical_and.reduce([tokenizer.word_starts(r[start:stop].numpy()) for r in rows])
    hits = np.flatnonzero(ok)
    return start + int(hits[0]) if len(hits) else start


def _decode_loop(
    model, tokenizer, head, B, max_new_tokens, max_seconds, use_kv_cache, banned, sampling, device, steer=None
) -> tuple[torch.Tensor, list[str]]:
    """The token loop of :func:`generate`: (ids (B, N) on CPU, stop reason per row, "" for none)."""
    window = model.config.max_seq_len
    ids = torch.tensor(head, dtype=torch.long).repeat(B, 1)  # (B, N) every token so far, on CPU
    stop = [""] * B  # stop reason per row; "" while active
    start = 0  # the model's context is ids[:, start:]
    # Only as many positions as this run can fill: the window may be far longer than the generation.
    cache = model.new_kv_cache(B, max_len=min(window, len(head) + max_new_tokens)) if use_kv_cache else None
    cached = 0  # ids[:, start:cached] are in the cache
    for step in range(max_new_tokens):
        active = torch.tensor([not s for s in stop])
        if ids.size(1) - start > window:  # no room for the next position: slide
            keep = max(1, int(window * WINDOW_KEEP))
            cut = ids.size(1) - keep
            start = _window_cut(tokenizer, ids, cut, min(cut + window // 8, ids.size(1) - 1), active)
            if cache is not None:
                # Rotary positions are relative to the window start, so the kept tokens are prefilled again.
                cache.reset()
                cached = start
        feed = ids[:, cached if cache is not None else start :].to(device)
        allowed = steer.allowed(ids, len(head), step) if steer is not None else None  # (B, V) or None
        tok = next_token(model, feed, cache, banned=banned, allowed=allowed, **sampling)  # (B,)
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


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt=None,
    *,
    max_new_tokens: int = 512,
    max_seconds: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    ignore_eos: bool = False,
    use_kv_cache: bool = True,
    prompt_bars: int | None = None,
    device: str | torch.device = "cpu",
    controls=None,
    min_new_tokens: int | None = None,
    min_seconds: float | None = None,
) -> list[Generation]:
    """Generate ``num_samples`` pieces together (one batch), each continuing ``prompt`` (see :func:`prompt_ids`).

    A sample stops at EOS (unless ``ignore_eos``), after ``max_new_tokens``, or once its music passes
    ``max_seconds`` (checked every few tokens; the score is then clipped to ``max_seconds``). When the context
    fills the model's window (``model.config.max_seq_len``) the oldest tokens are dropped and the cache refilled.
    ``controls``: a Controls or a dict of the CLI spellings (``{"instruments": "piano,bass", "key": "D minor",
    "tempo": 90, "time_sig": "3/4", "density": "low", "polyphony": "high", "tag": "jazz"}``); see steer.py.
    EOS is not drawn before ``min_new_tokens`` / ``min_seconds`` (with a prompt: steer.DEFAULT_PROMPT_MIN_TOKENS).
    Raises ValueError for out-of-range settings or an unreadable prompt, UsageError for a bad control.
    """
    problems = argument_problems(
        max_new_tokens=max_new_tokens,
        max_seconds=max_seconds,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        prompt_bars=prompt_bars,
    )
    if problems:
        raise ValueError("; ".join(problems))
    from midiforge.fim import sentinel_ids
    from midiforge.steer import Steering

    steer = Steering.build(tokenizer, controls, min_new_tokens or 0, min_seconds)
    steer = steer.with_defaults(prompt is not None, max_new_tokens)
    head = steer.head(prompt_ids(tokenizer, prompt, prompt_bars))
    generator = torch.Generator(device=device)  # sampling runs where the model is (decode.py)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    banned = [tokenizer.pad_id, tokenizer.bos_id] + ([tokenizer.eos_id] if ignore_eos else [])
    banned += sentinel_ids(tokenizer).tolist()  # the infilling sentinels belong to infill.py's inputs only
    B = num_samples
    was_training = model.training
    model.eval()
    try:
        ids, stop = decode(
            model,
            tokenizer,
            head,
            B,
            max_new_tokens,
            max_seconds,
            use_kv_cache,
            banned,
            sampling,
            device,
            steer,
        )
    finally:
        model.train(was_training)

    out = []
    for b in range(B):
        row = ids[b].tolist()
        if tokenizer.eos_id in row[len(head) :]:
            row = row[: row.index(tokenizer.eos_id, len(head)) + 1]
        elif tokenizer.pad_id in row[len(head) :]:  # stopped early (max_seconds): PAD is never sampled
            row = row[: row.index(tokenizer.pad_id, len(head))]
        score, num_events, num_skipped = tokenizer.decode_with_stats(row)
        reason = stop[b] or "max_tokens"
        if max_seconds is not None and score.note_num() and score.to("second").end() > max_seconds:
            score, reason = clip_seconds(score, max_seconds), "max_seconds"
        out.append(Generation(score, row, len(head), num_events, num_skipped, reason))
    return out


# --- command line --------------------------------------------------------------------------------------------


def configure_parser(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory written by `midiforge train`")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.mid",
        help="output MIDI file (OUT_1.mid ... with -n > 1)",
    )
    p.add_argument("--prompt", metavar="IN.mid", help="MIDI file to continue (default: start from scratch)")
    p.add_argument("--prompt-bars", type=int, metavar="N", help="use only the first N bars of the prompt")
    p.add_argument(
        "--max-tokens", type=int, default=1024, metavar="N", help="new tokens per sample (default 1024)"
    )
    p.add_argument(
        "--max-seconds", type=float, metavar="S", help="stop each sample once its music is S seconds long"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="never stop at end-of-sequence (fill --max-tokens)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="sampling temperature > 0 (default 1.0)"
    )
    p.add_argument("--top-k", type=int, metavar="K", help="sample only from the K most likely tokens")
    p.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="nucleus sampling: smallest set of tokens with mass P, in (0, 1]",
    )
    p.add_argument("--seed", type=int, metavar="S", help="random seed (same seed, same music)")
    p.add_argument(
        "-n",
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="number of pieces, generated as one batch",
    )
    p.add_argument(
        "--wav",
        action="store_true",
        help="also render OUT.wav (FluidSynth if installed, else a preview synth)",
    )
    p.add_argument("--pianoroll", action="store_true", help="also draw OUT.png, a piano roll")
    p.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the whole context every step (slow; for checks)"
    )
    p.add_argument(
        "--device", default="cpu", metavar="D", help="torch device, e.g. cpu, cuda, cuda:1, mps (default cpu)"
    )
    from midiforge.steer import add_arguments

    add_arguments(p)  # controls, --min-new-tokens, --min-seconds
    from midiforge.copycheck import add_arguments as add_copy_arguments

    add_copy_arguments(p)  # --check-copies, --train, --copy-threshold
    from midiforge.infill import add_arguments as add_infill_arguments

    add_infill_arguments(p)  # --infill, --add-track, --replace-track, --harmonize


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"invalid device {name!r}") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r} (cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name} requested but MPS is not available")
    return device


def output_paths(output: str | os.PathLike, n: int) -> list[Path]:
    """OUT.mid for one sample; OUT_1.mid ... OUT_n.mid for several."""
    out = Path(output)
    if out.suffix.lower() not in (".mid", ".midi"):
        out = out.with_name(out.name + ".mid")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, n + 1)]


def write_midi(score: symusic.Score, path: Path) -> None:
    """Write ``score`` atomically (never a partial file); an unwritable place is a UsageError."""
    try:
        atomic_write_bytes(path, score.dumps_midi())
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e


def write_extras(args, score: symusic.Score, path: Path) -> list[str]:
    """``--wav`` / ``--pianoroll`` beside the MIDI file at ``path``: what was written, for the summary line."""
    extras = []
    if args.wav:
        from midiforge.render import render_wav

        backend = render_wav(score, path.with_suffix(".wav"))
        extras.append(f"{path.with_suffix('.wav')} ({backend})")
    if args.pianoroll:
        from midiforge.render import render_pianoroll

        render_pianoroll(score, path.with_suffix(".png"), title=path.name)
        extras.append(str(path.with_suffix(".png")))
    return extras


def run(args) -> int:
    from midiforge import infill

    if (request := infill.request_of(args)) is not None:  # an edit inside the prompt: infill.py
        return infill.run(args, request)
    problems = argument_problems(
        max_new_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        prompt_bars=args.prompt_bars,
    )
    if args.prompt_bars is not None and args.prompt is None:
        problems.append("--prompt-bars needs --prompt")
    from midiforge.steer import cli_controls, min_problems

    problems += min_problems(args.min_new_tokens, args.min_seconds, args.max_tokens)
    if problems:
        raise UsageError("; ".join(problems))
    device = _check_device(args.device)
    from midiforge import copycheck

    copy_files = copycheck.cli_training_files(args)  # None without --check-copies
    prompt = None
    if args.prompt is not None:
        try:
            prompt = load_score(args.prompt)
        except MidiReadError as e:
            raise UsageError(f"cannot read prompt {args.prompt}: {e}") from e
    paths = output_paths(args.output, args.num_samples)
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {paths[0].parent}: {e.strerror}") from e

    from midiforge.checkpoint import load_inference

    model, tokenizer = load_inference(args.checkpoint, device)
    t0 = time.perf_counter()
    results = generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        use_kv_cache=not args.no_kv_cache,
        prompt_bars=args.prompt_bars,
        device=device,
        controls=cli_controls(args),
        min_new_tokens=args.min_new_tokens,
        min_seconds=args.min_seconds,
    )
    elapsed = time.perf_counter() - t0
    num_tokens = sum(r.num_new_tokens for r in results)
    for r, path in zip(results, paths, strict=True):
        write_midi(r.score, path)
        extras = write_extras(args, r.score, path)
        print(
            f"{path}: {r.score.note_num()} notes, {r.seconds:.1f} s, {r.num_new_tokens} new tokens "
            f"(stopped: {r.stop_reason}), {r.num_skipped} skipped-invalid events"
            + (f"; {', '.join(extras)}" if extras else "")
        )
    print(f"generated {num_tokens} tokens in {elapsed:.1f} s ({num_tokens / max(elapsed, 1e-9):.0f} tok/s)")
    if copy_files is not None:
        copycheck.print_check(args, tokenizer, copy_files, [r.ids for r in results], [str(p) for p in paths])
    return 0
