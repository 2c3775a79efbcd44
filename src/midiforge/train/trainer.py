"""The training machinery: :class:`Trainer` takes one optimizer step (AdamW, warmup+cosine, AMP, loss scaling,
out-of-memory splitting), :class:`TrainState` counts where the run is, :func:`evaluate` measures a dataset and
:func:`midiforge.train.loop.fit` runs the epochs. :mod:`midiforge.train.command` builds a run around them; import this
module through it, which sizes the thread pools before torch is imported.

Loss is token-weighted cross-entropy over non-padding positions, summed over every rank's tokens and divided
by their total; perplexity is exp(mean token loss), never a mean of exponentials.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from midiforge import lora
from midiforge.data.sampler import IGNORE_INDEX
from midiforge.errors import RunFailed
from midiforge.train import accel
from midiforge.train import distributed as dist

MAX_BAD_STEPS = 20  # consecutive non-finite steps before giving up
# Consecutive steps the fp16 loss scaler may skip: each halves the scale, so 64 in a row take the default
# 2**16 down to 2**-48, where no real overflow survives; only gradients that are NaN whatever the scale do.
MAX_SCALER_SKIPS = 64
OOM = torch.OutOfMemoryError
WARMUP_STEPS = 100
MIN_LR_RATIO = 0.1  # the cosine decays to this fraction of the peak learning rate
GRAD_CLIP = 1.0
BETAS = (0.9, 0.95)


class TrainingDiverged(RunFailed):
    """The loss stayed non-finite: stop without touching the last good checkpoint."""


class OutOfMemory(RunFailed):
    """A batch does not fit in memory even split as far as the run allows."""


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where a run is. Saved in every checkpoint; everything else about the run is in the RunConfig."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken (skipped ones included: the schedule follows this counter)
    batch: int = 0  # batches done in the current epoch
    tokens: int = 0  # tokens trained on, all ranks
    bad: int = 0  # consecutive non-finite steps
    scaler_skips: int = 0  # consecutive steps the fp16 loss scaler skipped (finite loss, overflowing grads)
    loss_sum: float = 0.0  # this epoch so far: summed token loss ...
    loss_tokens: int = 0  # ... over this many tokens
    seconds: float = 0.0  # time spent in this epoch before the last save (a resumed epoch adds to it)
    win_loss: float = 0.0  # the current window of the step curve (metrics.json "steps")
    win_tokens: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        """Also reads the ``counters`` dict of checkpoints made before this class (same keys, fewer)."""
        for f in fields(self):
            if f.name in d:
                setattr(self, f.name, type(getattr(self, f.name))(d[f.name]))

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0
        self.loss_sum, self.loss_tokens, self.seconds, self.win_loss, self.win_tokens = 0.0, 0, 0.0, 0.0, 0

    def add_step(self, status: str, loss: float, tokens: int, where: str) -> None:
        """Count one step; raise TrainingDiverged after too many bad ones in a row."""
        self.step += 1
        self.batch += 1
        if status == "bad":
            self.bad += 1
            dist.note0(f"step {self.step}: non-finite loss or gradients, step skipped")
            if self.bad >= MAX_BAD_STEPS:
                raise TrainingDiverged(
                    f"{self.bad} consecutive non-finite steps: training diverged; the last good checkpoint"
                    f" in {where} is kept. Lower -l"
                )
            return
        # A scaler skip is routine fp16 bookkeeping (the loss was finite): counted, not a bad step.
        self.scaler_skips = self.scaler_skips + 1 if status == "scaler_skip" else 0
        if self.scaler_skips >= MAX_SCALER_SKIPS:
            raise TrainingDiverged(
                f"the fp16 loss scaler skipped {self.scaler_skips} steps in a row (gradients are not finite"
                f" at any scale); the last good checkpoint in {where} is kept. Try --amp bf16 or lower -l"
            )
        self.bad = 0
        self.loss_sum += loss
        self.loss_tokens += tokens
        self.win_loss += loss
        self.win_tokens += tokens
        self.tokens += tokens

    def mean_loss(self) -> float | None:
        return self.loss_sum / self.loss_tokens if self.loss_tokens else None


# ---------------------------------------------------------------------------------------------- the step
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


NO_DECAY_GROUP = 1  # the optimizer's second parameter group: norms, biases, the embedding


class Trainer:
    """Model + AdamW + warmup/cosine LambdaLR + AMP (autocast, GradScaler) + one optimizer step."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        info: dist.DistInfo,
        *,
        learning_rate: float,
        weight_decay: float,
        amp: str = "off",
        compile: bool = False,
        fused: bool | None = None,
        adapters_only: bool = False,
        b_lr_ratio: float = 1.0,
    ):
        self.device, self.info = device, info
        # fused AdamW + device-side step outcome (accel.finish_step); default on CUDA only, so that the CPU
        # keeps its exact results. ``compile`` wraps the forward (accel.compile_module); ``raw`` stays the plain
        # module, so state_dict() never carries a wrapper's prefix.
        self.fused = device.type == "cuda" if fused is None else fused
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.warmup_steps = WARMUP_STEPS
        self.raw = model.to(device)
        self.model = self.raw
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.raw, device_ids=[device] if device.type == "cuda" else None
            )
        if compile:
            self.model = accel.compile_module(self.model)  # one compiled block for every layer; DDP outside it
        # ``adapters_only``: a LoRA run, whose checkpoints hold the adapter tensors only (midiforge.lora).
        self.adapters_only = adapters_only
        # Weight decay only on matrices of the blocks: not norms, biases or the (tied) embedding. Frozen
        # parameters (--freeze, LoRA's base weights) get no optimizer state at all.
        # LoRA+ (``b_lr_ratio`` != 1): the adapters' B matrices in a third group, at that multiple of the rate.
        decay, no_decay, fast = [], [], []
        for name, p in self.raw.named_parameters():
            if not p.requires_grad:
                continue
            if b_lr_ratio != 1.0 and ".lora_B." in name:
                fast.append(p)
            else:
                (no_decay if p.ndim < 2 or name.startswith("tok_emb") else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if fast:
            groups.append({"params": fast, "weight_decay": weight_decay, "lr_ratio": b_lr_ratio})
        self.optimizer = accel.adamw(groups, learning_rate, BETAS, self.fused)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.scheduler = None
        self.pieces = 1  # how many pieces a batch is split into after an out-of-memory error

    def state_dict(self) -> dict:
        return {
            "model": lora.adapter_state(self.raw) if self.adapters_only else self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, d: dict) -> None:
        """Model and optimizer must fit (RuntimeError/ValueError/KeyError otherwise); the scaler's state is
        optional (absent when the run that saved it had no fp16)."""
        if self.adapters_only:
            lora.load_adapter(self.raw, d["model"])
        else:
            self.raw.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        if d.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(d["scaler"])

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        )

    def set_schedule(self, step: int, total_steps: int) -> None:
        """(Re)build the schedule at ``step`` of ``total_steps`` with this trainer's lr and weight decay.

        Called after loading a checkpoint's optimizer state, so that the command line's values win. Short
        runs get a warmup of at most 10% of their steps (they must not stay in warmup).
        """
        self.warmup_steps = min(WARMUP_STEPS, max(1, total_steps // 10))
        # Groups by position (loading an optimizer state keeps only the saved groups' keys): decay, no decay,
        # and with LoRA+ the B matrices, which decay; their rate ratio ("lr_ratio") is saved with them.
        for i, group in enumerate(self.optimizer.param_groups):
            group["initial_lr"] = self.learning_rate * group.get("lr_ratio", 1.0)
            group["weight_decay"] = 0.0 if i == NO_DECAY_GROUP else self.weight_decay
        warmup = self.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, warmup, MIN_LR_RATIO), last_epoch=step - 1
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

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, norm: float) -> tuple[torch.Tensor, str]:
        """One optimizer step on a batch; ``norm`` = tokens of the whole step / world size (DDP averages
        gradients over ranks, so this makes the gradient that of the token-weighted mean over all ranks).

        Returns this rank's loss sum and what became of the step: ``"ok"``, ``"scaler_skip"`` (fp16: the
        loss was finite but the scaled gradients overflowed, so the scaler lowered its scale and skipped the
        update -- routine, especially early) or ``"bad"`` (non-finite loss or gradients, nothing applied).
        Reading the status synchronises with the device; :meth:`train_step_async` does not.
        """
        loss_sum = self._forward_backward_retry(inputs, labels, norm)
        if self.fused:
            return loss_sum, accel.status_of(float(accel.finish_step(self, loss_sum, GRAD_CLIP)), 1)
        return loss_sum, self._finish_sync(loss_sum)

    def train_step_async(self, inputs, labels, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`train_step` with the status as a code on the device (see :func:`accel.finish_step`); with
        ``fused`` nothing in it waits for the device. ``norm`` may be a device tensor (DDP on CUDA)."""
        loss_sum = self._forward_backward_retry(inputs, labels, norm)
        if self.fused:
            return loss_sum, accel.finish_step(self, loss_sum, GRAD_CLIP)
        code = accel.code_of(self._finish_sync(loss_sum), self.info.world_size)
        return loss_sum, torch.tensor(code, device=self.device, dtype=torch.float64)

    def _forward_backward_retry(self, inputs, labels, norm) -> torch.Tensor:
        """Forward and backward, halving the batch into more pieces after each out-of-memory error."""
        while True:
            try:
                loss_sum = self._forward_backward(inputs, labels, norm)
                break
            except OOM as e:
                if self.info.enabled or self.pieces >= inputs.size(0):
                    # Ranks must take the same steps: one rank cannot retry alone (a lone retry would hang the others).
                    raise OutOfMemory(
                        f"out of memory on a batch of {tuple(inputs.shape)} tokens; lower -b/--max-batch-size"
                    ) from e
            # Outside the except block: the exception's frames, and the activations they hold, are gone now.
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.pieces *= 2
            dist.note0(f"out of memory: splitting batches into {self.pieces} pieces (consider lowering -b)")
        return loss_sum

    def _finish_sync(self, loss_sum: torch.Tensor) -> str:
        """Unscale, clip, step, schedule, deciding on the host (the unfused CPU path, as it always was)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), GRAD_CLIP)
        self.last_grad_norm = grad_norm.detach()  # read by --tensorboard only (a device sync there)
        # Identical on every rank (gradients are all-reduced), so every rank takes the same decision.
        grads_ok = bool(torch.isfinite(grad_norm))
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        if grads_ok or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the scaler skips the step itself on inf/nan gradients
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule follows the step counter, skipped steps included (so resuming can rebuild it from
            # the counter); torch warns when the very first optimizer steps were skipped.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        if not bool(torch.isfinite(loss_sum)):
            return "bad"
        if grads_ok:
            return "ok"
        # Finite loss, non-finite gradients: with loss scaling the scaler has lowered its scale and skipped.
        return "scaler_skip" if self.scaler.is_enabled() and self.scaler.get_scale() < scale else "bad"


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


def bits_per_note(loss: float | None, tokens: int, notes: int) -> float | None:
    """Total negative log-likelihood in bits over the number of notes: comparable across tokenizers."""
    return None if loss is None or not notes else loss * tokens / notes / math.log(2)


def _finite_or_none(loss: float | None, what: str) -> float | None:
    """``loss``, or None (null in metrics.json, which refuses NaN/inf) with a note when it is not finite."""
    if loss is None or math.isfinite(loss):
        return loss
    dist.note0(f"{what} is not finite ({loss}); recorded as null")
    return None
