"""The README's main job in miniature: chorales → MIDI → JSON → train → generate, through the real CLI."""

import json

import pytest
import symusic

pytest.importorskip("music21")

from midiforge.cli import main  # noqa: E402


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    midi, js, ckpt = tmp_path / "midi", tmp_path / "json", tmp_path / "ckpt"
    assert main(["demo-data", str(midi), "--limit", "12", "-j", "2", "-q"]) == 0
    for split in ("train", "val"):
        assert any((midi / split).glob("*.mid")), f"no {split} chorales among the first 12"
        assert main(["prepare", str(midi / split), "-o", str(js / split), "-j", "1"]) == 0
    argv = ["train", "2", str(ckpt), "-t", str(js / "train"), "-v", str(js / "val"), "--preset", "tiny",
            "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--d-ff", "64", "--vocab-size", "800",
            "-e", "256", "-b", str(8 * 256 * 256), "-l", "3e-3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    for name in (
        "model.pth",
        "optimizer.pth",
        "metrics.json",
        "tokenizer.json",
        "config.json",
        "training.png",
    ):
        assert (ckpt / name).stat().st_size > 0, name
    epochs = json.loads((ckpt / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["val_perplexity"] is not None for e in epochs)
    assert epochs[-1]["val_perplexity"] < 800  # below the uniform-guess baseline of the vocabulary

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
    for i in (1, 2):
        score = symusic.Score(str(out.with_name(f"chorale_{i}.mid")))
        assert score.note_num() > 0
        assert out.with_name(f"chorale_{i}.png").stat().st_size > 0
