"""Generating music with a trained model: :func:`generate` turns a model, a tokenizer, a prompt and the sampling
settings into pieces (:class:`Generation`).

Layered like litgpt: :func:`midiforge.generate.sampling.sample` turns logits into token ids,
:func:`midiforge.generate.decode.decode` runs the token loop on the model's device (batch of samples, prompt,
per-sample stopping, sliding window), and :func:`generate` wraps it: settings checked, steering built, the prompt
encoded, the tokens decoded into scores. The command line lives in :mod:`midiforge.generate.command`.
The KV cache and full recomputation give the same tokens (their logits agree to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import symusic
import torch

from midiforge.data.fim import sentinel_ids
from midiforge.errors import UsageError
from midiforge.generate.decode import decode
from midiforge.generate.steer import DEFAULT_BEAT_STRENGTH, Steering
from midiforge.generate.streams import RowStreams
from midiforge.notes.midi import load_score
from midiforge.notes.scoretime import clip_seconds


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
    return close_last_note(tokenizer, [tokenizer.bos_id, *tokenizer.encode(score)])


def close_last_note(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` with the last note's DURATION spelt out where the encoding left it to the sticky value: the
    decoder reads a DURATION right after a PITCH as that note's own, so a continuation starting with one
    would change the prompt's last note."""
    v = tokenizer.vocab
    ev = tokenizer.base_events(ids)
    if not len(ev) or v.kind[ev[-1]] != v.k("pitch"):
        return ids
    durs = np.flatnonzero(v.kind[ev] == v.k("duration"))
    d = (
        int(v.value[ev[durs[-1]]])
        if len(durs)
        else int(np.searchsorted(v.durations, tokenizer.config.steps_per_quarter))
    )
    return [*ids, int(tokenizer.base_token_ids([v.start["duration"] + d])[0])]


@torch.inference_mode()
def _seconds_limit(tokenizer, head: list[int], max_seconds: float | None) -> float | None:
    """Where ``max_seconds`` of new music end, in seconds from the start: the prompt's own seconds don't count."""
    if max_seconds is None:
        return None
    head_score = tokenizer.decode(head)
    return (float(head_score.to("second").end()) if head_score.note_num() else 0.0) + max_seconds


def _banned_ids(tokenizer, ignore_eos: bool) -> list[int]:
    """Tokens never drawn: PAD, BOS, EOS with ``ignore_eos``, and the infilling sentinels (infill.py's inputs only)."""
    banned = [tokenizer.pad_id, tokenizer.bos_id] + ([tokenizer.eos_id] if ignore_eos else [])
    return banned + sentinel_ids(tokenizer).tolist()


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
    grid: str = "pairs",
    beat_strength: float | None = None,
    compile: bool | None = None,
) -> list[Generation]:
    """Generate ``num_samples`` pieces together (one batch), each continuing ``prompt`` (see :func:`prompt_ids`).

    A sample stops at EOS (unless ``ignore_eos``), after ``max_new_tokens``, or once its new music passes
    ``max_seconds`` after the prompt's end (checked every few tokens; the score is then clipped there: the prompt
    is never cut). ``grid``: the onset grid mask ("pairs", "positions" or "off"; steer.py, constraints.py), on
    when the checkpoint recorded its training set's grid; ``beat_strength`` (with the mask) adds that many times
    the training set's log frequency of each next onset position after the last one to the logits. Sample k
    draws from its own stream (seed, k). When the context fills the model's window (``model.config.max_seq_len``) the oldest tokens are dropped and the cache refilled.
    ``controls``: a Controls or a dict of the CLI spellings (``{"instruments": "piano,bass", "key": "D minor",
    "tempo": 90, "time_sig": "3/4", "density": "low", "polyphony": "high", "tag": "jazz"}``); see steer.py.
    ``compile`` (CUDA): compile the captured token step first (default: yes on CUDA; see decode.py).
    EOS is not drawn before ``min_new_tokens`` / ``min_seconds`` (with a prompt: steer.DEFAULT_PROMPT_MIN_TOKENS).
    Raises UsageError (a ValueError) for an out-of-range setting or a bad control, MidiReadError (a ValueError)
    for an unreadable prompt.
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
        raise UsageError("; ".join(problems))
    beat = DEFAULT_BEAT_STRENGTH if beat_strength is None else beat_strength
    steer = Steering.build(
        tokenizer, controls, min_new_tokens or 0, min_seconds, grid=grid, beat_strength=beat
    )
    steer = steer.with_defaults(prompt is not None, max_new_tokens)
    head = steer.head(prompt_ids(tokenizer, prompt, prompt_bars))
    limit = _seconds_limit(tokenizer, head, max_seconds)
    generator = RowStreams(int(torch.seed()) if seed is None else seed)  # sample k: stream (seed, k)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    banned = _banned_ids(tokenizer, ignore_eos)
    B = num_samples
    was_training = model.training
    model.eval()
    try:
        ids, stop = decode(
            model, tokenizer, head, B, max_new_tokens, limit, use_kv_cache, banned, sampling, device, steer,
            compile=compile,
        )  # fmt: skip
    finally:
        model.train(was_training)

    tick = head_ticks(tokenizer, head)
    return [_result(tokenizer, ids[b].tolist(), len(head), stop[b], limit, steer, tick) for b in range(B)]


def head_ticks(tokenizer, head: list[int]) -> int:
    """The tick (of decoded scores) where the head ends: its time shifts, summed."""
    v = tokenizer.vocab
    e = tokenizer.base_events(head)
    steps = int(v.value[e][v.kind[e] == v.k("shift")].sum())
    return steps * (tokenizer.config.output_tpq // tokenizer.config.steps_per_quarter)


def _result(tokenizer, row: list[int], head_len: int, stop: str, max_seconds: float | None, steer=None,
            head_tick: int = 0) -> Generation:  # fmt: skip
    """One row of the token buffer as a Generation: cut at its EOS (or at the PAD after an early stop), with
    the stated tempo exact (steer.finish) and clipped at ``max_seconds`` (absolute: prompt + new music)."""
    if tokenizer.eos_id in row[head_len:]:
        row = row[: row.index(tokenizer.eos_id, head_len) + 1]
    elif tokenizer.pad_id in row[head_len:]:  # stopped early (max_seconds): PAD is never sampled
        row = row[: row.index(tokenizer.pad_id, head_len)]
    score, num_events, num_skipped = tokenizer.decode_with_stats(row)
    score = _one_meta_event_per_tick(score)
    if steer is not None:
        score = steer.finish(score, head_tick)
    reason = stop or "max_tokens"
    if max_seconds is not None and score.note_num() and score.to("second").end() > max_seconds:
        score, reason = clip_seconds(score, max_seconds), "max_seconds"
    return Generation(score, row, head_len, num_events, num_skipped, reason)


def _one_meta_event_per_tick(score: symusic.Score) -> symusic.Score:
    """The score with one tempo (time signature, key) per tick: the last the model wrote there. A sampled
    stream can state TEMPO twice at one time, and two tempos at one tick leave the piece's timing to how a MIDI
    writer and reader order them, so the file written would not last as long as the piece reported."""
    for events in (score.tempos, score.time_signatures, score.key_signatures):
        times = [e.time for e in events]
        drop = [i for i in range(len(times) - 1) if times[i] == times[i + 1]]
        for i in reversed(drop):
            events.pop(i)
    return score
