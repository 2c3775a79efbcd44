"""Batching: the Σ len² sampler that packs windows under a budget, and the collate that pads them.

The budget is ``sum(L ** 2)`` per batch (attention's cost grows with the square of a window's length), given
with ``-b/--max-batch-size``; in code it is called ``batch_budget``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # label value at padding; what torch's cross_entropy ignores by default
_ORDER_STREAM = (
    2  # numpy seed stream of the batch order ([seed, epoch, stream]); dataset.py's transpositions use 1
)


# --------------------------------------------------------------------------------------------- batching


def collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of (inputs, labels) to (B, T): inputs with ``pad_id``, labels with -100."""
    t = max(len(x) for x, _ in batch)
    inputs = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        inputs[row, : len(x)] = x
        labels[row, : len(y)] = y
    return inputs, labels


def padding_fraction(lengths: np.ndarray, batches: Iterable[Sequence[int]]) -> float:
    """Share of padded positions when each batch is right-padded to its longest sample."""
    real = padded = 0
    for batch in batches:
        lens = np.asarray(lengths)[np.asarray(batch, np.int64)]
        real += int(lens.sum())
        padded += len(lens) * int(lens.max())
    return 1.0 - real / padded if padded else 0.0


def plan_batches(
    lengths: np.ndarray, order: np.ndarray, batch_budget: int, max_tokens: int | None = None
) -> tuple[list[np.ndarray], int]:
    """Cut ``order`` (sample indices, sorted by length) into consecutive batches with ``sum(L ** 2)`` within
    the budget (and at most ``max_tokens`` padded tokens). A batch is closed *before* a sample that would
    overshoot. A sample that cannot fit any batch goes alone. Returns (batches, number of such samples)."""
    batches: list[np.ndarray] = []
    current: list[int] = []
    cost = longest = 0
    num_oversized = 0
    for i, length in zip(order.tolist(), np.asarray(lengths)[order].tolist(), strict=True):
        c = length * length
        if c > batch_budget or (max_tokens is not None and length > max_tokens):
            num_oversized += 1
            batches.append(np.asarray([i], np.int64))
            continue
        m = max(longest, length)
        if current and (cost + c > batch_budget or (max_tokens and (len(current) + 1) * m > max_tokens)):
            batches.append(np.asarray(current, np.int64))
            current, cost, m = [], 0, length
        current.append(i)
        cost += c
        longest = m
    if current:
        batches.append(np.asarray(current, np.int64))
    return batches, num_oversized


class MidiDatasetSampler(torch.utils.data.Sampler):
    """Batches of sample indices with ``sum(L ** 2) <= batch_budget`` (use as a DataLoader batch_sampler).

    Each epoch: samples sorted by length (seeded random tie-breaks), packed greedily under the budget, batch
    order shuffled with a generator seeded by ``(seed, epoch)``. Every rank computes the same plan; it is
    padded by repeating batches to a multiple of ``world_size`` and rank r takes batches r, r+W, ...

    ``max_tokens`` also caps ``batch_size * longest`` (padded tokens). Without it, ``sum(L ** 2)`` lets short
    samples form huge batches (budget 8×1536² holds 1887 samples of 100 tokens: 15× the tokens, so the
    logits' memory, of a batch of 1536-token samples) that also mix very different lengths (padding).
    ``"auto"`` (default) uses ``batch_budget // longest``, the tokens of a batch of the longest samples
    (of those that fit the budget) of the epoch; ``None`` keeps only the ``sum(L ** 2)`` rule.

    ``len(sampler)`` is the number of batches of a whole epoch on this rank; after ``load_state_dict`` the
    next iteration yields only the ``len - position`` batches that were left.
    """

    def __init__(
        self,
        dataset,
        batch_budget: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | str | None = "auto",
    ):
        if batch_budget < 1:
            raise ValueError(f"batch_budget must be positive, got {batch_budget}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if not (
            max_tokens is None or max_tokens == "auto" or (isinstance(max_tokens, int) and max_tokens > 0)
        ):
            raise ValueError(f"max_tokens must be a positive int, 'auto' or None, got {max_tokens!r}")
        self.dataset = dataset
        self.batch_budget = int(batch_budget)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Move to an epoch (also the dataset's: its windows depend on the epoch) and start it from batch 0."""
        self.epoch = epoch
        self.dataset.set_epoch(epoch)
        self.position = 0  # batches of this epoch already yielded on this rank
        self._start = 0
        self._plan = None

    def global_plan(self) -> list[np.ndarray]:
        """All ranks' batches of the current epoch, in order, padded to a multiple of ``world_size``."""
        lengths = np.asarray(self.dataset.lengths, np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, _ORDER_STREAM])
        if self.shuffle:
            order = np.lexsort((rng.random(len(lengths)), lengths))
        else:
            order = np.argsort(lengths, kind="stable")
        max_tokens = self.max_tokens
        if max_tokens == "auto":
            fitting = lengths[lengths * lengths <= self.batch_budget]
            max_tokens = self.batch_budget // max(int(fitting.max()), 1) if len(fitting) else None
        batches, num_oversized = plan_batches(lengths, order, self.batch_budget, max_tokens)
        if num_oversized:
            warnings.warn(
                f"{num_oversized} samples are longer than the batch budget allows (L**2 > {self.batch_budget}"
                f"{f' or L > {max_tokens} tokens' if max_tokens else ''}); each goes alone in a batch."
                " Use max_sequence_length <= isqrt(batch_budget).",
                stacklevel=2,
            )
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if batches and len(batches) % self.world_size:
            extra = self.world_size - len(batches) % self.world_size
            batches += [batches[i % len(batches)] for i in range(extra)]
        return batches

    def _rank_plan(self) -> list[np.ndarray]:
        if self._plan is None:
            self._plan = self.global_plan()[self.rank :: self.world_size]
        return self._plan

    def __len__(self) -> int:
        return len(self._rank_plan())

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._rank_plan()
        start, self._start = self._start, 0
        self.position = start
        for batch in plan[start:]:
            self.position += 1
            yield batch.tolist()

    def padding_fraction(self) -> float:
        """Share of padded positions in this rank's batches of the current epoch."""
        return padding_fraction(self.dataset.lengths, self._rank_plan())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues the saved epoch's plan after ``position`` batches."""
        if state["seed"] != self.seed:
            warnings.warn(
                f"sampler seed {self.seed} replaced by the checkpoint's {state['seed']}", stacklevel=2
            )
            self.seed = state["seed"]
        self.set_epoch(state["epoch"])
        self.position = self._start = int(state["position"])
