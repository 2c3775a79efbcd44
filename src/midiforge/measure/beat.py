"""Where notes start against the beat: the on-beat share, the off-grid share, and the longest beatless stretch.

On a grid of STEPS_PER_QUARTER steps per quarter note (the tokenizer's: 16ths and triplets exact). The beat is
the time signature's: one denominator unit (a quarter in 4/4 and 3/4, a half in 2/2), or three of them in
compound meters (6/8, 9/8, 12/8, 6/16, ...); beats are counted from the time signature's own start, and 4/4 from 0
before the first one.
"""

from __future__ import annotations

import numpy as np

STEPS_PER_QUARTER = 12


def note_steps(notes) -> np.ndarray:
    """Grid step of every note's onset (rounded), drums included."""
    return np.rint(np.asarray(notes.time, np.float64) * STEPS_PER_QUARTER / max(int(notes.tpq), 1)).astype(
        np.int64
    )


def _signatures(notes) -> tuple[np.ndarray, np.ndarray]:
    """(start step, beat length in steps) of each time signature, sorted; 4/4 from 0 before the first."""
    tpq = max(int(notes.tpq), 1)
    ts_step = np.rint(np.asarray(notes.ts_time, np.float64) * STEPS_PER_QUARTER / tpq).astype(np.int64)
    num = np.asarray(notes.ts_numerator, np.int64)
    den = np.asarray(notes.ts_denominator, np.int64)
    order = np.argsort(ts_step, kind="stable")
    ts_step, num, den = ts_step[order], num[order], den[order]
    if len(ts_step) == 0 or ts_step[0] > 0:
        ts_step, num, den = np.r_[0, ts_step], np.r_[4, num], np.r_[4, den]
    last = np.r_[ts_step[1:] != ts_step[:-1], True]  # of several at one time, the last one holds
    ts_step, num, den = ts_step[last], num[last], den[last]
    unit = np.maximum(STEPS_PER_QUARTER * 4 // np.maximum(den, 1), 1)
    compound = (num % 3 == 0) & (num > 3) & (den >= 8)
    return ts_step, np.where(compound, 3 * unit, unit)


def beats_between(notes, first: int, last: int) -> np.ndarray:
    """The beat steps from the beat at or before step ``first`` to step ``last``."""
    start, beat = _signatures(notes)
    ends = np.r_[start[1:], last + 1]
    out = [np.arange(s, e, b) for s, e, b in zip(start.tolist(), ends.tolist(), beat.tolist(), strict=True)]
    beats = np.concatenate(out) if out else np.zeros(0, np.int64)
    lo = beats[beats <= first]
    return beats[(beats >= (lo[-1] if len(lo) else first)) & (beats <= last)]


def on_beat(notes) -> np.ndarray:
    """(notes,) bool: which notes start on a beat."""
    s = note_steps(notes)
    start, beat = _signatures(notes)
    i = np.searchsorted(start, s, side="right") - 1  # the signature in force (start[0] is 0; steps are >= 0)
    return (s - start[i]) % beat[i] == 0


def on_beat_share(notes) -> float:
    """Share of the notes that start on a beat (0 for a piece without notes)."""
    return float(on_beat(notes).mean()) if len(notes) else 0.0


def off_grid_share(notes, used: np.ndarray) -> float:
    """Share of the notes that start at a position of the quarter (``used``: (12,) bool) marked unused."""
    if len(notes) == 0:
        return 0.0
    return float((~np.asarray(used, bool)[note_steps(notes) % STEPS_PER_QUARTER]).mean())


def longest_beatless(notes) -> float:
    """The longest run of consecutive beats with no note starting on them, as a share of the piece's beats
    (from its first to its last onset); 0 for a piece with fewer than two onsets."""
    if len(notes) == 0:
        return 0.0
    s = np.unique(note_steps(notes))
    if len(s) < 2:
        return 0.0
    beats = beats_between(notes, int(s[0]), int(s[-1]))
    hit = np.isin(beats, s)
    # The longest run of False in hit: the distance between consecutive hits (with sentinels at both ends).
    where = np.flatnonzero(np.r_[True, hit, True])
    return float((np.diff(where) - 1).max() / max(len(beats), 1))
