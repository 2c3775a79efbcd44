"""Reading one piece, whatever its form: a MIDI file, a prepared JSON file, or a piece of a shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

from midiforge.notes.midi import JSON_SCHEMA, MidiReadError, NoteTable, load_score, score_to_notes
from midiforge.notes.shards import read_piece


def read_notes(path: str | os.PathLike, *, require_notes: bool = True) -> NoteTable:
    """A NoteTable from a MIDI file or a prepared JSON file. Raises MidiReadError on unusable input
    (with ``require_notes=False``, a well-formed file without notes is returned as an empty table)."""
    path = Path(path)
    if ".mfshard#" in path.name:  # a piece of a shard (midiforge.notes.shards): SHARD.mfshard#INDEX
        table = read_piece(path)
    elif path.suffix.lower() == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("schema") != JSON_SCHEMA:
                raise MidiReadError(f"not a midiforge notes file (schema {d.get('schema')!r})")
            table = NoteTable.from_json_dict(d)
        except MidiReadError:
            raise
        except KeyError as e:
            raise MidiReadError(f"invalid prepared JSON: missing field {e}") from e
        except Exception as e:
            raise MidiReadError(f"unreadable JSON: {type(e).__name__}: {e}") from e
    else:
        table = score_to_notes(load_score(path))
    if require_notes and table.tpq <= 0:
        raise MidiReadError(f"invalid ticks per quarter note ({table.tpq})")
    if require_notes and len(table) == 0:
        raise MidiReadError("no notes")
    return table
