"""Steering generation: --instruments as a hard constraint (untrained models, BPE tokens that merge PROGRAM
events), EOS held back until a minimum, the control prefix, bad control values, and old checkpoints."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from conftest import make_score
from conftest import tiny_model as _tiny_model

from midiforge.checkpoint import load_inference
from midiforge.cli import main
from midiforge.generate.core import generate
from midiforge.generate.steer import DEFAULT_PROMPT_MIN_TOKENS, token_kind_masks
from midiforge.model import ModelConfig
from midiforge.notes.midi import score_to_notes
from midiforge.tokens.controls import key_name, measure, parse_key, program_name
from midiforge.tokens.tokenizer import MidiTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ckpt_v1"


tiny_model = functools.partial(_tiny_model, max_seq_len=96)


def test_masks_follow_the_base_events_of_each_token(bpe_tok):
    masks = token_kind_masks(bpe_tok)
    names = bpe_tok.token_names(range(len(bpe_tok)))
    for i, name in enumerate(names):
        progs = {int(part.split("_")[1]) for part in name.split("+") if part.startswith("PROGRAM_")}
        assert set(np.flatnonzero(masks["program"][i]).tolist()) == progs, name
        assert masks["control"][i] == ("CTL_" in name), name
    merged = [i for i, n in enumerate(names) if "PROGRAM_" in n and "+" in n]
    assert merged  # the constraint is really exercised on merged tokens


@pytest.mark.parametrize("spec, allowed", [("piano,bass", {0, 32}), ("drums, 40", {128, 40}), ("33", {33})])
def test_instruments_are_a_hard_constraint_without_training(bpe_tok, spec, allowed):
    model = tiny_model(bpe_tok)  # untrained: the constraint must not depend on what the model learned
    programs = set()
    for seed in range(6):
        for r in generate(model, bpe_tok, max_new_tokens=120, num_samples=4, seed=seed, ignore_eos=True,
                          controls={"instruments": spec}):  # fmt: skip
            got = {128 if t.is_drum else t.program for t in r.score.tracks if len(t.notes)}
            assert got <= allowed, (seed, got)
            programs |= got
    assert programs  # notes were generated at all


def test_instruments_with_a_prompt_of_other_programs(bpe_tok):
    prompt = make_score(seed=9, num_notes=20, programs=(40,), drums=False)
    model = tiny_model(bpe_tok, seed=1)
    (r,) = generate(
        model, bpe_tok, prompt, max_new_tokens=80, seed=3, ignore_eos=True, controls={"instruments": "0"}
    )
    n_prompt = len(bpe_tok.decode(r.ids[: r.num_prompt_tokens]).tracks[0].notes)
    tracks = {t.program: len(t.notes) for t in r.score.tracks}
    assert tracks.get(40, 0) == n_prompt  # the prompt is kept; every new note is piano
    assert set(tracks) <= {0, 40}


class EosModel(torch.nn.Module):
    """Wants EOS at every step (a model that ends a prompt at once)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = ModelConfig(
            vocab_size=vocab_size, n_layer=1, n_head=1, d_model=2, d_ff=2, max_seq_len=512
        )
        self.eos = 2

    def new_kv_cache(self, batch_size, max_len=None):
        return None

    def forward(self, idx, kv_cache=None, last_only=False):
        logits = torch.zeros(idx.size(0), 1, self.config.vocab_size)
        logits[:, :, self.eos] = 100.0
        return logits


def test_eos_held_back_until_min_new_tokens_and_by_default_after_a_prompt():
    tok = MidiTokenizer()
    model = EosModel(len(tok))
    (r,) = generate(model, tok, max_new_tokens=400, seed=0)
    assert r.num_new_tokens == 1 and r.stop_reason == "eos"  # no prompt, no minimum: as before
    (r,) = generate(model, tok, max_new_tokens=400, seed=0, min_new_tokens=17)
    assert r.num_new_tokens == 18 and r.ids[-1] == tok.eos_id and tok.eos_id not in r.ids[:-1]
    prompt = make_score(seed=1, num_notes=30)
    (r,) = generate(model, tok, prompt, max_new_tokens=400, seed=0)
    assert r.num_new_tokens == DEFAULT_PROMPT_MIN_TOKENS + 1 and r.stop_reason == "eos"


def test_eos_held_back_until_min_seconds():
    tok = MidiTokenizer()
    model = EosModel(len(tok))
    (r,) = generate(model, tok, max_new_tokens=2000, seed=0, min_seconds=4.0)
    assert r.stop_reason == "eos" and r.seconds >= 4.0


def test_control_prefix_follows_bos_and_is_never_sampled(bpe_tok):
    model = tiny_model(bpe_tok)
    c = {"key": "D minor", "time_sig": "3/4", "tempo": 90, "density": "low", "polyphony": "high"}
    (r,) = generate(model, bpe_tok, max_new_tokens=60, seed=0, ignore_eos=True, controls=c)
    names = bpe_tok.token_names(r.ids)
    assert names[0] == "<bos>" and names[1:6] == ["CTL_TEMPO_3", "CTL_TIMESIG_14", "CTL_KEY_5", "CTL_DENSITY_0",
                                                   "CTL_POLY_2"]  # fmt: skip
    assert not any("CTL_" in n for n in names[r.num_prompt_tokens :])


