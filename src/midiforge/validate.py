"""Checks of the "sheet" of a prepared JSON file: the base events `prepare` stores beside the notes (see
:meth:`midiforge.tokenizer.MidiTokenizer.sheet`), which the tokenizer then uses instead of computing them.

A sheet reaches the token cache as it is, so it is checked when the file is read (:func:`check_sheet`, called by
``NoteTable.from_json_dict``, which keeps it decoded so that it is decoded once) and by the tokenizer that uses
it (:func:`sheet_events`). What can be checked depends on knowing the base vocabulary the sheet was made for,
which its ``config`` fingerprint names:

- always: the fields are there, ``num_events`` is a count, and both byte strings have exactly its length;
- when the vocabulary is known (the default tokenizer's, which is what `prepare` writes, or the tokenizer's own):
  every event id is in ``[0, base vocabulary size)`` and, against the note table, the sheet has one PITCH event of
  each pitch for every note of that pitch. (Word starts are not checked: wrong ones only split BPE words
  elsewhere, into ids that are still valid.)

A file whose sheet fails is skipped with the reason, as is a corrupt MIDI file, rather than re-encoded from its
notes: `prepare` writes notes and sheet together, so a sheet that does not match them means the file was
damaged or edited after it was written, and then its notes are not to be trusted either (they may be in range
and still wrong). Running `prepare` again on the MIDI source gives a good file.
"""

from __future__ import annotations

import base64

import numpy as np

from midiforge.midi import MidiReadError, NoteTable

_default_base = None  # (base fingerprint, vocabulary) of the default tokenizer, built on first use


def default_base():
    """(base fingerprint, ``_Vocab``) of the default tokenizer config: the one whose sheets `prepare` writes."""
    global _default_base
    if _default_base is None:
        from midiforge.tokenizer import MidiTokenizer

        tok = MidiTokenizer()
        _default_base = (tok.base_fingerprint, tok.vocab)
    return _default_base


def _invalid(reason: str) -> MidiReadError:
    return MidiReadError(f"invalid prepared JSON: sheet {reason}")


def decode_sheet(sheet) -> dict:
    """A sheet as ``{"config", "events" (int64 ids), "word_starts" (bool)}``, its form checked; a sheet already
    in that form (what :meth:`NoteTable.from_json_dict` keeps) is returned as it is. Raises MidiReadError."""
    if not isinstance(sheet, dict):
        raise _invalid(f"is a {type(sheet).__name__}, not an object")
    if isinstance(sheet.get("events"), np.ndarray):  # decoded already (JSON cannot hold an ndarray)
        return sheet
    for key in ("config", "num_events", "events_b64", "word_starts_b64"):
        if key not in sheet:
            raise _invalid(f"has no field {key!r}")
    n = sheet["num_events"]
    if type(n) is not int or n < 0:
        raise _invalid(f"num_events {n!r} (must be an integer >= 0)")
    raw = base64.b64decode(sheet["events_b64"])
    if len(raw) != 2 * n:
        raise _invalid(f"events_b64 holds {len(raw)} bytes, not 2 × num_events {n}")
    packed = base64.b64decode(sheet["word_starts_b64"])
    if len(packed) != (n + 7) // 8:
        raise _invalid(f"word_starts_b64 holds {len(packed)} bytes, not {(n + 7) // 8} for num_events {n}")
    events = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    word_start = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n).astype(bool)
    events.flags.writeable = word_start.flags.writeable = False  # shared by every events() call on the table
    return {"config": sheet["config"], "events": events, "word_starts": word_start}


def sheet_events(sheet, vocab, notes: NoteTable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(base event ids as int64, bool mask of BPE word starts) of a sheet made for the base vocabulary ``vocab``
    (a ``_Vocab``), checked against it and, if given, against the note table it came with.

    Raises MidiReadError naming the bad field of the sheet and its value.
    """
    d = decode_sheet(sheet)
    events, word_start = d["events"], d["word_starts"]
    if notes is None and d.get("checked_for") == vocab.size:  # check_sheet did it all when the file was read
        return events, word_start
    # One bincount gives both the id range (it comes out longer than the vocabulary if an id is out of it) and
    # the number of PITCH events of each pitch.
    counts = np.bincount(events, minlength=vocab.size)
    if len(counts) > vocab.size:  # ids are unsigned 16-bit: only the upper end can be out of range
        i = int(np.argmax(events >= vocab.size))
        raise _invalid(f"event id {int(events[i])} at event {i} (allowed 0..{vocab.size - 1})")
    if notes is not None:
        p0 = vocab.start["pitch"]
        have, want = counts[p0 : p0 + 128], np.bincount(notes.pitch, minlength=128)
        if not (have == want).all():
            p = int(np.argmax(have != want))
            raise _invalid(f"has {int(have[p])} PITCH_{p} events for {int(want[p])} notes of pitch {p}")
    return events, word_start


def check_sheet(sheet, notes: NoteTable) -> dict:
    """``sheet`` decoded (see :func:`decode_sheet`) and checked against ``notes``: in full when it was made for
    the default tokenizer config, its form only otherwise (a tokenizer of another config checks the ids when it
    uses the sheet)."""
    d = decode_sheet(sheet)
    fingerprint, vocab = default_base()
    if d["config"] == fingerprint:
        sheet_events(d, vocab, notes)
        d["checked_for"] = vocab.size  # so a tokenizer of this config (same vocabulary) need not check again
    return d
