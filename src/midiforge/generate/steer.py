"""Steering a generation: the control prefix, the --instruments hard constraint, and EOS held back until a
minimum length. Used by :func:`midiforge.generate.core.generate` through two small hooks: the head (prefix tokens)
and :meth:`Steering.allowed`, a (B, V) mask applied to the logits before sampling.

The instrument constraint is exact, not learned: every token whose base events contain a PROGRAM outside the
allowed set is masked (one boolean per token, precomputed from its base events), and the head ends with a
PROGRAM event of an allowed instrument so that the decoder's sticky program never starts outside the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from midiforge.errors import UsageError
from midiforge.tokens.controls import (
    Controls,
    parse_instruments,
    parse_key,
    parse_level,
    parse_tag,
    parse_tempo,
    parse_time_sig,
    prefix_events,
)

CHECK_SECONDS_EVERY = 32  # tokens between decodes of a row that must reach min_seconds
DEFAULT_PROMPT_MIN_TOKENS = (
    128  # with a prompt and no --min-new-tokens/--min-seconds: ~60 notes of continuation
)


def token_kind_masks(tokenizer) -> dict[str, np.ndarray]:
    """Per token id: ``program`` (V, 129) bool — the token contains PROGRAM(p); ``control`` (V,) — it contains
    a CTL_* event. Precomputed once per tokenizer from the flat base-event tables (no loop per token)."""
    v = tokenizer.vocab
    V = len(tokenizer)
    owner = np.repeat(np.arange(V), tokenizer._lens)  # token id of every entry of the flat base-event table
    flat = tokenizer._flat
    kind = v.kind[flat]
    program = np.zeros((V, 129), bool)
    is_prog = kind == v.k("program")
    program[owner[is_prog], v.value[flat[is_prog]]] = True
    control = np.zeros(V, bool)
    ctl_kinds = [v.k(k) for k in v.kinds if k.startswith("ctl_")]
    control[owner[np.isin(kind, ctl_kinds)]] = True
    return {"program": program, "control": control}


def parse_controls(tokenizer, *, instruments=None, tempo=None, time_sig=None, key=None, density=None,
                   polyphony=None, tag=None) -> Controls:  # fmt: skip
    """The user's spellings (strings, numbers or already-parsed values) → Controls. UsageError on a bad value."""
    if instruments is not None and not isinstance(instruments, tuple | list):
        instruments = parse_instruments(str(instruments))
    elif instruments is not None:
        instruments = parse_instruments(",".join(str(i) for i in instruments))
    return Controls(
        instruments=instruments,
        tempo=None if tempo is None else parse_tempo(tempo),
        time_sig=None if time_sig is None else parse_time_sig(str(time_sig), tokenizer.vocab),
        key=None if key is None else (key if isinstance(key, int) else parse_key(str(key))),
        density=None if density is None else parse_level(str(density), "--density"),
        polyphony=None if polyphony is None else parse_level(str(polyphony), "--polyphony"),
        tag=None if tag is None else parse_tag(str(tag), tokenizer.tags),
    )


def as_controls(tokenizer, controls) -> Controls | None:
    """``controls`` given to generate(): None, a Controls, or a dict of the CLI spellings."""
    if controls is None or isinstance(controls, Controls):
        return controls
    if isinstance(controls, dict):
        return parse_controls(tokenizer, **controls)
    raise UsageError(f"controls must be a dict or a Controls, not {type(controls).__name__}")


