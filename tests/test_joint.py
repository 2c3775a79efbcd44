"""joint.py's allowed tokens: the fast walk (trie, candidate events, memoised rules) must give exactly what the
definition gives, token by token: a token is allowed when the automaton accepts each of its base events in turn
(and writing has not ended before its last one), with the same state after it."""

import numpy as np
import pytest
import symusic
from conftest import corpus_dir, tiny_model
from favouring import Favouring

from midiforge.generate.harmonize import melody_line
from midiforge.generate.infill import Piece
from midiforge.generate.joint import VoiceRules, Writer, forced_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    """A tokenizer with BPE merges learnt from a real four-part score (long words: chords, voices)."""
    from midiforge.tokens.tokenizer import MidiTokenizer

    t = MidiTokenizer()
    t.train_bpe([corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")], len(t) + 300)
    return t


def by_definition(w: Writer, s) -> dict:
    out = {}
    for tid in range(3, len(w.tok)):
        st = s
        for e in w.tok._flat[w.tok._offs[tid] : w.tok._offs[tid + 1]].tolist():
            st = None if st.done else w.step(st, e)
            if st is None:
                break
        if st is not None:
            out[tid] = st
    return out


def melody_table(tok):
    src = symusic.Score(str(corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")))
    s = symusic.Score(src.ticks_per_quarter)
    s.tempos.append(symusic.Tempo(0, qpm=96.0))
    track = symusic.Track("Soprano", 0, False)
    top = {}
    for n in src.tracks[0].notes:
        if n.pitch > top.get(n.time, (0, -1))[1]:
            top[n.time] = (n.duration, n.pitch)
    for t in sorted(top)[:24]:
        track.notes.append(symusic.Note(t, *top[t], 90))
    s.tracks.append(track)
    return Piece.from_score(tok, s).table


@pytest.mark.parametrize("rules", [VoiceRules(((55, 74), (48, 67), (40, 60))),
                                   VoiceRules(((55, 74), (48, 67), (40, 60)), chords=False), None])  # fmt: skip
def test_allowed_tokens_are_those_of_the_definition(tok, rules):
    given = melody_table(tok)
    end = int((given.time + given.duration).max())
    top, onsets = melody_line(given, end)
    w = Writer(tok, forced_rows(tok, given), [(0, 1), (0, 2), (0, 3)], end, rules, top, onsets)
    rng = np.random.default_rng(0)
    s, seen = w.initial(), 0
    while not s.done and seen < 150:
        got, want = w.allowed(s), by_definition(w, s)
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in want)
        keys = sorted(got)
        s = got[keys[rng.integers(len(keys))]]
        seen += 1
    assert seen > 40


def favouring(tok, kinds) -> Favouring:
    """An untrained model whose logits favour tokens holding an event of one of ``kinds`` by +50."""
    v = tok.vocab
    want = [v.k(k) for k in kinds]
    ids = [
        i for i in range(len(tok)) if np.isin(v.kind[tok._flat[tok._offs[i] : tok._offs[i + 1]]], want).any()
    ]
    return Favouring(tiny_model(tok, max_seq_len=128), ids)


def two_parts(n=32) -> symusic.Score:
    """Soprano and bass of a real four-part score, at the corpus file's resolution."""
    src = symusic.Score(str(corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")))
    out = src.copy()
    out.tracks = [src.tracks[0].copy(), src.tracks[-1].copy()]
    for t in out.tracks:
        t.notes = t.notes[:n]
    return out


def notes_of(track):
    return [(n.time, n.duration, n.pitch, n.velocity) for n in track.notes]


@pytest.mark.parametrize("kinds", [None, ("velocity", "track", "program"), ("pitch",), ("shift",)])
def test_added_tracks_are_written_jointly_and_heard(tok, kinds):
    """--add-track (joint.py without voice rules): the given tracks come back exactly; every new track plays
    from the first onset, within the piece, at most MAX_CHORD notes at an onset; whatever the weights."""
    from midiforge.generate import infill
    from midiforge.generate.joint import MAX_CHORD

    given = two_parts()
    model = tiny_model(tok, max_seq_len=128) if kinds is None else favouring(tok, kinds)
    first = min(n.time for t in given.tracks for n in t.notes)
    step = given.ticks_per_quarter // tok.config.steps_per_quarter  # the piece ends on the grid
    for seed in range(2):
        out = infill.edit(model, tok, given, infill.Request(add_tracks=["cello", "flute"]), seed=seed,
                          max_new_tokens=1000 if kinds is None else 300)  # fmt: skip
        assert [notes_of(t) for t in out.tracks[:2]] == [notes_of(t) for t in given.tracks]
        new = out.tracks[2:]
        assert sorted(t.program for t in new) == [42, 73]
        for t in new:
            a = t.notes.numpy()
            assert a["time"].min() == first and (a["time"] + a["duration"]).max() <= given.end() + step
            assert np.bincount(a["time"] - first).max() <= MAX_CHORD
            if kinds is None:  # written in time with the given tracks, on through the piece
                assert a["time"].max() > given.end() // 2
