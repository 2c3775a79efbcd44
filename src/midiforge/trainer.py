"""The training machinery: :class:`Trainer` owns the model, AdamW, the warmup+cosine schedule, AMP and one
optimizer step (with out-of-memory splitting); :func:`evaluate` is the one loop that measures a dataset; :func:`fit`
runs the epochs, records metrics, guards against non-finite steps and checkpoints through a callback.
:mod:`midiforge.train` validates the command and builds the run (tokenizer, datasets, model, resume) around it;
import this module through it, which sizes the thread pools before torch is imported.

Loss is token-weighted cross-entropy over non-padding positions, summed over every rank's tokens and divided
by their total; perplexity is exp(mean token loss), never a mean of exponentials.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from midiforge import checkpoint as ckpt_io
from midiforge import distributed as dist
from midiforge.errors import UsageError

MAX_BAD_STEPS = 20  # consecutive non-finite steps before giving up
STOP_ENV = "MIDIFORGE_STOP_AFTER_STEPS"  # test hook: checkpoint and exit after this many optimizer steps
IGNORE_INDEX = -100
OOM = torch.OutOfMemoryError


class TrainingDiverged(UsageError):
    """The loss stayed non-finite: stop without touching the last good checkpoint."""

    exit_code = 1


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; saved as ``config.json["train"]`` beside every checkpoint."""

    num_epochs: int
    learning_rate: float
    weight_decay: float
    min_sequence_length: int
    max_sequence_length: int
    max_batch_size: int
    window: (
        int  # min(max_sequence_length, isqrt(max_batch_size)): the longest sample, the model's max_seq_len
    )
    seed: int
    amp: str  # resolved: off, fp16 or bf16
    augment: bool
    vocab_size: int
    train_dataset: list[str]
    val_dataset: list[str]
    world_size: int = 1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak learning rate
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG, as plain tensors/lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps`` (constant after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_loss_sum(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the non-padding positions (labels != -100)."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class Trainer:
    """Model + AdamW + warmup/cosine LambdaLR + AMP (autocast, GradScaler) + one optimizer step."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, info: dist.DistInfo):
        self.cfg, self.device, self.info = cfg, device, info
        self.raw = model.to(device)
        self.model = self.raw
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.raw, device_ids=[device] if device.type == "cuda" else None
            )
        # Weight decay only on matrices of the blocks: not norms, biases or the (tied) embedding.
        decay, no_decay = [], []
        for name, p in self.raw.named_parameters():
            (no_decay if p.ndim < 2 or name.startswith("tok_emb") else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
            betas=cfg.betas,
        )
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.scheduler = None
        self.pieces = 1  # how many pieces a batch is split into after an out-of-memory error

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        )

    def set_hyperparameters(self, step: int, total_steps: int) -> None:
        """(Re)build the schedule at ``step`` of ``total_steps`` with the configured lr and weight decay.

        Called after loading a checkpoint's optimizer state, so that the command line's values win.
        """
        for group, wd in zip(self.optimizer.param_groups, (self.cfg.weight_decay, 0.0), strict=True):
            group["initial_lr"] = self.cfg.learning_rate
            group["weight_decay"] = wd
        c = self.cfg
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, total_steps, c.warmup_steps, c.min_lr_ratio),
            last_epoch=step - 1,
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _forward_backward(self, inputs, labels, norm: float) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for x, y in _split(inputs, labels, self.pieces):
            with self.autocast():
                loss = token_loss_sum(self.model, x, y)
            self.scaler.scale(loss / norm).backward()
            total += loss.detach()
        return total

    def train_step(
        self, inputs: torch.Tensor, labels: torch.Tensor, norm: float
    ) -> tuple[torch.Tensor, bool]:
        """One optimizer step on a batch; ``norm`` = tokens of the whole step / world size (DDP averages
        gradients over ranks, so this makes the gradient that of the token-weighted mean over all ranks).
        Returns (this rank's loss sum, whether the step was applied)."""
        while True:
            try:
                loss_sum = self._forward_backward(inputs, labels, norm)
                break
            except OOM as e:
                if self.info.enabled or self.pieces >= inputs.size(0):
                    # Ranks must take the same steps: one rank cannot retry alone (the seed's DDP hung so).
                    raise UsageError(
                        f"out of memory on a batch of {tuple(inputs.shape)} tokens; lower -b/--max-batch-size"
                    ) from e
            # Outside the except block: the exception's frames, and the activations they hold, are gone now.
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.pieces *= 2
            dist.note0(f"out of memory: splitting batches into {self.pieces} pieces (consider lowering -b)")
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        # Identical on every rank (gradients are all-reduced), so every rank takes the same decision.
        ok = bool(torch.isfinite(grad_norm))
        if ok or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the scaler skips the step itself on inf/nan gradients
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule follows the step counter, skipped steps included (so resuming can rebuild it from
            # the counter); torch warns when the very first optimizer steps were skipped.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        return loss_sum, ok and bool(torch.isfinite(loss_sum))


def _split(inputs, labels, pieces: int):
    """The batch in ``pieces`` row chunks, each trimmed of columns that are padding in all its rows."""
    if pieces == 1:
        yield inputs, labels
        return
    for x, y in zip(inputs.tensor_split(pieces), labels.tensor_split(pieces), strict=True):
        if x.size(0):
            real = (y != IGNORE_INDEX).any(0).nonzero()
            t = int(real.max()) + 1 if len(real) else 1
            yield x[:, :t], y[:, :t]


@torch.no_grad()
def evaluate(trainer: Trainer, loader) -> tuple[float | None, int]:
    """Token-weighted mean loss over a loader (all ranks together) and the number of tokens."""
    model = trainer.raw  # not the DDP wrapper: ranks may hold different numbers of batches
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=trainer.device)
    for inputs, labels in loader:
        inputs, labels = inputs.to(trainer.device), labels.to(trainer.device)
        with trainer.autocast():
            sums[0] += token_loss_sum(model, inputs, labels).double()
        sums[1] += (labels != IGNORE_INDEX).sum()
    model.train()
    dist.all_reduce_sum(sums)
    loss, n = sums.tolist()
    return (loss / n if n else None), int(n)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))


def _finite_or_none(loss: float | None, what: str) -> float | None:
    """``loss``, or None (null in metrics.json, which refuses NaN/inf) with a note when it is not finite."""
    if loss is None or math.isfinite(loss):
        return loss
    dist.note0(f"{what} is not finite ({loss}); recorded as null")
    return None


def fresh_epoch_counters() -> dict:
    return {"batch": 0, "loss_sum": 0.0, "loss_tokens": 0, "seconds": 0.0, "win_loss": 0.0, "win_tokens": 0}


def fit(
    trainer: Trainer,
    sampler,
    make_loader: Callable[[int], Iterable],
    val_loader: Iterable | None,
    counters: dict,
    metrics: dict,
    save: Callable[[], None],
    ckpt_dir: Path,
    save_every_minutes: float,
) -> int:
    """Run the epochs from ``counters`` (possibly mid-epoch) to ``trainer.cfg.num_epochs``.

    ``make_loader(epoch)`` gives the training loader over ``sampler``; ``counters`` and ``metrics`` are updated
    in place and ``save()`` checkpoints them (every ``save_every_minutes`` and at each epoch end); ``ckpt_dir``
    receives the plot. Returns the exit code.
    """
    from tqdm import tqdm

    from midiforge.plot import plot_metrics

    device, info, num_epochs = trainer.device, trainer.info, trainer.cfg.num_epochs
    stop_after = int(os.environ.get(STOP_ENV) or 0)
    start_step = counters["step"]
    last_save = time.monotonic()
    for epoch in range(counters["epoch"], num_epochs):
        if counters["batch"] == 0:
            sampler.set_epoch(epoch)
        n_batches = len(sampler)
        record_every = max(1, n_batches // 200)  # about 200 points per epoch for the plot
        loader = make_loader(epoch)
        bar = tqdm(
            total=n_batches,
            initial=counters["batch"],
            desc=f"epoch {epoch + 1}/{num_epochs}",
            unit="batch",
            disable=not info.is_main,
            dynamic_ncols=True,
            mininterval=0.5
            if sys.stderr.isatty()
            else 30.0,  # a log file gets a line every 30 s, not a flood
        )
        t_epoch = time.monotonic() - counters["seconds"]
        t_session, session_tokens = time.monotonic(), 0
        stopping = False
        for inputs, labels in loader:
            n_local = int((labels != IGNORE_INDEX).sum())
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            due = info.is_main and time.monotonic() - last_save >= save_every_minutes * 60
            flags = dist.all_reduce_sum(
                torch.tensor([n_local, float(due)], dtype=torch.float64, device=device)
            )
            n_total, save_now = int(flags[0]), bool(flags[1] > 0)
            loss_sum, ok = trainer.train_step(inputs, labels, max(1.0, n_total / info.world_size))
            out = dist.all_reduce_sum(
                torch.stack([loss_sum.double(), torch.tensor(float(ok), device=device, dtype=torch.float64)])
            )
            ok = int(out[1]) == info.world_size
            counters["step"] += 1
            counters["batch"] += 1
            if ok:
                loss = float(out[0])
                counters["loss_sum"] += loss
                counters["loss_tokens"] += n_total
                counters["win_loss"] += loss
                counters["win_tokens"] += n_total
                counters["tokens"] += n_total
                counters["bad"] = 0
                session_tokens += n_total
                mean = counters["loss_sum"] / max(1, counters["loss_tokens"])
                rate = session_tokens / max(1e-9, time.monotonic() - t_session)
                bar.set_postfix_str(
                    f"loss {mean:.3f} ppl {perplexity(mean):.1f} {rate:,.0f} tok/s", refresh=False
                )
            else:
                counters["bad"] += 1
                dist.note0(f"step {counters['step']}: non-finite loss or gradients, step skipped")
                if counters["bad"] >= MAX_BAD_STEPS:
                    raise TrainingDiverged(
                        f"{counters['bad']} consecutive non-finite steps: training diverged;"
                        f" the last good checkpoint in {ckpt_dir} is kept. Lower -l"
                    )
            if counters["win_tokens"] and (
                counters["batch"] % record_every == 0 or counters["batch"] == n_batches
            ):
                x = round(epoch + counters["batch"] / n_batches, 6)
                metrics["steps"].append([x, counters["win_loss"] / counters["win_tokens"]])
                counters["win_loss"], counters["win_tokens"] = 0.0, 0
            bar.update(1)
            stopping = stop_after and start_step < stop_after <= counters["step"]
            if counters["batch"] < n_batches and (save_now or stopping):
                counters["seconds"] = time.monotonic() - t_epoch
                # Not mid-epoch while non-finite steps go on (``bad`` is the same on every rank): should they
                # turn into a divergence, the last good checkpoint must survive. Retried at the next step.
                if not counters["bad"]:
                    save()
                    last_save = time.monotonic()
                if stopping:
                    bar.close()
                    what = "nothing saved (non-finite steps)" if counters["bad"] else "checkpoint saved"
                    dist.print0(f"stopped after {counters['step']} steps ({STOP_ENV}); {what}")
                    return 0
        bar.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # training activations out, validation batches in
        train_loss = counters["loss_sum"] / counters["loss_tokens"] if counters["loss_tokens"] else None
        val_loss, _ = evaluate(trainer, val_loader) if val_loader is not None else (None, 0)
        train_loss = _finite_or_none(train_loss, f"epoch {epoch + 1}: training loss")
        val_loss = _finite_or_none(val_loss, f"epoch {epoch + 1}: validation loss")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        seconds = time.monotonic() - t_epoch
        metrics["epochs"].append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_perplexity": perplexity(train_loss),
                "val_loss": val_loss,
                "val_perplexity": perplexity(val_loss),
                "tokens": counters["loss_tokens"],
                "seconds": round(seconds, 3),
                "lr": trainer.lr,
                "step": counters["step"],
            }
        )
        if counters["bad"]:
            dist.note0(
                f"epoch {epoch + 1} ends after {counters['bad']} non-finite step(s) in a row; saved anyway"
                " (skipped steps leave the weights unchanged)"
            )
        counters.update(epoch=epoch + 1, **fresh_epoch_counters())
        save()
        last_save = time.monotonic()
        if info.is_main:
            try:
                plot_metrics(metrics, ckpt_dir / ckpt_io.PLOT_FILE)
            except Exception as e:  # a plotting problem must never stop training
                dist.note0(f"could not draw {ckpt_io.PLOT_FILE}: {type(e).__name__}: {e}")
        val = f", val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f})" if val_loss is not None else ""
        tl = f"{train_loss:.4f} (ppl {perplexity(train_loss):.2f})" if train_loss is not None else "n/a"
        dist.print0(
            f"epoch {epoch + 1}/{num_epochs}: train loss {tl}{val}, {seconds:.1f} s, lr {trainer.lr:.3g}"
        )
        if stopping and epoch + 1 < num_epochs:
            dist.print0(f"stopped after {counters['step']} steps ({STOP_ENV}); checkpoint saved")
            return 0
    dist.print0(f"done: {num_epochs} epochs; checkpoint in {ckpt_dir}")
    return 0
