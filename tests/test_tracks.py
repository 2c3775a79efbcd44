"""Track identity, key signatures and the sustain pedal survive decode(encode(x)) on real corpus files that have
them (EVENTS_VERSION 4), and a tokenizer saved before them still encodes what it always did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import symusic

from midiforge.notes.midi import MidiReadError, NoteTable
from midiforge.notes.read import read_notes
from midiforge.tokens import MidiTokenizer
from tests.conftest import corpus_dir

HALF_STEP = 1 / 24 + 1e-6  # half a grid step (12 steps per quarter), in quarters
FIXTURE_TOK = Path(__file__).resolve().parent / "fixtures" / "ckpt_v1" / "tokenizer.json"

# Files of ../shared/corpus that have each thing (found by scanning the corpus with symusic 0.6.0).
SAME_PROGRAM_TRACKS = [
    ("pop909", "001.mid"),  # MELODY, BRIDGE, PIANO: three program-0 tracks
    ("edge", "muspy_tests", "multitrack.mid"),  # four tracks, three sharing a program
    ("edge", "muspy_tests", "fur-elise.mid"),  # two piano staves as two program-0 tracks
    (
        "edge",
        "symusic_tests",
        "Multitrack_MIDIs",
        "In Too Deep.mid",
    ),  # 13 tracks, 4 repeated programs + drums
]
PEDALLED = [
    ("pop909", "001.mid"),  # PIANO track pedalled
    ("edge", "symusic_tests", "One_track_MIDIs", "Maestro_6.mid"),  # 1,568 presses
    ("edge", "muspy_tests", "fur-elise.mid"),
    ("edge", "partitura_tests", "mozart_k265_var1.mid"),
]
KEYED = [
    ("edge", "muspy_tests", "key-signatures.mid"),  # 30 key-signature changes
    ("edge", "symusic_tests", "Multitrack_MIDIs", "Girls Just Want to Have Fun.mid"),  # six flats
    ("edge", "partitura_tests", "bach_midi_score.mid"),
]


def _tracks_by_identity(score: symusic.Score) -> dict[tuple[int, int], symusic.Track]:
    """(program or 128 for drums, index among the tracks of that program) → track, tracks with notes only."""
    seen: dict[int, int] = {}
    out = {}
    for t in score.tracks:
        if len(t.notes) == 0:
            continue
        p = 128 if t.is_drum else t.program
        i = min(seen.get(p, 0), 7)
        seen[p] = i + 1
        out.setdefault((p, i), t)
    return out


def _notes_recovered(src: symusic.Track, dec: symusic.Track | None) -> tuple[int, int]:
    """The judge's note criterion (onset/duration within half a step, velocity within 8), within one track."""
    got = sorted((n.time, n.pitch, n.duration, n.velocity) for n in (dec.notes if dec is not None else []))
    used = [False] * len(got)
    ok = 0
    for n in src.notes:
        for j, (t, p, d, v) in enumerate(got):
            if used[j] or p != n.pitch or abs(t - n.time) > HALF_STEP:
                continue
            if (src.is_drum or abs(min(d, 8) - min(n.duration, 8)) <= HALF_STEP) and abs(v - n.velocity) <= 8:
                used[j] = True
                ok += 1
                break
    return ok, len(src.notes)


@pytest.mark.parametrize("parts", SAME_PROGRAM_TRACKS, ids=lambda p: p[-1])
def test_tracks_of_one_program_stay_apart_with_their_names(parts):
    path = corpus_dir(*parts)
    tok = MidiTokenizer()
    table = read_notes(path)
    src = symusic.Score(str(path)).to("quarter")
    dec = tok.decode(tok.encode(str(path)), table.track_names).to("quarter")
    want, have = _tracks_by_identity(src), _tracks_by_identity(dec)
    assert sorted(have) == sorted(want)  # one decoded track per (program, index), none merged or invented
    ok = total = 0
    for ident, track in want.items():
        k, n = _notes_recovered(track, have[ident])  # every note in its own track, not merely somewhere
        ok, total = ok + k, total + n
        if track.name:
            assert have[ident].name == track.name
    assert ok / total >= 0.99, (ok, total)


def _pedal_pairs(track, tpq: int) -> list[tuple[float, float]]:
    """(press, release) in quarters, computed in float64 from ticks (float32 quarters lose the half-step
    boundary at 500 quarters)."""
    return sorted((p.time / tpq, (p.time + p.duration) / tpq) for p in track.pedals)


