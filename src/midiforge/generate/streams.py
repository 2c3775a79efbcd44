"""One random stream per sample: sample k of a batch draws from (seed, k) alone, so ``-n 5`` and ``-n 20`` with
the same seed give the same first samples, on any device.

Counter-based: the draw of sample k at its step j is a hash of (seed, k, j) in integer arithmetic (exact on every
device; every product stays below 2**63), so no generator state is carried between steps or shared by rows.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x5BD1E995  # odd multipliers below 2**31: a 32-bit value times one fits in int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


class RowStreams:
    """``uniform(B, device)``: (B, 1) float32 uniforms in [0, 1), row k from stream (seed, k); each call is the
    next step. Passed to :func:`midiforge.generate.sampling.sample` in place of a torch.Generator."""

    def __init__(self, seed: int):
        self.seed = int(seed) & ((1 << 64) - 1)
        self.step = 0

    def uniform(self, rows: int, device) -> torch.Tensor:
        k = torch.arange(rows, dtype=torch.int64, device=device)
        h = _mix(torch.full_like(k, self.seed & _MASK32))
        h = _mix(h ^ ((self.seed >> 32) & _MASK32))
        h = _mix(h ^ k)
        h = _mix(h ^ (self.step & _MASK32))
        h = _mix(h ^ ((self.step >> 32) & _MASK32))
        self.step += 1
        return ((h >> 8).float() / float(1 << 24))[:, None]  # 24 bits: exact in float32, < 1
