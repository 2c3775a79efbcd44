"""Keeping the beat: the on-beat, off-grid and beatless statistics on hand-made scores, the onset grid a training
set records, and the grid mask holding on an untrained model."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import symusic
from conftest import tiny_model as _tiny_model

from midiforge.generate import generate
from midiforge.measure.beat import longest_beatless, off_grid_share, on_beat_share
from midiforge.measure.stats import piece_stats
from midiforge.notes.midi import score_to_notes
from midiforge.tokens.onsetgrid import OnsetGrid, count_grid
from midiforge.tokens.tokenizer import MidiTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TPQ = 480
tiny_model = functools.partial(_tiny_model, max_seq_len=128)


def score_of(onsets_q, ts=((0, 4, 4),), tpq=TPQ) -> symusic.Score:
    """One track with a note at each onset (in quarters), a 16th long; time signatures (quarter, num, den)."""
    s = symusic.Score(tpq)
    for q, n, d in ts:
        s.time_signatures.append(symusic.TimeSignature(int(q * tpq), n, d))
    t = symusic.Track("t", 0, False)
    for q in onsets_q:
        t.notes.append(symusic.Note(int(round(q * tpq)), tpq // 4, 60, 90))
    s.tracks.append(t)
    return s


def notes(*a, **k):
    return score_to_notes(score_of(*a, **k))


def test_on_beat_share_counts_notes_on_the_beats_of_the_meter():
    assert on_beat_share(notes([0, 1, 2, 3])) == 1.0
    assert on_beat_share(notes([0, 0.5, 1, 1.5])) == 0.5
    assert on_beat_share(notes([0.25, 1.75])) == 0.0
    # 2/2: the beat is a half note, so quarters 1 and 3 are off it.
    assert on_beat_share(notes([0, 1, 2, 3], ts=((0, 2, 2),))) == 0.5
    # 6/8: the beat is a dotted quarter (0, 1.5, 3, ...).
    assert on_beat_share(notes([0, 0.5, 1, 1.5], ts=((0, 6, 8),))) == 0.5
    # Beats count from the time signature's start: 3/4 from quarter 1 puts its beats on 1, 2, 3...
    assert on_beat_share(notes([0.5, 1, 1.5], ts=((0, 4, 4), (0.5, 3, 8)))) == 1.0
    assert on_beat_share(notes([])) == 0.0


def test_off_grid_share_counts_notes_at_positions_marked_unused():
    used = np.zeros(12, bool)
    used[[0, 6]] = True  # quarters and eighths only
    assert off_grid_share(notes([0, 0.5, 1]), used) == 0.0
    assert off_grid_share(notes([0, 0.25, 1 / 3, 1]), used) == 0.5  # a 16th and a triplet are off the grid
    assert off_grid_share(notes([0.25]), np.ones(12, bool)) == 0.0


def test_longest_beatless_stretch_as_a_share_of_the_beats():
    assert longest_beatless(notes([0, 1, 2, 3, 4])) == 0.0
    # Beats 0..8 (9 beats): between the notes at 0 and 8 every note is off the beat: beats 1-7 missed.
    assert longest_beatless(notes([0, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 8])) == pytest.approx(7 / 9)


def test_piece_stats_carry_the_beat_statistics():
    used = np.zeros(12, bool)
    used[0] = True
    s = piece_stats(notes([0, 0.5, 1, 2]), used)
    assert s["on_beat"] == 0.75 and s["off_grid"] == 0.25
    assert piece_stats(notes([0, 0.5])).get("off_grid") == 0.0  # no grid given: nothing is off it


@pytest.fixture(scope="module")
def tok() -> MidiTokenizer:
    return MidiTokenizer()


def test_onset_grid_counts_positions_after_positions(tok):
    ids = np.asarray(tok.encode(score_of([0, 0.5, 1, 1.25, 1.5, 2])))
    g = count_grid(tok, [ids])
    c = g.counts
    assert c[12, 0] == 1  # the first onset
    assert c[0, 6] == 1 and c[6, 0] == 2 and c[0, 3] == 1 and c[3, 6] == 1  # 0 6 0 3 6 0
    assert c.sum() == 6
    assert g.used().nonzero()[0].tolist() == [0, 3, 6]
    pairs = g.allowed("pairs")
    assert pairs[6, 0] and not pairs[6, 6] and not pairs[6, 3]
    assert g.allowed("positions")[6, 6]
    assert pairs[12].tolist() == g.used().tolist()  # the first onset: any used position
    assert pairs[5].tolist() == g.used().tolist()  # a position never seen before another: any used one
    back = OnsetGrid.from_json(g.to_json())
    assert np.array_equal(back.counts, c)


def test_onset_grid_rare_pairs_are_masked(tok):
    spq = 12
    counts = np.zeros((spq + 1, spq), np.int64)
    counts[0, 0], counts[0, 6] = 1000, 3  # 0.3 % of the onsets after a downbeat
    g = OnsetGrid(spq, counts)
    assert g.allowed("pairs", min_share=0.005)[0].nonzero()[0].tolist() == [0]
    assert g.allowed("pairs", min_share=0.001)[0].nonzero()[0].tolist() == [0, 6]


def _grid(positions, spq=12) -> OnsetGrid:
    counts = np.zeros((spq + 1, spq), np.int64)
    for a in positions:
        for b in positions:
            counts[a, b] = 10
    return OnsetGrid(spq, counts)


@pytest.mark.parametrize("mode", ["pairs", "positions"])
def test_grid_mask_holds_on_an_untrained_model(tok, mode):
    tok = MidiTokenizer()
    tok.onset_grid = _grid([0, 6])
    model = tiny_model(tok)  # untrained: its onsets land anywhere unless masked
    for r in generate(model, tok, max_new_tokens=150, num_samples=4, seed=3, ignore_eos=True, grid=mode):
        n = score_to_notes(r.score)
        assert len(n) > 10
        pos = np.rint(n.time * 12 / n.tpq).astype(int) % 12
        assert set(pos.tolist()) <= {0, 6}, mode
    free = generate(model, tok, max_new_tokens=150, num_samples=4, seed=3, ignore_eos=True, grid="off")
    pos = np.concatenate([np.rint(score_to_notes(r.score).time * 12 / TPQ).astype(int) % 12 for r in free])
    assert not set(pos.tolist()) <= {0, 6}  # without the mask the same model does leave the grid


def test_pairs_keep_the_phase_where_positions_do_not(tok):
    tok = MidiTokenizer()
    counts = np.zeros((13, 12), np.int64)
    counts[0, 0], counts[0, 6], counts[6, 0], counts[12, 0] = (
        50,
        50,
        50,
        1,
    )  # eighths, never two offbeats running
    tok.onset_grid = OnsetGrid(12, counts)
    model = tiny_model(tok, seed=2)
    for r in generate(model, tok, max_new_tokens=200, num_samples=4, seed=5, ignore_eos=True, grid="pairs"):
        steps = np.unique(np.rint(score_to_notes(r.score).time * 12 / TPQ).astype(int))
        pos = steps % 12
        assert not (
            (pos[1:] == 6) & (pos[:-1] == 6)
        ).any()  # an offbeat onset is always followed by a downbeat


def test_time_signatures_start_only_where_the_training_set_starts_them(tok):
    tok = MidiTokenizer()
    g = _grid([0, 3, 6, 9])
    tok.onset_grid = OnsetGrid(
        12, g.counts, np.eye(12, dtype=np.int64)[0] * 5
    )  # time signatures on beats only
    model = tiny_model(tok, seed=4)
    starts = []
    for r in generate(model, tok, max_new_tokens=300, num_samples=4, seed=6, ignore_eos=True):
        starts += [t.time * 12 // r.score.ticks_per_quarter for t in r.score.time_signatures]
    assert len(starts) > 4  # an untrained model writes many
    assert all(s % 12 == 0 for s in starts)
