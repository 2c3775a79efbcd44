"""Prepared JSON is checked on load: a bad value never reaches the token cache, and the file is skipped with a
reason that names the field, as a corrupt MIDI file is."""

import base64
import copy
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import make_score

from midiforge.data.dataset import MidiDataset
from midiforge.data.prepare import prepare_file
from midiforge.notes.midi import MidiReadError
from midiforge.notes.read import read_notes
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.tokens.vocab import TokenizerConfig

COLUMNS = ("time", "duration", "pitch", "velocity", "program")


def prepared(tmp_path: Path, name: str = "good", seed: int = 0) -> Path:
    """A prepared JSON file written by the real `prepare` code from a MIDI file made by make_score."""
    mid = tmp_path / f"{name}.mid"
    make_score(seed=seed, num_notes=60).dump_midi(str(mid))
    out = tmp_path / f"{name}.json"
    reason, num_notes = prepare_file(str(mid), hashlib.sha256(mid.read_bytes()).hexdigest(), str(out))
    assert reason is None and num_notes > 0
    return out


def get_notes(doc: dict) -> np.ndarray:
    raw = base64.b64decode(doc["notes_b64"])
    return np.frombuffer(raw, "<i4").reshape(len(doc["notes_columns"]), doc["num_notes"]).copy()


def set_notes(doc: dict, cols: np.ndarray) -> None:
    doc["notes_b64"] = base64.b64encode(cols.astype("<i4").tobytes()).decode("ascii")


def set_column(name: str, index: int, value: int):
    def corrupt(doc):
        cols = get_notes(doc)
        cols[doc["notes_columns"].index(name), index] = value
        set_notes(doc, cols)

    return corrupt


def sheet_events(doc: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(doc["sheet"]["events_b64"]), "<u2").copy()


def set_sheet_event(index: int, value):
    """Replace one sheet event; ``value`` may be a function of the tokenizer's vocabulary."""

    def corrupt(doc):
        events = sheet_events(doc)
        events[index] = value(MidiTokenizer().vocab) if callable(value) else value
        doc["sheet"]["events_b64"] = base64.b64encode(events.astype("<u2").tobytes()).decode("ascii")

    return corrupt


def move_a_pitch(doc):
    """The sheet's first PITCH event moved a semitone: every id still in range, but the pitches of the sheet are
    no longer those of the notes (make_score's pitches are 21..108, so +1 stays a PITCH)."""
    p0 = MidiTokenizer().vocab.start["pitch"]
    events = sheet_events(doc)
    i = int(np.flatnonzero((events >= p0) & (events < p0 + 128))[0])
    set_sheet_event(i, int(events[i]) + 1)(doc)


def drop_last_note(doc):
    doc["num_notes"] -= 1  # notes_b64 still holds num_notes + 1 notes


def put(*path_and_value):
    *path, value = path_and_value

    def corrupt(doc):
        d = doc
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return corrupt


def delete(key):
    return lambda doc: doc.pop(key)


# (case id, corruption, text the reason must contain: the field and its bad value)
CASES = [
    ("program 200", set_column("program", 3, 200), "program 200 at note 3"),
    ("program -1", set_column("program", 0, -1), "program -1"),
    ("pitch 128", set_column("pitch", 5, 128), "pitch 128 at note 5"),
    ("pitch 300", set_column("pitch", 0, 300), "pitch 300"),
    ("velocity 0", set_column("velocity", 7, 0), "velocity 0 at note 7"),
    ("velocity 200", set_column("velocity", 1, 200), "velocity 200"),
    ("negative time", set_column("time", 2, -5), "time -5 at note 2"),
    ("negative duration", set_column("duration", 4, -1), "duration -1 at note 4"),
    ("tpq 0", put("tpq", 0), "tpq 0"),
    ("tpq negative", put("tpq", -480), "tpq -480"),
    ("tpq float", put("tpq", 480.5), "tpq 480.5"),
    ("num_notes too small", drop_last_note, "notes_b64"),
    (
        "notes_columns repeated",
        put("notes_columns", ["time", "time", "pitch", "velocity", "program"]),
        "notes_columns",
    ),
    (
        "tempo lists differ",
        put("tempos", "qpm", [120.0, 90.0]),
        "tempos lists differ in length (time 1, qpm 2)",
    ),
    ("tempo 0", put("tempos", "qpm", [0.0]), "tempos.qpm 0.0"),
    ("tempo NaN", put("tempos", "qpm", [float("nan")]), "tempos.qpm nan"),
    ("tempo time negative", put("tempos", "time", [-1]), "tempos.time -1"),
    (
        "time signature lists differ",
        put("time_signatures", "numerator", [4, 3]),
        "time_signatures lists differ",
    ),
    ("numerator 0", put("time_signatures", "numerator", [0]), "time_signatures.numerator 0"),
    ("denominator 3", put("time_signatures", "denominator", [3]), "time_signatures.denominator 3"),
    ("denominator 0", put("time_signatures", "denominator", [0]), "time_signatures.denominator 0"),
    ("missing field", delete("tpq"), "missing field 'tpq'"),
    ("sheet id = vocab size", set_sheet_event(10, lambda v: v.size), "sheet event id {size} at event 10"),
    ("sheet id 65535", set_sheet_event(0, 65535), "sheet event id 65535 at event 0"),
    ("sheet too short", put("sheet", "num_events", 3), "sheet events_b64"),
    ("sheet word starts short", put("sheet", "word_starts_b64", ""), "sheet word_starts_b64"),
    ("sheet num_events negative", put("sheet", "num_events", -1), "sheet num_events -1"),
    ("sheet not an object", put("sheet", [1, 2]), "sheet is a list"),
    ("sheet pitches differ from notes", move_a_pitch, "sheet has"),
]


