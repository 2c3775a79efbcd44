"""Steering a generation: the control prefix, the requests that hold whatever the weights, the onset grid, and
EOS held back until a minimum length. Used by :func:`midiforge.generate.core.generate` through small hooks: the head
(prefix and stated events), :meth:`Steering.allowed` (a (B, V) mask from the host), :meth:`Steering.constraints`
(masks that follow each sample's state on the device, constraints.py) and :meth:`Steering.finish`.

Requests are facts, not hints:
- ``--instruments A,B``: every token holding a PROGRAM outside the set, or a TRACK past the first, is masked (one
  track per instrument), and every listed instrument opens at the first onset (constraints.OpenInstruments);
- ``--tempo``, ``--time-sig``, ``--key``: written into the head as TEMPO, TIMESIG and KEYSIG events (the model
  reads them, as it read them at the start of every training piece) and never drawn again; the tempo is then
  set to exactly the number given (a TEMPO event holds one of 128 bins). Pieces start TIMESIG, KEYSIG, TEMPO;
  when a request skips one of them before one it states (a key without a time signature), the model draws the
  skipped one first, so the head keeps the training order (:meth:`Steering.allowed` runs this short script).
- ``--key`` also steers the notes: each note's probability is multiplied by its pitch class's weight in the
  key's Krumhansl-Kessler profile (the one that labels keys in training), to the power ``key_strength``.
The control prefix (CTL_* events, learned) goes after BOS as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from midiforge.errors import UsageError
from midiforge.tokens.controls import (
    KK_PROFILES,
    TEMPO_EDGES,
    Controls,
    parse_instruments,
    parse_key,
    parse_level,
    parse_tag,
    parse_tempo,
    parse_time_sig,
    prefix_events,
    signature_of_key,
)

CHECK_SECONDS_EVERY = 32  # tokens between decodes of a row that must reach min_seconds
GRID_MODES = ("pairs", "positions", "off")
DEFAULT_PROMPT_MIN_TOKENS = (
    128  # with a prompt and no --min-new-tokens/--min-seconds: ~60 notes of continuation
)
DEFAULT_KEY_STRENGTH = 1.0  # bench/bench_controls.py --key-strengths measures the alternatives
# Chords on the beat (GridMask.bias): the demo's chorales attack 3.9 notes per onset on a quarter and 1.6 off it,
# the demo's model without the bias 3.2 and 2.4; at 1 its on-beat share reaches the chorales' (bench/bench_beat.py
# --beat-strengths; the costs measured are in docs/results.md). 0 turns it off, for music that is not built so.
DEFAULT_BEAT_STRENGTH = 1.0
HEAD_ORDER = ("time_sig", "key", "tempo")  # the meta events a training piece starts with, in its order
HEAD_ORDER_KIND = {"time_sig": "timesig", "key": "keysig", "tempo": "tempo"}


def token_kind_masks(tokenizer) -> dict[str, np.ndarray]:
    """Per token id: ``program`` (V, 129) bool — the token contains PROGRAM(p); ``track`` (V, tracks) — TRACK(i);
    ``tempo``, ``timesig``, ``keysig``, ``control`` (V,) — it contains such an event (control: any CTL_*).
    Precomputed once per tokenizer from the flat base-event tables (no loop per token)."""
    v = tokenizer.vocab
    V = len(tokenizer)
    owner = np.repeat(np.arange(V), tokenizer._lens)  # token id of every entry of the flat base-event table
    flat = tokenizer._flat
    kind = v.kind[flat]
    out = {}
    for name, size in (("program", 129), ("track", v.sizes["track"])):
        table = np.zeros((V, size), bool)
        hit = kind == v.k(name)
        table[owner[hit], v.value[flat[hit]]] = True
        out[name] = table
    for name in ("tempo", "timesig", "keysig"):
        out[name] = np.zeros(V, bool)
        out[name][owner[kind == v.k(name)]] = True
    control = np.zeros(V, bool)
    ctl_kinds = [v.k(k) for k in v.kinds if k.startswith("ctl_")]
    control[owner[np.isin(kind, ctl_kinds)]] = True
    out["control"] = control
    return out


def key_bias(tokenizer, key: int, strength: float) -> np.ndarray:
    """(V,) float32: per token, ``strength`` x the sum over its PITCH events of log(w / mean w), w the
    Krumhansl-Kessler weight of the pitch class in ``key`` (tonic * 2 + mode). So a note's probability is
    multiplied by its key weight to the power ``strength``: the tonic and its triad up, notes outside down."""
    tonic, mode = divmod(int(key), 2)
    prof = np.roll(KK_PROFILES[mode], tonic)  # (12,) weight of each pitch class (C = 0) in this key
    w = np.log(prof / prof.mean())
    v = tokenizer.vocab
    V = len(tokenizer)
    owner = np.repeat(np.arange(V), tokenizer._lens)  # token id of every entry of the flat base-event table
    flat = tokenizer._flat
    hit = v.kind[flat] == v.k("pitch")
    out = np.zeros(V, np.float64)
    np.add.at(out, owner[hit], w[v.value[flat[hit]] % 12])
    return (strength * out).astype(np.float32)


def parse_strength(value, flag: str = "--key-strength") -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not (x >= 0 and np.isfinite(x)):
        raise UsageError(f"{flag} must be a number >= 0 (got {value!r})")
    return x


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


def bin_middle(tempo_bin: int) -> float:
    """A tempo inside control bin ``tempo_bin`` (for a Controls given without the number asked for)."""
    edges = (TEMPO_EDGES[0] - 20.0, *TEMPO_EDGES, TEMPO_EDGES[-1] + 40.0)
    return (edges[tempo_bin] + edges[tempo_bin + 1]) / 2


def exact_qpm(given, c: Controls | None) -> float | None:
    """The tempo number the user gave (controls as a dict of CLI spellings), else None."""
    if isinstance(given, dict) and given.get("tempo") is not None and c is not None and c.tempo is not None:
        return float(given["tempo"])
    return None


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
    qpm: float | None = None  # the tempo asked for, exactly (controls hold a bin)
    grid: str = "pairs"  # the onset grid mask: "pairs", "positions" or "off" (constraints.GridMask)
    beat_strength: float = DEFAULT_BEAT_STRENGTH  # logit per extra note at an onset: + on the beat, - off it
    pinned: list[int] = field(default_factory=list)  # the control prefix: kept in the context when it slides
    key_strength: float = DEFAULT_KEY_STRENGTH  # the key's pull on the notes (key_bias); 0 = none
    script: list[torch.Tensor] = field(default_factory=list)  # (V,) bool: the tokens allowed at new token i
    _reached: list[bool] = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer, controls=None, min_new_tokens: int = 0, min_seconds: float | None = None,
              grid: str = "pairs", beat_strength: float = DEFAULT_BEAT_STRENGTH):  # fmt: skip
        if grid not in GRID_MODES:
            raise UsageError(f"grid mask must be one of {', '.join(GRID_MODES)} (got {grid!r})")
        beat_strength = parse_strength(beat_strength, "--beat-strength")
        strength = DEFAULT_KEY_STRENGTH
        if isinstance(controls, dict) and "key_strength" in controls:
            controls = dict(controls)
            strength = parse_strength(controls.pop("key_strength"))
            if controls.get("key") is None:
                raise UsageError("--key-strength goes with --key")
        c = as_controls(tokenizer, controls)
        if c is not None and c.any() and not tokenizer.has_controls:
            raise UsageError(
                "this checkpoint was trained before controls existed: generate without --instruments, --tempo,"
                " --time-sig, --key, --density, --polyphony and --tag (or train a new model)"
            )
        s = cls(tokenizer, c, int(min_new_tokens or 0), min_seconds, grid=grid, key_strength=strength,
                beat_strength=beat_strength)  # fmt: skip
        s.qpm = exact_qpm(controls, c)
        if tokenizer.has_controls:  # control events are the user's to give, never the model's to sample
            masks = token_kind_masks(tokenizer)
            allowed = ~masks["control"]
            if c is not None and c.instruments is not None:
                others = np.setdiff1d(np.arange(129), c.instruments)
                allowed &= ~masks["program"][:, others].any(axis=1)
                allowed &= ~masks["track"][:, 1:].any(axis=1)  # one track per instrument
            for name, kind in (("tempo", "tempo"), ("time_sig", "timesig"), ("key", "keysig")):
                if c is not None and getattr(c, name) is not None:  # stated once, in the head
                    allowed &= ~masks[kind]
            s.base_mask = torch.from_numpy(allowed)
        return s

    def head(self, ids: list[int]) -> list[int]:
        """[BOS] + prefix + the prompt's tokens + the stated events (TIMESIG, KEYSIG, TEMPO, in the order pieces
        start with; at the prompt's end) + (with --instruments) PROGRAM of the first instrument. Without a prompt,
        when a stated event follows one not stated, the head ends after the prefix and the rest becomes the
        script (:attr:`script`): the skipped events drawn by the model, the stated ones forced."""
        tok, c = self.tokenizer, self.controls
        if c is None or not c.any():
            return ids
        v = tok.vocab
        prefix = tok.base_token_ids(prefix_events(c, v, tok.tags)).tolist()
        self.pinned = prefix
        events = self.stated_events()
        stated = [name for name in HEAD_ORDER if events.get(name) is not None]
        gap = stated and HEAD_ORDER.index(stated[-1]) >= len(stated)  # one skipped before one stated
        order = [events[n] for n in HEAD_ORDER if n in events] + (
            [events["program"]] if "program" in events else []
        )
        if len(ids) > 1 or not gap:
            return [ids[0], *prefix, *ids[1:], *tok.base_token_ids(order).tolist()]
        V = len(tok)
        last = HEAD_ORDER.index(stated[-1])
        for name in (*HEAD_ORDER[: last + 1], "program"):
            m = torch.zeros(V, dtype=torch.bool)
            if events.get(name) is not None:
                m[int(tok.base_token_ids([events[name]])[0])] = True
            elif name != "program":  # the model's own, a token of that one event alone
                m[torch.from_numpy(self._single(HEAD_ORDER_KIND[name]))] = True
            else:
                continue
            self.script.append(m)
        return [ids[0], *prefix]

    def stated_events(self) -> dict[str, int]:
        """The base events the requests state: time_sig/key/tempo (HEAD_ORDER names) and the first program."""
        tok, c = self.tokenizer, self.controls
        v, out = tok.vocab, {}
        if c.time_sig is not None:
            out["time_sig"] = v.start["timesig"] + v.time_sig_index[tuple(c.time_sig)]
        if c.key is not None:
            sharps, tonality = signature_of_key(c.key)
            out["key"] = v.start["keysig"] + (sharps + 7) * 2 + tonality
        if c.tempo is not None:
            qpm = self.qpm if self.qpm is not None else bin_middle(c.tempo)
            out["tempo"] = v.start["tempo"] + int(np.abs(np.log(v.tempos) - np.log(qpm)).argmin())
        if c.instruments is not None:
            out["program"] = v.start["program"] + c.instruments[0]
        return out

    def _single(self, kind: str) -> np.ndarray:
        """Token ids spelling exactly one base event, of ``kind``."""
        tok = self.tokenizer
        one = np.flatnonzero(tok._lens == 1)
        first = tok._flat[tok._offs[one]]
        return one[tok.vocab.kind[first] == tok.vocab.k(kind)]

    def logit_bias(self, device) -> torch.Tensor | None:
        """(V,) float32 added to every step's logits (the requested key's pull, key_bias), or None."""
        c = self.controls
        if c is None or c.key is None or not self.key_strength:
            return None
        return torch.from_numpy(key_bias(self.tokenizer, c.key, self.key_strength)).to(device)

    def constraints(self, head: list[int], batch: int, device) -> list:
        """The masks that follow each row's state (constraints.py): the onset grid, the instruments' opening."""
        from midiforge.generate.constraints import GridMask, Later, OpenInstruments, TokenTable

        grid = getattr(self.tokenizer, "onset_grid", None)
        c = self.controls
        opening = c is not None and c.instruments is not None
        if (grid is None or self.grid == "off") and not opening:
            return []
        table = TokenTable.of(self.tokenizer)
        out = []
        if grid is not None and self.grid != "off":
            texture = None
            if self.beat_strength:  # chords on the beat, single notes off it
                texture = np.where(np.arange(grid.steps_per_quarter) == 0, 1.0, -1.0) * self.beat_strength
            out.append(
                GridMask(table, grid.allowed(self.grid), grid.timesig_allowed(), head, batch, device, texture)
            )
        if opening:
            opener = OpenInstruments(
                table, c.instruments, c.instruments[0], batch, self.tokenizer.eos_id, device
            )
            out.append(
                Later(opener, len(self.script)) if self.script else opener
            )  # after the script's PROGRAM
        return out

    def finish(self, score, head_tick: int):
        """The score with the stated tempo exactly as given: the TEMPO events from the head's end (at tick
        ``head_tick`` of the score) on, which are the head's own, since no other is ever drawn."""
        if self.qpm is not None:
            for t in score.tempos:
                if t.time >= head_tick:
                    t.qpm = self.qpm
        return score

    def with_defaults(self, has_prompt: bool, max_new_tokens: int) -> Steering:
        """A prompt with no minimum asked for gets DEFAULT_PROMPT_MIN_TOKENS (so that it is really continued)."""
        if has_prompt and self.min_new_tokens == 0 and self.min_seconds is None:
            return replace(self, min_new_tokens=min(DEFAULT_PROMPT_MIN_TOKENS, max_new_tokens))
        return self

    def allowed(self, ids: torch.Tensor, head_len: int, step: int) -> torch.Tensor | None:
        """(B, V) bool mask for the next token, or None when nothing is masked. EOS stays masked for a row
        until it has min_new_tokens new tokens and (checked every CHECK_SECONDS_EVERY tokens) min_seconds."""
        B = ids.size(0)
        if step < len(self.script):  # the head's script: one token of it at a time, nothing else
            return self.script[step].repeat(B, 1)  # (B, V)
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
    g = p.add_argument_group("controls (checkpoints trained with controls, the default); a bad value lists the"
                             " valid ones")  # fmt: skip
    g.add_argument(
        "--instruments", metavar="LIST", help="hard constraint: GM names or programs, e.g. piano,bass,drums"
    )
    g.add_argument("--tempo", metavar="BPM", help="initial tempo (learned, soft)")
    g.add_argument("--time-sig", metavar="N/D", help="time signature, e.g. 3/4 (learned, soft)")
    g.add_argument("--key", metavar="KEY", help="key, e.g. 'D minor' (learned, soft)")
    g.add_argument("--key-strength", type=float, metavar="X",
                   help=f"--key: how strongly the notes lean to the key (0: only the key signature is written;"
                        f" default {DEFAULT_KEY_STRENGTH})")  # fmt: skip
    g.add_argument("--density", metavar="LEVEL", help="notes per bar: low, medium or high (learned, soft)")
    g.add_argument("--polyphony", metavar="LEVEL", help="notes at once: low, medium or high (learned, soft)")
    g.add_argument("--tag", metavar="NAME", help="style tag the checkpoint was trained with (-t NAME=DIR)")
    g.add_argument(
        "--grid-mask",
        choices=GRID_MODES,
        default="pairs",
        help="start notes only where the training set does: 'pairs' (default) allows a position of the quarter"
        " only after the positions it follows in the training set, 'positions' any position it uses; 'off'"
        " allows all (checkpoints that recorded no grid: always off)",
    )
    g.add_argument(
        "--beat-strength",
        type=float,
        default=DEFAULT_BEAT_STRENGTH,
        metavar="X",
        help="with the grid mask: chords on the beat, single notes off it (X added to the logit per extra note at"
        f" an onset on a quarter, taken off elsewhere; 0: none; default {DEFAULT_BEAT_STRENGTH:g})",
    )
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
    names = ("instruments", "tempo", "time_sig", "key", "key_strength", "density", "polyphony", "tag")
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
