"""Token masks that follow each sample's state: the onset grid (keep the beat) and the opening of requested
instruments. Both live on the model's device as small tensors, so the decode loop never waits on the host.

Each constraint has ``mask() -> (B, V) bool`` (True = may be drawn next) and ``update(tok (B,))``, and may have
``bias() -> (B, V) float | None`` (added to the logits: the beat's texture, GridMask). Per token they
read a few precomputed columns of its base events (:class:`TokenTable`): the time shift it starts with, whether
it starts a note, and which programs it selects before and after its notes. BPE words begin at time shifts, so a
token's shifts all come first (checked when the table is built).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

OPEN_PATIENCE = 8  # tokens a sample may spend on an opened instrument before it must open the next one


@dataclass
class TokenTable:
    """Per token id: ``shift`` (V,) grid steps it advances time, ``note`` (V,) it holds a PITCH, ``timesig`` (V,) a
    TIMESIG, ``entry_note`` (V,)
    a PITCH comes before any PROGRAM (a note of the program in force), ``first_program`` (V,) the program of
    its first PROGRAM event when that comes before any PITCH (-1: none), ``last_program`` (V,) of its last PROGRAM
    event (-1: none), ``opens`` (V, 129) the programs a PROGRAM event of it gives a note to, ``notes`` (V,) its
    PITCH events."""

    shift: np.ndarray
    note: np.ndarray
    timesig: np.ndarray
    entry_note: np.ndarray
    first_program: np.ndarray
    last_program: np.ndarray
    opens: np.ndarray
    notes: np.ndarray

    @classmethod
    def of(cls, tokenizer) -> TokenTable:
        v = tokenizer.vocab
        V = len(tokenizer)
        k_shift, k_pitch, k_prog = v.k("shift"), v.k("pitch"), v.k("program")
        shift = np.zeros(V, np.int64)
        note = np.zeros(V, bool)
        timesig = np.zeros(V, bool)
        entry_note = np.zeros(V, bool)
        first_program = np.full(V, -1, np.int64)
        last_program = np.full(V, -1, np.int64)
        opens = np.zeros((V, 129), bool)
        notes = np.zeros(V, np.int64)
        for i in range(V):  # once per tokenizer (~1-2k tokens of a few events each)
            seq = tokenizer._flat[tokenizer._offs[i] : tokenizer._offs[i + 1]]
            kind, val = v.kind[seq], v.value[seq]
            is_shift = kind == k_shift
            if is_shift.any() and (~is_shift).any() and is_shift[np.argmin(is_shift) :].any():
                raise ValueError(
                    f"token {i} has a time shift after another event; constraints need leading shifts"
                )
            shift[i] = val[is_shift].sum()
            notes[i] = (kind == k_pitch).sum()
            timesig[i] = (kind == v.k("timesig")).any()
            prog = -1
            for kd, x in zip(kind.tolist(), val.tolist(), strict=True):
                if kd == k_prog:
                    if first_program[i] < 0 and not note[i]:
                        first_program[i] = x
                    prog = last_program[i] = x
                elif kd == k_pitch:
                    note[i] = True
                    if prog < 0:
                        entry_note[i] = True
                    else:
                        opens[i, prog] = True
        return cls(shift, note, timesig, entry_note, first_program, last_program, opens, notes)


class GridMask:
    """Notes start only where the training set starts them: an onset at position b of the quarter may follow one
    at position a only where ``allowed[a, b]`` (an :meth:`OnsetGrid.allowed` table; row spq = no onset yet).

    State per row: ``cur`` (the current grid step modulo a quarter), ``last`` (the position of the last onset,
    spq before any) and ``fresh`` (no time has passed since that onset: more notes there are a chord, not a new
    onset). A token that moves time is allowed when it lands where a note may start after ``last``, or when it
    moves whole quarters without a note (a rest); a token that neither moves nor holds a note is always allowed,
    so EOS and the rests always remain and no row is ever left with nothing to draw. A time signature may start
    only where ``timesig_ok`` (spq,) allows (the beats count from it).
    """

    def __init__(self, table: TokenTable, allowed: np.ndarray, timesig_ok: np.ndarray, head: list[int], batch: int,
                 device, texture: np.ndarray | None = None):  # fmt: skip
        spq = allowed.shape[1]
        # (spq,) added to the logit per extra note a token puts at an onset at each position (None: nothing)
        self.texture = (
            None if texture is None else torch.as_tensor(texture, dtype=torch.float32, device=device)
        )
        self.notes = torch.as_tensor(table.notes, dtype=torch.float32, device=device)  # (V,) notes per token
        self.spq = spq
        self.allowed = torch.as_tensor(allowed, dtype=torch.bool, device=device)  # (spq + 1, spq)
        self.timesig_ok = torch.as_tensor(timesig_ok, dtype=torch.bool, device=device)  # (spq,)
        self.timesig = torch.as_tensor(table.timesig, device=device)  # (V,)
        self.step = torch.as_tensor(table.shift % spq, device=device)  # (V,)
        self.moves = torch.as_tensor(table.shift > 0, device=device)  # (V,)
        self.note = torch.as_tensor(table.note, device=device)  # (V,)
        self.rest = self.moves & ~self.note & (self.step == 0)  # (V,) whole quarters, no note
        self.still = ~self.moves & ~self.note  # (V,)
        cur, last, fresh = 0, spq, False
        for t in head:  # the prompt (and the control prefix) set the state
            if table.shift[t]:
                cur, fresh = (cur + int(table.shift[t])) % spq, False
            if table.note[t]:
                last, fresh = cur, True
        self.cur = torch.full((batch,), cur, dtype=torch.long, device=device)
        self.last = torch.full((batch,), last, dtype=torch.long, device=device)
        self.fresh = torch.full((batch,), fresh, dtype=torch.bool, device=device)

    def mask(self) -> torch.Tensor:
        land = (self.cur[:, None] + self.step[None, :]) % self.spq  # (B, V) position after each token
        ok = self.allowed[self.last[:, None], land]  # (B, V)
        chord = self.fresh[:, None] & ~self.moves[None, :]  # more notes at the onset just made
        ok = ok | chord | self.rest[None, :] | self.still[None, :]
        return ok & (~self.timesig[None, :] | self.timesig_ok[land])

    def bias(self) -> torch.Tensor | None:
        """(B, V) float: ``texture[b]`` x the notes a token adds to an onset at position b beyond its first
        (a token that starts an onset: its notes but one; one that adds to the onset just made: all its notes);
        None without a texture. The chorales attack ~3.9 notes at an onset on the beat and ~1.6 off it."""
        if self.texture is None:
            return None
        land = (self.cur[:, None] + self.step[None, :]) % self.spq  # (B, V)
        adds = self.fresh[:, None] & ~self.moves[None, :]  # (B, V) notes joining the onset just made
        extra = torch.where(adds, self.notes[None, :], (self.notes[None, :] - 1).clamp(min=0))  # (B, V)
        return self.texture[land] * extra

    def update(self, tok: torch.Tensor) -> None:
        moved = self.moves[tok]  # (B,)
        self.cur = (self.cur + self.step[tok]) % self.spq
        self.fresh = self.fresh & ~moved
        note = self.note[tok]
        self.last = torch.where(note, self.cur, self.last)
        self.fresh = self.fresh | note


class OpenInstruments:
    """Every requested instrument gets a note at the first onset, in program order (as training pieces list
    the programs of an onset): until then time may not move and EOS is masked. The head ends with PROGRAM of the
    first instrument; a token is allowed only if it adds a note to it (``entry_note``); once it has one, the
    sample may add more or switch, and after OPEN_PATIENCE tokens it must switch to an instrument still missing
    (a token whose first program is one of them). Holds whatever the weights: an untrained model opens them all
    within (OPEN_PATIENCE + 1) tokens per instrument."""

    def __init__(self, table: TokenTable, programs, first: int, batch: int, eos_id: int, device):
        V = len(table.shift)
        self.table = table
        self.moves = torch.as_tensor(table.shift > 0, device=device)
        self.entry_note = torch.as_tensor(table.entry_note, device=device)
        self.first_program = torch.as_tensor(table.first_program, device=device)
        self.last_program = torch.as_tensor(table.last_program, device=device)
        self.opens = torch.as_tensor(table.opens, device=device)  # (V, 129)
        wanted = torch.zeros(129, dtype=torch.bool, device=device)
        wanted[list(programs)] = True
        self.pending = wanted.repeat(batch, 1)  # (B, 129) requested, no note yet
        self.prog = torch.full((batch,), first, dtype=torch.long, device=device)
        self.spent = torch.zeros(batch, dtype=torch.long, device=device)  # tokens since the last opening
        self.not_eos = torch.ones(V, dtype=torch.bool, device=device)
        self.not_eos[eos_id] = False
        rows = torch.arange(batch, device=device)
        self._rows = rows

    def mask(self) -> torch.Tensor:
        active = self.pending.any(dim=1)  # (B,)
        cur_open = ~self.pending[self._rows, self.prog]  # (B,) the program in force has its note
        fp = self.first_program.clamp(min=0)  # (V,)
        to_missing = (self.first_program[None, :] >= 0) & self.pending[:, fp]  # (B, V)
        stay = ~self.moves[None, :] & self.not_eos[None, :]  # (1, V)
        need_note = stay & self.entry_note[None, :]
        may_add = stay.expand(len(self.prog), -1)
        forced = to_missing & stay
        m = torch.where(cur_open[:, None], torch.where((self.spent >= OPEN_PATIENCE)[:, None], forced, may_add),
                        need_note)  # fmt: skip
        return torch.where(active[:, None], m, torch.ones_like(m))

    def update(self, tok: torch.Tensor) -> None:
        before = self.pending.sum(dim=1)
        entry = self.entry_note[tok]  # (B,)
        self.pending[self._rows[entry], self.prog[entry]] = False
        self.pending &= ~self.opens[tok]
        lp = self.last_program[tok]
        self.prog = torch.where(lp >= 0, lp, self.prog)
        opened = self.pending.sum(dim=1) < before
        self.spent = torch.where(opened, torch.zeros_like(self.spent), self.spent + 1)


class Later:
    """``rule`` from the ``n``-th token on (a rule that starts after the head's script, steer.py)."""

    def __init__(self, rule, n: int):
        self.rule, self.wait = rule, n

    def mask(self) -> torch.Tensor:
        if self.wait > 0:
            return torch.ones_like(self.rule.mask())
        return self.rule.mask()

    def update(self, tok: torch.Tensor) -> None:
        if self.wait > 0:
            self.wait -= 1
        else:
            self.rule.update(tok)


def total_bias(rules: list) -> torch.Tensor | None:
    """(B, V) float: the sum of the rules' logit biases (a rule without ``bias`` adds none), or None."""
    out = None
    for rule in rules:
        b = rule.bias() if hasattr(rule, "bias") else None
        if b is not None:
            out = b if out is None else out + b
    return out


def combine(allowed: torch.Tensor | None, rules: list, banned: torch.Tensor) -> torch.Tensor | None:
    """(B, V) bool: ``allowed`` (the host's mask, or None) and every rule's mask. A row the rules would leave
    with nothing outside ``banned`` (V,) (a prompt that ends somewhere no rule foresaw) keeps ``allowed`` alone."""
    if not rules:
        return allowed
    ok = allowed.clone() if allowed is not None else None
    for rule in rules:
        m = rule.mask()  # (B, V)
        ok = m if ok is None else ok & m
    empty = ~(ok & ~banned).any(dim=1)  # (B,); no host look: the decode loop stays on the device
    base = allowed if allowed is not None else torch.ones_like(ok)
    return torch.where(empty[:, None], base, ok)
