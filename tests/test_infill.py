"""Infilling: the training rearrangement (fim.py) and the edits of `generate` (infill.py), on real files.

The guarantees hold for any model, so most tests use untrained ones: whatever the model writes, everything
outside the edited bars or tracks comes back exactly as the tokenizer stores it.
"""

import functools
import json

import numpy as np
import pytest
import symusic
import torch
from conftest import corpus_dir
from conftest import tiny_model as _tiny_model
from favouring import Favouring

from midiforge.cli import main
from midiforge.data import fim
from midiforge.generate import infill
from midiforge.generate.core import generate
from midiforge.notes.midi import load_score, score_to_notes
from midiforge.notes.read import read_notes
from midiforge.tokens.encode import to_grid
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train.config import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> MidiTokenizer:
    return MidiTokenizer()


tiny_model = functools.partial(_tiny_model, max_seq_len=96)


def pop(name="001.mid"):
    return load_score(corpus_dir("pop909", name))


def chorale():
    return load_score(corpus_dir("edge", "partitura_tests", "bach_midi_score.mid"))


def note_set(score, lo=None, hi=None, tracks=None) -> list:
    """(track name, program, drum, time, duration, pitch, velocity) of notes with onsets outside [lo, hi)."""
    out = []
    for t in score.tracks:
        if tracks is not None and t.name not in tracks:
            continue
        a = t.notes.numpy()
        for row in zip(a["time"], a["duration"], a["pitch"], a["velocity"], strict=True):
            if lo is not None and lo <= row[0] < hi:
                continue
            out.append((t.name, t.program, t.is_drum, *(int(x) for x in row)))
    return sorted(out)


def stored(tok, score):
    """The prompt as the tokenizer stores it, with its track names."""
    return tok.decode(tok.encode(score), track_names=score_to_notes(score).track_names)


def maps(score):
    return (
        [(t.time, round(t.qpm, 3)) for t in score.tempos],
        [(t.time, t.numerator, t.denominator) for t in score.time_signatures],
        [(k.time, k.key, k.tonality) for k in score.key_signatures],
    )


# ------------------------------------------------------------------------------------------- fim.py
@pytest.mark.parametrize(
    "parts",
    [("pop909", "001.mid"), ("edge", "partitura_tests", "bach_midi_score.mid"), ("pop909", "002.mid")],
)
def test_step_table_reencodes_to_the_same_events(tok, parts):
    ev, _ = tok.events(read_notes(corpus_dir(*parts)))
    table, src = fim.events_to_table(tok, ev)
    assert len(table) == int((tok.vocab.kind[ev] == tok.vocab.k("pitch")).sum())
    assert np.array_equal(tok.events(table)[0], ev)


def test_span_examples_are_the_window_rearranged(tok):
    ids = np.array([tok.bos_id, *tok.encode(corpus_dir("pop909", "003.mid"))[:400]])
    r = fim.Rearranger(tok, rate=1.0, track_share=0.0)
    S, M, E, _ = fim.sentinel_ids(tok).tolist()
    seen = 0
    for seed in range(20):
        x, y = r(ids, np.random.default_rng(seed))
        seq = np.append(x, y[-1])
        assert len(seq) <= len(ids) and np.array_equal(seq[1:][y != -100], y[y != -100])
        if E not in seq:  # trimmed: the window was full before FIM_END
            continue
        seen += 1
        s, m, e = (int(np.flatnonzero(seq == k)[0]) for k in (S, M, E))
        assert s < m < e == len(seq) - 1
        prefix, middle = seq[:s], seq[m + 1 : e]
        # The middle continues the prefix exactly as in the piece: the two read as the window's start.
        assert np.array_equal(np.concatenate([prefix, middle]), ids[: len(prefix) + len(middle)])
        # The suffix, measured from the prefix's end, holds the notes after the middle at their true times.
        n_before = len(prefix) + len(middle)
        suffix_ev = tok.base_events(seq[s + 1 : m])
        t_pre = fim.shift_total(tok, prefix)
        whole, _ = fim.events_to_table(tok, tok.base_events(ids))
        after, _ = fim.events_to_table(tok, tok.base_events(ids[n_before:]))
        suf, _ = fim.events_to_table(tok, suffix_ev)
        n = max(
            len(suf) - 1, 0
        )  # the suffix may have given way at its end (its last note may lack its DURATION)
        assert n <= len(after) and len(whole) >= len(suf)
        t_mid = fim.shift_total(tok, ids[:n_before])
        assert np.array_equal(suf.time[:n] + t_pre, after.time[:n] + t_mid)
        assert np.array_equal(suf.pitch[:n], after.pitch[:n])
        assert (y == -100).sum() == 2  # no loss on FIM_SUFFIX / FIM_MIDDLE, which the user supplies
    assert seen >= 10


