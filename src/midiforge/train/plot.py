"""Training curves: ``ckpt/training.png`` from ``ckpt/metrics.json`` (also `midiforge plot CKPT`).

Losses on the left axis, perplexities on a log-scaled right axis, one x-axis in epochs (and, for runs that
record it, validation bits per note in a second panel below): an epoch's values sit
at x = its number (1..N, the end of that epoch), and the per-step training loss is a light red line at
fractional epochs, so validation and training points of the same epoch line up.

Drawn with the Agg canvas directly (no pyplot): it never opens a window, never blocks and holds no global
figure state, so the training loop can call it after every epoch.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.options import add_checkpoint

# The specified styles: train loss red solid, val loss blue dotted, train ppl green dashed, val ppl blue dashed.
STYLES = {
    "train_loss": {"color": "tab:red", "linestyle": "-", "label": "train loss"},
    "val_loss": {"color": "tab:blue", "linestyle": ":", "label": "validation loss"},
    "train_perplexity": {"color": "tab:green", "linestyle": "--", "label": "train perplexity"},
    "val_perplexity": {"color": "tab:blue", "linestyle": "--", "label": "validation perplexity"},
}

# Validation bits per note (loss x tokens / notes / ln 2, comparable across tokenizers): a panel of its own below.
BITS_STYLE = {"color": "tab:purple", "linestyle": "-", "label": "validation bits per note"}


def _series(epochs: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in epochs:
        v = e.get(key)
        if v is not None:
            xs.append(float(e["epoch"]))
            ys.append(float(v))
    return xs, ys


def figure(metrics: dict):
    """A matplotlib Figure (Agg canvas) of the training curves for a metrics.json dict."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = metrics.get("epochs", [])
    steps = metrics.get("steps", [])
    bx, by = _series(epochs, "val_bits_per_note")
    rows = 2 if bx else 1  # a second panel only for runs that record bits per note
    fig = Figure(figsize=(9, 5 + 2.6 * (rows - 1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(rows, 1, 1)
    ax2 = ax.twinx()
    lines = []
    if steps:
        sx, sy = zip(*steps, strict=True)
        lines += ax.plot(sx, sy, color="tab:red", alpha=0.25, linewidth=0.8, label="train loss (per step)")
    for key in ("train_loss", "val_loss"):
        xs, ys = _series(epochs, key)
        if xs:
            lines += ax.plot(xs, ys, marker="o", markersize=3, **STYLES[key])
    for key in ("train_perplexity", "val_perplexity"):
        xs, ys = _series(epochs, key)
        if xs:
            lines += ax2.plot(xs, ys, marker="s", markersize=3, **STYLES[key])
    if ax2.lines:
        ax2.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax2.set_ylabel("perplexity (log scale)")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    ax.set_title("training curves" if epochs or steps else "training curves (no data yet)")
    if rows == 2:
        ax3 = fig.add_subplot(rows, 1, 2, sharex=ax)
        ax3.plot(bx, by, marker="o", markersize=3, **BITS_STYLE)
        ax3.set_xlabel("epoch")
        ax3.set_ylabel("bits per note")
        ax3.grid(True, alpha=0.3)
        ax3.legend(loc="upper right", fontsize=8)
        fig.subplots_adjust(left=0.08, right=0.9, bottom=0.07, top=0.95, hspace=0.25)
        return fig
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.1, top=0.93)  # fixed: tight_layout costs ~0.4 s a draw
    return fig


def render_png(metrics: dict) -> bytes:
    """The PNG bytes of the training curves for a metrics.json dict."""
    buf = io.BytesIO()
    figure(metrics).savefig(buf, format="png")
    return buf.getvalue()


def plot_metrics(metrics: dict, out_path: str | os.PathLike) -> None:
    """Draw the curves and write them atomically to ``out_path``."""
    atomic_write_bytes(out_path, render_png(metrics))


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p, "checkpoint folder of a training run")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="where to draw the curves (default: the run's own training.png)",
    )


def run(args: argparse.Namespace) -> int:
    from midiforge import checkpoint as ck  # here: `midiforge plot` need not import torch

    ckpt = Path(args.checkpoint)
    path = ckpt / ck.METRICS_FILE
    # The committed save's files (a run may be saving into the directory right now); nothing is written there.
    blobs = ck.read_committed(ckpt, [ck.METRICS_FILE, ck.CONFIG_FILE]) if ckpt.is_dir() else {}
    if ck.METRICS_FILE not in blobs:
        raise UsageError(f"{path}: no such file (train first)")
    metrics = ck.read_json(path, blobs[ck.METRICS_FILE])
    if not isinstance(metrics, dict) or not isinstance(metrics.get("epochs", []), list):
        raise UsageError(f"{path}: not a midiforge metrics file")
    tok = ck.load_tokenizer(ckpt)
    if tok is not None and ck.CONFIG_FILE in blobs:  # curves of a model whose tokenizer was swapped mislead
        state = (
            ck.load_torch(ckpt / ck.STATE_FILE, data=blobs[ck.STATE_FILE]) if ck.STATE_FILE in blobs else None
        )
        ck.check_tokenizer(ckpt, tok, ck.read_config(ckpt, blobs[ck.CONFIG_FILE]), state)
    out = Path(args.output or ckpt / ck.PLOT_FILE)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_metrics(metrics, out)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
    print(f"wrote {out}")
    return 0
