"""The control prefix of training windows: measured from the piece, after BOS, labels ignored, dropout seeded."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import corpus_dir

from midiforge.data.dataset import MidiDataset
from midiforge.data.prefix import ControlPrefix
from midiforge.notes.read import read_notes
from midiforge.tokens.controls import measure
from midiforge.tokens.tokenizer import MidiTokenizer


@pytest.fixture(scope="module")
def files():
    root = corpus_dir("pop909")
    return [str(root / f"{i:03d}.mid") for i in (1, 2, 3)]


def test_first_window_carries_the_measured_prefix(files, tmp_path):
    tok = MidiTokenizer()
    tok.tags = ["pop"]
    cp = ControlPrefix(tok, dropout=0.0, tags={f: "pop" for f in files})
    ds = MidiDataset(files, tok, max_sequence_length=512, cache_dir=tmp_path, augment=False, controls=cp)
    assert (ds.lengths <= 512).all()
    first = [i for i in range(len(ds)) if ds._win_start[i] == 0]
    assert len(first) == 3
    for i in first:
        x, y = ds[i]
        assert len(x) == ds.lengths[i]
        names = tok.token_names(x.tolist())
        k = sum(n.startswith("CTL_") for n in names)
        assert names[0] == "<bos>" and all(n.startswith("CTL_") for n in names[1 : 1 + k]) and k >= 6
        assert names[1] == "CTL_TAG_0" and "CTL_PROGRAM_0" in names[: k + 1]
        assert (y[:k] == -100).all() and (y[k:] >= 0).all()
    # The labels come from the piece itself: the same estimator on the file gives the same key.
    c = measure(read_notes(files[0]))
    assert (
        cp.controls(
            files[0],
            ds.piece_ids(0),
            0,
        ).key
        == c.key
    )


def test_control_dropout_is_seeded_and_drops_some(files, tmp_path):
    tok = MidiTokenizer()
    full = MidiDataset(files, tok, max_sequence_length=512, cache_dir=tmp_path, augment=False,
                       controls=ControlPrefix(tok, dropout=0.0, seed=3))  # fmt: skip
    whole = [full._prefix[p].tolist() for p in range(3)]  # every control of each piece
    cp = ControlPrefix(tok, dropout=0.5, seed=3)
    ds = MidiDataset(files, tok, max_sequence_length=512, cache_dir=tmp_path, augment=False, controls=cp)
    kept = []  # per epoch: each piece's prefix
    for epoch in range(6):
        ds.set_epoch(epoch)
        kept.append([ds._prefix[p].tolist() for p in range(3)])
    again = MidiDataset(files, tok, max_sequence_length=512, cache_dir=tmp_path, augment=False,
                        controls=ControlPrefix(tok, dropout=0.5, seed=3))  # fmt: skip
    again.set_epoch(5)
    assert [again._prefix[p].tolist() for p in range(3)] == kept[-1]  # seeded: the same epoch drops the same
    for epoch in kept:
        for pre, all_of_it in zip(epoch, whole, strict=True):
            rest = iter(all_of_it)
            assert all(t in rest for t in pre), (pre, all_of_it)  # the full prefix less some, in its order
    share = sum(map(len, sum(kept, []))) / (6 * sum(map(len, whole)))
    assert 0.3 < share < 0.7, share  # about half of the tokens kept at dropout 0.5
    assert len({repr(e) for e in kept}) == 6  # a fresh draw every epoch


def test_every_window_carries_the_prefix_and_every_token_is_learned_once(files, tmp_path):
    tok = MidiTokenizer()
    cp = ControlPrefix(tok, dropout=0.0)
    ds = MidiDataset(files, tok, max_sequence_length=256, cache_dir=tmp_path, augment=False, controls=cp)
    assert (ds.lengths <= 256).all()
    later = [i for i in range(len(ds)) if ds._win_start[i] > 0]
    assert later  # the pieces are longer than one window
    learned = {p: 0 for p in range(3)}
    for i in range(len(ds)):
        x, y = ds[i]
        p = int(ds._win_piece[i])
        pre = ds._prefix[p]
        names = tok.token_names(x[: len(pre) + 1].tolist())
        first = 1 if ds._win_start[i] == 0 else 0  # BOS only where the piece starts
        assert all(n.startswith("CTL_") for n in names[first : first + len(pre)])
        assert (y[: len(pre)] == -100).all() and (y[len(pre) :] >= 0).all()
        learned[p] += int((y >= 0).sum())
    for p in range(3):  # every token of [BOS] + ids + [EOS] but BOS is a label exactly once
        assert learned[p] == len(ds.piece_ids(p)) + 1


def test_the_key_label_is_the_key_the_notes_sound_in(tmp_path):
    import symusic

    from midiforge.notes.midi import score_to_notes
    from midiforge.tokens.controls import estimate_key, key_name

    s = symusic.Score(480)
    s.key_signatures.append(symusic.KeySignature(0, 4, 0))  # E major written, C major played
    t = symusic.Track("t", 0, False)
    for i, p in enumerate([60, 64, 67, 72, 65, 62, 59, 60] * 4):
        t.notes.append(symusic.Note(i * 480, 480, p, 90))
    s.tracks.append(t)
    path = tmp_path / "c.mid"
    s.dump_midi(str(path))
    tok = MidiTokenizer()
    cp = ControlPrefix(tok, dropout=0.0)
    ids = np.asarray(tok.encode(str(path)))
    got = cp.controls(str(path), ids, 0).key
    assert key_name(got) == "C major" == key_name(estimate_key(score_to_notes(s)))
