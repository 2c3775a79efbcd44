"""The token stream's layouts: the full default stream, and the same-information-as-REMI option
(``TokenizerConfig(tracks=False, pedals=False, key_signatures=False)``). The option drops exactly what it says;
both round-trip real corpus files by the project's judge; and the encoder still writes, byte for byte, what the
events v4 and v3 encoders wrote, so old tokenizers, token caches and checkpoints keep working."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import symusic
from conftest import corpus_dir

from midiforge.notes.read import read_notes
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.tokens.vocab import TokenizerConfig

SAME_AS_REMI = TokenizerConfig(tracks=False, pedals=False, key_signatures=False)

# sha256 (first 16 hex digits) of the base events and packed word starts of each file at transpositions 0, +5
# and -7, as the events v4 encoder (and, for version 3, the encoder of a tokenizer saved before v4) wrote them
# before the encoder was rewritten for speed: the rewrite must not change a single event.
GOLDEN = {
    ("pop909", "001.mid"): ("1491e8678faac88c", "0cb3c71d58807543"),
    ("pop909", "117.mid"): ("80fc43be44cbfe9a", "a9713041c7a1c331"),
    ("edge", "muspy_tests", "key-signatures.mid"): ("a1ce1be8c0de3da0", "f434efd98718d3f3"),
    ("edge", "muspy_tests", "fur-elise.mid"): ("3724feb053f9764f", "17fbd203bd38f025"),
    ("edge", "symusic_tests", "Multitrack_MIDIs", "In Too Deep.mid"): (
        "ad4f62e0c59e3e3b",
        "3d7079cf1f093c0b",
    ),
    ("edge", "symusic_tests", "One_track_MIDIs", "Maestro_6.mid"): ("d32314bad6899809", "d8cab98aceef827d"),
    ("edge", "partitura_tests", "mozart_k265_var1.mid"): ("1ed6e6924f8991f0", "35ec028790e34264"),
}


def _digest(tok: MidiTokenizer, notes) -> str:
    h = hashlib.sha256()
    for transpose in (0, 5, -7):
        events, word_start = tok.events(notes, transpose)
        h.update(events.astype("<i8").tobytes())
        h.update(np.packbits(word_start).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("parts", list(GOLDEN), ids=lambda p: p[-1])
def test_old_streams_are_written_unchanged(parts):
    notes = read_notes(corpus_dir(*parts))
    v4, v3 = MidiTokenizer(), MidiTokenizer()
    v3.events_version = 3
    assert (_digest(v4, notes), _digest(v3, notes)) == GOLDEN[parts]
    # Without tracks, pedals and key signatures the stream is the v3 one: the same events, a new vocabulary name.
    same = MidiTokenizer(SAME_AS_REMI)
    assert _digest(same, notes) == GOLDEN[parts][1]
    assert same.base_fingerprint != v4.base_fingerprint


def test_same_information_option_drops_tracks_pedals_and_key_signatures():
    """POP909 001: three program-0 tracks, a pedalled piano; fur-elise: two staves, pedal, a key signature."""
    for parts in (("pop909", "001.mid"), ("edge", "muspy_tests", "fur-elise.mid")):
        path = corpus_dir(*parts)
        full, same = MidiTokenizer(), MidiTokenizer(SAME_AS_REMI)
        v = full.vocab
        kinds_full = set(v.kind[full.events(read_notes(path))[0]].tolist())
        kinds_same = set(v.kind[same.events(read_notes(path))[0]].tolist())
        dropped = {v.k("track"), v.k("pedal"), v.k("keysig")}
        assert dropped <= kinds_full or dropped - {v.k("keysig")} <= kinds_full  # the file has them
        assert not kinds_same & dropped
        src = symusic.Score(str(path))
        dec_full, dec_same = full.decode(full.encode(path)), same.decode(same.encode(path))
        assert len(dec_full.tracks) == len([t for t in src.tracks if len(t.notes)]) > len(dec_same.tracks)
        assert len(dec_same.tracks) == len({(t.program, t.is_drum) for t in src.tracks if len(t.notes)})
        assert sum(len(t.pedals) for t in dec_full.tracks) > 0 == sum(len(t.pedals) for t in dec_same.tracks)
        assert len(dec_same.key_signatures) == 0

        # Every note is still there: the same (program, pitch, onset) multiset as the full stream's.
        def rows(score):
            return sorted(
                (t.program, n.pitch, n.time, n.duration, n.velocity) for t in score.tracks for n in t.notes
            )

        assert rows(dec_same) == rows(dec_full)


@pytest.mark.parametrize("config", [TokenizerConfig(), SAME_AS_REMI], ids=["full", "same-as-remi"])
def test_each_layout_round_trips_real_files(config):
    """The project's judge (../shared/tools/roundtrip.py) on 8 POP909 songs and the edge files: >= 99.5% of
    notes, and decode(encode(x)) is lossless on what the stream keeps (encoding the decoded score again gives the
    same events)."""
    pop909, edge = corpus_dir("pop909"), corpus_dir("edge")
    sys.path.insert(0, str(corpus_dir().parent / "tools"))
    try:
        from roundtrip import recovered
    finally:
        sys.path.pop(0)
    tok = MidiTokenizer(config)
    ok = total = 0
    for f in sorted(pop909.glob("*.mid"))[:8] + sorted(edge.rglob("*.mid*")):
        try:
            src = symusic.Score(str(f))
        except Exception:
            continue  # the corpus's deliberately broken files
        ids = tok.encode(str(f))
        dec = tok.decode(ids)
        k, n = recovered(src.to("quarter"), dec.to("quarter"))
        ok, total = ok + k, total + n
        again = tok.encode(dec)
        assert tok.base_events(again).tolist() == tok.base_events(ids).tolist(), f.name
    assert total > 30_000
    assert ok / total >= 0.995, f"{ok}/{total}"


def test_same_information_config_saves_and_loads(tmp_path, midi_files):
    tok = MidiTokenizer(SAME_AS_REMI)
    tok.train_bpe(midi_files, len(tok) + 30)
    tok.save(tmp_path / "tok.json")
    back = MidiTokenizer.load(tmp_path / "tok.json")
    assert back.config == SAME_AS_REMI and back.fingerprint == tok.fingerprint
    assert back.encode(midi_files[0]) == tok.encode(midi_files[0])
    # A default config saves no new fields: fingerprints of tokenizers saved before the option are unchanged.
    MidiTokenizer().save(tmp_path / "default.json")
    cfg = json.loads((tmp_path / "default.json").read_text())["config"]
    assert not {"tracks", "pedals", "key_signatures"} & set(cfg)
