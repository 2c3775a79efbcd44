"""Write tracks together with given ones, in time (what ``generate --harmonize`` runs on).

The model reads and writes the ordinary token stream, the layout it is trained on most, in which every onset
lists its notes track by track. The given notes are forced into that stream at their own times (at each step
only the tokens that spell them are allowed), and between them the model writes the target tracks' notes:
at a given onset it writes right after the given notes, and it may write onsets of its own in between, but
time never moves past the next given onset. So every written note sees the given music up to its own time
and every voice written so far, and all voices are written jointly, onset by onset.

The rules are a small automaton over base events (:class:`Writer`). A BPE token is allowed when the automaton
accepts all of its base events, found by walking a trie of the vocabulary from the current state, so only
the tokens that can follow are visited. For a harmonisation (:class:`VoiceRules`) the automaton also keeps
four-part writing: each voice one note at a time, inside its range, never above the voice over it; a voice
whose note has ended attacks with the melody; no parallel fifths or octaves with a voice above. The output
voices are legato: a note lasts until the next note of its voice (the melody's end for the last one).
Without rules (``rules=None``) the targets are free tracks: any pitches, up to MAX_CHORD at an onset, state
events in the encoder's order; each one attacks at the first onset of the given notes (every track asked for is
heard).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from midiforge.generate import stopping
from midiforge.generate.sampling import sample
from midiforge.notes.midi import NoteTable

MAX_CHORD = 8  # free targets: notes of one track at one onset (an untrained model would write chords forever)
# Pitch-class sets of every major and minor triad and dominant seventh: a sonority fits when it is a subset.
CHORDS = [
    frozenset((r + i) % 12 for i in iv) for r in range(12) for iv in ((0, 4, 7), (0, 3, 7), (0, 4, 7, 10))
]
_FITS: dict = {}


def fits_chord(pcs: frozenset) -> bool:
    got = _FITS.get(pcs)
    if got is None:
        got = _FITS[pcs] = any(pcs <= c for c in CHORDS)
    return got


@dataclass(frozen=True)
class VoiceRules:
    """Four-part writing under a melody: ``ranges[k]`` (lowest, highest MIDI pitch) of target voice k, top down."""

    ranges: tuple[tuple[int, int], ...]
    no_parallels: bool = True
    chords: bool = True  # where the melody attacks, the voices sound a triad or dominant seventh with it


@dataclass
class State:
    """Where the stream is: time, the next forced row, the decoder's sticky state, and per target voice
    (rules only) its pitch, the end of its written note, whether it attacked at ``t`` and its pitch before."""

    t: int = 0
    fi: int = 0
    prog: int = 0
    track: int = 0
    vel: int = 0
    dur: int = 0
    pend: tuple = ()  # ("f", dur index) after a forced PITCH; ("v", voice) after a free one; ("s", kind) after a
    # free target's PROGRAM/TRACK/VELOCITY
    pitch: tuple = ()
    end: tuple = ()
    hit: tuple = ()
    before: tuple = ()
    done: bool = False

    def copy(self, **kw) -> State:
        s = State.__new__(State)
        d = self.__dict__.copy()
        if len(d) > _FIELDS:  # memos of this state (_settled, _complete, _attack) are not the copy's
            for m in _MEMOS:
                d.pop(m, None)
        d.update(kw)
        s.__dict__ = d
        return s


_FIELDS = len(State.__dataclass_fields__)
_MEMOS = ("_settled", "_complete", "_attack")


def forced_rows(tok, given: NoteTable) -> list[tuple]:
    """The given table as rows in stream order: (time, terminal event, program, track, velocity, duration
    index) with the sticky values the decoder applies (velocity/duration None for meta events)."""
    v, c = tok.vocab, tok.config
    ev, _ = tok.events(given)
    kind, val = v.kind[ev], v.value[ev]
    K = {n: v.k(n) for n in ("shift", "program", "track", "velocity", "pitch", "duration")}
    t, prog, track, vel = 0, 0, 0, c.velocity_bins // 2
    dur = int(np.searchsorted(v.durations, c.steps_per_quarter))
    rows: list[list] = []
    for i in range(len(ev)):
        k, x = int(kind[i]), int(val[i])
        if k == K["shift"]:
            t += x
        elif k == K["program"]:
            prog = x
        elif k == K["track"]:
            track = x
        elif k == K["velocity"]:
            vel = x
        elif k == K["duration"]:
            dur = x
            if i and kind[i - 1] == K["pitch"]:
                rows[-1][5] = x
        elif k == K["pitch"]:
            rows.append([t, int(ev[i]), prog, track, vel, dur])
        else:
            rows.append([t, int(ev[i]), prog, track, None, None])
    return [tuple(r) for r in rows]


def token_trie(tok) -> dict:
    """Trie of the vocabulary's base-event spellings: node = {"ids": [...], event: child node, ..., None: [(event,
    child node), ...]}."""
    root: dict = {"ids": []}
    for tid in range(3, len(tok)):  # PAD, BOS, EOS spell nothing
        node = root
        for e in tok._flat[tok._offs[tid] : tok._offs[tid + 1]].tolist():
            node = node.setdefault(e, {"ids": []})
        node["ids"].append(tid)
    _index(root)
    return root


def _index(node: dict) -> None:
    """Adds ``node[None]``: its (event, child) pairs, listed once (the walk visits small nodes whole)."""
    pairs = [(e, c) for e, c in node.items() if e != "ids"]
    for _, c in pairs:
        _index(c)
    node[None] = pairs


@dataclass
class Writer:
    """The automaton: which base events may come next, given the forced rows, targets and rules."""

    tok: object
    rows: list
    targets: list  # (program, track) of each target, top voice first
    end: int  # grid step where writing stops
    rules: VoiceRules | None = None
    melody: np.ndarray | None = None  # (end + 1,) highest given pitch sounding at each step, -1 none
    onsets: set = field(default_factory=set)  # steps where a given note starts
    trie: dict = field(default_factory=dict)

    def __post_init__(self):
        v = self.tok.vocab
        self.K = {n: v.k(n) for n in v.kinds}
        self.kind, self.val = v.kind, v.value
        self._kl, self._vl = v.kind.tolist(), v.value.tolist()  # plain lists: a step reads them ~100x a token
        self._dur, self._pitch, self._shift = self.K["duration"], self.K["pitch"], self.K["shift"]
        self.durations = v.durations
        self.voice = {t: k for k, t in enumerate(self.targets)}
        self.programs = {p for p, _ in self.targets}
        self.trie = self.trie or token_trie(self.tok)
        st = self.start = v.start
        self.all_durations = [st["duration"] + i for i in range(1, len(v.durations))]
        self.free_state = [st["program"] + p for p in sorted(self.programs)]
        self.free_state += [st["track"] + i for i in range(8)] + [
            st["velocity"] + b for b in range(v.sizes["velocity"])
        ]
        self._pitch_memo: dict = {}
        self._state_order = {self.K[n]: i for i, n in enumerate(("program", "track", "velocity", "pitch"))}
        notes = [r[0] for r in self.rows if r[4] is not None]
        self.first_note = min(notes, default=0)  # free targets all attack at the given notes' first onset

    def initial(self) -> State:
        n = len(self.targets)
        c = self.tok.config
        dur = int(np.searchsorted(self.durations, c.steps_per_quarter))
        return State(vel=c.velocity_bins // 2, dur=dur, pitch=(-1,) * n, end=(0,) * n, hit=(False,) * n,
                     before=(-1,) * n)  # fmt: skip

    # ------------------------------------------------------------------ the rules of a voice
    def _above(self, s: State, k: int) -> int:
        """Pitch of what sounds over voice k at s.t (the melody over voice 0), -1 for nothing."""
        if k == 0:
            return int(self.melody[min(s.t, len(self.melody) - 1)]) if self.melody is not None else -1
        return s.pitch[k - 1]

    def _above_before(self, s: State, k: int) -> int:
        if k == 0:
            return int(self.melody[min(s.t, len(self.melody)) - 1]) if s.t and self.melody is not None else -1
        return s.before[k - 1]

    def _required(self, s: State, k: int) -> bool:
        """Voice k must attack at s.t: its note ended (or never began) where the melody attacks, or it would
        sound above the voice over it."""
        if s.t in self.onsets and (s.pitch[k] < 0 or s.end[k] <= s.t):
            return True
        above = self._above(s, k)
        if s.pitch[k] < 0:
            return False
        if 0 <= above < s.pitch[k]:
            return True
        if self.rules.chords and s.t in self.onsets:
            pcs = {self._above(s, u) % 12 for u in range(k + 1) if self._above(s, u) >= 0}
            return not fits_chord(frozenset(pcs | {s.pitch[k] % 12}))
        return False

    def _skippable(self, s: State, upto: int) -> bool:
        """Voices after the last one that attacked at s.t and before ``upto`` may stay silent at s.t."""
        first = max([k + 1 for k in range(len(s.hit)) if s.hit[k]], default=0)
        if upto < first:
            return False
        return not any(self._required(s, k) for k in range(first, upto))

    def pitches(self, s: State, k: int) -> frozenset:
        """The pitches voice k may attack at s.t."""
        chord = self.rules.chords and s.t in self.onsets
        mel = self.melody
        if mel is not None:  # the melody now and one step before, as _above/_above_before read it
            m = (int(mel[min(s.t, len(mel) - 1)]), int(mel[min(s.t, len(mel)) - 1]) if s.t else -1)
        else:
            m = (-1, -1)
        key = (k, m, s.pitch[:k], s.before[: k + 1], chord)
        got = self._pitch_memo.get(key)
        if got is None:
            over = tuple(
                (self._above(s, u), self._above_before(s, u)) for u in range(k + 1)
            )  # melody, voices
            got = self._pitch_memo[key] = self._pitches(k, over, s.before[k], chord)
        return got

    def _attackable(self, s: State, k: int) -> frozenset:
        """The pitches voice k may attack next at s (none when it has attacked at s.t or a voice between the
        last one that did and k owes a note); memoised per state: every PITCH child of a trie node asks."""
        memo = s.__dict__.setdefault("_attack", {})
        got = memo.get(k)
        if got is None:
            got = memo[k] = frozenset() if s.hit[k] or not self._skippable(s, k) else self.pitches(s, k)
        return got

    def _pitches(self, k: int, over: tuple, own0: int, chord: bool) -> frozenset:
        ranges, above = self.rules.ranges, over[k][0]
        hi = ranges[k][1] if above < 0 else min(ranges[k][1], above)
        lo = max(r[0] for r in ranges[k:])  # leave the voices below room inside their own ranges
        if lo > hi:  # a melody below the ranges: stay under it
            lo = max(0, hi - 12)
        ok = set(range(lo, hi + 1))
        if chord:
            pcs = frozenset(now % 12 for now, _ in over if now >= 0)
            ok = {x for x in ok if fits_chord(pcs | {x % 12})} or ok
        if self.rules.no_parallels and own0 >= 0:
            for now, before in over:  # the melody and every voice over k: no parallel 5ths/8ves with them
                if now < 0 or before < 0 or now == before:
                    continue
                iv = (before - own0) % 12
                if iv in (0, 7):
                    up = now > before
                    bad = {x for x in ok if x != own0 and (x > own0) == up and (now - x) % 12 == iv}
                    ok = (ok - bad) or ok
        return frozenset(ok)

    # ------------------------------------------------------------------ the automaton
    def step(self, s: State, e: int) -> State | None:
        """The state after base event ``e``, or None when ``e`` may not come here."""
        if s.done:
            return s
        K, kind, x = self.K, self._kl[e], self._vl[e]
        if s.pend:
            s = self._resolve(s, kind, x)
            if s is None or kind == self._dur:
                return s
        elif kind == self._dur:
            return None  # a DURATION belongs right after its PITCH
        rows = self.rows
        if s.fi < len(rows) and rows[s.fi][0] == s.t:  # a given row is due here: spell it
            return self._forced(s, kind, x, e, rows[s.fi])
        if kind == self._shift:
            return self._shift_to(s, x)
        free = () if self.rules else ("s", kind)  # free targets: what may follow a state event, _resolve
        if kind == K["program"]:
            if x not in self.programs or x == s.prog:
                return None
            if free and not any(self._open(s, k) for (p, _), k in self.voice.items() if p == x):
                return None
            return s.copy(prog=x, pend=free)
        if kind == K["track"]:
            k = self.voice.get((s.prog, x))
            if x == s.track:
                return None
            if k is None or (self.rules and (s.hit[k] or not self._skippable(s, k))):
                return None
            return s.copy(track=x, pend=free) if not free or self._open(s, k) else None
        if kind == K["velocity"]:
            if x == s.vel or (free and not self._open(s, self.voice.get((s.prog, s.track)))):
                return None
            return s.copy(vel=x, pend=free)
        if kind == self._pitch:
            k = self.voice.get((s.prog, s.track))
            if k is None:
                return None
            if self.rules is None:
                if not self._open(s, k):
                    return None
                return s.copy(pend=("v", k), pitch=s.pitch[:k] + (x,) + s.pitch[k + 1 :],
                              hit=s.hit[:k] + (s.hit[k] + 1,) + s.hit[k + 1 :])  # fmt: skip
            if x not in self._attackable(s, k):
                return None
            i = (slice(0, k), slice(k + 1, None))
            return s.copy(pend=("v", k), pitch=s.pitch[i[0]] + (x,) + s.pitch[i[1]],
                          hit=s.hit[i[0]] + (True,) + s.hit[i[1]],
                          end=s.end[i[0]] + (s.t + int(self.durations[s.dur]),) + s.end[i[1]])  # fmt: skip
        return None  # meta events, pedals, controls, sentinels: never written by the model here

    @staticmethod
    def _open(s: State, k: int | None) -> bool:
        """A free target ``k`` may take another note at s.t."""
        return k is not None and s.hit[k] < MAX_CHORD

    def _resolve(self, s: State, kind: int, x: int) -> State | None:
        """The event after a PITCH: its DURATION, or (when the sticky one fits) anything else. After a free
        target's state event, the encoder's order: PROGRAM, TRACK, VELOCITY, then a PITCH (nothing else)."""
        if s.pend[0] == "s":
            order = self._state_order
            return self._settled(s) if order.get(kind, -1) > order[s.pend[1]] else None
        if s.pend[0] == "f":
            need = s.pend[1]
            if kind == self._dur:
                return s.copy(pend=(), dur=x) if x == need else None
            return self._settled(s) if s.dur == need else None
        if kind == self._dur:
            if self.durations[x] <= 0:
                return None
            k = s.pend[1]
            if self.rules is None:
                return s.copy(pend=(), dur=x)
            end = s.end[:k] + (s.t + int(self.durations[x]),) + s.end[k + 1 :]
            return s.copy(pend=(), dur=x, end=end)
        return self._settled(s)

    @staticmethod
    def _settled(s: State) -> State:
        """``s`` with its PITCH's duration left as it is (one copy per state, shared by its successors)."""
        got = s.__dict__.get("_settled")
        if got is None:
            got = s.__dict__["_settled"] = s.copy(pend=())
        return got

    def _complete(self, s: State) -> bool:
        """No voice owes a note at s.t (memoised per state: every SHIFT candidate asks). Free targets (no rules)
        owe one note each, from the first onset of the given notes on: every track asked for is heard."""
        got = s.__dict__.get("_complete")
        if got is None:
            if self.rules is None:
                got = s.t < self.first_note or min(s.pitch, default=0) >= 0
            else:
                got = self._skippable(s, len(self.targets))
            s.__dict__["_complete"] = got
        return got

    def _forced(self, s: State, kind: int, x: int, e: int, row: tuple) -> State | None:
        _, ev, prog, track, vel, dur = row
        K = self.K
        if self.kind[ev] != K["pedal"] and vel is None:  # tempo, time and key signatures: that event
            return s.copy(fi=s.fi + 1) if e == ev else None
        if kind == K["program"]:
            return s.copy(prog=x) if x == prog != s.prog else None
        if kind == K["track"]:
            return s.copy(track=x) if x == track != s.track else None
        if kind == K["velocity"]:
            return s.copy(vel=x) if vel is not None and x == vel != s.vel else None
        if e != ev or s.prog != prog or s.track != track or (vel is not None and s.vel != vel):
            return None
        if vel is None:  # a pedal
            return s.copy(fi=s.fi + 1)
        return s.copy(fi=s.fi + 1, pend=("f", dur))

    def _shift_to(self, s: State, k: int) -> State | None:
        if not self._complete(s):
            return None
        t = s.t + k
        if s.fi < len(self.rows):
            if t > self.rows[s.fi][0]:
                return None
        elif t >= self.end:
            return s.copy(t=t, done=True)
        n = len(self.targets)
        return s.copy(t=t, hit=(False,) * n, before=s.pitch)

    def can_end(self, s: State) -> bool:
        """EOS here: every given row written, no voice owing a note."""
        if s.fi < len(self.rows) or (s.pend and s.pend[0] == "f" and s.dur != s.pend[1]):
            return False
        return self._complete(s)

    def candidates(self, s: State) -> list[int]:
        """A superset of the base events :meth:`step` accepts next (so the trie walk visits few children)."""
        st = self.start
        if s.pend and s.pend[0] == "s":
            return self.candidates(s.copy(pend=()))
        if s.pend:
            tail = [st["duration"] + s.pend[1]] if s.pend[0] == "f" else self.all_durations
            if s.pend[0] == "f" and s.dur != s.pend[1]:
                return tail
            return tail + self.candidates(s.copy(pend=()))
        rows = self.rows
        if s.fi < len(rows) and rows[s.fi][0] == s.t:
            _, ev, prog, track, vel, _ = rows[s.fi]
            return [ev, st["program"] + prog, st["track"] + track] + ([st["velocity"] + vel] if vel else [])
        horizon = rows[s.fi][0] - s.t if s.fi < len(rows) else self.tok.config.max_shift
        out = list(range(st["shift"], st["shift"] + min(horizon, self.tok.config.max_shift)))
        out += self.free_state
        k = self.voice.get((s.prog, s.track))
        if k is not None:
            ps = self.pitches(s, k) if self.rules else range(128)
            out += [st["pitch"] + p for p in ps]
        return out

    def allowed(self, s: State) -> dict[int, State]:
        """Token id → the state after it, for every token the automaton accepts whole."""
        out: dict[int, State] = {}
        stack = [(self.trie, s)]
        while stack:
            node, st = stack.pop()
            for tid in node["ids"]:
                out[tid] = st
            pairs = node[None]
            if not pairs or st.done:
                continue
            if len(pairs) > 32:  # the root and a few wide nodes: visit only the events that may come next
                pairs = [(e, node.get(e)) for e in self.candidates(st)]
            for e, child in pairs:
                if child is not None:
                    ns = self.step(st, e)
                    if ns is not None:
                        stack.append((child, ns))
        return out


