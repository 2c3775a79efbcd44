"""plot.py: the curves' styles and alignment, atomic PNG output, and the `midiforge plot` command."""

from __future__ import annotations

import json

import numpy as np
from conftest import color_mask, read_png

from midiforge import cli
from midiforge.train.plot import STYLES, figure, plot_metrics, render_png

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


def test_curves_carry_the_values_of_metrics_json():
    fig = figure(METRICS)
    lines = _lines(fig)
    for key, style in STYLES.items():
        xs = [float(e["epoch"]) for e in METRICS["epochs"]]
        ys = [e[key] for e in METRICS["epochs"]]
        assert list(lines[style["label"]].get_xdata()) == xs, key
        assert list(lines[style["label"]].get_ydata()) == ys, key
    step_x, step_y = zip(*METRICS["steps"], strict=True)
    assert list(lines["train loss (per step)"].get_xdata()) == list(step_x)
    assert list(lines["train loss (per step)"].get_ydata()) == list(step_y)
    # Losses on the left axis (linear), perplexities on the right one (log scale).
    loss_ax, ppl_ax = fig.axes
    assert {line.get_label() for line in loss_ax.get_lines()} == {
        "train loss (per step)",
        "train loss",
        "validation loss",
    }
    assert {line.get_label() for line in ppl_ax.get_lines()} == {"train perplexity", "validation perplexity"}
    assert (loss_ax.get_yscale(), ppl_ax.get_yscale()) == ("linear", "log")
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "train loss (per step)",
        "train loss",
        "validation loss",
        "train perplexity",
        "validation perplexity",
    ]


def test_missing_epoch_values_are_left_out_not_zero():
    first, second = METRICS["epochs"]
    metrics = {"epochs": [dict(first, val_loss=None, val_perplexity=None), second], "steps": []}
    lines = _lines(figure(metrics))
    assert list(lines["validation loss"].get_xdata()) == [2.0]
    assert list(lines["validation loss"].get_ydata()) == [3.1]
    assert list(lines["train loss"].get_ydata()) == [4.0, 3.0]
    assert "train loss (per step)" not in lines


def test_without_validation_and_empty(tmp_path):
    no_val = {"epochs": [dict(e, val_loss=None, val_perplexity=None) for e in METRICS["epochs"]], "steps": []}
    labels = set(_lines(figure(no_val)))
    assert labels == {"train loss", "train perplexity"}
    out = tmp_path / "empty.png"
    plot_metrics({"epochs": [], "steps": []}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = read_png(out)
    assert img.shape == (500, 900, 3)  # 9 x 5 inches at 100 dpi
    assert not any(color_mask(img, c).any() for c in ("tab:red", "tab:blue", "tab:green"))  # no curves
    assert (img.max(axis=-1) < 0.5).sum() > 100  # but axes, labels and the "no data yet" title


def test_plot_command(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    assert cli.main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The picture is the one drawn from that metrics.json: pixel for pixel, and not the one of other data.
    img = read_png(png)
    assert img.shape == (500, 900, 3)
    (tmp_path / "same.png").write_bytes(render_png(METRICS))
    np.testing.assert_array_equal(img, read_png(tmp_path / "same.png"))
    other = dict(METRICS, steps=[])
    (tmp_path / "other.png").write_bytes(render_png(other))
    assert not np.array_equal(img, read_png(tmp_path / "other.png"))
    for color in ("tab:blue", "tab:green"):  # validation curves and the train perplexity, drawn opaque
        assert color_mask(img, color).sum() > 20, color
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "midiforge plot: error:" in capsys.readouterr().err
