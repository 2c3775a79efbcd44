"""`midiforge evaluate`: bits per note against the validation loss, sliding windows, the copy check, sample
statistics on hand-made scores, the report files, and bad input."""

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from conftest import corpus_dir, read_png
from conftest import tiny_model as _tiny_model

from midiforge.cli import main
from midiforge.data.dataset import MidiDataset, window_starts
from midiforge.data.sampler import collate
from midiforge.measure import copycheck, scoring
from midiforge.measure.stats import piece_stats, ticks_to_seconds
from midiforge.notes.midi import score_to_notes
from midiforge.tokens.tokenizer import MidiTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def pop909(*names: str) -> list[Path]:
    return [corpus_dir("pop909", f"{n:03d}.mid") for n in names]


@pytest.fixture(scope="module")
def tok() -> MidiTokenizer:
    t = MidiTokenizer()
    t.train_bpe([str(p) for p in pop909(1, 2, 3, 4)], len(t) + 200)
    return t


tiny_model = functools.partial(_tiny_model, n_layer=2)


def save_ckpt(d: Path, model, tok, train=()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    config = {"model": model.config.to_dict(), "train": {"train_dataset": [str(p) for p in train]}}
    (d / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), d / "model.pth")
    tok.save(d / "tokenizer.json")
    return d


# ------------------------------------------------------------------------------------------- likelihood
def test_bits_per_note_equals_what_the_validation_loss_implies(tok, tmp_path):
    """Same pieces, same windows (stride = context: the dataset's onset-cut windows), same model."""
    from midiforge.evaluate import read_pieces

    files, context = pop909(5, 6), 96
    model = tiny_model(tok, context)
    ds = MidiDataset(files, tok, 1, context, cache_dir=tmp_path, augment=False)
    assert len(ds) > 2 * ds.num_pieces  # pieces are far longer than the window: many windows each
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):  # what trainer.evaluate sums, one window at a time
            x, y = collate([ds[i]], tok.pad_id)
            logits = model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum"))
            n += int((y != -100).sum())
    val_loss = loss_sum / n
    val_notes = sum(scoring.count_notes(tok, ds.piece_ids(p, 0)) for p in range(ds.num_pieces))

    pieces, tables, skipped = read_pieces(files, tok)
    assert not skipped and [p.notes for p in pieces] == [len(t) for t in tables]
    assert sum(p.notes for p in pieces) == val_notes  # one PITCH per note of the file
    result = scoring.score(model, tok, pieces, stride=context)
    total = result["total"]
    assert total["tokens"] == n
    expected = val_loss * n / val_notes / math.log(2)
    assert total["bits_per_note"] == pytest.approx(expected, rel=1e-5)
    assert total["bits_per_token"] == pytest.approx(val_loss / math.log(2), rel=1e-5)
    assert total["tokens_per_note"] == pytest.approx(n / val_notes)
    seconds = sum(p.seconds for p in pieces)
    assert total["bits_per_second"] == pytest.approx(total["bits"] / seconds, rel=1e-6)
    # The breakdown splits every token's bits among its base events: the parts add up to the whole.
    parts = total["breakdown_bits_per_note"]
    assert sum(parts.values()) == pytest.approx(total["bits_per_note"], rel=1e-9)
    assert parts["pitch"] > 0 and parts["time"] > 0 and parts["duration"] > 0 and parts["end"] > 0
    # A sliding stride scores the same tokens, with more context each: a different but finite total.
    slid = scoring.score(model, tok, pieces, stride=context // 4)["total"]
    assert slid["tokens"] == n and math.isfinite(slid["bits_per_note"])


def test_breakdown_without_bpe_is_exact_per_attribute():
    t = MidiTokenizer()
    w = scoring.category_weights(t)
    assert np.allclose(w[3:].sum(1), 1) and set(np.unique(w[3:])) == {0.0, 1.0}  # one event, one kind
    pitch_ids = t.base_token_ids(t.vocab.start["pitch"] + np.arange(128))
    assert (w[pitch_ids, scoring.CATEGORIES.index("pitch")] == 1).all()


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (16, 1), (7, 3), (50, 50)])
def test_sliding_windows_score_every_token_exactly_once(window, stride):
    rng = np.random.default_rng(window * 100 + stride)
    num_ids = 300
    ws = rng.random(num_ids) < 0.3
    ws[40:80] = False  # a stretch with no onset: hard cuts
    plan = scoring.windows(ws, num_ids, window, stride)
    scored = np.zeros(num_ids + 1, int)
    prev_b = 0
    for c, a, b in plan:
        assert a == prev_b and c <= a < b and b - c <= window  # fits the model, scores something
        scored[a + 1 : b + 1] += 1
        prev_b = b
    assert prev_b == num_ids + 1 and (scored[1:] == 1).all() and scored[0] == 0
    if stride == window:  # exactly the dataset's windows
        assert [c for c, _, _ in plan] == window_starts(ws, num_ids, window).tolist()


