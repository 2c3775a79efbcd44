"""`generate --harmonize` (harmonize.py, joint.py) and the faults of editing found in issue 18.

The four-part rules are constraints of the decoding, not of the weights: they are tested on untrained models,
some of them pushed hard (+50 on the logits) towards the tokens that would break the rules.
"""

import functools

import numpy as np
import pytest
import symusic
import torch
from conftest import corpus_dir
from conftest import tiny_model as _tiny_model
from favouring import Favouring

from midiforge.cli import main
from midiforge.generate import infill
from midiforge.generate.core import generate, prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_model = functools.partial(_tiny_model, max_seq_len=64)  # short: the context slides within a melody


@pytest.fixture(scope="module")
def tok():
    from midiforge.tokens.tokenizer import MidiTokenizer

    return MidiTokenizer()


def favouring(tok, pick, seed=0, max_seq_len=64) -> Favouring:
    """An untrained model whose logits favour the tokens whose base events pass ``pick`` by +50."""
    v = tok.vocab
    ids = [i for i in range(len(tok)) if any(pick(v.kind[e], v.value[e], v) for e in _events(tok, i))]
    return Favouring(tiny_model(tok, seed=seed, max_seq_len=max_seq_len), ids)


def _events(tok, i):
    return tok._flat[tok._offs[i] : tok._offs[i + 1]].tolist()


def high_pitches(k, x, v):
    return k == v.k("pitch") and x >= 76  # above every lower voice's range: crossing and range both tempted


def long_notes(k, x, v):
    return k == v.k("duration") and v.durations[x] >= 48


def chord_tokens(k, x, v):
    return k in (v.k("pitch"), v.k("track"))  # many notes at once, in any track


