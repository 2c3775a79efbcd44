"""Base events → ``symusic.Score``: the decoding half of :class:`~midiforge.tokenizer.MidiTokenizer`.

Total: any sequence of in-vocabulary base events decodes; state events that never reach a note are counted
as skipped. Vectorised: sticky state (program, velocity, duration) is carried forward with a running maximum
of indices instead of a Python loop over events.
"""

from __future__ import annotations

import numpy as np
import symusic

from midiforge.midi import DRUM_PROGRAM


def events_to_score(config, vocab, e: np.ndarray) -> tuple[symusic.Score, int, int]:
    """(score, number of base events, number of events skipped as invalid) for base event ids ``e``."""
    c, v = config, vocab
    kind, val = v.kind[e], v.value[e]
    K = {name: v.k(name) for name in v.kinds}
    time = np.cumsum(np.where(kind == K["shift"], val, 0))  # grid step of every event
    idx = np.arange(len(e))

    def sticky(k: int, default: int) -> np.ndarray:
        last = np.maximum.accumulate(np.where(kind == k, idx, -1)) if len(e) else np.zeros(0, np.int64)
        return np.where(last >= 0, val[np.maximum(last, 0)], default)

    program = sticky(K["program"], 0)
    vel_bin = sticky(K["velocity"], c.velocity_bins // 2)
    dur_idx = sticky(K["duration"], int(np.searchsorted(v.durations, c.steps_per_quarter)))
    note = np.flatnonzero(kind == K["pitch"])
    # State events whose effect never reaches a note (e.g. a trailing VELOCITY) are all decoding ignores.
    state = np.isin(kind, [K["program"], K["velocity"], K["duration"]])
    last_note = note[-1] if len(note) else -1
    reaches = idx < last_note
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
    for p in np.unique(n_prog):  # one track per program, drums last (unique sorts 128 last)
        m = n_prog == p
        drum = bool(p == DRUM_PROGRAM)
        name = "Drums" if drum else f"Program {int(p)}"
        track = symusic.Track(name, 0 if drum else int(p), drum)
        track.notes = symusic.Note.from_numpy(n_time[m], n_dur[m], n_pitch[m], n_vel[m])
        score.tracks.append(track)
    for i in np.flatnonzero(kind == K["tempo"]):
        score.tempos.append(symusic.Tempo(int(time[i] * step), qpm=float(v.tempos[val[i]])))
    for i in np.flatnonzero(kind == K["timesig"]):
        n, d = v.time_sigs[val[i]]
        score.time_signatures.append(symusic.TimeSignature(int(time[i] * step), n, d))
    return score, len(e), skipped
