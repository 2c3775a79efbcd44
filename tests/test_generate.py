import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from conftest import color_mask, corpus_dir, read_png, read_wav
from conftest import tiny_model as _tiny_model

from midiforge.cli import main
from midiforge.generate.command import output_paths
from midiforge.generate.core import generate
from midiforge.generate.sampling import sample
from midiforge.model import ModelConfig
from midiforge.notes.scoretime import clip_seconds
from midiforge.tokens.tokenizer import MidiTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> MidiTokenizer:
    return MidiTokenizer()


tiny_model = functools.partial(_tiny_model, max_seq_len=64)


def melody(num_bars=4, tpq=480) -> symusic.Score:
    s = symusic.Score(tpq)
    s.tempos.append(symusic.Tempo(0, 100.0))
    s.time_signatures.append(symusic.TimeSignature(0, 3, 4))
    t = symusic.Track("lead", program=40)
    for i in range(num_bars * 3):
        t.notes.append(symusic.Note(i * tpq, tpq // 2, 60 + (i * 5) % 12, 80))
    s.tracks.append(t)
    return s


def note_arrays(track) -> np.ndarray:
    a = track.notes.numpy()
    return np.stack([a["time"], a["duration"], a["pitch"], a["velocity"]], axis=1)


# --- sample ----------------------------------------------------------------------------------------------


def test_sample_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(500, 1)
    assert (sample(logits, top_k=1, generator=g) == 1).all()
    assert (sample(logits, top_p=0.01, generator=g) == 1).all()
    drawn = sample(logits, top_k=2, generator=g)
    assert set(drawn.tolist()) == {1, 3}
    drawn = sample(logits, temperature=100.0, generator=g)  # nearly uniform
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    banned = logits.clone()
    banned[:, 1] = float("-inf")
    assert not (sample(banned, generator=g) == 1).any()


def test_sample_frequencies_follow_probabilities():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.1, 0.6, 0.3])
    drawn = sample(probs.log().repeat(20000, 1), generator=g)
    freq = torch.bincount(drawn, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


# --- generate --------------------------------------------------------------------------------------------


def test_seeded_determinism(tok):
    model = tiny_model(tok)
    a = generate(model, tok, max_new_tokens=40, seed=7, num_samples=2, ignore_eos=True)
    b = generate(model, tok, max_new_tokens=40, seed=7, num_samples=2, ignore_eos=True)
    c = generate(model, tok, max_new_tokens=40, seed=8, num_samples=2, ignore_eos=True)
    assert [r.ids for r in a] == [r.ids for r in b]
    assert [r.ids for r in a] != [r.ids for r in c]
    assert a[0].ids != a[1].ids  # samples of a batch differ
    assert all(r.num_new_tokens == 40 and r.stop_reason == "max_tokens" for r in a)


def test_kv_cache_matches_full_recomputation_with_sliding_window(tok):
    model = tiny_model(tok, max_seq_len=24)
    kw = dict(
        prompt=melody(), max_new_tokens=60, seed=3, num_samples=3, temperature=1.3, top_k=50, top_p=0.95
    )
    cached = generate(model, tok, use_kv_cache=True, **kw)
    full = generate(model, tok, use_kv_cache=False, **kw)
    assert [r.ids for r in cached] == [r.ids for r in full]


def test_sliding_window_beyond_max_seq_len(tok):
    model = tiny_model(tok, max_seq_len=16)
    prompt = melody(num_bars=8)
    (r,) = generate(model, tok, prompt, max_new_tokens=70, seed=0, ignore_eos=True)
    assert r.num_prompt_tokens > 16  # even the prompt alone is longer than the window
    assert r.num_new_tokens == 70


@pytest.mark.parametrize("source", ["melody", "pop909"])
def test_prompt_notes_come_back_unchanged(tok, source):
    if source == "pop909":
        prompt = symusic.Score(str(corpus_dir("pop909", "001.mid")))
    else:
        prompt = melody(num_bars=8)
    model = tiny_model(tok)
    results = generate(model, tok, prompt, prompt_bars=4, max_new_tokens=30, seed=1, num_samples=2)
    ts = prompt.time_signatures[0] if len(prompt.time_signatures) else None
    bar = prompt.ticks_per_quarter * 4 * (ts.numerator / ts.denominator if ts else 1)
    expected = tok.decode(tok.encode(prompt.clip(0, int(4 * bar))))
    assert expected.note_num() > 0
    for r in results:
        # Tracks by name: with track identity (events v4) POP909's three program-0 tracks stay three tracks.
        out = {(t.name, t.program, t.is_drum): t for t in r.score.tracks}
        for t in expected.tracks:
            got = note_arrays(out[(t.name, t.program, t.is_drum)])
            np.testing.assert_array_equal(got[: len(t.notes)], note_arrays(t))


def test_max_seconds_clips_and_stops(tok):
    model = tiny_model(tok)
    results = generate(
        model, tok, max_new_tokens=400, max_seconds=3.0, seed=2, num_samples=2, ignore_eos=True
    )
    for r in results:
        assert r.stop_reason == "max_seconds"
        assert r.score.to("second").end() <= 3.0 + 1e-3


def test_clip_seconds_drops_late_notes_keeps_early_ones():
    s = melody(num_bars=4)  # 100 qpm: a quarter is 0.6 s; notes of 0.3 s at 0, 0.6, 1.2, 1.8 s, ...
    clipped = clip_seconds(s, 1.5)  # the third note ends at exactly 1.5 s: nothing to shorten
    assert [(n.time, n.duration) for n in clipped.tracks[0].notes] == [(0, 240), (480, 240), (960, 240)]
    assert clipped.to("second").end() == pytest.approx(1.5, abs=1e-3)


def test_clip_seconds_shortens_notes_crossing_the_limit_under_a_tempo_change():
    tpq = 480
    s = symusic.Score(tpq)
    s.tempos.append(symusic.Tempo(0, 120.0))  # a quarter is 0.5 s up to tick 960 (1.0 s) ...
    s.tempos.append(symusic.Tempo(2 * tpq, 60.0))  # ... then 1 s: 2.5 s is tick 960 + 1.5 * 480 = 1680
    lead = symusic.Track("lead", program=0)
    for time, dur, pitch in [
        (0, 480, 60),  # ends at 0.5 s: untouched
        (0, 3840, 62),  # held across the tempo change and the limit: cut to end at 2.5 s
        (1440, 480, 64),  # starts at 2.0 s, would end at 3.0 s: cut from 480 to 240 ticks
        (1680, 480, 65),  # starts exactly at the limit: dropped
        (2400, 120, 67),  # starts after it: dropped
    ]:
        lead.notes.append(symusic.Note(time, dur, pitch, 80))
    bass = symusic.Track("bass", program=33)
    bass.notes.append(symusic.Note(1200, 960, 40, 90))  # 1.5 s to 3.5 s: cut to 1.0 s
    drums = symusic.Track("drums", program=0, is_drum=True)
    drums.notes.append(symusic.Note(1679, 100, 36, 100))  # starts one tick before the limit: 1 tick left
    s.tracks.extend([lead, bass, drums])
    before = [note_arrays(t).copy() for t in s.tracks]

    clipped = clip_seconds(s, 2.5)

    lead, bass, drums = clipped.tracks
    assert [(n.time, n.duration, n.pitch) for n in lead.notes] == [
        (0, 480, 60),
        (0, 1680, 62),
        (1440, 240, 64),
    ]
    assert [(n.time, n.duration) for n in bass.notes] == [(1200, 480)]
    assert [(n.time, n.duration) for n in drums.notes] == [(1679, 1)]
    assert [n.velocity for n in lead.notes] == [80, 80, 80] and drums.is_drum and bass.program == 33
    # In seconds: every note now ends by 2.5 s, the shortened ones exactly there.
    sec = clipped.to("second")
    ends = [[(round(n.time, 4), round(n.end, 4)) for n in t.notes] for t in sec.tracks]
    assert ends[0] == [(0.0, 0.5), (0.0, 2.5), (2.0, 2.5)]
    assert ends[1] == [(1.5, 2.5)]
    assert sec.end() == pytest.approx(2.5, abs=1e-6)
    assert [(t.time, t.qpm) for t in clipped.tempos] == [(0, 120.0), (960, 60.0)]
    for track, notes in zip(s.tracks, before, strict=True):  # the input score is left as it was
        np.testing.assert_array_equal(note_arrays(track), notes)


class EosModel(torch.nn.Module):
    """Stands in for a Transformer: row 0 wants EOS after 3 new tokens, other rows never do."""

    def __init__(self, vocab_size, eos_id, prompt_len):
        super().__init__()
        self.config = ModelConfig(
            vocab_size=vocab_size, n_layer=1, n_head=1, d_model=2, d_ff=2, max_seq_len=64
        )
        self.eos_id, self.prompt_len, self.seen = eos_id, prompt_len, 0

    def new_kv_cache(self, batch_size, max_len=None):
        return None

    def forward(self, idx, kv_cache=None, last_only=False):
        self.seen = idx.size(1) if self.seen == 0 else self.seen + 1
        logits = torch.zeros(idx.size(0), 1, self.config.vocab_size)
        logits[:, :, self.eos_id] = -100.0
        if self.seen >= self.prompt_len + 3:
            logits[0, :, self.eos_id] = 100.0
        return logits


def test_per_sample_eos_stopping(tok):
    model = EosModel(len(tok), tok.eos_id, prompt_len=1)
    r0, r1 = generate(model, tok, max_new_tokens=20, num_samples=2, seed=0)
    assert r0.stop_reason == "eos" and r0.ids[-1] == tok.eos_id and r0.num_new_tokens == 4
    assert r1.stop_reason == "max_tokens" and r1.num_new_tokens == 20
    assert tok.pad_id not in r1.ids and tok.eos_id not in r1.ids


def test_bad_settings_raise_value_error(tok):
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="temperature.*top-p"):
        generate(model, tok, temperature=0, top_p=2.0)


