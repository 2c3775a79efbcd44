"""MIDI input/output through symusic, and the tokenizer-free note table every other module works on.

A :class:`NoteTable` is a piece as flat numpy columns (one row per note, all tracks together), plus its tempo
and time-signature maps. Times are in the source file's ticks, with its ticks-per-quarter, so the table is
lossless with respect to what we model and independent of any tokenizer setting.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import symusic

from midiforge.errors import UsageError

MIDI_SUFFIXES = (".mid", ".midi")
JSON_SCHEMA = "midiforge.notes/1"
DRUM_PROGRAM = 128  # the note table's program column uses 128 for drum tracks
MAX_TRACK_INDEX = 7  # tracks of one program beyond the 8th share the 8th's index (TRACK events, detok)


class MidiReadError(ValueError):
    """A file that is not a usable MIDI piece (corrupt, empty, unsupported). The message says why."""


@dataclass
class NoteTable:
    """One piece as numpy columns. ``program`` is 0..127 for pitched tracks and 128 for drums.

    Invariants (established by :func:`score_to_notes`, checked by :meth:`from_json_dict`, relied on by the
    tokenizer): pitch in 0..127, velocity in 1..127, time and duration >= 0, tempos > 0, time signatures with a
    numerator > 0 and a power-of-two denominator.
    """

    tpq: int
    time: np.ndarray  # int64 ticks
    duration: np.ndarray  # int64 ticks
    pitch: np.ndarray  # int16
    velocity: np.ndarray  # int16
    program: np.ndarray  # int16, 128 = drums
    tempo_time: np.ndarray  # int64 ticks
    tempo_qpm: np.ndarray  # float64 quarter notes per minute
    ts_time: np.ndarray  # int64 ticks
    ts_numerator: np.ndarray  # int16
    ts_denominator: np.ndarray  # int16
    sheet: dict | None = (
        None  # base events precomputed by `prepare` for one tokenizer config (tokens/tokenizer.py, tokens/sheet.py)
    )
    # Track identity: index of the note's source track among the tracks of its program (0..MAX_TRACK_INDEX,
    # in the file's track order), so that e.g. a chorale's four program-0 voices stay four tracks.
    track: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    # Sustain pedal (CC64, as symusic pairs it): one row per pedal press, with its track's program and index.
    pedal_time: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pedal_duration: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pedal_program: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    pedal_track: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    # Key signatures from the meta events: sharps (-7..7, flats negative) and tonality (0 major, 1 minor).
    ks_time: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ks_key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    ks_tonality: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    track_names: dict = field(default_factory=dict)  # (program, track index) → the source track's name

    def __post_init__(self):
        if len(self.track) != len(self.time):  # tables built without track identity: one track per program
            self.track = np.zeros(len(self.time), np.int16)

    def __len__(self) -> int:
        return len(self.time)

    @property
    def is_drum(self) -> np.ndarray:
        return self.program == DRUM_PROGRAM

    # --- compact JSON form (see docs/architecture.md, "JSON dataset format") ---
    _INT_COLUMNS = ("time", "duration", "pitch", "velocity", "program", "track")
    _LEGACY_COLUMNS = _INT_COLUMNS[:5]  # files written before track identity: every note's track is 0

    def to_json_dict(self) -> dict:
        notes = np.stack([getattr(self, c).astype(np.int32) for c in self._INT_COLUMNS])
        return {
            "tpq": int(self.tpq),
            "num_notes": len(self),
            # Columns as little-endian int32 (5 × num_notes), base64: ~10× faster to load than lists of ints.
            "notes_columns": list(self._INT_COLUMNS),
            "notes_b64": base64.b64encode(notes.astype("<i4").tobytes()).decode("ascii"),
            "pedals": {
                "time": self.pedal_time.tolist(),
                "duration": self.pedal_duration.tolist(),
                "program": self.pedal_program.tolist(),
                "track": self.pedal_track.tolist(),
            },
            "key_signatures": {
                "time": self.ks_time.tolist(),
                "key": self.ks_key.tolist(),
                "tonality": self.ks_tonality.tolist(),
            },
            "track_names": [[int(p), int(t), str(n)] for (p, t), n in sorted(self.track_names.items())],
            "tempos": {
                "time": self.tempo_time.tolist(),
                "qpm": [round(q, 6) for q in self.tempo_qpm.tolist()],
            },
            "time_signatures": {
                "time": self.ts_time.tolist(),
                "numerator": self.ts_numerator.tolist(),
                "denominator": self.ts_denominator.tolist(),
            },
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> NoteTable:
        """The table of a prepared JSON document, checked before anything in it reaches a token cache.

        Raises MidiReadError naming the first bad field and value: a column, tempo or time signature out of
        range, array lengths that disagree, or a bad sheet (the sheet's form only: its ids are checked where a tokenizer uses it).
        """
        if not isinstance(d, dict):
            raise _invalid(f"document is a {type(d).__name__}, not an object")
        tpq, n = _json_int(d, "tpq"), _json_int(d, "num_notes")
        if tpq <= 0:
            raise _invalid(f"tpq {tpq} (must be > 0)")
        if n < 0:
            raise _invalid(f"num_notes {n} (must be >= 0)")
        names = d["notes_columns"]
        if not isinstance(names, list) or sorted(map(str, names)) not in (
            sorted(cls._INT_COLUMNS),
            sorted(cls._LEGACY_COLUMNS),
        ):
            raise _invalid(f"notes_columns {names!r} (must name each of {', '.join(cls._INT_COLUMNS)} once)")
        raw = base64.b64decode(d["notes_b64"])
        if len(raw) != 4 * len(names) * n:
            raise _invalid(f"notes_b64 holds {len(raw)} bytes, not 4 × {len(names)} columns × num_notes {n}")
        cols = np.frombuffer(raw, dtype="<i4").reshape(len(names), n)
        c = dict(zip(names, cols, strict=True))
        if n:  # two reductions over all columns at once; a bad value is located only when there is one
            lows, highs = cols.min(axis=1).tolist(), cols.max(axis=1).tolist()
            for name, low, high in zip(names, lows, highs, strict=True):
                lo, hi = NOTE_LIMITS[name]
                if low < lo or high > hi:
                    col = c[name]
                    _raise_first_bad(name, col, (col < lo) | (col > hi), f"{lo}..{hi}", "note")
        tempo_time, qpm = _json_arrays(d, "tempos", ("time", "qpm"))
        ts_time, num, den = _json_arrays(d, "time_signatures", ("time", "numerator", "denominator"))
        _check_range("tempos.time", tempo_time, 0, _MAX_TICK)
        _check_range("tempos.qpm", qpm, _TINY, _HUGE, "finite and > 0")
        _check_range("time_signatures.time", ts_time, 0, _MAX_TICK)
        _check_range("time_signatures.numerator", num, 1, 255)
        if not _POWERS_OF_TWO.issuperset(den.tolist()):
            bad = ~np.isin(den, list(_POWERS_OF_TWO))
            _raise_first_bad("time_signatures.denominator", den, bad, "a power of two, 1..128", "index")
        table = cls(
            tpq=tpq,
            time=c["time"].astype(np.int64),
            duration=c["duration"].astype(np.int64),
            pitch=c["pitch"].astype(np.int16),
            velocity=c["velocity"].astype(np.int16),
            program=c["program"].astype(np.int16),
            tempo_time=tempo_time,
            tempo_qpm=qpm,
            ts_time=ts_time,
            ts_numerator=num.astype(np.int16),
            ts_denominator=den.astype(np.int16),
            track=c["track"].astype(np.int16) if "track" in c else np.zeros(n, np.int16),
        )
        _extras_from_json(d, table)
        if d.get("sheet") is not None:
            table.sheet = decode_sheet(
                d["sheet"]
            )  # kept decoded; its ids are checked where a tokenizer uses it
        return table


_MAX_TICK = (1 << 31) - 1  # symusic keeps tick times in int32
# Allowed values of the note columns of a prepared JSON file.
NOTE_LIMITS = {"time": (0, _MAX_TICK), "duration": (0, _MAX_TICK), "pitch": (0, 127), "velocity": (1, 127)}
NOTE_LIMITS["program"] = (0, DRUM_PROGRAM)  # 0..127 pitched, 128 drums: the only drum flag the format has
NOTE_LIMITS["track"] = (0, MAX_TRACK_INDEX)


def _extras_from_json(d: dict, table: NoteTable) -> None:
    """Pedals, key signatures and track names of a prepared JSON document, checked, into ``table``.
    Each group is optional (files written before they existed have none)."""
    if d.get("pedals") is not None:
        pt, pd, pp, ptr = _json_arrays(d, "pedals", ("time", "duration", "program", "track"))
        _check_range("pedals.time", pt, 0, _MAX_TICK)
        _check_range("pedals.duration", pd, 0, _MAX_TICK)
        _check_range("pedals.program", pp, 0, DRUM_PROGRAM)
        _check_range("pedals.track", ptr, 0, MAX_TRACK_INDEX)
        table.pedal_time, table.pedal_duration = pt, pd
        table.pedal_program, table.pedal_track = pp.astype(np.int16), ptr.astype(np.int16)
    if d.get("key_signatures") is not None:
        kt, kk, kton = _json_arrays(d, "key_signatures", ("time", "key", "tonality"))
        _check_range("key_signatures.time", kt, 0, _MAX_TICK)
        _check_range("key_signatures.key", kk, -7, 7)
        _check_range("key_signatures.tonality", kton, 0, 1)
        table.ks_time, table.ks_key, table.ks_tonality = kt, kk.astype(np.int16), kton.astype(np.int16)
    names = d.get("track_names") or []
    if not isinstance(names, list):
        raise _invalid("track_names must be a list of [program, track, name]")
    for i, row in enumerate(names):
        ok = isinstance(row, list) and len(row) == 3 and all(type(x) is int for x in row[:2])
        if not (
            ok and 0 <= row[0] <= DRUM_PROGRAM and 0 <= row[1] <= MAX_TRACK_INDEX and isinstance(row[2], str)
        ):
            raise _invalid(f"track_names[{i}] {row!r} (must be [program 0..128, track 0..7, name])")
        table.track_names[(row[0], row[1])] = row[2]


_TINY, _HUGE = np.nextafter(0.0, 1.0), np.finfo(np.float64).max  # qpm: finite and > 0
_POWERS_OF_TWO = frozenset(1 << k for k in range(8))  # denominators a MIDI file can state (symusic: uint8)


def _invalid(reason: str) -> MidiReadError:
    return MidiReadError(f"invalid prepared JSON: {reason}")


def _json_int(d: dict, key: str) -> int:
    v = d[key]
    if type(v) is not int:  # not bool, not float, not str
        raise _invalid(f"{key} {v!r} (must be an integer)")
    return v


def _json_arrays(d: dict, key: str, fields: tuple[str, ...]) -> list[np.ndarray]:
    """The equally long number lists ``d[key][field]`` as 1-d int64 arrays (float64 for qpm), as numpy converts
    them (a float tick time is truncated; its range is checked afterwards)."""
    group = d[key]
    if not isinstance(group, dict):
        raise _invalid(f"{key} is a {type(group).__name__}, not an object")
    out = []
    for f in fields:
        v = group[f]
        try:
            a = np.asarray(v, dtype=np.float64 if f == "qpm" else np.int64) if isinstance(v, list) else None
        except (TypeError, ValueError, OverflowError):
            a = None
        if a is None or a.ndim != 1:
            raise _invalid(f"{key}.{f} must be a list of {'numbers' if f == 'qpm' else 'integers'}")
        out.append(a)
    if len({len(a) for a in out}) > 1:
        lengths = ", ".join(f"{f} {len(a)}" for f, a in zip(fields, out, strict=True))
        raise _invalid(f"{key} lists differ in length ({lengths})")
    return out


def _check_range(field: str, a: np.ndarray, lo, hi, allowed: str | None = None) -> None:
    """MidiReadError naming ``field`` and its first value outside ``lo..hi`` (NaN included), if there is one.
    Two reductions; the bad value is located only when there is one."""
    if len(a) and not (a.min() >= lo and a.max() <= hi):
        _raise_first_bad(field, a, ~((a >= lo) & (a <= hi)), allowed or f"{lo}..{hi}", "index")


def _raise_first_bad(field: str, a: np.ndarray, bad: np.ndarray, allowed: str, what: str) -> None:
    i = int(np.argmax(bad))
    raise _invalid(f"{field} {a[i].item()!r} at {what} {i} (allowed {allowed})")


# A piece's "sheet": the base events `prepare` stores beside the notes so that loading skips the tokenizer's
# work. Reading checks only its form (it needs no tokenizer); midiforge.tokens.sheet checks the ids against a
# vocabulary and the PITCH events against the notes, where the tokenizer uses it.
def _sheet_invalid(reason: str) -> MidiReadError:
    return MidiReadError(f"invalid prepared JSON: sheet {reason}")


def decode_sheet(sheet) -> dict:
    """A sheet as ``{"config", "events" (int64 ids), "word_starts" (bool)}``, its form checked; a sheet already
    in that form (what :meth:`NoteTable.from_json_dict` keeps) is returned as it is. Raises MidiReadError."""
    if not isinstance(sheet, dict):
        raise _sheet_invalid(f"is a {type(sheet).__name__}, not an object")
    if isinstance(sheet.get("events"), np.ndarray):  # decoded already (JSON cannot hold an ndarray)
        return sheet
    for key in ("config", "num_events", "events_b64", "word_starts_b64"):
        if key not in sheet:
            raise _sheet_invalid(f"has no field {key!r}")
    n = sheet["num_events"]
    if type(n) is not int or n < 0:
        raise _sheet_invalid(f"num_events {n!r} (must be an integer >= 0)")
    raw = base64.b64decode(sheet["events_b64"])
    if len(raw) != 2 * n:
        raise _sheet_invalid(f"events_b64 holds {len(raw)} bytes, not 2 × num_events {n}")
    packed = base64.b64decode(sheet["word_starts_b64"])
    if len(packed) != (n + 7) // 8:
        raise _sheet_invalid(
            f"word_starts_b64 holds {len(packed)} bytes, not {(n + 7) // 8} for num_events {n}"
        )
    events = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    word_start = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n).astype(bool)
    events.flags.writeable = word_start.flags.writeable = False  # shared by every events() call on the table
    return {"config": sheet["config"], "events": events, "word_starts": word_start}


def load_score(src: str | os.PathLike | bytes | symusic.Score) -> symusic.Score:
    """A symusic Score (in ticks) from a path, raw bytes or a Score. Raises MidiReadError with the reason."""
    if isinstance(src, symusic.Score):
        return src if src.ticks_per_quarter and str(src.ttype) == "Tick" else src.to("tick")
    try:
        if isinstance(src, bytes | bytearray):
            if not src:
                raise MidiReadError("empty file (0 bytes)")
            score = symusic.Score.from_midi(bytes(src))
        else:
            path = Path(src)
            if path.stat().st_size == 0:
                raise MidiReadError("empty file (0 bytes)")
            score = symusic.Score(str(path))
    except MidiReadError:
        raise
    except FileNotFoundError as e:
        raise MidiReadError(f"no such file: {src}") from e
    except Exception as e:  # symusic raises RuntimeError/ValueError with its own message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MidiReadError(f"unparsable MIDI: {msg}") from e
    return score


def score_to_notes(score: symusic.Score) -> NoteTable:
    """Flatten a Score into a NoteTable (one loop over tracks; notes stay in numpy).

    Called once per file read, so it is kept to a fixed number of numpy calls per piece plus one
    ``numpy()`` per track: the per-track program and index columns are one ``np.repeat`` each, the columns
    are concatenated straight into their final dtypes, and clipping uses the ufuncs (np.clip and np.isin
    cost more in call overhead than parsing a small file).
    """
    notes: list[dict[str, np.ndarray]] = []
    pedals: list[dict[str, np.ndarray]] = []
    owner = ([], [], [])  # per track with notes: (program, index, number of notes)
    p_owner = ([], [], [])  # the same per track with pedals
    per_program: dict[int, int] = {}  # tracks seen so far of each program → the next track index
    names: dict[tuple[int, int], str] = {}
    for track in score.tracks:
        n = len(track.notes)
        if n == 0:
            continue  # a track without notes (and its pedals) carries nothing we model
        prog = DRUM_PROGRAM if track.is_drum else int(track.program)
        index = min(per_program.get(prog, 0), MAX_TRACK_INDEX)
        per_program[prog] = index + 1
        if track.name and (prog, index) not in names:
            names[(prog, index)] = track.name
        notes.append(track.notes.numpy())
        for col, value in zip(owner, (prog, index, n), strict=True):
            col.append(value)
        n_ped = len(track.pedals)
        if n_ped:
            pedals.append(track.pedals.numpy())
            for col, value in zip(p_owner, (prog, index, n_ped), strict=True):
                col.append(value)
    program, track_index = _per_row(owner)
    p_program, p_track = _per_row(p_owner)
    pitch = _column(notes, "pitch", np.int16)
    velocity = _column(notes, "velocity", np.int16)
    ks = score.key_signatures.numpy()
    ks_ok = (ks["key"] >= -7) & (ks["key"] <= 7) & (ks["tonality"] <= 1) & (ks["tonality"] >= 0)
    tempos = score.tempos.numpy()
    ts = score.time_signatures.numpy()
    # A broken file can state a numerator 0 or a denominator 2**8 (symusic: 0): the tokenizer skips such time
    # signatures anyway, and dropping them here keeps every table `prepare` writes valid for from_json_dict.
    den = ts["denominator"].astype(np.int64)
    ok = (ts["numerator"] > 0) & (den >= 1) & (den <= 128) & ((den & (den - 1)) == 0)  # a power of two
    return NoteTable(
        tpq=int(score.ticks_per_quarter),
        time=_column(notes, "time", np.int64),
        duration=np.maximum(_column(notes, "duration", np.int64), 0),
        pitch=np.minimum(np.maximum(pitch, 0, out=pitch), 127, out=pitch),
        velocity=np.minimum(np.maximum(velocity, 1, out=velocity), 127, out=velocity),
        program=program,
        tempo_time=tempos["time"].astype(np.int64),
        tempo_qpm=6e7 / np.maximum(tempos["mspq"].astype(np.float64), 1.0),
        ts_time=ts["time"][ok].astype(np.int64),
        ts_numerator=ts["numerator"][ok].astype(np.int16),
        ts_denominator=den[ok].astype(np.int16),
        track=track_index,
        pedal_time=np.maximum(_column(pedals, "time", np.int64), 0),
        pedal_duration=np.maximum(_column(pedals, "duration", np.int64), 0),
        pedal_program=p_program,
        pedal_track=p_track,
        ks_time=np.maximum(ks["time"][ks_ok].astype(np.int64), 0),
        ks_key=ks["key"][ks_ok].astype(np.int16),
        ks_tonality=ks["tonality"][ks_ok].astype(np.int16),
        track_names=names,
    )


def _column(arrays: list[dict[str, np.ndarray]], name: str, dtype) -> np.ndarray:
    """One column of every track's arrays, concatenated into ``dtype`` (one copy)."""
    if not arrays:
        return np.zeros(0, dtype)
    return np.concatenate([a[name] for a in arrays], dtype=dtype)


def _per_row(owner: tuple[list, list, list]) -> tuple[np.ndarray, np.ndarray]:
    """(program, track index) int16 columns, each track's values repeated over its rows."""
    programs, indices, counts = owner
    return (
        np.repeat(np.array(programs, np.int16), counts),
        np.repeat(np.array(indices, np.int16), counts),
    )


def find_files(sources, suffixes=MIDI_SUFFIXES) -> list[Path]:
    """Files under the given files/directories whose suffix (any case) is in ``suffixes``, sorted, recursive.

    Raises UsageError for a path that does not exist.
    """
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise UsageError(f"no such file or directory: {src}")
        if p.is_file():
            out.append(p)
        else:
            out.extend(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    return sorted(set(out))
