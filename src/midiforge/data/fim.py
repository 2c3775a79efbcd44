"""Infilling as a training objective: some training windows are rearranged so that a left-to-right decoder
learns to write a span or a track given what surrounds it (generation side: infill.py).

Two rearrangements of a window ``w`` (model tokens, cut at onsets by MidiDataset):

span ("fill in the middle")::

    [BOS] prefix  FIM_SUFFIX  suffix' [EOS]  FIM_MIDDLE  middle  FIM_END

  prefix, middle and suffix are cut at word starts (onsets). ``prefix`` and ``middle`` are the window's own
  tokens, so the middle continues the prefix exactly as in ordinary reading. ``suffix'`` is the suffix
  re-encoded with its times measured from the end of the prefix: its leading SHIFTs are the explicit time
  anchor (our time tokens are relative), and its first note carries its PROGRAM/TRACK/VELOCITY explicitly.

track (anticipation / MIDI-GPT style: the given tracks come first, the track to write after them)::

    [BOS] FIM_TRACKS  given tracks  FIM_MIDDLE  PROGRAM(p) TRACK(i)  track (p, i)  FIM_END

  the given tracks are a random non-empty subset of the window's other tracks (so that a melody alone, as in
  harmonisation, is a seen situation), all encoded by the tokenizer's own events() from the window's notes.

Sentinels are base events of their own (vocab kind "fim"), never produced by events(): ordinary pieces, their
ids, EVENTS_VERSION and token caches stay as they were. No loss is put on predicting what the user supplies at
generation (the sentinels FIM_SUFFIX/FIM_MIDDLE/FIM_TRACKS and the track header); FIM_END is learnt.
Everything works on a piece as a NoteTable at ``tpq = steps_per_quarter`` (times are grid steps), which the
tokenizer's events() encodes exactly as it encoded the original (same rounding, bins and order).
"""

from __future__ import annotations

import numpy as np

from midiforge.notes.midi import NoteTable

FIM_SUFFIX, FIM_MIDDLE, FIM_END, FIM_TRACKS = range(4)
SENTINEL_NAMES = ("FIM_SUFFIX", "FIM_MIDDLE", "FIM_END", "FIM_TRACKS")
IGNORE_INDEX = -100  # sampler.IGNORE_INDEX (not imported: sampler imports torch-heavy code lazily anyway)
_FIM_STREAM = 7  # numpy stream id of the rearrangement RNG, apart from dataset.py's transposition/order streams


# ------------------------------------------------------------------------------------------- vocabulary
def sentinel_events(tok) -> np.ndarray:
    """Base event ids of FIM_SUFFIX, FIM_MIDDLE, FIM_END, FIM_TRACKS."""
    return tok.vocab.start["fim"] + np.arange(4, dtype=np.int64)


def supports_infill(tok) -> bool:
    """Whether the tokenizer has the sentinels as tokens (a BPE learnt before they existed lacks them)."""
    if not tok.has_controls:  # legacy v3 tokenizers: events differ anyway
        return False
    if tok._bpe is None:
        return True
    return all(tok._bpe.token_to_id(chr(0x4E00 + int(e))) is not None for e in sentinel_events(tok))


def sentinel_ids(tok) -> np.ndarray:
    """Token ids of the four sentinels (empty when the tokenizer lacks them)."""
    return tok.base_token_ids(sentinel_events(tok)) if supports_infill(tok) else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------- piece tables
