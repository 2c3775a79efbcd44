"""A piece's notes as the page's piano roll draws them: seconds (to follow the audio), bar lines numbered as
``--infill`` counts them, and tracks numbered as ``--replace-track`` counts them.

Bars follow the time-signature map, 4/4 before the first, and a change off a bar line starts a bar of its own,
as :func:`midiforge.generate.infill.bar_lines` draws them on the token grid. Tracks are numbered by (program,
index among the tracks of that program), in that order, as the editing code numbers them.
"""

from __future__ import annotations

import bisect
import re

import symusic

from midiforge.notes.midi import DRUM_PROGRAM, MAX_TRACK_INDEX
from midiforge.tokens.controls import program_name

GENERIC_NAME = re.compile(r"(Program \d+|Drums)( #\d+)?", re.IGNORECASE)  # names the decoder makes up
MAX_NOTES = 20_000  # notes sent to the page at most (a piano roll of more is a blur anyway)


def _seconds(score: symusic.Score):
    """tick → seconds under the score's tempo map (120 bpm before the first tempo)."""
    tpq = score.ticks_per_quarter
    tempos = sorted((int(t.time), float(t.qpm)) for t in score.tempos) or [(0, 120.0)]
    if tempos[0][0] > 0:
        tempos.insert(0, (0, 120.0))
    starts, acc = [], [0.0]
    for i, (t, q) in enumerate(tempos):
        starts.append(t)
        if i + 1 < len(tempos):
            acc.append(acc[-1] + (tempos[i + 1][0] - t) * 60.0 / (q * tpq))

    def at(tick: int) -> float:
        i = bisect.bisect_right(starts, tick) - 1
        return acc[i] + (tick - starts[i]) * 60.0 / (tempos[i][1] * tpq)

    return at


def bar_ticks(score: symusic.Score, end: int) -> list[int]:
    """The tick of every bar line through ``end`` (the last one at or after it)."""
    tpq = score.ticks_per_quarter
    changes = sorted((int(t.time), int(t.numerator), int(t.denominator)) for t in score.time_signatures)
    out, pos, n, d = [0], 0, 4, 4
    end = max(end, 1)
    while pos < end:
        while changes and changes[0][0] <= pos:
            _, n, d = changes.pop(0)
        nxt = pos + max(1, tpq * 4 * n // d)
        if changes and pos < changes[0][0] < nxt:
            nxt = changes[0][0]
        out.append(nxt)
        pos = nxt
    return out


def roll(score: symusic.Score) -> dict:
    """{"seconds", "bars": [s, ...], "tracks": [{"number", "name", "program", "drum", "notes": [[start s, end s,
    pitch, velocity], ...]}]}; ``number`` is what --replace-track takes."""
    at = _seconds(score)
    end = int(score.end()) if score.note_num() else 0
    keys, per_program = [], {}
    for t in score.tracks:
        if len(t.notes) == 0:
            keys.append(None)
            continue
        prog = DRUM_PROGRAM if t.is_drum else int(t.program)
        index = min(per_program.get(prog, 0), MAX_TRACK_INDEX)
        per_program[prog] = index + 1
        keys.append((prog, index))
    number = {k: i + 1 for i, k in enumerate(sorted({k for k in keys if k is not None}))}
    tracks, budget = [], MAX_NOTES
    for t, key in zip(score.tracks, keys, strict=True):
        if key is None:
            continue
        notes = [[round(at(n.time), 3), round(at(n.time + n.duration), 3), int(n.pitch), int(n.velocity)]
                 for n in list(t.notes)[:budget]]  # fmt: skip
        budget -= len(notes)
        label = program_name(key[0]) + (f" #{key[1] + 1}" if key[1] else "")
        name = t.name.strip()
        name = label if not name or GENERIC_NAME.fullmatch(name) else name  # "Program 0 #2" says nothing
        tracks.append({"number": number[key], "name": name, "program": key[0],
                       "drum": bool(t.is_drum), "notes": notes})  # fmt: skip
    bars = bar_ticks(score, end)
    return {"seconds": round(at(end), 3), "bars": [round(at(b), 3) for b in bars], "tracks": tracks}
