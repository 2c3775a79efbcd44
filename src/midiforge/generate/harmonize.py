"""``generate --harmonize``: voices written under a one-track melody, jointly and in time (joint.py), kept to
four-part rules: one note at a time per voice, each in its range (SATB by default, ``--voice-ranges``), never
above the voice over it, named (Alto, Tenor, Bass) and ordered by pitch. The melody comes back as given.
"""

from __future__ import annotations

import re

import numpy as np
import symusic

from midiforge.data import fim
from midiforge.errors import UsageError
from midiforge.notes.midi import NoteTable

SATB = {"Alto": (55, 74), "Tenor": (48, 67), "Bass": (40, 60)}  # G3-D5, C3-G4, E2-C4
DEFAULT_VOICES = {1: ("Bass",), 2: ("Tenor", "Bass"), 3: ("Alto", "Tenor", "Bass")}
_STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def parse_voices(value) -> int:
    """The value of ``--harmonize``: a number of voices. A file name there is the usual slip: say where it goes."""
    text = str(value).strip()
    if not text.isdigit():
        raise UsageError(
            f"--harmonize takes a number of voices, not {text!r}; the melody goes in --prompt "
            f"(--prompt {text} --harmonize)"
        )
    return int(text)


def parse_pitch(text: str) -> int:
    """A MIDI number ("55") or a note name with its octave ("G3", "F#2", "Bb4"; C4 = 60)."""
    s = text.strip()
    m = re.fullmatch(r"([A-Ga-g])([#b]?)(-?\d)", s)
    if s.isdigit():
        p = int(s)
    elif m:
        p = 12 * (int(m[3]) + 1) + _STEPS[m[1].upper()] + {"#": 1, "b": -1, "": 0}[m[2]]
    else:
        raise UsageError(f"--voice-ranges: {s!r} is not a pitch (a MIDI number or a name such as G3)")
    if not 0 <= p <= 127:
        raise UsageError(f"--voice-ranges: {s!r} is outside the MIDI pitches 0..127")
    return p


def parse_ranges(spec: str) -> tuple[tuple[int, int], ...]:
    """``"G3-D5,C3-G4,E2-C4"`` (top voice first) → ((55, 74), (48, 67), (40, 60))."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([^-\s]+)\s*-\s*([^-\s]+)\s*", part)
        if not m:
            raise UsageError(f"--voice-ranges: {part.strip()!r} is not a range such as G3-D5 or 55-74")
        lo, hi = parse_pitch(m[1]), parse_pitch(m[2])
        if lo > hi:
            raise UsageError(f"--voice-ranges: {part.strip()!r} runs downwards (lowest pitch first)")
        out.append((lo, hi))
    return tuple(out)


def voice_plan(n: int, ranges: tuple | None) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """(names, ranges) of ``n`` voices, top down; UsageError when they cannot be had."""
    if ranges is not None and len(ranges) != n:
        raise UsageError(f"--voice-ranges gives {len(ranges)} range(s) for {n} voice(s)")
    if ranges is None:
        if n not in DEFAULT_VOICES:
            raise UsageError(f"--harmonize {n}: give --voice-ranges for more than 3 voices (top voice first)")
        names = DEFAULT_VOICES[n]
        return names, tuple(SATB[v] for v in names)
    names = DEFAULT_VOICES.get(n) or tuple(f"Voice {k + 2}" for k in range(n))
    return names, tuple(ranges)


def voices_of(tok, model, piece, n: int, ranges, chords: bool, sampling: dict, generator, max_new_tokens: int,
              device, use_kv_cache: bool):  # fmt: skip
    """Written voices as a step-time table (targets: the melody's program, track indices after it) and their
    (program, track) keys and names, top down."""
    from midiforge.generate.joint import VoiceRules, Writer, forced_rows, write

    ((program, index),) = piece.owners
    names, ranges = voice_plan(n, ranges)
    targets = [(program, j) for j in range(8) if j != index][:n]
    top, onsets = melody_line(piece.table, piece.end)
    writer = Writer(
        tok, forced_rows(tok, piece.table), targets, piece.end, VoiceRules(ranges, chords=chords), top, onsets
    )
    ids, stop = write(model, tok, writer, generator=generator, sampling=sampling, max_new_tokens=max_new_tokens,
                      device=device, use_kv_cache=use_kv_cache)  # fmt: skip
    table, _ = fim.events_to_table(tok, tok.base_events(ids))
    key = table.program.astype(np.int64) * 16 + table.track
    rows = fim.subset(table, np.isin(key, [p * 16 + i for p, i in targets]))
    return legato(rows, stop), targets, names


def add_tracks(score: symusic.Score, rows, targets, names, spq: int) -> symusic.Score:
    """``score`` (as given) with one new track per target holding its rows, times from grid steps to ticks."""
    out = score.copy()
    tpq = score.ticks_per_quarter
    for (p, i), name in zip(targets, names, strict=True):
        m = (rows.program == p) & (rows.track == i)
        on = np.rint(rows.time[m] * tpq / spq).astype(np.int64)
        off = np.rint((rows.time[m] + rows.duration[m]) * tpq / spq).astype(np.int64)
        track = symusic.Track(name, int(p), False)
        track.notes = symusic.Note.from_numpy(on.astype(np.int32), np.maximum(off - on, 1).astype(np.int32),
                                              rows.pitch[m].astype(np.int8), rows.velocity[m].astype(np.int8))  # fmt: skip
        out.tracks.append(track)
    return out


def melody_line(given: NoteTable, end: int) -> tuple[np.ndarray, set]:
    """(highest given pitch sounding at each grid step through ``end``, -1 where none; the onset steps)."""
    top = np.full(end + 1, -1, np.int64)
    for t, d, p in zip(given.time.tolist(), given.duration.tolist(), given.pitch.tolist(), strict=True):
        seg = top[t : max(t + d, t + 1)]
        np.maximum(seg, p, out=seg)
    return top, set(given.time.tolist())


def legato(rows: NoteTable, stop: int) -> NoteTable:
    """Each written note lasts until the next note of its track, the last one until ``stop``; notes at or
    after ``stop`` (an onset left unfinished) are dropped."""
    rows = fim.subset(rows, rows.time < stop)
    order = np.lexsort((rows.time, rows.track, rows.program))
    for name in ("time", "duration", "pitch", "velocity", "program", "track"):
        setattr(rows, name, getattr(rows, name)[order])
    key = rows.program.astype(np.int64) * 16 + rows.track
    nxt = np.append(rows.time[1:], stop)
    nxt[np.append(key[1:] != key[:-1], True)] = stop
    rows.duration = np.maximum(nxt - rows.time, 1)
    return rows
