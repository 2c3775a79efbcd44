"""The output of an edit: the user's own score, with only the edited region's notes replaced.

Everything else is the input as it was read: its ticks per quarter, tempo map, velocities, controllers,
track names and order. The model's notes (a step-time table) are converted to the input's ticks and put in
the track the tokenizer numbers (program, index) the same way (midi.score_to_notes), or in a new track.
"""

from __future__ import annotations

import numpy as np
import symusic

from midiforge.notes.midi import DRUM_PROGRAM, MAX_TRACK_INDEX
from midiforge.tokens.encode import to_grid


def track_keys(score: symusic.Score) -> list:
    """(program, index) of each track as score_to_notes numbers them; None for a track without notes."""
    seen: dict[int, int] = {}
    keys = []
    for t in score.tracks:
        if not len(t.notes):
            keys.append(None)
            continue
        p = DRUM_PROGRAM if t.is_drum else int(t.program)
        keys.append((p, min(seen.get(p, 0), MAX_TRACK_INDEX)))
        seen[p] = seen.get(p, 0) + 1
    return keys


def splice(tok, score: symusic.Score, written, *, spans=(), replaced=None, names=None) -> symusic.Score:
    """``score`` with the notes and pedals whose onsets fall in ``spans`` (grid steps [lo, hi)) or that belong
    to track ``replaced`` ((program, index)) removed, and the rows of ``written`` added."""
    out = score.copy()
    tpq, spq = score.ticks_per_quarter, tok.config.steps_per_quarter
    keys = track_keys(score)
    for track, key in zip(out.tracks, keys, strict=True):
        if key is None:
            continue
        if key == replaced:
            track.notes = symusic.Note.from_numpy(*(np.zeros(0, np.int32),) * 2, *(np.zeros(0, np.int8),) * 2)
            track.pedals = type(track.pedals)()
            continue
        if spans:
            a = track.notes.numpy()
            keep = ~_in_spans(to_grid(a["time"].astype(np.int64), tpq, spq), spans)
            track.notes = symusic.Note.from_numpy(
                *(a[k][keep] for k in ("time", "duration", "pitch", "velocity"))
            )
            if len(track.pedals):
                pa = track.pedals.numpy()
                pk = ~_in_spans(to_grid(pa["time"].astype(np.int64), tpq, spq), spans)
                track.pedals = symusic.Pedal.from_numpy(pa["time"][pk], pa["duration"][pk])
    by_key = {k: t for k, t in zip(keys, out.tracks, strict=True) if k is not None}
    w_key = written.program.astype(np.int64) * 16 + written.track
    p_key = written.pedal_program.astype(np.int64) * 16 + written.pedal_track
    for k in np.unique(np.concatenate([w_key, p_key])).tolist():
        p, i = divmod(int(k), 16)
        track = by_key.get((p, i))
        if track is None:
            name = (names or {}).get((p, i)) or written.track_names.get((p, i), "")
            track = symusic.Track(name, 0 if p == DRUM_PROGRAM else p, p == DRUM_PROGRAM)
            out.tracks.append(track)
            by_key[(p, i)] = track
        m = w_key == k
        on, off = _ticks(written.time[m], tpq, spq), _ticks(written.time[m] + written.duration[m], tpq, spq)
        for t, d, pitch, vel in zip(on, np.maximum(off - on, 1), written.pitch[m], written.velocity[m],
                                    strict=True):  # fmt: skip
            track.notes.append(symusic.Note(int(t), int(d), int(pitch), int(vel)))
        m = p_key == k
        on = _ticks(written.pedal_time[m], tpq, spq)
        off = _ticks(written.pedal_time[m] + written.pedal_duration[m], tpq, spq)
        for t, d in zip(on, off - on, strict=True):
            track.pedals.append(symusic.Pedal(int(t), int(d)))
        track.notes.sort()
    return out


def _ticks(steps: np.ndarray, tpq: int, spq: int) -> np.ndarray:
    return np.rint(np.asarray(steps, np.float64) * tpq / spq).astype(np.int64)


def _in_spans(x: np.ndarray, spans) -> np.ndarray:
    m = np.zeros(len(x), bool)
    for lo, hi in spans:
        m |= (x >= lo) & (x < hi)
    return m