# --- CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(tok)
    (d / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "train": {}}))
    torch.save(model.state_dict(), d / "model.pth")
    tok.save(d / "tokenizer.json")
    return d


def test_cli_writes_midi_wav_and_pianoroll(ckpt, tmp_path, capsys):
    prompt = tmp_path / "prompt.mid"
    melody().dump_midi(str(prompt))
    out = tmp_path / "song.mid"
    argv = ["generate", str(ckpt), "-o", str(out), "--prompt", str(prompt), "--prompt-bars", "2"]
    argv += [
        "--max-tokens",
        "40",
        "--max-seconds",
        "6",
        "--seed",
        "5",
        "-n",
        "2",
        "--wav",
        "--pianoroll",
        "--top-k",
        "20",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    # The same generation through the API: the files must hold exactly these notes.
    from midiforge.checkpoint import load_inference

    model, tokenizer = load_inference(ckpt)
    expected = generate(
        model,
        tokenizer,
        symusic.Score(str(prompt)),
        prompt_bars=2,
        max_new_tokens=40,
        max_seconds=6.0,
        seed=5,
        num_samples=2,
        top_k=20,
    )
    assert expected[0].ids != expected[1].ids
    from midiforge.generate.core import prompt_ids

    head_end = tokenizer.decode(prompt_ids(tokenizer, symusic.Score(str(prompt)), 2)).to("second").end()
    for i, want in enumerate(expected, start=1):
        path = tmp_path / f"song_{i}.mid"
        score = symusic.Score(str(path))
        assert score.note_num() >= 6  # at least the 2 prompt bars
        # --max-seconds counts the new music: the prompt is never cut.
        assert head_end - 1e-2 <= score.to("second").end() <= head_end + 6.0 + 1e-2
        assert _notes_by_track(score) == _notes_by_track(want.score)

        # What the command printed about this file agrees with the file.
        (line,) = [ln for ln in printed.splitlines() if ln.startswith(f"{path}: ")]
        m = re.match(
            r".*?: (\d+) notes, ([\d.]+) s, (\d+) new tokens .*?, (\d+) skipped-invalid events; (.*)", line
        )
        assert m, line
        assert int(m[1]) == score.note_num() == want.score.note_num()
        assert float(m[2]) == pytest.approx(score.to("second").end(), abs=0.05)
        assert (int(m[3]), int(m[4])) == (want.num_new_tokens, want.num_skipped)

        # The WAV: as long as the music (plus a release tail), audible, peak-normalised and unclipped.
        wav = tmp_path / f"song_{i}.wav"
        assert f"{wav} (" in m[5]
        backend = m[5].split(f"{wav} (")[1].split(")")[0]
        pcm, rate = read_wav(wav)
        assert rate == 44100
        seconds, wav_seconds = score.to("second").end(), len(pcm) / rate
        assert seconds <= wav_seconds <= seconds + (1.0 if backend == "builtin" else 4.0), backend
        x = pcm.astype(np.float64) / 32767
        assert np.abs(x).max() == pytest.approx(10 ** (-1 / 20), abs=2e-3)  # -1 dBFS: never full scale
        assert np.sqrt(np.mean(x**2)) > 0.01  # not silent

        # The piano roll: the figure's size, and the first track's colour drawn on it.
        png = tmp_path / f"song_{i}.png"
        assert str(png) in m[5]
        img = read_png(png)
        assert img.shape == (500, 1200, 3)
        assert color_mask(img, "tab:blue").sum() > 50
    assert not list(tmp_path.glob(".*tmp*"))


def _notes_by_track(score: symusic.Score) -> dict:
    """{(program, is_drum): [(time, duration, pitch, velocity), ...]} for a comparison of two scores."""
    return {(t.program, t.is_drum): note_arrays(t).tolist() for t in score.tracks if len(t.notes)}


def test_cli_no_kv_cache_gives_same_file(ckpt, tmp_path):
    args = ["--max-tokens", "30", "--seed", "9", "--ignore-eos"]
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "a.mid"), *args]) == 0
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "b.mid"), "--no-kv-cache", *args]) == 0
    assert (tmp_path / "a.mid").read_bytes() == (tmp_path / "b.mid").read_bytes()


