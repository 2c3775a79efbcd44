"""MIDI input/output through symusic, and the tokenizer-free note table every other module works on.

A :class:`NoteTable` is a piece as flat numpy columns (one row per note, all tracks together), plus its tempo
and time-signature maps. Times are in the source file's ticks, with its ticks-per-quarter, so the table is
lossless with respect to what we model and independent of any tokenizer setting.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic

from midiforge.errors import UsageError

MIDI_SUFFIXES = (".mid", ".midi")
JSON_SCHEMA = "midiforge.notes/1"
DRUM_PROGRAM = 128  # the note table's program column uses 128 for drum tracks


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
        None  # base events precomputed by `prepare` for one tokenizer config (see tokenizer.py, validate.py)
    )

    def __len__(self) -> int:
        return len(self.time)

    @property
    def is_drum(self) -> np.ndarray:
        return self.program == DRUM_PROGRAM

    # --- compact JSON form (see docs/architecture.md, "JSON dataset format") ---
    _INT_COLUMNS = ("time", "duration", "pitch", "velocity", "program")

    def to_json_dict(self) -> dict:
        notes = np.stack([getattr(self, c).astype(np.int32) for c in self._INT_COLUMNS])
        return {
            "tpq": int(self.tpq),
            "num_notes": len(self),
            # Columns as little-endian int32 (5 × num_notes), base64: ~10× faster to load than lists of ints.
            "notes_columns": list(self._INT_COLUMNS),
            "notes_b64": base64.b64encode(notes.astype("<i4").tobytes()).decode("ascii"),
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
        range, array lengths that disagree, or a bad sheet (see :func:`midiforge.validate.check_sheet`).
        """
        if not isinstance(d, dict):
            raise _invalid(f"document is a {type(d).__name__}, not an object")
        tpq, n = _json_int(d, "tpq"), _json_int(d, "num_notes")
        if tpq <= 0:
            raise _invalid(f"tpq {tpq} (must be > 0)")
        if n < 0:
            raise _invalid(f"num_notes {n} (must be >= 0)")
        names = d["notes_columns"]
        if not isinstance(names, list) or sorted(map(str, names)) != sorted(cls._INT_COLUMNS):
            raise _invalid(f"notes_columns {names!r} (must name each of {', '.join(cls._INT_COLUMNS)} once)")
        raw = base64.b64decode(d["notes_b64"])
        if len(raw) != 4 * len(names) * n:
            raise _invalid(f"notes_b64 holds {len(raw)} bytes, not 4 × {len(names)} columns × num_notes {n}")
        cols = np.frombuffer(raw, dtype="<i4").reshape(len(names), n)
        c = dict(zip(names, cols, strict=True))
        if n:  # two reductions over all columns at once; a bad value is located only when there is one
            lows, highs = cols.min(axis=1).tolist(), cols.max(axis=1).tolist()
            for name, low, high in zip(names, lows, highs, strict=True):
                lo, hi = _NOTE_LIMITS[name]
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
        )
        if d.get("sheet") is not None:
            from midiforge.validate import check_sheet  # imported here: validate.py imports this module

            table.sheet = check_sheet(d["sheet"], table)  # kept decoded: events() reuses the checked arrays
        return table


_MAX_TICK = (1 << 31) - 1  # symusic keeps tick times in int32
# Allowed values of the note columns of a prepared JSON file.
_NOTE_LIMITS = {"time": (0, _MAX_TICK), "duration": (0, _MAX_TICK), "pitch": (0, 127), "velocity": (1, 127)}
_NOTE_LIMITS["program"] = (0, DRUM_PROGRAM)  # 0..127 pitched, 128 drums: the only drum flag the format has
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
    """Flatten a Score into a NoteTable (one loop over tracks; notes stay in numpy)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("time", "duration", "pitch", "velocity", "program")}
    for track in score.tracks:
        if len(track.notes) == 0:
            continue
        a = track.notes.numpy()
        n = len(a["time"])
        cols["time"].append(a["time"])
        cols["duration"].append(a["duration"])
        cols["pitch"].append(a["pitch"])
        cols["velocity"].append(a["velocity"])
        cols["program"].append(np.full(n, DRUM_PROGRAM if track.is_drum else track.program, dtype=np.int16))
    cat = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in cols.items()}  # one copy each
    tempos = score.tempos.numpy()
    ts = score.time_signatures.numpy()
    # A broken file can state a numerator 0 or a denominator 2**8 (symusic: 0): the tokenizer skips such time
    # signatures anyway, and dropping them here keeps every table `prepare` writes valid for from_json_dict.
    ok = (ts["numerator"] > 0) & np.isin(ts["denominator"], list(_POWERS_OF_TWO))
    ts = {k: v[ok] for k, v in ts.items()}
    return NoteTable(
        tpq=int(score.ticks_per_quarter),
        time=cat["time"].astype(np.int64),
        duration=np.maximum(cat["duration"].astype(np.int64), 0),
        pitch=np.clip(cat["pitch"].astype(np.int16), 0, 127),
        velocity=np.clip(cat["velocity"].astype(np.int16), 1, 127),
        program=cat["program"].astype(np.int16, copy=False),
        tempo_time=tempos["time"].astype(np.int64),
        tempo_qpm=6e7 / np.maximum(tempos["mspq"].astype(np.float64), 1.0),
        ts_time=ts["time"].astype(np.int64),
        ts_numerator=ts["numerator"].astype(np.int16),
        ts_denominator=ts["denominator"].astype(np.int16),
    )


def read_notes(path: str | os.PathLike, *, require_notes: bool = True) -> NoteTable:
    """A NoteTable from a MIDI file or a prepared JSON file. Raises MidiReadError on unusable input
    (with ``require_notes=False``, a well-formed file without notes is returned as an empty table)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("schema") != JSON_SCHEMA:
                raise MidiReadError(f"not a midiforge notes file (schema {d.get('schema')!r})")
            table = NoteTable.from_json_dict(d)
        except MidiReadError:
            raise
        except KeyError as e:
            raise _invalid(f"missing field {e}") from e
        except Exception as e:
            raise MidiReadError(f"unreadable JSON: {type(e).__name__}: {e}") from e
    else:
        table = score_to_notes(load_score(path))
    if require_notes and table.tpq <= 0:
        raise MidiReadError(f"invalid ticks per quarter note ({table.tpq})")
    if require_notes and len(table) == 0:
        raise MidiReadError("no notes")
    return table


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