def test_sliding_scores_match_a_full_context_forward_where_the_context_is_whole(tok):
    model = tiny_model(tok, 32)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tok), 100)
    seq = np.concatenate([[tok.bos_id], ids, [tok.eos_id]])
    plan = scoring.windows(tok.word_starts(ids), len(ids), 32, 8)
    assert len(plan) > 5
    nll = scoring.token_nll(model, [seq], [plan], "cpu")[0]
    b = plan[0][2]  # the first window (cut at an onset): scored with the true prefix as context
    with torch.no_grad():
        logits = model(torch.from_numpy(seq[None, :b]))
        direct = torch.nn.functional.cross_entropy(
            logits[0], torch.from_numpy(seq[1 : b + 1]), reduction="none"
        )
    assert 16 < b <= 32 and np.allclose(nll[:b], direct.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------- copy check
def test_copy_check_flags_a_planted_training_piece_not_a_held_out_one(tok, tmp_path):
    train = pop909(1, 2, 3, 4, 5, 6)
    index, cached = copycheck.training_index(tok, train, tmp_path)
    assert not cached and len(index.names) == 6
    again, cached = copycheck.training_index(tok, train, tmp_path)
    assert cached and np.array_equal(again.hashes, index.hashes)

    planted = tok.encode(train[2], transpose=2)[300:900]  # an excerpt, transposed: still a copy
    held_out = tok.encode(pop909(7)[0])
    rng = np.random.default_rng(0)
    noise = rng.integers(3, len(tok), 600)
    res = copycheck.check(index, tok, [planted, held_out, noise])
    notes_in_excerpt = scoring.count_notes(tok, planted)
    assert res[0]["flagged"] and res[0]["piece"] == str(train[2])
    assert res[0]["notes"] >= notes_in_excerpt - 20  # nearly the whole excerpt (edges may be cut mid-onset)
    assert not res[1]["flagged"] and res[1]["notes"] <= copycheck.DEFAULT_THRESHOLD
    assert not res[2]["flagged"]


def test_copy_runs_are_exact_lengths():
    # Two hand-made symbol strings sharing exactly 20 symbols (21 notes).
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 5000, 20)
    train = np.concatenate([rng.integers(0, 5000, 30), shared, rng.integers(0, 5000, 30)])
    query = np.concatenate([rng.integers(6000, 9000, 10), shared, rng.integers(6000, 9000, 10)])
    index = copycheck.CopyIndex.build([train], ["t"], np.zeros(3, np.int64))
    run = index.longest_run(query)
    assert run == {"notes": 21, "piece": "t", "query_note": 10, "train_note": 30}


# ------------------------------------------------------------------------------------------- statistics
def scale_score(pitches, tpq=480, qpm=120.0) -> symusic.Score:
    s = symusic.Score(tpq)
    s.tempos.append(symusic.Tempo(0, qpm=qpm))
    t = symusic.Track("p", 0, False)
    for i, p in enumerate(pitches):
        t.notes.append(symusic.Note(i * tpq, tpq, p, 80))
    s.tracks.append(t)
    return s