@pytest.mark.parametrize("parts", PEDALLED, ids=lambda p: p[-1])
def test_sustain_pedal_on_and_off_within_half_a_step(parts):
    path = corpus_dir(*parts)
    tok = MidiTokenizer()
    src = symusic.Score(str(path))
    dec = tok.decode(tok.encode(str(path)))
    want, have = _tracks_by_identity(src), _tracks_by_identity(dec)
    matched = total = 0
    for ident, track in want.items():
        # Presses shorter than half a step vanish on the grid (a press and its release round to one step).
        src_p = [(a, b) for a, b in _pedal_pairs(track, src.tpq) if b - a > 1 / 12]
        got = _pedal_pairs(have[ident], dec.tpq) if ident in have else []
        total += len(src_p)
        for a, b in src_p:
            if any(abs(a - x) <= HALF_STEP and abs(b - y) <= HALF_STEP for x, y in got):
                matched += 1
    assert total > 10
    assert matched / total >= 0.99, (matched, total)


@pytest.mark.parametrize("parts", KEYED, ids=lambda p: p[-1])
def test_key_signatures_survive(parts):
    path = corpus_dir(*parts)
    tok = MidiTokenizer()
    src = symusic.Score(str(path)).to("quarter")
    dec = tok.decode(tok.encode(str(path))).to("quarter")
    want = [(round(k.time * 12), k.key, k.tonality) for k in src.key_signatures]
    have = [(round(k.time * 12), k.key, k.tonality) for k in dec.key_signatures]
    assert len(want) >= 1 and have == want


def test_transposition_moves_the_key_signature():
    path = corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")  # C# major (7 sharps)
    tok = MidiTokenizer()
    src_keys = [(k.key, k.tonality) for k in symusic.Score(str(path)).key_signatures]
    up = tok.decode(tok.encode_notes(read_notes(path), transpose=2))
    for (sharps, ton), k in zip(src_keys, up.key_signatures, strict=True):
        # Up a semitone is 7 sharps more (mod 12): C# major + 2 = Eb major, 3 flats.
        assert (k.key - (sharps + 14)) % 12 == 0 and -6 <= k.key <= 6 and k.tonality == ton
    assert [k.key for k in up.key_signatures][:1] == [-3]


def test_legacy_tokenizer_writes_no_new_events_and_keeps_its_fingerprint():
    doc = json.loads(FIXTURE_TOK.read_text())
    tok = MidiTokenizer.load(FIXTURE_TOK)
    assert "events_version" not in doc and tok.events_version == 3 and not tok.has_controls
    assert tok.fingerprint == doc["fingerprint"]  # checkpoints trained with it still pass the check
    events, _ = tok.events(read_notes(corpus_dir("pop909", "001.mid")))
    kinds = {tok.vocab.kinds[k] for k in np.unique(tok.vocab.kind[events])}
    assert kinds.isdisjoint({"track", "keysig", "pedal"}) and "pitch" in kinds
    new = MidiTokenizer()
    assert new.events_version == 4 and new.has_controls


def test_note_table_json_keeps_tracks_pedals_keys_and_names():
    table = read_notes(corpus_dir("edge", "muspy_tests", "fur-elise.mid"))
    assert len(np.unique(table.track)) == 2 and len(table.pedal_time) > 0 and len(table.ks_time) > 0
    back = NoteTable.from_json_dict(json.loads(json.dumps(table.to_json_dict())))
    for col in (
        "track",
        "pedal_time",
        "pedal_duration",
        "pedal_program",
        "pedal_track",
        "ks_key",
        "ks_tonality",
    ):
        assert np.array_equal(getattr(back, col), getattr(table, col)), col
    assert back.track_names == table.track_names
    tok = MidiTokenizer()
    assert np.array_equal(tok.events(back)[0], tok.events(table)[0])


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["pedals"].update(track=[9] * len(d["pedals"]["track"])), "pedals.track"),
        (
            lambda d: d["key_signatures"].update(key=[8] * len(d["key_signatures"]["key"])),
            "key_signatures.key",
        ),
        (lambda d: d.update(track_names=[[0, 0]]), "track_names[0]"),
        (lambda d: d["pedals"].update(time=d["pedals"]["time"][:-1]), "pedals lists differ"),
    ],
)
def test_bad_new_json_fields_are_refused_by_name(edit, field):
    d = json.loads(json.dumps(read_notes(corpus_dir("edge", "muspy_tests", "fur-elise.mid")).to_json_dict()))
    edit(d)
    with pytest.raises(MidiReadError, match=field.replace("[", r"\[")):
        NoteTable.from_json_dict(d)


def test_json_without_the_new_fields_still_loads():
    table = read_notes(corpus_dir("pop909", "001.mid"))
    d = table.to_json_dict()
    for k in ("pedals", "key_signatures", "track_names"):
        del d[k]
    raw = np.frombuffer(__import__("base64").b64decode(d["notes_b64"]), "<i4").reshape(6, -1)[:5]
    d["notes_columns"] = d["notes_columns"][:5]
    d["notes_b64"] = __import__("base64").b64encode(raw.astype("<i4").tobytes()).decode()
    back = NoteTable.from_json_dict(d)
    assert len(back) == len(table) and not back.track.any() and len(back.pedal_time) == 0
