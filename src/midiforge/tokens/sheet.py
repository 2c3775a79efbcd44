"""Checks of a prepared piece's "sheet" against the tokenizer that uses it (its form is checked when the piece is
read: :func:`midiforge.notes.midi.decode_sheet`).

The sheet's ``config`` fingerprint names the base vocabulary it was made for; a tokenizer uses a sheet only when
that is its own, and then checks it here: every event id is in ``[0, base vocabulary size)`` and, against the
note table, the sheet has one PITCH event of each pitch for every note of that pitch. (Word starts are not
checked: wrong ones only split BPE words elsewhere, into ids that are still valid.)

A sheet that fails is a MidiReadError, so the piece is skipped with the reason, as a corrupt MIDI file is,
rather than re-encoded from its notes: `prepare` writes notes and sheet together, so a sheet that does not match
them means the file was damaged or edited after it was written, and then its notes are not to be trusted either.
Running `prepare` again on the MIDI source gives a good file.
"""

from __future__ import annotations

import numpy as np

from midiforge.notes.midi import MidiReadError, NoteTable, decode_sheet


def _invalid(reason: str) -> MidiReadError:
    return MidiReadError(f"invalid prepared JSON: sheet {reason}")


def sheet_events(sheet, vocab, notes: NoteTable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(base event ids as int64, bool mask of BPE word starts) of a sheet made for the base vocabulary ``vocab``
    (a ``Vocab``), checked against it and, if given, against the note table it came with.

    Raises MidiReadError naming the bad field of the sheet and its value.
    """
    d = decode_sheet(sheet)
    events, word_start = d["events"], d["word_starts"]
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