@dataclass
class Steering:
    """Everything generate() needs to steer one batch."""

    tokenizer: object
    controls: Controls | None = None
    min_new_tokens: int = 0
    min_seconds: float | None = None
    base_mask: torch.Tensor | None = None  # (V,) bool, True = may be sampled
    _reached: list[bool] = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer, controls=None, min_new_tokens: int = 0, min_seconds: float | None = None):
        c = as_controls(tokenizer, controls)
        if c is not None and c.any() and not tokenizer.has_controls:
            raise UsageError(
                "this checkpoint was trained before controls existed: generate without --instruments, --tempo,"
                " --time-sig, --key, --density, --polyphony and --tag (or train a new model)"
            )
        s = cls(tokenizer, c, int(min_new_tokens or 0), min_seconds)
        if tokenizer.has_controls:  # control events are the user's to give, never the model's to sample
            masks = token_kind_masks(tokenizer)
            allowed = ~masks["control"]
            if c is not None and c.instruments is not None:
                others = np.setdiff1d(np.arange(129), c.instruments)
                allowed &= ~masks["program"][:, others].any(axis=1)
            s.base_mask = torch.from_numpy(allowed)
        return s

    def head(self, ids: list[int]) -> list[int]:
        """[BOS] + prefix + the prompt's tokens + (with --instruments) PROGRAM of the first allowed instrument."""
        tok, c = self.tokenizer, self.controls
        if c is None or not c.any():
            return ids
        prefix = tok.base_token_ids(prefix_events(c, tok.vocab, tok.tags)).tolist()
        out = [ids[0], *prefix, *ids[1:]]
        if c.instruments is not None:
            out.append(int(tok.base_token_ids([tok.vocab.start["program"] + c.instruments[0]])[0]))
        return out

    def with_defaults(self, has_prompt: bool, max_new_tokens: int) -> Steering:
        """A prompt with no minimum asked for gets DEFAULT_PROMPT_MIN_TOKENS (so that it is really continued)."""
        if has_prompt and self.min_new_tokens == 0 and self.min_seconds is None:
            return replace(self, min_new_tokens=min(DEFAULT_PROMPT_MIN_TOKENS, max_new_tokens))
        return self

    def allowed(self, ids: torch.Tensor, head_len: int, step: int) -> torch.Tensor | None:
        """(B, V) bool mask for the next token, or None when nothing is masked. EOS stays masked for a row
        until it has min_new_tokens new tokens and (checked every CHECK_SECONDS_EVERY tokens) min_seconds."""
        B = ids.size(0)
        if not self._reached:
            self._reached = [False] * B
        n_new = ids.size(1) - head_len
        for b in range(B):
            if self._reached[b] or n_new < self.min_new_tokens:
                continue
            if self.min_seconds is None:
                self._reached[b] = True
            elif n_new % CHECK_SECONDS_EVERY == 0:
                score = self.tokenizer.decode(ids[b].numpy())
                self._reached[b] = bool(score.note_num()) and score.to("second").end() >= self.min_seconds
        if self.base_mask is None and all(self._reached):
            return None
        V = len(self.tokenizer)
        mask = self.base_mask if self.base_mask is not None else torch.ones(V, dtype=torch.bool)
        mask = mask.repeat(B, 1)  # (B, V)
        for b in range(B):
            if not self._reached[b]:
                mask[b, self.tokenizer.eos_id] = False
        return mask


# --- command line (added to `midiforge generate` by generate.configure_parser) ---------------------------------
def add_arguments(p) -> None:
    g = p.add_argument_group("controls (see README, 'Steering'); bad values list the valid ones")
    g.add_argument(
        "--instruments", metavar="LIST", help="hard constraint: GM names or programs, e.g. piano,bass,drums"
    )
    g.add_argument("--tempo", metavar="BPM", help="initial tempo (learned, soft)")
    g.add_argument("--time-sig", metavar="N/D", help="time signature, e.g. 3/4 (learned, soft)")
    g.add_argument("--key", metavar="KEY", help="key, e.g. 'D minor' (learned, soft)")
    g.add_argument("--density", metavar="LEVEL", help="notes per bar: low, medium or high (learned, soft)")
    g.add_argument("--polyphony", metavar="LEVEL", help="notes at once: low, medium or high (learned, soft)")
    g.add_argument("--tag", metavar="NAME", help="style tag the checkpoint was trained with (-t NAME=DIR)")
    g.add_argument(
        "--min-new-tokens",
        type=int,
        metavar="N",
        help=f"no end-of-sequence before N new tokens (default with --prompt: {DEFAULT_PROMPT_MIN_TOKENS})",
    )
    g.add_argument(
        "--min-seconds", type=float, metavar="S", help="no end-of-sequence before S seconds of music"
    )


def cli_controls(args) -> dict | None:
    """The controls given on the command line, as generate()'s ``controls`` dict (None when none)."""
    names = ("instruments", "tempo", "time_sig", "key", "density", "polyphony", "tag")
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return given or None


def min_problems(min_new_tokens, min_seconds, max_new_tokens) -> list[str]:
    problems = []
    if min_new_tokens is not None and not 0 <= min_new_tokens <= max_new_tokens:
        problems.append(
            f"--min-new-tokens must be in 0..--max-tokens ({max_new_tokens}) (got {min_new_tokens})"
        )
    if min_seconds is not None and not min_seconds >= 0:
        problems.append(f"--min-seconds must be >= 0 (got {min_seconds})")
    return problems
