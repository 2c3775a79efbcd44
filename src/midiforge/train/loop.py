"""The epoch loop: :func:`fit` drives a :class:`Loop` (trainer, state, data, save callback) through the epochs.

For each batch: a step (:meth:`Trainer.train_step`, or its device-side twin on CUDA), then the metrics
(:meth:`TrainState.add_step`, :func:`record_window`), then a save if :class:`SavePolicy` says one is due. The
progress bar is :class:`Progress`; the epoch end (validation, the metrics row, the save, the plot) is
:func:`_end_epoch`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from midiforge.data.sampler import IGNORE_INDEX
from midiforge.train import accel
from midiforge.train import distributed as dist
from midiforge.train.trainer import (
    Trainer,
    TrainState,
    _finite_or_none,
    bits_per_note,
    evaluate,
    perplexity,
)


# ---------------------------------------------------------------------------------------------- the loop
class SavePolicy:
    """When to checkpoint mid-epoch (every ``minutes``, by rank 0's clock) and when to stop (``max_steps``);
    epoch ends always save."""

    def __init__(self, minutes: float, max_steps: int | None):
        self.seconds, self.max_steps = minutes * 60, max_steps
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.seconds

    def stop(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def saved(self) -> None:
        self.last = time.monotonic()


class Progress:
    """The tqdm bar of one epoch (rank 0 only), with the running loss and this session's tokens/s."""

    def __init__(self, epoch: int, num_epochs: int, n_batches: int, done: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=n_batches,
            initial=done,
            desc=f"epoch {epoch + 1}/{num_epochs}",
            unit="batch",
            disable=not dist.current().is_main,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, no flood
        )
        self.t0, self.tokens = time.monotonic(), 0

    def update(self, state: TrainState, tokens: int) -> None:
        self.tokens += tokens
        mean = state.mean_loss()
        if tokens and mean is not None:
            rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(
                f"loss {mean:.3f} ppl {perplexity(mean):.1f} {rate:,.0f} tok/s", refresh=False
            )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def record_window(state: TrainState, metrics: dict, epoch: int, n_batches: int) -> None:
    """Close the step-curve window every 1/200 of an epoch (about 200 points per epoch for the plot)."""
    every = max(1, n_batches // 200)
    if state.win_tokens and (state.batch % every == 0 or state.batch == n_batches):
        metrics["steps"].append(
            [round(epoch + state.batch / n_batches, 6), state.win_loss / state.win_tokens]
        )
        state.win_loss, state.win_tokens = 0.0, 0


def val_figure(row: dict) -> float | None:
    """What "better" means for validation: bits per note, or the loss when no notes were counted."""
    return row["val_bits_per_note"] if row.get("val_bits_per_note") is not None else row.get("val_loss")


@dataclass
class BestKeeper:
    """``CKPT/best``: the weights of the epoch with the lowest validation figure so far, and ``--patience``."""

    save: Callable[[dict], None]  # write CKPT/best from the current weights with this record (rank 0)
    record: dict | None = None  # epoch, step, val_bits_per_note, val_loss of what CKPT/best holds
    patience: int | None = None

    def offer(self, row: dict) -> bool:
        """Save the weights as the best when ``row`` (an epoch's metrics) beats the record; whether it did."""
        fig = val_figure(row)
        if fig is None or (self.record is not None and not fig < val_figure(self.record)):
            return False
        self.record = {k: row[k] for k in ("epoch", "step", "val_bits_per_note", "val_loss")}
        self.save(self.record)
        return True

    def exhausted(self, epochs_done: int) -> bool:
        """Whether --patience epochs have passed without a better figure."""
        last = self.record["epoch"] if self.record is not None else 0
        return self.patience is not None and epochs_done - last >= self.patience

    def describe(self, where: str) -> str:
        r = self.record
        if r is None:
            return "no validation figure yet"
        fig = f"{r['val_bits_per_note']:.3f} bits/note" if r["val_bits_per_note"] is not None else "val loss"
        return f"best: epoch {r['epoch']} ({fig}) in {where}/best"


@dataclass
class Loop:
    """What :func:`fit` drives: built by :mod:`midiforge.train.command`."""

    trainer: Trainer
    state: TrainState
    metrics: dict  # metrics.json: {"epochs": [...], "steps": [[epoch_fraction, loss], ...]}
    sampler: object  # MidiDatasetSampler of this rank
    make_loader: Callable[[int], Iterable]  # epoch -> training batches over ``sampler``
    val_loader: Iterable | None
    save: Callable[[], None]  # write a checkpoint of everything above (rank 0; the caller holds the lock)
    end_of_epoch: Callable[[], None]  # after the epoch-end save: the plot
    policy: SavePolicy
    num_epochs: int
    where: str  # the checkpoint directory, for messages
    val_notes: int = 0  # validation notes, counted once: bits/note = loss * tokens / notes / ln 2
    on_step: Callable[[str, float, int], None] | None = None  # (status, loss sum, tokens) per step
    readback_every: int = 1  # steps whose results stay on the device before one read-back (accel.Readback)
    best: BestKeeper | None = None  # with validation: CKPT/best and --patience


def _replay(loop: Loop, readback, world: int, epoch: int, n_batches: int, progress: Progress) -> None:
    """The steps read back, in order, counted exactly as if each had been read right after it ran."""
    for status, loss, n in readback.drain(world):
        loop.state.add_step(status, loss, n, loop.where)
        record_window(loop.state, loop.metrics, epoch, n_batches)
        progress.update(loop.state, n if status == "ok" else 0)
        if loop.on_step is not None:
            loop.on_step(status, loss, n)


def fit(loop: Loop) -> int:
    """Run the epochs from ``loop.state`` (possibly mid-epoch) to ``loop.num_epochs``. Returns the exit code."""
    trainer, state, device = loop.trainer, loop.state, loop.trainer.device
    world = dist.current().world_size
    best = loop.best
    if best is not None and state.batch == 0 and state.epoch > 0 and best.exhausted(state.epoch):
        dist.print0(f"{loop.where}: stopped early before (--patience {best.patience}); {best.describe(loop.where)}."
                    " Pass a larger --patience, or none, to train further.")  # fmt: skip
        return 0
    for epoch in range(state.epoch, loop.num_epochs):
        if state.batch == 0:
            loop.sampler.set_epoch(epoch)
        n_batches = len(loop.sampler)
        progress = Progress(epoch, loop.num_epochs, n_batches, state.batch)
        t_epoch = time.monotonic() - state.seconds
        stopping, readback = False, accel.Readback(loop.readback_every)
        for inputs, labels in loop.make_loader(epoch):
            n_local = int((labels != IGNORE_INDEX).sum())  # the loader's CPU tensor: no device wait
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            n_total, norm, save_now = accel.agree_step(loop.policy, n_local, device, world, readback.every)
            # 1. the step; its loss and status stay on the device until read back
            loss_sum, code = trainer.train_step_async(inputs, labels, norm)
            readback.push(loss_sum, code, n_total)
            stopping = loop.policy.stop(state.step + len(readback))
            if not readback.due(stopping or state.batch + len(readback) >= n_batches):
                continue
            if save_now is None:  # deferred read-back: rank 0's clock is asked only now
                save_now = accel.save_due(loop.policy, device)
            # 2. the metrics
            _replay(loop, readback, world, epoch, n_batches, progress)
            # 3. a save, if one is due
            if state.batch < n_batches and (save_now or stopping):
                state.seconds = time.monotonic() - t_epoch
                # Not mid-epoch while non-finite steps go on (``bad`` is the same on every rank): should they
                # turn into a divergence, the last good checkpoint must survive. Retried at the next step.
                if not state.bad:
                    loop.save()
                    loop.policy.saved()
                if stopping:
                    progress.close()
                    what = "nothing saved (non-finite steps)" if state.bad else "checkpoint saved"
                    dist.print0(f"stopped after {state.step} steps (--max-steps); {what}")
                    return 0
        _replay(loop, readback, world, epoch, n_batches, progress)
        progress.close()
        patience_over = _end_epoch(loop, epoch, time.monotonic() - t_epoch)
        if stopping and epoch + 1 < loop.num_epochs:
            dist.print0(f"stopped after {state.step} steps (--max-steps); checkpoint saved")
            return 0
        if patience_over and epoch + 1 < loop.num_epochs:
            dist.print0(
                f"stopped early after epoch {epoch + 1}: no lower validation bits per note in {best.patience}"
                f" epochs (--patience); {best.describe(loop.where)}"
            )
            return 0
    kept = f"; {best.describe(loop.where)}" if best is not None else ""
    dist.print0(f"done: {loop.num_epochs} epochs; checkpoint in {loop.where}{kept}")
    return 0


def _end_epoch(loop: Loop, epoch: int, seconds: float) -> bool:
    """Validation, the epoch's metrics row, CKPT/best when it is the best so far, the save (always: skipped
    steps leave the weights unchanged). Returns whether --patience has run out."""
    trainer, state, device = loop.trainer, loop.state, loop.trainer.device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # training activations out, validation batches in
    train_loss = state.mean_loss()
    val_loss, val_tokens = evaluate(trainer, loop.val_loader) if loop.val_loader is not None else (None, 0)
    train_loss = _finite_or_none(train_loss, f"epoch {epoch + 1}: training loss")
    val_loss = _finite_or_none(val_loss, f"epoch {epoch + 1}: validation loss")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    loop.metrics["epochs"].append(
        {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_perplexity": perplexity(train_loss),
            "val_loss": val_loss,
            "val_perplexity": perplexity(val_loss),
            "val_bits_per_note": bits_per_note(val_loss, val_tokens, loop.val_notes),
            "tokens": state.loss_tokens,
            "seconds": round(seconds, 3),
            "lr": trainer.lr,
            "step": state.step,
        }
    )
    if state.bad:
        dist.note0(
            f"epoch {epoch + 1} ends after {state.bad} non-finite step(s) in a row; saved anyway"
            " (skipped steps leave the weights unchanged)"
        )
    # CKPT/best first: killed between the two saves, the epoch is trained again and CKPT/best already holds it.
    improved = loop.best is not None and loop.best.offer(loop.metrics["epochs"][-1])
    state.new_epoch(epoch + 1)
    loop.save()
    loop.policy.saved()
    loop.end_of_epoch()
    val = f", val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f})" if val_loss is not None else ""
    val += " (best so far)" if improved else ""
    tl = f"{train_loss:.4f} (ppl {perplexity(train_loss):.2f})" if train_loss is not None else "n/a"
    dist.print0(
        f"epoch {epoch + 1}/{loop.num_epochs}: train loss {tl}{val}, {seconds:.1f} s, lr {trainer.lr:.3g}"
    )
    return loop.best is not None and loop.best.exhausted(epoch + 1)
