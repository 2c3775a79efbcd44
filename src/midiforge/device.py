"""The torch device a command runs on, from the user's spelling of it (one rule for every command)."""

from __future__ import annotations

import torch

from midiforge.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """``name`` (cpu, cuda, cuda:N, mps, or auto = CUDA when available, else the CPU) as a device that exists
    here. Raises UsageError for a misspelt or unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"invalid device {name!r}") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r} (cpu, cuda, cuda:N, mps or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name} requested but MPS is not available")
    return device
