"""Speed switches of the training step: compilation, the optimizer, and a step with no host synchronisation.

On CUDA the host must not wait for the device between steps: every ``float(tensor)`` or ``bool(tensor)``
drains the GPU's queue and leaves it idle while Python prepares the next step. So there

- the step's outcome (ok / fp16 scaler skip / bad) is computed on the device as a code (:func:`finish_step`):
  a non-finite gradient is handed to fused AdamW as ``found_inf``, which skips the update inside the kernel,
  instead of being tested on the host;
- the loop keeps each step's (loss sum, code) on the device in a :class:`Readback` and reads them all back in
  one transfer every few steps (or when a save, the stop or the epoch end needs them), then feeds them to
  :meth:`~midiforge.train.trainer.TrainState.add_step` one by one, in order, exactly as if read every step.

On the CPU nothing is gained by deferring (there is no queue), so the CPU keeps the synchronous step and reads
back every step: the same losses, bad steps and saves, bit for bit, as before this module existed.
"""

from __future__ import annotations

import time
import warnings

import torch

from midiforge.model import Transformer, run_block
from midiforge.train import distributed as dist

COMPILE_CHOICES = ("auto", "on", "off")
READBACK_EVERY = 32  # CUDA: steps between read-backs of the step results ...
READBACK_SECONDS = 1.0  # ... or this long since the last one, whichever comes first (progress bar refresh)
# inductor generates kernels (C++ on the CPU, Triton on CUDA); the tests use "aot_eager", the same graph
# capture and autograd tracing without code generation, which takes seconds instead of minutes on a CPU.
COMPILE_BACKEND = "inductor"
OK, SKIP = 0.0, 1.0  # per-rank step codes; "bad" is world_size + 1, so that a sum over ranks tells all three


