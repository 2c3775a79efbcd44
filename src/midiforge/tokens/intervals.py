"""A piece as a transposition-invariant string of symbols: what the copy check and the validation split compare.

The pitched notes (drums left out) on the tokenizer's grid, ordered by onset then pitch, become one symbol per
pair of neighbouring notes: (onset interval in grid steps, pitch interval). Intervals make the string the same
in every key; the grid makes a sample and the piece it copies agree exactly. A run of ``s`` symbols in common
is a run of ``s + 1`` notes.
"""

from __future__ import annotations

import numpy as np


def note_sequence(tokenizer, ids) -> tuple[np.ndarray, np.ndarray]:
    """(onset in grid steps, pitch) of the pitched notes of a token sequence, ordered by onset then pitch."""
    v = tokenizer.vocab
    e = tokenizer.base_events(np.asarray(ids, np.int64))
    kind, val = v.kind[e], v.value[e]
    time = np.cumsum(np.where(kind == v.k("shift"), val, 0))
    idx = np.arange(len(e))
    last_prog = np.maximum.accumulate(np.where(kind == v.k("program"), idx, -1)) if len(e) else idx
    program = np.where(last_prog >= 0, val[np.maximum(last_prog, 0)], 0)
    note = (kind == v.k("pitch")) & (program != 128)
    onset, pitch = time[note], val[note]
    order = np.lexsort((pitch, onset))
    return onset[order], pitch[order]


def symbols(onset: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """One int64 per pair of neighbouring notes: onset interval (0..4095 steps) and pitch interval."""
    if len(onset) < 2:
        return np.zeros(0, np.int64)
    d_on = np.clip(np.diff(onset), 0, 4095).astype(np.int64)
    d_pitch = np.diff(pitch).astype(np.int64) + 128  # 1..255
    return (d_on << 8) | d_pitch