def _piece(qpm, time_sig, chord, per_bar, bars, program, key_sig=None) -> symusic.Score:
    """``bars`` bars of ``chord`` struck ``per_bar`` times a bar, each held until the next."""
    tpq = 480
    s = symusic.Score(tpq)
    s.tempos.append(symusic.Tempo(0, qpm=qpm))
    s.time_signatures.append(symusic.TimeSignature(0, *time_sig))
    if key_sig is not None:
        s.key_signatures.append(symusic.KeySignature(0, *key_sig))
    step = tpq * 4 * time_sig[0] // time_sig[1] // per_bar
    track = symusic.Track("t", program, False)
    for i in range(bars * per_bar):
        for pitch in chord:
            track.notes.append(symusic.Note(i * step, step, pitch, 80))
    s.tracks.append(track)
    return s


@pytest.mark.parametrize(
    "piece, expected",
    [
        # C major triads under a D minor key signature: the signature names the key. 9 notes a bar, 3 at once.
        (_piece(100, (3, 4), (60, 64, 67), 3, 8, 0, key_sig=(-1, 1)),
         dict(instruments=(0,), tempo="90-104 bpm", time_sig="3/4", key="D minor", density="low",
              polyphony="medium")),
        # No signature: the key is estimated from the pitches (A minor triads). 24 notes a bar, 3 at once.
        (_piece(150, (4, 4), (57, 60, 64), 8, 4, 33),
         dict(instruments=(33,), tempo="134-156 bpm", time_sig="4/4", key="A minor", density="high",
              polyphony="medium")),
        # Four voices in 6/8 at 60 bpm, 8 chords a bar: 32 notes a bar, 4 at once.
        (_piece(60, (6, 8), (45, 57, 60, 64), 8, 4, 52),
         dict(instruments=(52,), tempo="60-76 bpm", time_sig="6/8", key="A minor", density="high",
              polyphony="high")),
        # One note at a time, 4 a bar: sparse and monophonic.
        (_piece(120, (4, 4), (62,), 4, 4, 40),
         dict(instruments=(40,), tempo="118-134 bpm", time_sig="4/4", density="low",
              polyphony="low")),
    ],
)  # fmt: skip
def test_measure_reads_the_piece(piece, expected):
    c = measure(score_to_notes(piece))
    got = {k: v for k, v in c.describe().items() if k in expected}
    assert got == {**expected, "instruments": [program_name(p) for p in expected["instruments"]]}
    assert c.instruments == expected["instruments"]
    if "key" in expected:  # the key signature wins over the pitches only when asked to
        assert key_name(measure(score_to_notes(piece), use_key_signature=False).key) == (
            "C major" if expected["key"] == "D minor" else expected["key"]
        )
    assert parse_key("d minor") == parse_key("D min") == 2 * 2 + 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, bpe_tok) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(bpe_tok)
    (d / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "train": {}}))
    torch.save(model.state_dict(), d / "model.pth")
    bpe_tok.tags = ["bach"]
    bpe_tok.save(d / "tokenizer.json")
    bpe_tok.tags = []
    return d


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--instruments", "piano,banjoo"], "acoustic grand piano"),
        (["--key", "H minor"], "major or minor"),
        (["--time-sig", "5/3"], "e.g. 3/4"),
        (["--density", "huge"], "low, medium, high"),
        (["--polyphony", "0"], "low, medium, high"),
        (["--tempo", "fast"], "beats per minute"),
        (["--tag", "jazz"], "its tags: bach"),
        (["--min-new-tokens", "99999"], "--min-new-tokens"),
    ],
)
def test_bad_control_values_exit_2_with_one_line(ckpt, tmp_path, capsys, extra, words):
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "x.mid"), "--max-tokens", "8", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("midiforge generate: error:") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "x.mid").exists()


def test_cli_with_controls_writes_only_allowed_programs(ckpt, tmp_path, capsys):
    out = tmp_path / "c.mid"
    argv = ["generate", str(ckpt), "-o", str(out), "--max-tokens", "60", "--seed", "1", "--ignore-eos"]
    assert main(argv + ["--instruments", "bass", "--tag", "bach", "--key", "A minor"]) == 0
    s = symusic.Score(str(out))
    assert s.note_num() > 0 and {t.program for t in s.tracks} == {32}
    # The command passes every control on: the same piece as generate() given them, whose prefix holds them.
    model, tok = load_inference(ckpt)
    controls = {"instruments": "bass", "tag": "bach", "key": "A minor"}
    (r,) = generate(model, tok, max_new_tokens=60, seed=1, ignore_eos=True, controls=controls)
    assert tok.token_names(r.ids)[1:4] == ["CTL_TAG_0", "CTL_PROGRAM_32", f"CTL_KEY_{parse_key('A minor')}"]
    assert s == symusic.Score.from_midi(r.score.dumps_midi())


def test_without_seed_a_random_one_is_printed_and_reproduces_the_piece(ckpt, tmp_path, capsys):
    argv = ["generate", str(ckpt), "--max-tokens", "40", "--ignore-eos"]
    assert main([*argv, "-o", str(tmp_path / "a.mid")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("generated ") and ", seed " in last
    seed = last.rsplit(" ", 1)[1]
    assert main([*argv, "-o", str(tmp_path / "b.mid"), "--seed", seed]) == 0
    assert capsys.readouterr().out.strip().endswith(f", seed {seed}")
    assert (tmp_path / "a.mid").read_bytes() == (tmp_path / "b.mid").read_bytes()


def test_checkpoint_from_before_controls_generates_and_refuses_controls(tmp_path, capsys):
    ckpt = tmp_path / "old"
    shutil.copytree(FIXTURE, ckpt)
    out = tmp_path / "old.mid"
    assert main(["generate", str(ckpt), "-o", str(out), "--max-tokens", "30", "--seed", "0"]) == 0
    assert out.is_file()
    assert main(["generate", str(ckpt), "-o", str(tmp_path / "y.mid"), "--instruments", "piano"]) == 2
    err = capsys.readouterr().err
    assert "trained before controls existed" in err and err.count("\n") == 1
