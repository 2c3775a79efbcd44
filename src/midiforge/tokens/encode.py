"""Notes → base events: the encoding half of :class:`~midiforge.tokens.tokenizer.MidiTokenizer` (see the event
list there).

One row per note, pedal change, tempo, time signature and key signature, sorted by one packed int64 key, then
laid out as fixed slots per row ([SHIFT(max)×n, SHIFT(rest), PROGRAM, TRACK, VELOCITY, the event, DURATION]) with
one ``np.repeat``: no Python loop per note. The work per piece is a fixed number of numpy calls, so it is kept
small (one grid rounding for every time, one sort of the keys and the row columns read back from the sorted key
instead of gathered) to stay close to the cost of parsing the file.
"""

from __future__ import annotations

import weakref

import numpy as np

from midiforge.notes.midi import DRUM_PROGRAM, NoteTable
from midiforge.tokens.vocab import TokenizerConfig, Vocab, changes

_EMPTY = np.zeros(0, np.int64)
_TIME_BITS = 26  # grid steps: 2^26 steps = 5.6 M quarter notes


def to_grid(ticks: np.ndarray, tpq: int, spq: int) -> np.ndarray:
    """Nearest grid step of each tick time. Times go through float32 quarters, as symusic's tick→quarter
    conversion does; a time exactly halfway between two steps goes to the step whose float32 quarter value
    is nearer, so the error stays within half a step when measured in float32 quarters too."""
    q = (ticks / tpq).astype(np.float32)
    lo = np.floor(np.multiply(q, spq, dtype=np.float64))
    err_lo = (lo / spq).astype(np.float32)
    err_hi = ((lo + 1) / spq).astype(np.float32)
    for err in (err_lo, err_hi):  # in place: this runs on every note's onset and duration
        err -= q
        np.abs(err, out=err)
    out = lo.astype(np.int64)
    out += err_hi < err_lo
    return out


def note_events(c: TokenizerConfig, v: Vocab, notes: NoteTable, transpose: int, extras: bool) -> np.ndarray:
    """Base event ids (int64) of a piece. ``extras``: write TRACK, PEDAL and KEYSIG as the config asks (False:
    a tokenizer from before them, whose BPE lacks them)."""
    tracks, pedals, keys = extras and c.tracks, extras and c.pedals, extras and c.key_signatures
    spq = c.steps_per_quarter
    pitch = notes.pitch.astype(np.int64)
    time, duration, velocity, program = notes.time, notes.duration, notes.velocity, notes.program
    track = notes.track if tracks else None
    if transpose:
        pitch = np.where(program != DRUM_PROGRAM, pitch + transpose, pitch)
        keep = (pitch >= 0) & (pitch <= 127)
        pitch, time, duration, velocity, program = (
            a[keep] for a in (pitch, time, duration, velocity, program)
        )
        track = track[keep] if tracks else None
    n_note = len(pitch)
    # Pedal presses: (on, off) on the grid, rounded with the notes' times and durations in one call.
    p_time = notes.pedal_time if pedals else _EMPTY
    n_p = len(p_time)
    grid = to_grid(
        np.concatenate([time, duration, p_time, p_time + notes.pedal_duration] if n_p else [time, duration]),
        notes.tpq,
        spq,
    )
    onset, dur_steps = grid[:n_note], grid[n_note : 2 * n_note]
    p_prog = p_track = _EMPTY
    if n_p:
        p_on, p_off = grid[2 * n_note : 2 * n_note + n_p], grid[2 * n_note + n_p :]
        ok = p_off > p_on  # a press shorter than half a step vanishes on the grid
        p_on, p_off = p_on[ok], p_off[ok]
        p_prog = notes.pedal_program[ok].astype(np.int64)
        p_track = notes.pedal_track[ok].astype(np.int64) if tracks else np.zeros(len(p_on), np.int64)
        n_p = len(p_on)
    meta_time, meta_tok = _meta(c, v, notes, transpose, keys)
    n_meta = len(meta_time)

    # One packed int64 key per row. Bits: pitch 0-7, duration index + 1 8-15, velocity bin + 1 16-21, sub 22-23
    # (0 = pedal off, 1 = pedal on, 2 = note), track 24-26, program 27-34, kind 35-36 (0 = time signature,
    # 1 = key signature, 2 = tempo, 3 = pedal or note), time 37-62; a meta row holds its index among the metas
    # in bits 0-34 instead, which keeps them in their input order. Sorting the keys orders the rows by time, kind,
    # program, track, sub, velocity, duration, pitch; every column is then read back from the sorted key.
    vel_bits, dur_bits = _key_tables(v)
    hi = (1 << _TIME_BITS) - 1
    note_key = np.minimum(onset, hi)
    note_key <<= 37
    note_key |= vel_bits[velocity]  # velocities are 1..127
    note_key |= dur_bits[np.minimum(dur_steps, len(dur_bits) - 1)]
    note_key |= program.astype(np.int64) << 27
    note_key |= pitch
    if tracks:
        note_key |= track.astype(np.int64) << 24
    parts = [note_key]
    if n_p:
        owner = (3 << 35) | (p_prog << 27) | (p_track << 24)
        parts += [(np.minimum(p_off, hi) << 37) | owner, (np.minimum(p_on, hi) << 37) | owner | (1 << 22)]
    if n_meta:
        parts.append(meta_time | np.arange(n_meta))
    key = np.sort(np.concatenate(parts) if len(parts) > 1 else note_key)
    # Rows with equal keys are equal notes or equal pedal changes: their order does not matter.
    if len(key) == 0:
        return _EMPTY
    return _layout(c, v, key, meta_tok, tracks)