def expected(text: str) -> str:
    return text.format(size=MidiTokenizer().vocab.size)


def write_corrupted(good: Path, path: Path, corrupt) -> Path:
    doc = copy.deepcopy(json.loads(good.read_text(encoding="utf-8")))
    corrupt(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_prepared_json_reads_back_with_its_sheet(tmp_path):
    good = prepared(tmp_path)
    notes = read_notes(good)
    tok = MidiTokenizer()
    assert notes.sheet is not None and notes.sheet["config"] == tok.base_fingerprint
    plain = read_notes(tmp_path / "good.mid")
    for a, b in zip(tok.events(notes), tok.events(plain), strict=True):
        assert np.array_equal(a, b)


# Checked where a tokenizer uses the sheet (it needs the vocabulary), not when the file is read.
TOKENIZER_CHECKS = {"sheet id = vocab size", "sheet id 65535", "sheet pitches differ from notes"}


@pytest.mark.parametrize(("case_id", "corrupt", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_field_is_rejected_and_named(tmp_path, case_id, corrupt, reason):
    good = prepared(tmp_path)
    bad = write_corrupted(good, tmp_path / "bad.json", corrupt)
    with pytest.raises(MidiReadError) as err:
        if case_id in TOKENIZER_CHECKS:
            notes = read_notes(bad)  # reading needs no tokenizer: the sheet's form is fine
            MidiTokenizer().events(notes)
        else:
            read_notes(bad)
    message = str(err.value)
    assert expected(reason) in message
    assert message.startswith("invalid prepared JSON: ") and "\n" not in message


def test_dataset_keeps_the_good_file_and_lists_each_bad_one_with_its_reason(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = prepared(src)
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.json").write_bytes(good.read_bytes())
    picked = ["program 200", "pitch 128", "velocity 0", "negative time", "tpq 0", "sheet id = vocab size"]
    picked += ["num_notes too small", "denominator 3"]
    reasons = {}
    for case_id, corrupt, reason in CASES:
        if case_id in picked:
            path = write_corrupted(good, data / f"{case_id.replace(' ', '_')}.json", corrupt)
            reasons[str(path)] = expected(reason)
    assert len(reasons) == len(picked)

    tok = MidiTokenizer()
    kw = dict(cache_dir=tmp_path / "cache", augment=False, num_workers=1)
    ds = MidiDataset([data], tok, 4, 512, **kw)
    assert ds.files == [str(data / "good.json")]
    assert set(ds.skipped) == set(reasons)
    for path, reason in reasons.items():
        assert reason in ds.skipped[path] and ds.skipped[path].startswith("invalid prepared JSON: ")
    assert int(max(ds.piece_ids(0))) < len(tok)

    # the reasons are cached like those of corrupt MIDI files: the next build reads none of the bad files
    again = MidiDataset([data], tok, 4, 512, **kw)
    assert again.num_encoded == 0 and again.skipped == ds.skipped and again.files == ds.files


def test_a_sheet_for_another_config_is_checked_by_the_tokenizer_that_uses_it(tmp_path):
    """read_notes can check the ids of a sheet made for the default config only; a tokenizer whose config the
    sheet claims checks them itself, and the dataset skips the file with that reason (cached)."""
    other = MidiTokenizer(TokenizerConfig(velocity_bins=8))
    good = prepared(tmp_path)

    def claim_other_config(doc):
        doc["sheet"]["config"] = other.base_fingerprint
        set_sheet_event(0, other.vocab.size)(doc)

    data = tmp_path / "data"
    data.mkdir()
    bad = write_corrupted(good, data / "bad.json", claim_other_config)
    notes = read_notes(
        bad
    )  # the notes are fine and the sheet's form is right: nothing to say without its vocab
    with pytest.raises(MidiReadError, match=f"sheet event id {other.vocab.size} at event 0"):
        other.events(notes)
    assert np.array_equal(MidiTokenizer().events(notes)[0], MidiTokenizer().events(read_notes(good))[0])

    kw = dict(cache_dir=tmp_path / "cache", augment=False, num_workers=1)
    ds = MidiDataset([data], other, 4, 512, **kw)
    assert ds.files == [] and f"sheet event id {other.vocab.size}" in ds.skipped[str(bad)]
    again = MidiDataset([data], other, 4, 512, **kw)
    assert again.num_encoded == 0 and again.skipped == ds.skipped


def midi_with_time_signature(numerator: int, dd: int) -> bytes:
    """A one-note type-0 MIDI file whose time signature is numerator / 2**dd, written byte by byte."""
    track = b"\x00\xff\x58\x04" + bytes([numerator, dd, 24, 8])
    track += b"\x00\x90\x3c\x40" + b"\x83\x60\x80\x3c\x00" + b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + track


@pytest.mark.parametrize(("numerator", "dd"), [(0, 2), (4, 8)])  # numerator 0; denominator 2**8 (symusic: 0)
def test_prepare_drops_time_signatures_a_json_file_may_not_hold(tmp_path, numerator, dd):
    """A broken time signature in a MIDI file must not make `prepare` write a file that then fails to load."""
    mid = tmp_path / "odd.mid"
    mid.write_bytes(midi_with_time_signature(numerator, dd))
    out = tmp_path / "odd.json"
    assert prepare_file(str(mid), hashlib.sha256(mid.read_bytes()).hexdigest(), str(out)) == (None, 1)
    notes = read_notes(out)
    assert len(notes) == 1 and len(notes.ts_numerator) == 0
    tok = MidiTokenizer()
    assert tok.encode(out) == tok.encode(mid)
