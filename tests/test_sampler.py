"""MidiDatasetSampler and collate, on a fake dataset (only ``lengths`` and ``set_epoch`` matter)."""

import math
import warnings

import numpy as np
import pytest
import torch

from midiforge.data.sampler import IGNORE_INDEX, MidiDatasetSampler, collate, padding_fraction


class FakeDataset:
    """Lengths that change with the epoch, like a dataset with augmentation."""

    def __init__(self, n=500, max_len=64, seed=0):
        self.n, self.max_len, self.seed = n, max_len, seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.lengths = rng.integers(1, self.max_len + 1, size=self.n)

    def __len__(self):
        return self.n


BUDGET = 8 * 64**2


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_budget_coverage_and_len():
    ds = FakeDataset()
    sampler = MidiDatasetSampler(ds, BUDGET, seed=1)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        for b in batches:
            assert sum(int(ds.lengths[i]) ** 2 for i in b) <= BUDGET
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(ds.n))  # every sample exactly once


def test_batches_are_full_no_premature_close():
    # Sorted packing: every batch but the last (in sorted order) could not take its successor's first sample.
    ds = FakeDataset()
    sampler = MidiDatasetSampler(ds, BUDGET, shuffle=False, max_tokens=None)
    batches = list(sampler)
    for b, nxt in zip(batches, batches[1:], strict=False):
        cost = sum(int(ds.lengths[i]) ** 2 for i in b)
        assert cost + int(ds.lengths[nxt[0]]) ** 2 > BUDGET
    # with the default token cap, a batch closes when either limit would be passed
    sampler = MidiDatasetSampler(ds, BUDGET, shuffle=False)
    cap = BUDGET // int(ds.lengths.max())
    batches = list(sampler)
    for b, nxt in zip(batches, batches[1:], strict=False):
        cost = sum(int(ds.lengths[i]) ** 2 for i in b)
        nxt_len = int(ds.lengths[nxt[0]])
        assert cost + nxt_len**2 > BUDGET or (len(b) + 1) * nxt_len > cap


def test_order_differs_between_epochs_and_repeats_with_seed():
    ds = FakeDataset()
    a = MidiDatasetSampler(ds, BUDGET, seed=3)
    e0, e1 = epoch_batches(a, 0), epoch_batches(a, 1)
    b = MidiDatasetSampler(FakeDataset(), BUDGET, seed=3)
    assert epoch_batches(b, 0) == e0
    assert epoch_batches(b, 1) == e1
    ds_same = FakeDataset()
    ds_same.set_epoch = lambda e: None  # same lengths in every epoch: only the sampler's shuffle differs
    c = MidiDatasetSampler(ds_same, BUDGET, seed=3)
    assert epoch_batches(c, 0) != epoch_batches(c, 1)
    d = MidiDatasetSampler(ds_same, BUDGET, seed=4)
    assert epoch_batches(d, 0) != epoch_batches(c, 0)


def test_oversized_sample_alone_with_warning():
    ds = FakeDataset(n=50, max_len=20)
    ds.lengths[7] = 100  # 100**2 > budget
    ds.set_epoch = lambda e: None
    sampler = MidiDatasetSampler(ds, 8 * 20**2)
    with pytest.warns(UserWarning, match="1 samples are longer"):
        batches = list(sampler)
    assert [7] in batches
    assert sorted(i for b in batches for i in b) == list(range(50))


@pytest.mark.parametrize("max_tokens", [256, "auto"])
def test_max_tokens_caps_padded_tokens(max_tokens):
    ds = FakeDataset(n=300, max_len=64)
    sampler = MidiDatasetSampler(ds, BUDGET, max_tokens=max_tokens)
    cap = 256 if max_tokens == 256 else BUDGET // int(ds.lengths.max())
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert len(b) * max(int(ds.lengths[i]) for i in b) <= cap
    # without the cap, the shortest samples share one huge batch
    uncapped = MidiDatasetSampler(ds, BUDGET, max_tokens=None)
    assert max(len(b) for b in uncapped) > max(len(b) for b in batches)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_ranks_equal_and_cover(world_size):
    ds = FakeDataset(n=333)
    samplers = [
        MidiDatasetSampler(ds, BUDGET, seed=5, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for epoch in range(2):
        per_rank = [epoch_batches(s, epoch) for s in samplers]
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1 and counts == {len(samplers[0])}
        seen = [i for batches in per_rank for b in batches for i in b]
        assert set(seen) == set(range(ds.n))
        # padding repeats fewer than world_size batches
        single = MidiDatasetSampler(ds, BUDGET, seed=5)
        n_plan = len(epoch_batches(single, epoch))
        assert counts.pop() == math.ceil(n_plan / world_size)


def test_mid_epoch_resume_identical_remaining():
    ds = FakeDataset()
    sampler = MidiDatasetSampler(ds, BUDGET, seed=9)
    sampler.set_epoch(2)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 5, "seed": 9}
    rest = list(it)

    resumed = MidiDatasetSampler(FakeDataset(), BUDGET, seed=9)
    resumed.load_state_dict(state)
    assert list(resumed) == rest
    assert resumed.state_dict()["position"] == len(resumed) == len(head) + len(rest)
    # a following set_epoch starts the next epoch from its beginning
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed)


def test_resume_distributed():
    ds = FakeDataset()
    s = MidiDatasetSampler(ds, BUDGET, seed=1, rank=1, world_size=2)
    batches = list(s)
    s2 = MidiDatasetSampler(FakeDataset(), BUDGET, seed=1, rank=1, world_size=2)
    s2.load_state_dict({"epoch": 0, "position": 3, "seed": 1})
    assert list(s2) == batches[3:]


def test_empty_dataset():
    ds = FakeDataset(n=0)
    sampler = MidiDatasetSampler(ds, BUDGET, world_size=2, rank=1)
    assert len(sampler) == 0 and list(sampler) == []


def test_padding_fraction_small_when_sorted():
    ds = FakeDataset(n=2000, max_len=512)
    ds.lengths = np.maximum(ds.lengths, 256)  # windows of long pieces: mostly long
    ds.set_epoch = lambda e: None
    sampler = MidiDatasetSampler(ds, 8 * 512**2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frac = sampler.padding_fraction()
    assert 0.0 <= frac < 0.05
    batches = list(sampler)
    real = sum(ds.lengths[b].sum() for b in batches)
    assert frac == pytest.approx(1 - real / sum(len(b) * ds.lengths[b].max() for b in batches))
    assert padding_fraction(np.array([2, 4]), [[0, 1]]) == pytest.approx(0.25)


def test_collate():
    batch = [(torch.tensor([5, 6, 7]), torch.tensor([6, 7, 2])), (torch.tensor([9]), torch.tensor([2]))]
    inputs, labels = collate(batch, pad_id=0)
    assert inputs.dtype == labels.dtype == torch.long
    assert inputs.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert labels.tolist() == [[6, 7, 2], [2, IGNORE_INDEX, IGNORE_INDEX]]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        MidiDatasetSampler(FakeDataset(), 0)
    with pytest.raises(ValueError):
        MidiDatasetSampler(FakeDataset(), BUDGET, rank=2, world_size=2)
    with pytest.raises(ValueError):
        MidiDatasetSampler(FakeDataset(), BUDGET, max_tokens=0)
