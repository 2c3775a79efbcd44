"""The README's main job in miniature: chorales → MIDI → JSON → train → generate, through the real CLI."""

import json
import re

import pytest
import symusic

pytest.importorskip("music21")

from conftest import color_mask, read_png  # noqa: E402

from midiforge.cli import main  # noqa: E402


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    midi, js, ckpt = tmp_path / "midi", tmp_path / "json", tmp_path / "ckpt"
    assert main(["demo-data", str(midi), "--limit", "12", "-j", "2", "-q"]) == 0
    for split in ("train", "val"):
        assert any((midi / split).glob("*.mid")), f"no {split} chorales among the first 12"
        assert main(["prepare", str(midi / split), "-o", str(js / split), "-j", "1"]) == 0
    argv = ["train", "2", str(ckpt), "-t", str(js / "train"), "-v", str(js / "val"), "--preset", "tiny",
            "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--d-ff", "64", "--vocab-size", "1100",
            "-e", "256", "-b", str(8 * 256 * 256), "-l", "3e-3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    epochs = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["val_perplexity"] is not None for e in epochs)
    assert epochs[-1]["val_perplexity"] < 800  # below the uniform-guess baseline of the vocabulary

    # model.pth, config.json and tokenizer.json load together into the model that was asked for...
    import torch

    from midiforge.checkpoint import load_inference

    model, tokenizer = load_inference(ckpt)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_ff) == (1, 2, 32, 64)
    assert cfg.vocab_size == len(tokenizer) <= 1100
    assert json.loads((ckpt / "config.json").read_text())["model"]["vocab_size"] == cfg.vocab_size
    # ...optimizer.pth is the AdamW state of exactly those parameters, after some steps...
    opt = torch.load(ckpt / "optimizer.pth", map_location="cpu", weights_only=True)
    num_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert num_params == len(list(model.parameters())) and len(opt["state"]) == num_params
    assert all(int(st["step"]) > 0 for st in opt["state"].values())
    # ...and training.png shows the curves of metrics.json: validation (blue), train perplexity (green) and,
    # in a second panel (900 x 760 in all), validation bits per note (purple).
    from midiforge.train.plot import render_png

    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert all(e["val_bits_per_note"] > 0 for e in metrics["epochs"])
    assert (ckpt / "training.png").read_bytes() == render_png(metrics)
    img = read_png(ckpt / "training.png")
    assert img.shape == (760, 900, 3)
    assert color_mask(img, "tab:blue").sum() > 20 and color_mask(img, "tab:green").sum() > 20
    assert color_mask(img, "tab:purple").sum() > 20
    capsys.readouterr()

    out = tmp_path / "samples" / "chorale.mid"
    gen = [
        "generate",
        str(ckpt),
        "-o",
        str(out),
        "-n",
        "2",
        "--max-tokens",
        "200",
        "--seed",
        "1",
        "--pianoroll",
    ]
    assert main(gen) == 0
    printed = capsys.readouterr().out
    for i in (1, 2):
        path = out.with_name(f"chorale_{i}.mid")
        score = symusic.Score(str(path))
        assert score.note_num() > 0
        # The file holds what the command reported for it.
        m = re.search(rf"^{re.escape(str(path))}: (\d+) notes, ([\d.]+) s, ", printed, re.MULTILINE)
        assert m, printed
        assert int(m[1]) == score.note_num()
        assert float(m[2]) == pytest.approx(score.to("second").end(), abs=0.05)
        assert all(0 <= n.pitch <= 127 and n.duration > 0 for t in score.tracks for n in t.notes)
        img = read_png(out.with_name(f"chorale_{i}.png"))
        assert img.shape == (500, 1200, 3)
        assert color_mask(img, "tab:blue").sum() > 50  # the first track's notes are drawn
