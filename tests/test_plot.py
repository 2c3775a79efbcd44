"""plot.py: the curves' styles and alignment, atomic PNG output, and the `midiforge plot` command."""

from __future__ import annotations

import json

from midiforge import cli
from midiforge.plot import STYLES, figure, plot_metrics

METRICS = {
    "epochs": [
        {"epoch": 1, "train_loss": 4.0, "train_perplexity": 54.6, "val_loss": 3.8, "val_perplexity": 44.7},
        {"epoch": 2, "train_loss": 3.0, "train_perplexity": 20.1, "val_loss": 3.1, "val_perplexity": 22.2},
    ],
    "steps": [[0.5, 5.0], [1.0, 4.2], [1.5, 3.5], [2.0, 3.0]],
}


def _lines(fig):
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def test_styles_and_aligned_epoch_axis():
    lines = _lines(figure(METRICS))
    expected = {  # the seed's styles: red solid, blue dotted, green dashed, blue dashed
        "train loss": ("tab:red", "-"),
        "validation loss": ("tab:blue", ":"),
        "train perplexity": ("tab:green", "--"),
        "validation perplexity": ("tab:blue", "--"),
    }
    for label, (color, style) in expected.items():
        assert lines[label].get_color() == color and lines[label].get_linestyle() == style, label
    # Epoch-end values sit at x = 1..N for training and validation alike (the seed plotted val one epoch early).
    for label in expected:
        assert list(lines[label].get_xdata()) == [1.0, 2.0]
    assert list(lines["train loss (per step)"].get_xdata()) == [0.5, 1.0, 1.5, 2.0]
    assert set(STYLES) == {"train_loss", "val_loss", "train_perplexity", "val_perplexity"}


def test_without_validation_and_empty(tmp_path):
    no_val = {"epochs": [dict(e, val_loss=None, val_perplexity=None) for e in METRICS["epochs"]], "steps": []}
    labels = set(_lines(figure(no_val)))
    assert labels == {"train loss", "train perplexity"}
    out = tmp_path / "empty.png"
    plot_metrics({"epochs": [], "steps": []}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    assert cli.main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "midiforge plot: error:" in capsys.readouterr().err
