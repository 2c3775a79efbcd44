"""The sample BPE learns its merges from: a bounded, seeded, corpus-wide draw of pieces.

BPE training memory grows with the text it sees (measured: 0.66 GB at 2,500 files, 1.28 GB at 10k, so tens of
GB for Lakh). The merges only need a representative sample, so :func:`sample_texts` walks the pieces in a seeded
random order over the *whole* corpus (never "the first N files", which on a sorted folder is one artist or one
genre) and stops once ``budget`` base events were taken; the last piece is cut at a word start so that the
budget is a hard limit. Memory is then bounded by the budget, not by the corpus.

Only the sampled files are read: for a budget far below the corpus the sample costs a fraction of a pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from midiforge.notes.read import read_notes

# The default budget of `train --bpe-sample-events`; bench/bench_scale.py --bpe-check measures it (tokens per
# note against BPE learned on everything, memory, time).
DEFAULT_SAMPLE_EVENTS = 4_000_000

_SAMPLE_STREAM = 3  # numpy stream of the sample order (dataset transpositions: 1, sampler order: 2)


@dataclass
class SampleStats:
    """What a sample took: pieces read (usable or not), pieces used, base events used."""

    pieces_seen: int = 0
    pieces_used: int = 0
    events: int = 0
    truncated: bool = False  # the budget ended inside a piece
    exhausted: bool = False  # every source was read: the sample is the whole corpus


def sample_order(n: int, seed: int) -> np.ndarray:
    """The order in which ``n`` sources are drawn for the BPE sample (a permutation, deterministic per seed)."""
    return np.random.default_rng([seed, _SAMPLE_STREAM]).permutation(n)


def sample_texts(
    tokenizer,
    sources: Iterable,
    budget: int | None,
    seed: int = 0,
    stats: SampleStats | None = None,
) -> Iterator[str]:
    """BPE training texts (see ``MidiTokenizer._to_text``) of a seeded random sample of ``sources``.

    ``sources``: paths (MIDI or prepared data) or id sequences of the untrained ``tokenizer``. A sequence is
    drawn in :func:`sample_order`; any other iterable is taken in its own order. ``budget``: at most this many
    base events in all (None: every source). Unusable files are skipped (they are the dataset's business).
    """
    if budget is not None and budget < 1:
        raise ValueError(f"the BPE sample budget must be at least 1 base event, got {budget}")
    stats = stats if stats is not None else SampleStats()
    if hasattr(sources, "__len__") and hasattr(sources, "__getitem__"):
        order = sample_order(len(sources), seed)
        items = (sources[int(i)] for i in order)
    else:
        items = iter(sources)
    for src in items:
        stats.pieces_seen += 1
        if isinstance(src, str | os.PathLike):
            try:
                events, ws = tokenizer.events(read_notes(src))
            except (ValueError, OSError):  # MidiReadError, a damaged shard: the dataset reports those
                continue
        else:
            events = tokenizer.base_events(src)
            ws = tokenizer.word_starts_of_events(events)
        if not len(events):
            continue
        if budget is not None and stats.events + len(events) > budget:
            room = budget - stats.events
            # Cut at the last word start within the room, so no word is split in the middle.
            cut = np.flatnonzero(ws[: room + 1])
            end = int(cut[-1]) if len(cut) and room < len(events) else room
            events, ws = events[:end], ws[:end]
            stats.truncated = True
        if len(events):
            stats.pieces_used += 1
            stats.events += len(events)
            yield tokenizer._to_text(events, ws)
        if stats.truncated:
            return
    stats.exhausted = True
