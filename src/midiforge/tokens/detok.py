"""Base events → ``symusic.Score``: the decoding half of :class:`~midiforge.tokens.tokenizer.MidiTokenizer`.

Total: any sequence of in-vocabulary base events decodes; state events that never reach a note are counted
as skipped. Vectorised: sticky state (program, velocity, duration) is carried forward with a running maximum
of indices instead of a Python loop over events.
"""

from __future__ import annotations

import numpy as np
import symusic

from midiforge.notes.midi import DRUM_PROGRAM


def events_to_score(config, vocab, e: np.ndarray, track_names=None) -> tuple[symusic.Score, int, int]:
    """(score, number of base events, number of events skipped as invalid) for base event ids ``e``.

    One track per (program, TRACK index), named from ``track_names`` ((program, index) → name) where given.
    Control (CTL_*) events describe the piece and make no notes; they are neither decoded nor counted skipped.
    """
    c, v = config, vocab
    kind, val = v.kind[e], v.value[e]
    K = {name: v.k(name) for name in v.kinds}
    time = np.cumsum(np.where(kind == K["shift"], val, 0))  # grid step of every event
    idx = np.arange(len(e))

    def sticky(k: int, default: int) -> np.ndarray:
        last = np.maximum.accumulate(np.where(kind == k, idx, -1)) if len(e) else np.zeros(0, np.int64)
        return np.where(last >= 0, val[np.maximum(last, 0)], default)

    program = sticky(K["program"], 0)
    track_ix = sticky(K["track"], 0)
    vel_bin = sticky(K["velocity"], c.velocity_bins // 2)
    dur_idx = sticky(K["duration"], int(np.searchsorted(v.durations, c.steps_per_quarter)))
    note = np.flatnonzero(kind == K["pitch"])
    # State events whose effect never reaches a note (e.g. a trailing VELOCITY) are all decoding ignores.
    state = np.isin(kind, [K["program"], K["track"], K["velocity"], K["duration"]])
    last_note = note[-1] if len(note) else -1
    reaches = idx < last_note
    reaches |= idx < (np.flatnonzero(kind == K["pedal"])[-1] if (kind == K["pedal"]).any() else -1)
    if last_note >= 0 and last_note + 1 < len(e):
        reaches[last_note + 1] = kind[last_note + 1] == K["duration"]
    skipped = int((state & ~reaches).sum())

    step = c.output_tpq // c.steps_per_quarter
    score = symusic.Score(c.output_tpq)
    n_time = (time[note] * step).astype(np.int32)
    n_dur = (v.durations[dur_idx[np.minimum(note + 1, len(e) - 1)]] * step).astype(np.int32)
    n_pitch = val[note].astype(np.int8)
    n_vel = np.clip((vel_bin[note] * 127 + 127 // 2) // c.velocity_bins + 1, 1, 127).astype(np.int8)
    n_prog = program[note]
    n_key = n_prog * 16 + track_ix[note]  # (program, track index) as one number
    pedals = _pedals(kind == K["pedal"], val, time, program * 16 + track_ix, step)
    names = track_names or {}
    for k in np.unique(n_key):  # one track per (program, index), drums last (unique sorts 128 last)
        p, t = divmod(int(k), 16)
        m = n_key == k
        drum = p == DRUM_PROGRAM
        name = names.get((p, t)) or ("Drums" if drum else f"Program {p}") + (f" #{t + 1}" if t else "")
        track = symusic.Track(name, 0 if drum else p, drum)
        track.notes = symusic.Note.from_numpy(n_time[m], n_dur[m], n_pitch[m], n_vel[m])
        for on, dur in pedals.get(int(k), []):
            track.pedals.append(symusic.Pedal(on, dur))
        score.tracks.append(track)
    for i in np.flatnonzero(kind == K["tempo"]):
        score.tempos.append(symusic.Tempo(int(time[i] * step), qpm=float(v.tempos[val[i]])))
    for i in np.flatnonzero(kind == K["timesig"]):
        n, d = v.time_sigs[val[i]]
        score.time_signatures.append(symusic.TimeSignature(int(time[i] * step), n, d))
    for i in np.flatnonzero(kind == K["keysig"]):
        sharps, tonality = divmod(int(val[i]), 2)
        score.key_signatures.append(symusic.KeySignature(int(time[i] * step), sharps - 7, tonality))
    return score, len(e), skipped


def _pedals(is_pedal: np.ndarray, val, time, owner, step: int) -> dict[int, list[tuple[int, int]]]:
    """owner key → [(on tick, duration ticks)] from PEDAL events: an ON while down and an OFF while up are
    ignored; a press never released ends at the last event's time. Pedals are few: a loop is fine."""
    down: dict[int, int] = {}
    out: dict[int, list[tuple[int, int]]] = {}
    for i in np.flatnonzero(is_pedal).tolist():
        k, t = int(owner[i]), int(time[i])
        if val[i] == 1 and k not in down:
            down[k] = t
        elif val[i] == 0 and k in down:
            out.setdefault(k, []).append((down[k] * step, (t - down.pop(k)) * step))
    end = int(time[-1]) if len(time) else 0
    for k, t in down.items():
        if end > t:
            out.setdefault(k, []).append((t * step, (end - t) * step))
    return out
