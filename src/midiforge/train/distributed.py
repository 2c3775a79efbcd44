"""Process-group plumbing for data-parallel training: who am I, rank-0 output, sums across ranks, spawning.

Two ways in: ``torchrun`` (or any launcher) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and we
join that group; a plain ``python train.py`` on a machine with several GPUs calls :func:`spawn` to start one
worker per GPU itself. One process with no such variables is world size 1 and never touches
``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """The process's place in the job, from the launcher's environment variables (defaults: alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))),
        world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def env_problems() -> list[str]:
    """What is wrong with the launcher's variables (empty when alone or when they are complete)."""
    info = from_env()
    if info.world_size <= 1:
        return []
    problems = [f"{v} is not set" for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if not 0 <= info.rank < info.world_size:
        problems.append(f"RANK={info.rank} is not in 0..{info.world_size - 1}")
    return problems


TIMEOUT_ENV = "MIDIFORGE_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 360.0


def timeout() -> datetime.timedelta:
    """How long a collective may wait (env MIDIFORGE_DIST_TIMEOUT_MINUTES, default 6 h): rank 0 trains BPE
    and fills the token cache while the other ranks wait at a barrier, far beyond NCCL's default 10 min."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = DEFAULT_TIMEOUT_MINUTES
    if not minutes > 0:
        minutes = DEFAULT_TIMEOUT_MINUTES
    return datetime.timedelta(minutes=minutes)


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA, gloo for CPU) when the job has more than one process."""
    if not info.enabled or dist.is_initialized():
        return
    kw = dict(rank=info.rank, world_size=info.world_size, timeout=timeout())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kw)
    else:
        dist.init_process_group("gloo", **kw)


def shutdown() -> None:
    """Leave the process group. Collect garbage first: the run's DDP wrapper, caught in reference cycles
    (the loop's closures), still holds the group; destroyed later, at interpreter exit, its gloo threads
    abort the process ("terminate called without an active exception", exit -6, one run in ~6 here)."""
    if dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op alone)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks, in place (no-op alone)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place (no-op alone)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


_INFO = DistInfo()


def set_current(info: DistInfo) -> None:
    global _INFO
    _INFO = info


def current() -> DistInfo:
    """This process's place in the job, as set by :func:`set_current` (alone by default)."""
    return _INFO


def device_problems(info: DistInfo, device: torch.device, explicit_index: bool) -> list[str]:
    """Why ranks cannot each have a GPU of their own (NCCL refuses, or hangs, when two ranks share one).

    Two ranks on one GPU is not supported: fail at once with the fix, instead of hanging in NCCL.
    """
    if device.type != "cuda" or not info.enabled:
        return []
    n = torch.cuda.device_count()
    if info.local_world_size > n:
        return [
            f"{info.local_world_size} processes on this machine but {n} GPU(s): each rank needs a GPU of its"
            f" own; start at most {n} per machine, or pass --device cpu (gloo)"
        ]
    if explicit_index and info.local_world_size > 1:
        return [f"--device {device} would put every rank on one GPU; pass --device cuda (one GPU per rank)"]
    return []


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only: one voice for the whole job."""
    if _INFO.is_main:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def note0(msg: str) -> None:
    """A one-line note/warning for the user on stderr, rank 0 only."""
    print0(f"note: {msg}", file=sys.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(index: int, fn, nprocs: int, port: int, fn_args: tuple) -> None:
    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    code = fn(*fn_args)
    if code:
        sys.exit(code)


def spawn(fn, nprocs: int, fn_args: tuple = ()) -> None:
    """Run ``fn(*fn_args)`` in ``nprocs`` local processes that form one job (ranks 0..nprocs-1)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(fn, nprocs, free_port(), fn_args), nprocs=nprocs, join=True)