def test_statistics_of_a_c_major_scale():
    st = piece_stats(score_to_notes(scale_score([60, 62, 64, 65, 67, 69, 71, 72])))
    assert st["key"] == "C major" and st["in_scale"] == 1.0
    assert st["pitch_range"] == 12 and st["ioi"] == [1.0] * 7 and st["duration"] == [1.0] * 8
    assert st["note_density"] == pytest.approx(2.0)  # 8 notes in 4 s at 120 quarters/min
    assert st["polyphony"] == pytest.approx(1.0)
    assert st["pitch_class"] == [2, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1]


def test_statistics_of_a_minor_scale_and_a_chord():
    a_minor = piece_stats(score_to_notes(scale_score([57, 59, 60, 62, 64, 65, 67, 69, 64, 57])))
    assert a_minor["key"] == "A minor" and a_minor["in_scale"] == 1.0
    chromatic = piece_stats(score_to_notes(scale_score(list(range(60, 72)))))
    assert chromatic["in_scale"] == pytest.approx(7 / 12)
    s = scale_score([])
    for p in (60, 64, 67):  # a C major triad held one quarter, then a single note
        s.tracks[0].notes.append(symusic.Note(0, 480, p, 80))
    s.tracks[0].notes.append(symusic.Note(480, 480, 72, 80))
    st = piece_stats(score_to_notes(s))
    assert st["polyphony"] == pytest.approx(2.0)  # 3 notes for half the time, 1 for the other half
    assert st["ioi"] == [1.0]


def test_seconds_follow_the_tempo_map():
    notes = score_to_notes(scale_score([60, 62, 64]))
    notes.tempo_time, notes.tempo_qpm = np.array([0, 960]), np.array([120.0, 60.0])
    assert ticks_to_seconds(notes, [0, 480, 960, 1440]).tolist() == pytest.approx([0, 0.5, 1.0, 2.0])