def test_track_examples_write_one_track_given_others(tok):
    ids = np.array(tok.encode(corpus_dir("pop909", "001.mid"))[1000:1400])
    r = fim.Rearranger(tok, rate=1.0, track_share=1.0)
    _, M, E, T = fim.sentinel_ids(tok).tolist()
    whole, _ = fim.events_to_table(tok, tok.base_events(ids))
    for seed in range(10):
        x, y = r(ids, np.random.default_rng(seed))
        seq = np.append(x, y[-1])
        assert seq[0] == T and len(seq) <= len(ids)
        m = int(np.flatnonzero(seq == M)[0])
        stop = int(np.flatnonzero(seq == E)[0]) if E in seq else len(seq)
        ctx, _ = fim.events_to_table(tok, tok.base_events(seq[1:m]))
        tgt, _ = fim.events_to_table(tok, tok.base_events(seq[m + 1 : stop]))
        p, i = int(tgt.program[0]), int(tgt.track[0])
        assert set(zip(tgt.program.tolist(), tgt.track.tolist(), strict=True)) == {(p, i)}
        assert (p, i) not in set(zip(ctx.program.tolist(), ctx.track.tolist(), strict=True))
        mine = (whole.program == p) & (whole.track == i)
        n = len(tgt)
        assert np.array_equal(tgt.time, whole.time[mine][:n]) and np.array_equal(
            tgt.pitch, whole.pitch[mine][:n]
        )
        assert (y[m : m + 2] == -100).all()  # the PROGRAM/TRACK header is given, not learnt


def test_short_windows_whose_given_tracks_fill_them_stay_ordinary(tok):
    """A track example is cut to the window's planned length; when the given tracks alone fill it, the
    FIM_MIDDLE sentinel is cut away and the window must stay ordinary (this crashed the demo's first epoch)."""
    notes = read_notes(corpus_dir("pop909", "001.mid"))
    ids = np.concatenate([[tok.bos_id], tok.encode_notes(notes), [tok.eos_id]]).astype(np.int64)
    r = fim.Rearranger(tok, rate=1.0, track_share=1.0)
    made = left = 0
    for length in (24, 48, 96):
        for start in range(0, len(ids) - length, 37):
            w = ids[start : start + length + 1]
            for s in range(3):
                out = r(w, np.random.default_rng([s, start, length]))
                if out is None:
                    left += 1
                    continue
                x, y = out
                assert len(x) == len(y) <= len(w) - 1
                at = np.flatnonzero(x == r.middle)
                assert len(at) == 1 and (y[at[0] :] != -100).any()  # something after FIM_MIDDLE to learn
                made += 1
    assert made > 100 and left > 0


