import json
import sys
from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import corpus_dir, make_score

from midiforge.tokens import MidiTokenizer
from midiforge.tokens.vocab import TokenizerConfig


def _notes(score: symusic.Score):
    """(program-or-drum, pitch, onset, duration, velocity) in quarters, sorted."""
    s = score.to("quarter")
    rows = [
        (-1 if t.is_drum else t.program, n.pitch, round(n.time, 4), round(n.duration, 4), n.velocity)
        for t in s.tracks
        for n in t.notes
    ]
    return sorted(rows)


def test_roundtrip_synthetic_exact_on_grid():
    tok = MidiTokenizer()
    score = make_score(seed=1)
    dec = tok.decode(tok.encode(score))
    a, b = _notes(score), _notes(dec)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[:4] == y[:4]  # program/drum, pitch, onset, duration exact on the grid
        assert abs(x[4] - y[4]) <= 4  # velocity within half a 16-bin step
    assert {(t.program, t.is_drum) for t in dec.tracks} == {(0, False), (33, False), (0, True)}
    assert abs(dec.tempos[0].qpm - score.tempos[0].qpm) / score.tempos[0].qpm < 0.013
    assert (dec.time_signatures[0].numerator, dec.time_signatures[0].denominator) == (4, 4)


def test_encode_accepts_path_bytes_score(tmp_path):
    tok = MidiTokenizer()
    score = make_score(seed=2)
    p = tmp_path / "x.mid"
    score.dump_midi(str(p))
    ids = tok.encode(p)
    assert ids == tok.encode(str(p)) == tok.encode(p.read_bytes()) == tok.encode(symusic.Score(str(p)))
    assert all(isinstance(i, int) for i in ids) and min(ids) >= 3


def test_fidelity_on_real_corpus():
    """The project's own judge (../shared/tools/roundtrip.py) on POP909 + edge files: >= 99% of notes."""
    pop909, edge = corpus_dir("pop909"), corpus_dir("edge")
    sys.path.insert(0, str(corpus_dir().parent / "tools"))
    try:
        from roundtrip import last_onset_seconds, recovered
    finally:
        sys.path.pop(0)
    tok = MidiTokenizer()
    files = sorted(pop909.glob("*.mid"))[:80] + sorted(edge.rglob("*.mid*"))
    assert len(files) > 100
    ok = total = tempo_ok = tempo_n = 0
    for f in files:
        try:
            src = symusic.Score(str(f))
        except Exception:
            continue
        dec = tok.decode(tok.encode(str(f)))
        k, n = recovered(src.to("quarter"), dec.to("quarter"))
        ok, total = ok + k, total + n
        a_s = last_onset_seconds(src)
        if a_s > 1:
            tempo_n += 1
            tempo_ok += abs(a_s - last_onset_seconds(dec)) <= 0.02 * a_s
    print(f"fidelity: {ok}/{total} = {ok / total:.4f} notes; tempo map {tempo_ok}/{tempo_n} files")
    assert total > 100_000
    assert ok / total >= 0.99
    assert tempo_ok / tempo_n >= 0.95


def test_decode_is_total_on_random_ids():
    tok = MidiTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(tok), size=int(rng.integers(0, 400)))
        score, num_events, skipped = tok.decode_with_stats(ids)
        assert isinstance(score, symusic.Score)
        assert 0 <= skipped <= num_events
        symusic.Score.from_midi(score.dumps_midi())  # writes and re-reads as a valid MIDI file


def test_decode_rejects_out_of_vocab():
    tok = MidiTokenizer()
    with pytest.raises(ValueError, match="out of the vocabulary"):
        tok.decode([5, len(tok)])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_specials_and_eos_stop():
    tok = MidiTokenizer()
    ids = tok.encode(make_score(seed=3, num_notes=20))
    full = tok.decode([tok.bos_id] + ids + [tok.eos_id] + ids)
    assert full.note_num() == tok.decode(ids).note_num()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_transpose_moves_pitched_notes_only():
    tok = MidiTokenizer()
    score = make_score(seed=4)
    base = tok.decode(tok.encode(score))
    up = tok.decode(tok.encode(score, transpose=3))
    for t0, t1 in zip(base.tracks, up.tracks, strict=True):
        p0 = np.array([n.pitch for n in t0.notes])
        p1 = np.array([n.pitch for n in t1.notes])
        assert np.array_equal(p1, p0 if t0.is_drum else p0 + 3)