def events_to_table(tok, e: np.ndarray) -> tuple[NoteTable, dict[str, np.ndarray]]:
    """Base events → a NoteTable in grid steps (tpq = steps_per_quarter), decoded exactly as detok decodes
    them, and the index of the event each row came from (``src["note"|"pedal"|"tempo"|"ts"|"ks"]``)."""
    c, v = tok.config, tok.vocab
    e = np.asarray(e, np.int64)
    kind, val = v.kind[e], v.value[e]
    K = {name: v.k(name) for name in v.kinds}
    time = np.cumsum(np.where(kind == K["shift"], val, 0))
    idx = np.arange(len(e))

    def sticky(k: int, default: int) -> np.ndarray:
        last = np.maximum.accumulate(np.where(kind == k, idx, -1)) if len(e) else np.zeros(0, np.int64)
        return np.where(last >= 0, val[np.maximum(last, 0)], default)

    program, track = sticky(K["program"], 0), sticky(K["track"], 0)
    vel_bin = sticky(K["velocity"], c.velocity_bins // 2)
    dur_idx = sticky(K["duration"], int(np.searchsorted(v.durations, c.steps_per_quarter)))
    note = np.flatnonzero(kind == K["pitch"])
    nd = dur_idx[np.minimum(note + 1, len(e) - 1)] if len(note) else np.zeros(0, np.int64)
    # Pedals pair as in detok._pedals: ON while down and OFF while up are ignored; an open press ends at the end.
    p_on, p_dur, p_prog, p_track, p_src, down = [], [], [], [], [], {}
    for i in np.flatnonzero(kind == K["pedal"]).tolist():
        key = (int(program[i]), int(track[i]))
        if val[i] == 1 and key not in down:
            down[key] = i
        elif val[i] == 0 and key in down:
            j = down.pop(key)
            p_on.append(time[j]), p_dur.append(time[i] - time[j]), p_src.append(j)
            p_prog.append(key[0]), p_track.append(key[1])
    end = int(time[-1]) if len(time) else 0
    for key, j in down.items():
        if end > time[j]:
            p_on.append(time[j]), p_dur.append(end - time[j]), p_src.append(j)
            p_prog.append(key[0]), p_track.append(key[1])
    tempo, ts, ks = (np.flatnonzero(kind == K[k]) for k in ("tempo", "timesig", "keysig"))
    tsv = [v.time_sigs[x] for x in val[ts].tolist()]
    i64, i16 = np.int64, np.int16
    table = NoteTable(
        tpq=c.steps_per_quarter,
        time=time[note].astype(i64),
        duration=v.durations[nd].astype(i64),
        pitch=val[note].astype(i16),
        velocity=np.clip((vel_bin[note] * 127 + 127 // 2) // c.velocity_bins + 1, 1, 127).astype(i16),
        program=program[note].astype(i16),
        track=track[note].astype(i16),
        tempo_time=time[tempo].astype(i64),
        tempo_qpm=v.tempos[val[tempo]].astype(np.float64),
        ts_time=time[ts].astype(i64),
        ts_numerator=np.array([n for n, _ in tsv], i16),
        ts_denominator=np.array([d for _, d in tsv], i16),
        pedal_time=np.array(p_on, i64),
        pedal_duration=np.array(p_dur, i64),
        pedal_program=np.array(p_prog, i16),
        pedal_track=np.array(p_track, i16),
        ks_time=time[ks].astype(i64),
        ks_key=(val[ks] // 2 - 7).astype(i16),
        ks_tonality=(val[ks] % 2).astype(i16),
    )
    src = {"note": note, "pedal": np.array(p_src, i64), "tempo": tempo, "ts": ts, "ks": ks}
    return table, src


_NOTE_COLS = ("time", "duration", "pitch", "velocity", "program", "track")
_PEDAL_COLS = ("pedal_time", "pedal_duration", "pedal_program", "pedal_track")
_META = {"tempo": ("tempo_time", "tempo_qpm"), "ts": ("ts_time", "ts_numerator", "ts_denominator"),
         "ks": ("ks_time", "ks_key", "ks_tonality")}  # fmt: skip


def subset(t: NoteTable, notes=None, pedals=None, meta=None, origin: int = 0) -> NoteTable:
    """Rows of ``t`` chosen by boolean masks (None: none of them), times moved by ``-origin``.
    ``meta``: dict kind → mask for "tempo", "ts", "ks" (missing kinds: none)."""
    cols = {"tpq": t.tpq, "track_names": dict(t.track_names)}
    for names, m in ((_NOTE_COLS, notes), (_PEDAL_COLS, pedals)):
        for n in names:
            a = getattr(t, n)
            cols[n] = a[m] if m is not None else a[:0]
    for k, names in _META.items():
        m = (meta or {}).get(k)
        for n in names:
            a = getattr(t, n)
            cols[n] = a[m] if m is not None else a[:0]
    for n in ("time", "pedal_time", "tempo_time", "ts_time", "ks_time"):
        cols[n] = cols[n] - origin
    return NoteTable(**cols)


def concat(a: NoteTable, b: NoteTable) -> NoteTable:
    """All rows of both tables (same tpq)."""
    cols = {"tpq": a.tpq, "track_names": {**a.track_names, **b.track_names}}
    for n in _NOTE_COLS + _PEDAL_COLS + tuple(x for names in _META.values() for x in names):
        cols[n] = np.concatenate([getattr(a, n), getattr(b, n)])
    return NoteTable(**cols)


def encode_table(tok, t: NoteTable) -> np.ndarray:
    """Token ids (int64) of a step-time table, by the tokenizer's own events() and BPE."""
    ev, ws = tok.events(t)
    return tok.bpe_encode(ev, ws).astype(np.int64)


def shift_total(tok, ids) -> int:
    """Grid steps the SHIFTs of ``ids`` advance."""
    ev = tok.base_events(ids)
    v = tok.vocab
    return int(np.where(v.kind[ev] == v.k("shift"), v.value[ev], 0).sum())


# ------------------------------------------------------------------------------------------- training
class Rearranger:
    """Turns a share ``rate`` of training windows into infilling examples; ``track_share`` of those (when the
    window has two tracks or more) are track examples, the rest span examples.

    ``__call__(w, rng)`` → (inputs, labels) int64 arrays no longer than ``len(w) - 1``, or None for a window
    left ordinary. ``rng``: numpy Generator seeded by the dataset from (seed, epoch, window index), so a
    resumed run rebuilds exactly the same examples.
    """

    def __init__(self, tok, rate: float = 0.5, track_share: float = 0.5):
        self.tok, self.rate, self.track_share = tok, float(rate), float(track_share)
        s = sentinel_ids(tok)
        self.suffix, self.middle, self.end, self.tracks = (int(x) for x in s)
        self.given = {self.suffix, self.middle, self.tracks}

    @staticmethod
    def rng(seed: int, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, index, _FIM_STREAM])

    def __call__(self, w: np.ndarray, rng: np.random.Generator):
        if self.rate <= 0 or rng.random() >= self.rate or len(w) < 8:
            return None
        tok = self.tok
        bos = int(w[0] == tok.bos_id)
        eos = int(w[-1] == tok.eos_id)
        body = np.asarray(w[bos : len(w) - eos], np.int64)
        ev = tok.base_events(body)
        table, src = events_to_table(tok, ev)
        head = [tok.bos_id] * bos
        seq, n_header = None, 0
        if rng.random() < self.track_share:
            seq, n_header = self._track(table, rng, head)
        if seq is None:
            seq = self._span(body, ev, table, src, rng, head, eos)
        if seq is None:
            return None
        seq = np.asarray(seq[: len(w)], np.int64)  # never longer than the window the sampler planned for
        middle = np.flatnonzero(seq == self.middle)
        if not len(middle) or middle[0] + n_header + 1 >= len(seq):
            return None  # the given part alone filled the window: nothing is left to learn to write
        labels = seq[1:].copy()
        labels[np.isin(labels, list(self.given))] = IGNORE_INDEX
        if n_header:  # the header (which track to write) is the user's choice, not the model's
            at = int(middle[0])
            labels[at : at + n_header] = IGNORE_INDEX
        return seq[:-1], labels

    def _span(self, body, ev, table, src, rng, head, eos):
        tok = self.tok
        cands = np.append(np.flatnonzero(tok.word_starts(body)), len(body))
        if len(cands) < 3:
            return None
        a, b = np.sort(rng.choice(cands, 2, replace=False))
        starts = np.concatenate([[0], np.cumsum(tok._lens[body])])  # event offset of each token
        v = tok.vocab
        t_at = np.concatenate([[0], np.cumsum(np.where(v.kind[ev] == v.k("shift"), v.value[ev], 0))])
        origin = int(t_at[starts[a]])  # time at the end of the prefix: the suffix is measured from here
        cut = starts[b]
        suf = subset(
            table,
            notes=src["note"] >= cut,
            pedals=src["pedal"] >= cut,
            meta={k: src[k] >= cut for k in ("tempo", "ts", "ks")},
            origin=origin,
        )
        suffix = list(encode_table(tok, suf)) + [tok.eos_id] * eos
        # The window's length is the sampler's plan: the suffix gives way (from its end) to keep the middle whole.
        over = len(head) + a + 1 + len(suffix) + 1 + (b - a) + 1 - (len(head) + len(body) + eos)
        if over > 0:
            suffix = suffix[: max(0, len(suffix) - over)]
        return [*head, *body[:a], self.suffix, *suffix, self.middle, *body[a:b], self.end]

    def _track(self, table: NoteTable, rng, head):
        tok = self.tok
        owner = table.program.astype(np.int64) * 16 + table.track
        owners = np.unique(owner)
        if len(owners) < 2:
            return None, 0
        target = int(rng.choice(owners))
        others = owners[owners != target]
        keep = others[rng.random(len(others)) < 0.5]
        if len(keep) == 0:
            keep = others[rng.integers(len(others)) :][:1]
        p_owner = table.pedal_program.astype(np.int64) * 16 + table.pedal_track
        all_meta = {k: np.ones(len(getattr(table, names[0])), bool) for k, names in _META.items()}
        ctx = subset(table, np.isin(owner, keep), np.isin(p_owner, keep), all_meta)
        tgt = subset(table, owner == target, p_owner == target)
        header = header_ids(tok, target // 16, target % 16)
        seq = [*head, self.tracks, *encode_table(tok, ctx), self.middle, *header]
        return seq + [*encode_table(tok, tgt), self.end], len(header)


def header_ids(tok, program: int, track: int) -> list[int]:
    """PROGRAM(p) TRACK(i): which track a track example writes."""
    v = tok.vocab
    return [int(x) for x in tok.base_token_ids([v.start["program"] + program, v.start["track"] + track])]


def from_config(cfg, tok):
    """The Rearranger of a run (None when the rate is 0 or the tokenizer lacks the sentinels)."""
    rate = getattr(cfg, "infill_rate", 0.0)
    if not rate or not supports_infill(tok):
        return None
    return Rearranger(tok, rate, getattr(cfg, "infill_track_share", 0.5))