def test_rearrangement_is_seeded_and_on_by_default(tok):
    r = fim.from_config(RunConfig(num_epochs=1, ckpt_path="x"), tok)
    assert r is not None and r.rate == 0.5
    assert fim.from_config(RunConfig(num_epochs=1, ckpt_path="x", infill_rate=0.0), tok) is None
    ids = np.array(tok.encode(corpus_dir("pop909", "004.mid"))[:300])
    a = [r(ids, r.rng(1, 2, i)) for i in range(12)]
    b = [r(ids, r.rng(1, 2, i)) for i in range(12)]
    assert all((x is None and y is None) or np.array_equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert 2 <= sum(x is not None for x in a) <= 10


def test_dataset_rearranges_some_windows_reproducibly(tok, tmp_path):
    from midiforge.data.dataset import MidiDataset

    files = [corpus_dir("pop909", f"00{i}.mid") for i in (1, 2)]
    ds = MidiDataset(files, tok, 32, 256, cache_dir=tmp_path, augment=False, seed=3, num_workers=0)
    plain = [ds[i] for i in range(len(ds))]
    ds.infill = fim.Rearranger(tok, rate=0.5)
    sent = set(fim.sentinel_ids(tok).tolist())
    items = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(items, again, strict=True))
    changed = [i for i in range(len(ds)) if not torch.equal(items[i][0], plain[i][0])]
    assert 0.25 * len(ds) < len(changed) < 0.75 * len(ds)
    for i in range(len(ds)):
        assert len(items[i][0]) <= ds.lengths[i] and (i in changed) == bool(set(items[i][0].tolist()) & sent)
    ds.set_epoch(1)  # another epoch, other examples
    assert any(not torch.equal(ds[i][0], items[i][0]) for i in changed)


# ------------------------------------------------------------------------------------------- infill.py
def test_span_infill_keeps_everything_outside_over_many_seeds_across_windows(tok, monkeypatch):
    score = pop()  # ~3,000 tokens: far longer than the 96-token context
    piece = infill.Piece.from_score(tok, score)
    bars = piece.bars
    step = score.ticks_per_quarter // tok.config.steps_per_quarter
    rounds = []
    run = infill._Sampler.run
    monkeypatch.setattr(
        infill._Sampler, "run", lambda s, seq, until: rounds.append(len(seq)) or run(s, seq, until)
    )
    model = tiny_model(tok)
    changed = 0

    def outside(notes):  # by the grid step the tokenizer puts each onset on, as the edit decides
        on = to_grid(np.array([n[3] for n in notes], np.int64), score.ticks_per_quarter, 12)
        keep = ~(((on >= bars[19]) & (on < bars[23])) | ((on >= bars[39]) & (on < bars[40])))
        return [n for n, k in zip(notes, keep, strict=True) if k]

    for seed in range(6):
        out = infill.edit(
            model, tok, score, infill.Request(infill=["20-23", "40"]), seed=seed, max_new_tokens=48
        )
        assert outside(note_set(out)) == outside(note_set(score))  # exactly the input's, not a re-encoding
        assert maps(out) == maps(score) and out.ticks_per_quarter == score.ticks_per_quarter
        assert out.end() <= score.end() + step
        changed += note_set(out) != note_set(score)
    assert changed == 6
    assert max(rounds) <= 96 and len(rounds) > 12  # the context filled up: the window slid within a span


def test_track_edits_keep_the_other_tracks(tok):
    score = chorale()
    model = tiny_model(tok, max_seq_len=256)

    def notes(track):
        return [(n.time, n.duration, n.pitch, n.velocity) for n in track.notes]

    for seed in range(2):
        out = infill.edit(model, tok, score, infill.Request(replace_track="2"), seed=seed, max_new_tokens=200)
        assert len(out.tracks) == 2 and notes(out.tracks[0]) == notes(score.tracks[0])
        assert maps(out) == maps(score) and out.end() <= score.end()
        out = infill.edit(
            model, tok, score, infill.Request(add_tracks=["cello"]), seed=seed, max_new_tokens=200
        )
        assert [notes(t) for t in out.tracks[:2]] == [notes(t) for t in score.tracks]
        new = out.tracks[2:]
        assert all(t.program == 42 for t in new) and sum(len(t.notes) for t in new) > 0


def test_harmonize_writes_voices_under_the_melody(tok, tmp_path):
    melody = chorale()
    melody.tracks = melody.tracks[:1]
    model = tiny_model(tok, max_seq_len=256)
    out = infill.edit(model, tok, melody, infill.Request(harmonize=3), seed=0, max_new_tokens=16)
    assert note_set(out, tracks=[melody.tracks[0].name]) == note_set(melody)
    assert len(out.tracks) == 4 and {t.program for t in out.tracks} == {melody.tracks[0].program}