def melody(n=40, tpq=10080) -> symusic.Score:
    """The top line of a real Bach score (its first ``n`` onsets), resolution, tempo and velocity as a file
    from the chorale corpus has them (10080 ticks per quarter, 96 bpm, velocity 90)."""
    src = symusic.Score(str(corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")))
    a = src.tracks[0].notes.numpy()
    top = {}
    for t, d, p in zip(a["time"].tolist(), a["duration"].tolist(), a["pitch"].tolist(), strict=True):
        if p > top.get(t, (0, -1))[1]:
            top[t] = (d, p)
    s = symusic.Score(tpq)
    s.tempos.append(symusic.Tempo(0, qpm=96.0))
    s.time_signatures.append(symusic.TimeSignature(0, 3, 8))
    track = symusic.Track("Soprano", 0, False)
    scale = tpq / src.ticks_per_quarter
    for t in sorted(top)[:n]:
        d, p = top[t]
        track.notes.append(symusic.Note(int(t * scale), int(d * scale), p, 90))
    s.tracks.append(track)
    return s


def notes(track) -> list:
    return [(n.time, n.duration, n.pitch, n.velocity) for n in track.notes]


def check_voices(out: symusic.Score, given: symusic.Score, names, ranges):
    """The harmonisation rules, on the output file: the melody as given, then the voices named and in order,
    each one note at a time inside its range, never above the voice over it."""
    assert out.ticks_per_quarter == given.ticks_per_quarter
    assert [(t.time, t.mspq) for t in out.tempos] == [(t.time, t.mspq) for t in given.tempos]
    assert [t.name for t in out.tracks] == [given.tracks[0].name, *names]
    assert notes(out.tracks[0]) == notes(given.tracks[0])
    assert {t.program for t in out.tracks} == {given.tracks[0].program}
    lines = []
    for track, (lo, hi) in zip(out.tracks[1:], ranges, strict=True):
        a = track.notes.numpy()
        assert len(a["time"]) > 0 and np.all(np.diff(a["time"]) > 0)  # one note per onset
        assert np.all(a["time"][:-1] + a["duration"][:-1] <= a["time"][1:])  # ...and one at a time
        assert np.all((a["pitch"] >= lo) & (a["pitch"] <= hi))
        lines.append(a)
    mel = out.tracks[0].notes.numpy()
    times = np.unique(np.concatenate([mel["time"], *(a["time"] for a in lines)]))
    for t in times.tolist():  # at every onset, each voice at or below the one over it
        sounding = [_top(mel, t)] + [_top(a, t) for a in lines]
        heard = [p for p in sounding if p >= 0]
        assert heard == sorted(heard, reverse=True), (t, sounding)


def _top(a, t) -> int:
    on = (a["time"] <= t) & (a["time"] + a["duration"] > t)
    return int(a["pitch"][on].max()) if on.any() else -1


SATB = [(55, 74), (48, 67), (40, 60)]


@pytest.mark.parametrize("pick", [None, high_pitches, long_notes, chord_tokens])
def test_voices_keep_the_rules_whatever_the_model(tok, pick):
    model = tiny_model(tok) if pick is None else favouring(tok, pick)
    given = melody()
    for seed in range(2):
        out = infill.edit(model, tok, given, infill.Request(harmonize="3"), seed=seed, max_new_tokens=300)
        check_voices(out, given, ["Alto", "Tenor", "Bass"], SATB)


def test_voice_ranges_and_count_are_the_users(tok):
    given = melody(24)
    request = infill.Request(harmonize="2", voice_ranges="C4-A4,40-52")
    out = infill.edit(favouring(tok, high_pitches), tok, given, request, seed=0, max_new_tokens=200)
    check_voices(out, given, ["Tenor", "Bass"], [(60, 69), (40, 52)])


def test_harmonizing_is_reproducible_and_joint(tok):
    given = melody(24)
    request = infill.Request(harmonize="3")
    runs = [infill.edit(tiny_model(tok), tok, given, request, seed=3, max_new_tokens=200) for _ in range(2)]
    assert [notes(t) for t in runs[0].tracks] == [notes(t) for t in runs[1].tracks]
    first = min(n.time for n in given.tracks[0].notes)
    assert all(t.notes[0].time == first for t in runs[0].tracks[1:])  # every voice enters with the melody


@pytest.fixture
def ckpt(tok, tmp_path):
    """An untrained checkpoint trained without infilling: harmonising does not need the sentinels."""
    import json

    d = tmp_path / "ckpt"
    d.mkdir()
    model = tiny_model(tok)
    (d / "config.json").write_text(
        json.dumps({"model": model.config.to_dict(), "train": {"infill_rate": 0.0}})
    )
    torch.save(model.state_dict(), d / "model.pth")
    tok.save(d / "tokenizer.json")
    return d


def test_cli_harmonizes_a_melody(ckpt, tmp_path, capsys):
    prompt, out = tmp_path / "melody.mid", tmp_path / "out.mid"
    melody(16).dump_midi(str(prompt))
    argv = ["generate", str(ckpt), "-o", str(out), "--prompt", str(prompt), "--harmonize", "--seed", "0"]
    assert main([*argv, "--voice-ranges", "G3-D5,C3-G4,E2-C4", "--max-tokens", "120"]) == 0
    check_voices(symusic.Score(str(out)), symusic.Score(str(prompt)), ["Alto", "Tenor", "Bass"], SATB)
    assert "--harmonize" in capsys.readouterr().out


def test_cli_track_edits_need_no_infilling_checkpoint(ckpt, tmp_path):
    """--replace-track and --add-track write the ordinary stream (joint.py), like --harmonize: a checkpoint
    trained without infilling will do."""
    prompt, out = tmp_path / "two.mid", tmp_path / "out.mid"
    given = melody(16)
    bass = given.tracks[0].copy()
    bass.name = "Bass"
    for n in bass.notes:
        n.pitch -= 24
    given.tracks.append(bass)
    given.dump_midi(str(prompt))
    for edit in (["--replace-track", "Bass"], ["--add-track", "cello"]):
        argv = ["generate", str(ckpt), "-o", str(out), "--prompt", str(prompt), *edit, "--seed", "0"]
        assert main([*argv, "--max-tokens", "200"]) == 0
        got = symusic.Score(str(out))
        assert notes(got.tracks[0]) == notes(given.tracks[0])
        assert len(got.tracks) == (2 if edit[0] == "--replace-track" else 3) and got.tracks[-1].notes


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--harmonize", "MELODY.mid"], "--prompt"),  # fault 1: the melody given to --harmonize
        (["--harmonize", "5"], "--voice-ranges"),
        (["--harmonize", "--voice-ranges", "60-50,40-45,30-35"], "downwards"),
        (["--harmonize", "--voice-ranges", "G3-D5"], "1 range(s) for 3 voice(s)"),
        (["--infill", "2", "--voice-ranges", "G3-D5"], "go with --harmonize"),
    ],
)
def test_cli_bad_harmonize_requests_say_what_to_do(ckpt, tmp_path, extra, says, capsys):
    prompt = tmp_path / "melody.mid"
    melody(8).dump_midi(str(prompt))
    argv = ["generate", str(ckpt), "-o", str(tmp_path / "x.mid"), "--prompt", str(prompt), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("midiforge generate: error:") and err.count("\n") == 1 and says in err
    assert not (tmp_path / "x.mid").exists()


# ------------------------------------------------------------------------------------------- faults 2-4
def stored_notes(score: symusic.Score) -> list:
    return sorted((t.name, *row) for t in score.tracks for row in notes(t))


def test_a_continued_prompt_comes_back_as_stored(tok):
    """Fault 2: a DURATION right after the prompt's last PITCH (whose duration was left to the sticky value)
    lengthened that note."""
    score = symusic.Score(str(corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")))  # in 3/8
    head = prompt_ids(tok, score, prompt_bars=8)
    plain = tok.encode(score.clip(0, 8 * 3 * score.ticks_per_quarter // 2))
    v = tok.vocab
    assert v.kind[tok.base_events(plain)[-1]] == v.k("pitch")  # the case: the prompt ends on a bare PITCH
    ref = tok.decode([tok.bos_id, *plain])
    model = favouring(tok, lambda k, x, v: k == v.k("duration") and v.durations[x] >= 60)
    for g in generate(model, tok, score, prompt_bars=8, max_new_tokens=6, num_samples=3, seed=0):
        assert tok.base_events(g.ids[len(head) :]).size and g.ids[: len(head)] == head
        kept = tok.decode(head)
        assert stored_notes(kept) == stored_notes(ref)
        got = {(t.name, *row) for t in g.score.tracks for row in notes(t)}
        assert set(stored_notes(ref)) <= got


def test_infilled_notes_end_by_the_span_end(tok):
    """Fault 3: notes written in bars 5-8 rang into bar 9 and overlapped its kept notes."""
    given = symusic.Score(str(corpus_dir("edge", "partitura_tests", "bach_midi_score.mid")))
    piece = infill.Piece.from_score(tok, given)
    lo, hi = (int(piece.bars[k]) * given.ticks_per_quarter // tok.config.steps_per_quarter for k in (4, 8))

    def pick(k, x, v):  # short steps, a few pitches, each note 8 quarters long
        return (
            (k == v.k("shift") and x <= 3)
            or (k == v.k("pitch") and 60 <= x < 65)
            or (k == v.k("duration") and v.durations[x] == 96)
        )

    model = favouring(tok, pick, max_seq_len=256)
    out = infill.edit(model, tok, given, infill.Request(infill=["5-8"]), seed=0, max_new_tokens=120)
    new = [n for t in out.tracks for n in t.notes if lo <= n.time < hi]
    assert new and all(n.time + n.duration <= hi for n in new)


def test_edits_keep_what_they_do_not_edit_exactly(tok):
    """Fault 4: an edit rewrote the tempo (96 → 96.09), velocities (90 → 92) and resolution (10080 → 480)."""
    given = melody(60)
    accomp = given.tracks[0].copy()
    accomp.name = "Bass"
    for n in accomp.notes:
        n.pitch -= 24
        n.velocity = 71
    given.tracks.append(accomp)
    piece = infill.Piece.from_score(tok, given)
    lo, hi = (int(piece.bars[k]) * given.ticks_per_quarter // tok.config.steps_per_quarter for k in (2, 4))
    out = infill.edit(tiny_model(tok), tok, given, infill.Request(infill=["3-4"]), seed=0, max_new_tokens=60)
    assert out.ticks_per_quarter == given.ticks_per_quarter
    assert [(t.time, t.mspq) for t in out.tempos] == [(t.time, t.mspq) for t in given.tempos]
    for a, b in zip(given.tracks, out.tracks, strict=True):
        assert (a.name, a.program) == (b.name, b.program)
        assert [x for x in notes(a) if not lo <= x[0] < hi] == [x for x in notes(b) if not lo <= x[0] < hi]
    out = infill.edit(
        tiny_model(tok), tok, given, infill.Request(replace_track="2"), seed=0, max_new_tokens=20
    )
    assert out.ticks_per_quarter == given.ticks_per_quarter and notes(out.tracks[0]) == notes(given.tracks[0])