def test_bpe_compresses_and_save_load_identical(tmp_path, midi_files):
    tok = MidiTokenizer()
    base_lens = [len(tok.encode(f)) for f in midi_files]
    tok.train_bpe(midi_files, vocab_size=len(tok) + 200)
    assert len(tok) == 200 + MidiTokenizer().__len__()
    ids = [tok.encode(f) for f in midi_files]
    assert sum(map(len, ids)) < 0.8 * sum(base_lens)
    # BPE never changes the music: decode of BPE ids == decode of base ids.
    for f, x in zip(midi_files, ids, strict=True):
        assert _notes(tok.decode(x)) == _notes(MidiTokenizer().decode(MidiTokenizer().encode(f)))
    path = tmp_path / "tok.json"
    tok.save(path)
    doc = json.loads(path.read_text())
    assert doc["config"]["steps_per_quarter"] == 12 and "symusic" in doc["versions"]
    tok2 = MidiTokenizer.load(path)
    assert tok2.fingerprint == tok.fingerprint != MidiTokenizer().fingerprint
    assert [tok2.encode(f) for f in midi_files] == ids


def test_train_bpe_from_encoded_sequences(midi_files):
    seqs = [MidiTokenizer().encode(f) for f in midi_files]
    a, b = MidiTokenizer(), MidiTokenizer()
    a.train_bpe(seqs, vocab_size=len(a) + 100)
    b.train_bpe(midi_files, vocab_size=len(b) + 100)
    assert a.fingerprint == b.fingerprint


def test_word_starts_mark_time_shifts():
    tok = MidiTokenizer()
    ids = np.array(tok.encode(make_score(seed=5, num_notes=30)))
    ws = tok.word_starts(ids)
    assert ws.any() and not ws.all()
    names = tok.token_names(ids[ws])
    assert all(n.startswith("SHIFT_") for n in names)


@pytest.mark.parametrize("split", ["onset", "beat"])
def test_word_split_options(split, midi_files):
    tok = MidiTokenizer(TokenizerConfig(word_split=split))
    tok.train_bpe(midi_files, vocab_size=len(tok) + 50)
    assert _notes(tok.decode(tok.encode(midi_files[0]))) == _notes(
        MidiTokenizer().decode(MidiTokenizer().encode(midi_files[0]))
    )


def test_empty_score_encodes_to_nothing():
    assert MidiTokenizer().encode(symusic.Score(480)) == []


def test_zero_tpq_score_encodes_to_nothing():
    tok = MidiTokenizer()
    zero = corpus_dir("edge", "muspy_tests", "zero-ticks-per-beat.mid")
    assert symusic.Score(str(zero)).ticks_per_quarter == 0  # the file really is the edge case
    assert tok.encode(str(zero)) == []
    assert tok.decode(tok.encode(str(zero))).note_num() == 0


def test_long_rest_and_long_notes():
    score = symusic.Score(480)
    tr = symusic.Track("p", 0, False)
    tr.notes.append(symusic.Note(0, 480 * 20, 60, 80))  # 20-quarter note
    tr.notes.append(symusic.Note(480 * 50, 240, 62, 80))  # after a 50-quarter rest
    score.tracks.append(tr)
    dec = MidiTokenizer().decode(MidiTokenizer().encode(score))
    notes = dec.tracks[0].notes
    assert [n.time for n in notes] == [0, 480 * 50] and [n.duration for n in notes] == [480 * 20, 240]


def test_unicode_paths(tmp_path):
    p = Path(tmp_path) / "曲子 ü.MID"
    make_score(seed=6, num_notes=10).dump_midi(str(p))
    assert len(MidiTokenizer().encode(p)) > 10


def test_prepared_sheet_gives_the_same_events_and_is_ignored_for_another_config(tmp_path):
    import json as _json

    from midiforge.data.prepare import json_document
    from midiforge.notes.read import read_notes

    p = tmp_path / "a.mid"
    make_score(seed=7).dump_midi(str(p))
    notes = read_notes(p)
    path = tmp_path / "a.json"
    path.write_text(_json.dumps(json_document(notes, str(p), "0" * 64)))
    loaded = read_notes(path)
    assert loaded.sheet is not None
    tok = MidiTokenizer()
    for a, b in zip(tok.events(loaded), tok.events(notes), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(tok.events(loaded, transpose=2)[0], tok.events(notes, transpose=2)[0])
    other = MidiTokenizer(TokenizerConfig(velocity_bins=32))
    assert other.base_fingerprint != tok.base_fingerprint
    assert np.array_equal(other.events(loaded)[0], other.events(notes)[0])  # sheet ignored, recomputed
    tok.train_bpe([p], vocab_size=len(tok) + 20)
    assert tok.encode(path) == tok.encode(p)

