"""`--tensorboard [DIR]`: training scalars, and one short sample per epoch as a piano roll and as audio.

Written with :class:`torch.utils.tensorboard.SummaryWriter` (needs the ``tensorboard`` package:
``pip install midiforge[tensorboard]``); ``tensorboard --logdir DIR`` shows the run. Only rank 0 writes.

Scalars, per optimizer step (x = step): ``train/loss`` (the step's mean token loss), ``train/perplexity``,
``train/lr``, ``train/tokens_per_second`` (since the previous logged step), ``train/grad_norm`` (before
clipping; when the trainer exposes it). Per epoch (x = step at the epoch's end): ``epoch/train_loss``,
``epoch/val_loss``, ``epoch/val_perplexity``, ``epoch/val_bits_per_note``; and ``sample/pianoroll`` (image) and
``sample/audio`` (the builtin preview synth) of a short piece generated with the current weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from midiforge.errors import UsageError
from midiforge.generate.core import generate
from midiforge.notes.render import render_pianoroll, synthesize

SAMPLE_TOKENS = 256  # tokens of the per-epoch sample: a few bars, seconds to generate on a CPU
AUDIO_RATE = 16000
EPOCH_KEYS = ("train_loss", "val_loss", "val_perplexity", "val_bits_per_note", "train_perplexity")


def log_dir(value: str | None, ckpt_dir: Path) -> Path | None:
    """The directory of ``--tensorboard [DIR]``: None when off, ``CKPT/tensorboard`` when given bare."""
    if value is None:
        return None
    return Path(value) if value else Path(ckpt_dir) / "tensorboard"


def check_available() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install 'midiforge[tensorboard]'"
        ) from e


class TensorBoardLog:
    """The writer of one run (rank 0). ``step(...)`` after every optimizer step, ``epoch(...)`` at epoch ends."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        check_available()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(directory))
        except OSError as e:
            raise UsageError(f"--tensorboard: cannot write {directory}: {e.strerror or e}") from e
        self.directory = directory
        self._t, self._tokens = time.monotonic(), 0

    def step(self, trainer, state, status: str, loss_sum: float, tokens: int) -> None:
        """One optimizer step (``loss_sum`` over ``tokens`` tokens, all ranks)."""
        w, step = self.writer, state.step
        self._tokens += tokens
        if status != "ok" or not tokens:
            return
        loss = loss_sum / tokens
        if math.isfinite(loss):
            w.add_scalar("train/loss", loss, step)
            w.add_scalar("train/perplexity", math.exp(min(loss, 700.0)), step)
        w.add_scalar("train/lr", trainer.lr, step)
        now = time.monotonic()
        if now > self._t:
            w.add_scalar("train/tokens_per_second", self._tokens / (now - self._t), step)
        self._t, self._tokens = now, 0
        norm = getattr(trainer, "last_grad_norm", None)
        if norm is not None:
            norm = float(norm)
            if math.isfinite(norm):
                w.add_scalar("train/grad_norm", norm, step)

    def epoch(self, row: dict, model=None, tokenizer=None, device="cpu") -> None:
        """An epoch's metrics row (metrics.json) and, with a model, a short sample as image and audio."""
        w, step = self.writer, int(row.get("step", 0))
        for key in EPOCH_KEYS:
            v = row.get(key)
            if v is not None and math.isfinite(v):
                w.add_scalar(f"epoch/{key}", v, step)
        if model is not None and tokenizer is not None:
            self._sample(model, tokenizer, int(row.get("epoch", 0)), step, device)
        w.flush()

    def _sample(self, model, tokenizer, epoch: int, step: int, device) -> None:
        import io

        import numpy as np
        from matplotlib.image import imread

        g = generate(model, tokenizer, max_new_tokens=SAMPLE_TOKENS, seed=epoch, device=device)[0]
        with io.BytesIO() as buf:
            tmp = self.directory / f".pianoroll-{epoch}.png"
            render_pianoroll(g.score, tmp, title=f"epoch {epoch}: {g.score.note_num()} notes")
            buf.write(tmp.read_bytes())
            tmp.unlink()
            buf.seek(0)
            img = imread(buf, format="png")[..., :3]  # (H, W, 3) floats in [0, 1]
        self.writer.add_image("sample/pianoroll", img, step, dataformats="HWC")
        audio = synthesize(g.score, AUDIO_RATE) if g.score.note_num() else np.zeros(AUDIO_RATE, np.float32)
        peak = float(np.abs(audio).max()) or 1.0
        self.writer.add_audio("sample/audio", (audio / peak)[None, :], step, sample_rate=AUDIO_RATE)

    def close(self) -> None:
        self.writer.close()