@torch.inference_mode()
def write(model, tok, writer: Writer, *, generator, sampling: dict, max_new_tokens: int, device="cpu",
          use_kv_cache: bool = True) -> tuple[list[int], int]:  # fmt: skip
    """(token ids of the joint stream, BOS first; the grid step up to which every rule was kept: the end, or
    where ``max_new_tokens`` ran out). Tokens the rules leave no choice about do not count."""
    L, V = model.config.max_seq_len, model.config.vocab_size
    ids = [tok.bos_id]
    s = writer.initial()
    cache = model.new_kv_cache(1, max_len=L) if use_kv_cache else None
    start = cached = 0
    chosen = 0
    while chosen < max_new_tokens:
        if len(ids) % stopping.CHECK_EVERY == 0:
            stopping.check()
        if len(ids) - start >= L:  # slide: keep the newest three quarters, cut at an onset
            cut = len(ids) - int(L * 0.75)
            ws = np.flatnonzero(tok.word_starts(np.asarray(ids[cut:], np.int64)))
            start = cut + (int(ws[0]) if len(ws) else 0)
            if cache is not None:
                cache.reset()
                cached = start
        nxt = writer.allowed(s)
        if writer.can_end(s):
            nxt[tok.eos_id] = s
        assert nxt, "the writing rules left no token to write"
        if len(nxt) == 1:
            t = next(iter(nxt))
        else:
            feed = torch.tensor([ids[cached if cache is not None else start :]], device=device)
            logits = model(feed, cache, last_only=True)[:, -1, :].float().cpu()  # (1, V)
            cached = len(ids)
            mask = torch.zeros(V, dtype=torch.bool)
            mask[list(nxt)] = True
            t = int(sample(logits.masked_fill(~mask, float("-inf")), generator=generator, **sampling)[0])
            chosen += 1
        if t == tok.eos_id:
            return ids, writer.end
        ids.append(t)
        s = nxt[t]
        if s.done:
            return ids, writer.end
    return ids, s.t