@pytest.mark.parametrize(
    "extra",
    [
        ["--temperature", "0"],
        ["--top-p", "1.5"],
        ["--top-p", "0"],
        ["--top-k", "0"],
        ["--max-tokens", "0"],
        ["--max-seconds", "-1"],
        ["-n", "0"],
        ["--prompt-bars", "2"],  # without --prompt
        ["--prompt", "/nonexistent.mid"],
        ["--device", "nonsense"],
    ],
)
def test_cli_bad_arguments_exit_2(ckpt, tmp_path, extra, capsys):
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "x.mid"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("midiforge generate: error:") and err.count("\n") == 1
    assert not (tmp_path / "x.mid").exists()


def test_cli_bad_checkpoints_exit_2(tmp_path, tok, ckpt):
    assert main(["generate", str(tmp_path / "missing"), "-o", str(tmp_path / "x.mid")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.pth", "tokenizer.json"):
        (bad / name).write_bytes((ckpt / name).read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["vocab_size"] += 1  # does not fit the tokenizer
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(bad), "-o", str(tmp_path / "x.mid")]) == 2
    corrupt = tmp_path / "prompt.mid"
    corrupt.write_bytes(b"MThd garbage")
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "x.mid"), "--prompt", str(corrupt)]) == 2


def test_output_paths():
    assert output_paths("out.mid", 1) == [Path("out.mid")]
    assert output_paths("d/out.mid", 2) == [Path("d/out_1.mid"), Path("d/out_2.mid")]
    assert output_paths("out", 1) == [Path("out.mid")]


def test_a_generation_has_one_tempo_per_tick_and_lasts_as_its_file():
    """A sampled stream may state TEMPO twice at one time (an untrained model does): the later one holds, so the
    seconds reported equal those of the MIDI file written (two tempos at one tick leave the timing to the
    order a writer and reader give them)."""
    import symusic

    from midiforge.generate.core import _one_meta_event_per_tick

    score = symusic.Score(480)
    track = symusic.Track("t", 0, False)
    track.notes.append(symusic.Note(0, 480, 60, 80))
    track.notes.append(symusic.Note(1920, 480, 62, 80))
    score.tracks.append(track)
    for time, qpm in ((0, 40.0), (0, 300.0), (960, 300.0), (960, 40.0)):
        score.tempos.append(symusic.Tempo(time, qpm))
    out = _one_meta_event_per_tick(score)
    assert [(t.time, round(t.qpm)) for t in out.tempos] == [(0, 300), (960, 40)]
    back = symusic.Score.from_midi(out.dumps_midi())
    assert back.to("second").end() == pytest.approx(out.to("second").end(), abs=1e-3)
