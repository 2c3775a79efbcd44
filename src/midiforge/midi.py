"""MIDI input/output through symusic, and the tokenizer-free note table every other module works on.

A :class:`NoteTable` is a piece as flat numpy columns (one row per note, all tracks together), plus its tempo
and time-signature maps. Times are in the source file's ticks, with its ticks-per-quarter, so the table is
lossless with respect to what we model and independent of any tokenizer setting.
"""

from __future__ import annotations

import base64
import hashlib
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

    Invariants (established by :func:`score_to_notes` and :meth:`from_json_dict`, relied on by the tokenizer):
    pitch in 0..127, velocity in 1..127, duration >= 0.
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
        None  # base events precomputed by `prepare` for one tokenizer config (see tokenizer.py)
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
        n = int(d["num_notes"])
        cols = np.frombuffer(base64.b64decode(d["notes_b64"]), dtype="<i4").reshape(
            len(d["notes_columns"]), n
        )
        c = dict(zip(d["notes_columns"], cols, strict=True))
        ts = d["time_signatures"]
        return cls(
            tpq=int(d["tpq"]),
            time=c["time"].astype(np.int64),
            duration=np.maximum(c["duration"].astype(np.int64), 0),
            pitch=np.clip(c["pitch"].astype(np.int16), 0, 127),
            velocity=np.clip(c["velocity"].astype(np.int16), 1, 127),
            program=c["program"].astype(np.int16),
            tempo_time=np.asarray(d["tempos"]["time"], dtype=np.int64),
            tempo_qpm=np.asarray(d["tempos"]["qpm"], dtype=np.float64),
            ts_time=np.asarray(ts["time"], dtype=np.int64),
            ts_numerator=np.asarray(ts["numerator"], dtype=np.int16),
            ts_denominator=np.asarray(ts["denominator"], dtype=np.int16),
            sheet=d.get("sheet"),
        )


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


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write a file so that a crash at any instant leaves either the old or the new content.

    ``durable=False`` skips the fsync: still atomic against a killed process, but after a power loss the file
    may be empty. Meant for derived files that are cheap to rebuild (prepared JSON), where fsync costs ~70%.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
