"""Music time on a score: seconds ↔ ticks under its tempo map, and cutting a score at a number of seconds.

``--max-seconds`` counts music time, so generation needs both directions of the tempo map.
"""

from __future__ import annotations

import math

import numpy as np
import symusic


def _seconds_to_tick(score: symusic.Score, seconds: float) -> int:
    """The tick at ``seconds`` under the score's tempo map (120 quarters/min before the first tempo event)."""
    tempos = sorted((t.time, t.mspq) for t in score.tempos)
    if not tempos or tempos[0][0] > 0:
        tempos.insert(0, (0, 500_000))
    elapsed = 0.0
    for i, (tick, mspq) in enumerate(tempos):
        sec_per_tick = mspq / 1e6 / score.ticks_per_quarter
        span = (tempos[i + 1][0] - tick) * sec_per_tick if i + 1 < len(tempos) else math.inf
        if elapsed + span >= seconds:
            return tick + int((seconds - elapsed) / sec_per_tick)
        elapsed += span
    raise AssertionError("unreachable: the last tempo segment is infinite")


def clip_seconds(score: symusic.Score, seconds: float) -> symusic.Score:
    """Notes starting before ``seconds``, shortened to end by then; events after it dropped."""
    end = _seconds_to_tick(score, seconds)
    out = score.clip(0, end)
    for track in out.tracks:
        if len(track.notes):
            a = track.notes.numpy()
            dur = np.minimum(a["duration"], end - a["time"])
            track.notes = symusic.Note.from_numpy(a["time"], dur, a["pitch"], a["velocity"])
    return out