def test_sentinels_never_drawn_or_decoded(tok):
    s = fim.sentinel_ids(tok).tolist()
    model = Favouring(tiny_model(tok), s)  # sentinels are by far the likeliest tokens
    g = generate(model, tok, pop("005.mid"), prompt_bars=2, max_new_tokens=20, seed=0)[0]
    assert not set(g.ids[g.num_prompt_tokens :]) & set(s) and g.num_new_tokens == 20
    # Editing: FIM_END is what the model may say to end a span; the other three are never drawn.
    sampler = infill._Sampler(model, tok, "cpu", torch.Generator().manual_seed(0), {}, True, 20)
    new, why = sampler.run([tok.bos_id, s[fim.FIM_SUFFIX], s[fim.FIM_MIDDLE]], 10_000)
    assert why == "end" and new == []
    others = Favouring(tiny_model(tok), [s[fim.FIM_SUFFIX], s[fim.FIM_MIDDLE], s[fim.FIM_TRACKS]])
    sampler = infill._Sampler(others, tok, "cpu", torch.Generator().manual_seed(0), {}, True, 20)
    new, why = sampler.run([tok.bos_id, s[fim.FIM_SUFFIX], s[fim.FIM_MIDDLE]], 10_000)
    assert why in ("max", "time", "end") and not set(new) & set(s)
    # And what an edit writes decodes to plain notes of the piece's own tracks' kind: nothing else.
    score = chorale()
    out = infill.edit(others, tok, score, infill.Request(infill=["2-3"]), seed=0, max_new_tokens=20)
    assert note_set(out, 0, 0) and tok.encode(out) and not set(tok.encode(out)) & set(s)


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(tok)
    (d / "config.json").write_text(
        json.dumps({"model": model.config.to_dict(), "train": {"infill_rate": 0.5}})
    )
    torch.save(model.state_dict(), d / "model.pth")
    tok.save(d / "tokenizer.json")
    return d


def test_cli_infill_writes_the_edit(ckpt, tmp_path, tok, capsys):
    prompt = tmp_path / "in.mid"
    chorale().dump_midi(str(prompt))
    out = tmp_path / "out.mid"
    argv = ["generate", str(ckpt), "-o", str(out), "--prompt", str(prompt), "--infill", "3-4", "--seed", "1"]
    assert main([*argv, "--max-tokens", "30"]) == 0
    got = symusic.Score(str(out))
    assert maps(got)[1] == maps(stored(tok, chorale()))[1] and got.note_num() > 0
    assert "--infill" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra",
    [
        ["--infill", "3-400"],  # beyond the end
        ["--infill", "0-2"],
        ["--infill", "x"],
        ["--replace-track", "9"],  # no such track
        ["--replace-track", "no such name"],
        ["--harmonize"],  # the prompt has several tracks
        ["--add-track", "kazoo"],
        ["--infill", "2", "--add-track", "cello"],  # two kinds at once
        ["--infill", "2", "--key", "C major"],
    ],
)
def test_cli_bad_requests_exit_2(ckpt, tmp_path, extra, capsys):
    prompt = tmp_path / "in.mid"
    chorale().dump_midi(str(prompt))
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "x.mid"), "--prompt", str(prompt), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("midiforge generate: error:") and err.count("\n") == 1
    assert not (tmp_path / "x.mid").exists()


def test_cli_refuses_checkpoints_without_infilling(ckpt, tmp_path, capsys):
    prompt = tmp_path / "in.mid"
    chorale().dump_midi(str(prompt))
    no = tmp_path / "no_infill"
    no.mkdir()
    for name in ("model.pth", "tokenizer.json"):
        (no / name).write_bytes((ckpt / name).read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    for train in ({"infill_rate": 0.0}, {}):  # --infill-rate 0, and a checkpoint from before the option
        cfg["train"] = train
        (no / "config.json").write_text(json.dumps(cfg))
        argv = ["generate", str(no), "-o", str(tmp_path / "x.mid"), "--prompt", str(prompt), "--infill", "2"]
        assert main(argv) == 2
        assert "trained without infilling" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "x.mid"), "--infill", "2"]) == 2  # no --prompt