def compile_enabled(mode: str, device: torch.device) -> bool:
    """``--compile``: auto = on for CUDA (measured 4x on an H200 in issue 8), off for the CPU (no gain on the
    2-core machine at tiny/small sizes, see bench/bench_compile.py, and minutes of compile time)."""
    if mode not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` with dynamic shapes: batches vary in B and T (the Σ len² sampler), and dynamic=True
    keeps that to a bounded number of graphs instead of one per shape.

    Our Transformer (alone or inside DDP) is compiled by region: one compiled :func:`midiforge.model.run_block`
    serves every layer (:class:`RegionalCompiled`), so compile time does not grow with depth (large, 24 layers,
    did not finish compiling in 120 s whole on an H200). Any other module (the bench's Hugging Face Llama) is
    compiled whole; that wrapper's state_dict has ``_orig_mod.`` keys: save the module it wraps, never it.
    """
    inner = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    if isinstance(inner, Transformer):
        return RegionalCompiled(module)
    return torch.compile(module, dynamic=True, backend=COMPILE_BACKEND)


class RegionalCompiled(torch.nn.Module):
    """``module`` (a Transformer, or DDP around one) whose blocks run through one compiled block function.

    The embedding, the final norm and the head stay eager (three kernels); the blocks are where the time goes.
    ``module`` itself is untouched: evaluation and generation on it stay eager, as without compilation.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.block_fn = torch.compile(run_block, dynamic=True, backend=COMPILE_BACKEND)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.module(idx, block_fn=self.block_fn)  # (B, T, V)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], fused: bool) -> torch.optim.AdamW:
    """AdamW; ``fused`` (CUDA) updates every parameter in one kernel and accepts ``found_inf`` on the device.
    Unfused is torch's default per-parameter loop on the CPU, which keeps CPU results as they were."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)


def finish_step(trainer, loss_sum: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """After backward: unscale, clip, optimizer and scaler step, schedule -- with no host synchronisation.

    Returns this rank's step code on the device (0-dim float64): 0 ok, 1 fp16 scaler skip, world + 1 bad.
    Same decisions as the synchronous :meth:`Trainer.train_step`: the update is skipped when the gradient
    norm is not finite; a finite loss whose scaled gradients overflowed, with the scaler lowering its scale,
    is a scaler skip; anything else non-finite is bad.
    """
    opt, scaler = trainer.optimizer, trainer.scaler
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.raw.parameters(), grad_clip)
    trainer.last_grad_norm = grad_norm.detach()  # kept on the device; only --tensorboard reads it
    grads_ok = torch.isfinite(grad_norm)  # (), on the device
    if scaler.is_enabled():
        scale_before = scaler._scale.clone()  # the scale tensor itself: get_scale() would synchronise
        scaler.step(opt)  # a fused optimizer receives the scaler's found_inf: no host check
        scaler.update()
        lowered = scaler._scale < scale_before
    else:
        opt.grad_scale, opt.found_inf = None, (~grads_ok).float()  # the fused kernel skips on found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        lowered = torch.zeros((), dtype=torch.bool, device=grads_ok.device)
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        trainer.scheduler.step()
    bad = torch.tensor(code_of("bad", trainer.info.world_size), dtype=torch.float64, device=grads_ok.device)
    code = torch.where(grads_ok, OK, torch.where(lowered, SKIP, bad))
    return torch.where(torch.isfinite(loss_sum), code, bad).double()


def code_of(status: str, world: int) -> float:
    """One rank's code of a step status (the inverse of :func:`status_of` for a single rank)."""
    return {"ok": OK, "scaler_skip": SKIP}.get(status, float(world + 1))


def status_of(code_sum: float, world: int) -> str:
    """The step's status from its codes summed over ``world`` ranks: any bad rank makes the step bad."""
    return "ok" if code_sum == 0 else ("bad" if code_sum > world else "scaler_skip")


class Readback:
    """Step results not yet read back from the device, in step order.

    ``every`` = 1 reads back after every step (the CPU); larger values read back when that many are pending,
    when :data:`READBACK_SECONDS` have passed, or when the caller needs the numbers now (save, stop, epoch end).
    """

    def __init__(self, every: int):
        self.every = max(1, every)
        self.items: list[tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]] = []
        self.last = time.monotonic()

    def __len__(self) -> int:
        return len(self.items)

    def push(self, loss_sum: torch.Tensor, code: torch.Tensor, tokens: int | torch.Tensor) -> None:
        """One step: this rank's loss sum and code (device tensors), the step's tokens on all ranks."""
        self.items.append((loss_sum, code, tokens))

    def due(self, needed: bool) -> bool:
        return needed or len(self.items) >= self.every or time.monotonic() - self.last >= READBACK_SECONDS

    def drain(self, world: int) -> list[tuple[str, float, int]]:
        """(status, loss sum over all ranks, tokens) of every pending step: one all-reduce, one transfer."""
        if not self.items:
            return []
        sums = torch.stack([torch.stack([loss.double(), code]) for loss, code, _ in self.items])  # (K, 2)
        sums = dist.all_reduce_sum(sums)
        dev = [t for _, _, t in self.items if isinstance(t, torch.Tensor)]
        if dev:  # DDP on CUDA: the token counts were all-reduced on the device too
            sums = torch.cat([sums, torch.stack(dev).double().reshape(-1, 1)], dim=1)  # (K, 3)
        rows = sums.tolist()
        out = []
        for (_, _, t), row in zip(self.items, rows, strict=True):
            tokens = int(row[2]) if isinstance(t, torch.Tensor) else t
            out.append((status_of(row[1], world), row[0], tokens))
        self.items.clear()
        self.last = time.monotonic()
        return out


def agree_step(policy, n_local: int, device, world: int, every: int):
    """(tokens of the step on all ranks, the loss normaliser, save now?): every rank must agree on them.

    Read back every step (``every`` = 1): all three on the host, as always. Deferred: the tokens stay on the
    device under DDP, and the save question waits for the read-back (None; see :func:`save_due`).
    """
    if every == 1:
        due = float(dist.current().is_main and policy.due())  # rank 0's clock decides
        flags = dist.all_reduce_sum(torch.tensor([n_local, due], dtype=torch.float64).to(device))
        n_total = int(flags[0])
        return n_total, max(1.0, n_total / world), bool(flags[1] > 0)
    if world == 1:
        return n_local, max(1.0, float(n_local)), None
    n = torch.tensor([float(n_local)], dtype=torch.float64).to(device, non_blocking=True)
    n = dist.all_reduce_sum(n)  # (1,) on the device
    return n[0], (n[0] / world).clamp_min(1.0).float(), None


def save_due(policy, device) -> bool:
    """Whether rank 0's clock says a save is due, agreed by all ranks (one read-back)."""
    due = torch.tensor([float(dist.current().is_main and policy.due())], device=device)
    return bool(dist.all_reduce_sum(due)[0] > 0)