def _key_tables(v: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """(key bits of each velocity 0..127: kind 3, sub 2 and velocity bin + 1; key bits of each duration in
    steps: duration index + 1), made once per vocabulary: two lookups per note instead of eight operations."""
    tables = _TABLES.get(v)
    if tables is None:
        vel_bin = (np.arange(128, dtype=np.int64) - 1) * v.c.velocity_bins // 127
        vel_bits = (3 << 35) | (2 << 22) | ((vel_bin + 1) << 16)
        tables = _TABLES[v] = (vel_bits, (v.duration_index.astype(np.int64) + 1) << 8)
    return tables


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _meta(c: TokenizerConfig, v: Vocab, notes: NoteTable, transpose: int, keys: bool):
    """(key bits of time and kind, base event) of each tempo, time signature and key signature, in the order
    the v4 encoder put them before its stable sort: time signatures, key signatures, tempos."""
    scale = c.steps_per_quarter / notes.tpq
    hi = (1 << _TIME_BITS) - 1
    t_on = np.rint(notes.tempo_time * scale).astype(np.int64)
    t_bin = np.abs(v.log_tempos[None, :] - np.log(np.maximum(notes.tempo_qpm, 1e-3))[:, None]).argmin(1)
    if len(t_bin):
        # The last tempo at each grid time wins; then drop repeats of the same bin.
        last = changes(t_on[::-1])[::-1]
        t_on, t_bin = t_on[last], t_bin[last]
        keep_t = changes(t_bin)
        t_on, t_bin = t_on[keep_t], t_bin[keep_t]
    ts_on, ts_tok = _EMPTY, _EMPTY
    if len(notes.ts_time):
        ts_tok = np.array(
            [
                v.time_sig_index.get(nd, -1)
                for nd in zip(notes.ts_numerator.tolist(), notes.ts_denominator.tolist(), strict=True)
            ],
            dtype=np.int64,
        )
        ok = ts_tok >= 0
        ts_on, ts_tok = np.rint(notes.ts_time[ok] * scale).astype(np.int64), ts_tok[ok]
    ks_on, ks_tok = _EMPTY, _EMPTY
    if keys and len(notes.ks_time):
        ks_on = np.rint(notes.ks_time * scale).astype(np.int64)
        sharps = notes.ks_key.astype(np.int64)
        if transpose:
            sharps = (sharps + 7 * transpose) % 12  # tonic = 7 × sharps (mod 12), and 7 × 7 = 1 (mod 12)
            sharps = np.where(sharps > 6, sharps - 12, sharps)
        ks_tok = (sharps + 7) * 2 + notes.ks_tonality
    key = np.concatenate([ts_on, ks_on, t_on])
    np.maximum(key, 0, out=key)
    np.minimum(key, hi, out=key)
    key <<= 37
    n_ts, n_ks = len(ts_on), len(ks_on)
    key[n_ts : n_ts + n_ks] |= 1 << 35  # kind: 0 time signature, 1 key signature, 2 tempo
    key[n_ts + n_ks :] |= 2 << 35
    toks = np.concatenate([v.start["timesig"] + ts_tok, v.start["keysig"] + ks_tok, v.start["tempo"] + t_bin])
    return key, toks.astype(np.int64, copy=False)


def _layout(c: TokenizerConfig, v: Vocab, key: np.ndarray, meta_tok: np.ndarray, tracks: bool) -> np.ndarray:
    """The base events of rows sorted by their packed keys: slots per row, each written where needed."""
    r_time = key >> 37
    r_kind = (key >> 35) & 3
    r_prog = (key >> 27) & 255
    r_track = (key >> 24) & 7
    r_sub = (key >> 22) & 3
    r_vel = ((key >> 16) & 63) - 1
    low = key & 0xFFFF
    owned = r_kind == 3
    is_note = owned & (r_sub == 2)
    nrow = len(key)
    # The event of each row: PITCH, PEDAL(sub) or the meta event (its index among the metas in the low bits).
    r_a = np.where(is_note, v.start["pitch"] + (low & 255), v.start["pedal"] + r_sub)
    all_owned = bool(owned.all())
    if not all_owned:
        meta_rows = np.flatnonzero(~owned)
        r_a[meta_rows] = meta_tok[key[meta_rows] & ((1 << 35) - 1)]
    r_dur = v.start["duration"] + (low >> 8) - 1

    # Time shifts: SHIFT(max) repeated for long rests, then the remainder (times only grow: delta >= 0).
    delta = np.empty_like(r_time)
    delta[0] = r_time[0]
    np.subtract(r_time[1:], r_time[:-1], out=delta[1:])
    n_long = np.maximum(delta - 1, 0) // c.max_shift
    rem = delta - n_long * c.max_shift

    # Sticky state: PROGRAM / TRACK where they change from the previous note or pedal, VELOCITY / DURATION
    # where they change from the previous note. TRACK starts at 0 (the decoder's default). A DURATION right
    # after a PITCH applies to that note and the following ones. This slot order, with the notes of an onset
    # sorted by velocity, then duration, gave the fewest BPE tokens per note of the orders tried
    # (docs/tokenizer-levers.md).
    keep = np.zeros((nrow, 7), bool)  # which slots of each row are written
    keep[:, 0] = n_long > 0
    keep[:, 1] = rem > 0
    keep[:, 5] = True
    owned_rows = None if all_owned else np.flatnonzero(owned)
    note_rows = np.flatnonzero(is_note)
    _mark(keep[:, 2], r_prog, owned_rows)
    if tracks:
        _mark(keep[:, 3], r_track, owned_rows, first_default=0)
    _mark(keep[:, 4], r_vel, note_rows)
    _mark(keep[:, 6], r_dur, note_rows)
    # Bool marks and int32 slots, not int64 counts and slots: (nrow, 7) arrays are the largest this function
    # writes; np.compress with the marks is one pass (np.repeat first converts counts, slots[keep] is slower).
    slots = np.empty((nrow, 7), np.int32)
    slots[:, 0] = v.start["shift"] + c.max_shift - 1
    slots[:, 1] = v.start["shift"] + rem - 1
    slots[:, 2] = v.start["program"] + r_prog
    slots[:, 3] = v.start["track"] + r_track
    slots[:, 4] = v.start["velocity"] + r_vel
    slots[:, 5] = r_a
    slots[:, 6] = r_dur
    if n_long.max() > 1:  # a rest of more than twice the longest SHIFT: SHIFT(max) repeated n_long times
        count = keep.astype(np.intp)
        count[:, 0] = n_long
        return np.repeat(slots.ravel(), count.ravel()).astype(np.int64)
    return np.compress(keep.ravel(), slots.ravel()).astype(np.int64)  # row by row, slot by slot


def _mark(
    out: np.ndarray, col: np.ndarray, rows: np.ndarray | None, first_default: int | None = None
) -> None:
    """out[r] = 1 for the rows ``rows`` (None: every row) whose ``col`` differs from the previous such row's;
    the first such row counts as a change unless its value is ``first_default``."""
    sub = col if rows is None else col[rows]
    if not len(sub):
        return
    ch = changes(sub)
    if first_default is not None:
        ch[0] = sub[0] != first_default
    if rows is None:
        out[:] = ch
    else:
        out[rows] = ch