# ------------------------------------------------------------------------------------------- the command
def test_cli_writes_the_report_and_the_figure(tok, tmp_path, capsys):
    ckpt = save_ckpt(tmp_path / "ck", tiny_model(tok, 64), tok, train=pop909(1, 2, 3))
    out = tmp_path / "rep" / "report.json"
    args = [str(ckpt), "-v", str(pop909(8)[0]), "-v", str(pop909(9)[0]), "-o", str(out)]
    args += ["--samples", "2", "--max-tokens", "64", "--cache-dir", str(tmp_path / "cache")]
    assert main(["evaluate", *args]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    lik = report["likelihood"]
    assert (
        lik["total"]["pieces"] == 2
        and len(lik["pieces"]) == 2
        and lik["window"] == 64
        and lik["stride"] == 32
    )
    assert all(p["windows"] > 1 for p in lik["pieces"])
    assert lik["total"]["unigram"]["bits_per_note"] > 0  # the baseline from the recorded training set
    assert f"{lik['total']['bits_per_note']:.2f} bits/note" in printed
    stats = report["statistics"]
    assert set(stats["pitch_class"]["overlap"]) == {"samples", "floor", "ceiling"}
    assert set(stats["pitch_class"]["values"]) == {"reference", "samples", "floor", "half_a", "half_b"}
    assert len(report["samples"]) == 2 and all(0 <= v <= 1.0001 for v in stats["ioi"]["overlap"].values())
    cc = report["copy_check"]
    assert len(cc["held_out"]) == 2 and len(cc["samples"]) == 2
    img = read_png(out.with_suffix(".png"))
    assert img.shape[0] > 400 and img.std() > 0.05  # a drawn figure, not a blank canvas


def test_cli_without_a_training_set_still_scores(tok, tmp_path, capsys):
    ckpt = save_ckpt(tmp_path / "ck", tiny_model(tok, 64), tok, train=[tmp_path / "gone"])
    assert main(["evaluate", str(ckpt), "-v", str(pop909(8)[0])]) == 0
    printed = capsys.readouterr().out
    assert "bits/note" in printed and "training set: skipped" in printed and "gone" in printed


@pytest.mark.parametrize(
    "case", ["missing_data", "empty_data", "no_tokenizer", "only_bad_files", "bad_stride"]
)
def test_cli_bad_input_is_one_line_and_exit_2(tok, tmp_path, capsys, case):
    ckpt = save_ckpt(tmp_path / "ck", tiny_model(tok, 64), tok)
    data = str(pop909(8)[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "missing_data":
        data = str(tmp_path / "nope")
    elif case == "empty_data":
        data = str(empty)
    elif case == "no_tokenizer":
        (ckpt / "tokenizer.json").unlink()
    elif case == "only_bad_files":
        (empty / "bad.mid").write_bytes(b"MThd garbage")
        data = str(empty)
    extra = ["--stride", "0"] if case == "bad_stride" else []
    assert main(["evaluate", str(ckpt), "-v", data, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("midiforge evaluate: error:") and "\n" not in err


# ------------------------------------------------------------------------------------------- during training
def test_training_records_val_bits_per_note_that_evaluate_reproduces_and_tensorboard_has_it(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from midiforge.train.plot import figure

    ckpt, tb = tmp_path / "ck", tmp_path / "tb"
    shape = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "--vocab-size", "1100"]
    args = ["train", "1", str(ckpt), "-t", str(pop909(1)[0]), "-v", str(pop909(2)[0]), *shape]
    args += ["-e", "96", "-b", str(8 * 96 * 96), "--device", "cpu", "--tensorboard", str(tb)]
    # Without a control prefix: with one, validation is conditioned on each piece's measured controls, which
    # evaluate (unconditional) does not give the model.
    args += ["--controls", "off"]
    assert main(args) == 0
    row = json.loads((ckpt / "metrics.json").read_text())["epochs"][0]
    assert row["val_bits_per_note"] > 0
    capsys.readouterr()
    # evaluate with stride = context scores the validation set in the very windows training used
    assert (
        main(
            ["evaluate", str(ckpt), "-v", str(pop909(2)[0]), "--stride", "96", "-o", str(tmp_path / "r.json")]
        )
        == 0
    )
    total = json.loads((tmp_path / "r.json").read_text())["likelihood"]["total"]
    assert total["bits_per_note"] == pytest.approx(row["val_bits_per_note"], rel=1e-5)
    assert total["bits_per_token"] * math.log(2) == pytest.approx(row["val_loss"], rel=1e-5)
    # the plot gets a second panel for it; the seed's curves stay on the first
    fig = figure(json.loads((ckpt / "metrics.json").read_text()))
    assert [line.get_label() for line in fig.axes[-1].get_lines()] == ["validation bits per note"]
    assert list(fig.axes[-1].get_lines()[0].get_ydata()) == [row["val_bits_per_note"]]
    # TensorBoard's own reader loads the event files with the expected tags
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0, "audio": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/perplexity", "train/lr", "train/tokens_per_second", "train/grad_norm"):
        assert tag in tags["scalars"], tag
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, row["step"] + 1))
    (bpn,) = acc.Scalars("epoch/val_bits_per_note")
    assert bpn.step == row["step"] and bpn.value == pytest.approx(row["val_bits_per_note"], rel=1e-6)
    assert acc.Scalars("epoch/val_loss")[0].value == pytest.approx(row["val_loss"], rel=1e-6)
    assert tags["images"] == ["sample/pianoroll"] and tags["audio"] == ["sample/audio"]
    img = acc.Images("sample/pianoroll")[0]
    assert img.width > 400 and img.height > 200
    assert acc.Audio("sample/audio")[0].sample_rate == 16000


def test_tensorboard_flag_parses_bare_and_with_a_directory():
    from midiforge.train.config import parse_args
    from midiforge.train.tblog import log_dir

    base = ["1", "ck", "-t", "x"]
    assert parse_args(base).tensorboard is None
    bare = parse_args([*base, "--tensorboard"])
    assert bare.tensorboard == "" and log_dir(bare.tensorboard, Path("ck")) == Path("ck/tensorboard")
    given = parse_args(["--tensorboard", "logs/run1", *base])
    assert log_dir(given.tensorboard, Path("ck")) == Path("logs/run1")
    assert given.to_dict()["tensorboard"] == "logs/run1"
