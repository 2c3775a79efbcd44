"""The onset grid of a training set: where in the beat its notes start, and which step follows which.

A note's position is its grid step modulo one quarter note (``steps_per_quarter`` positions, 12 by default:
16ths and triplets). :class:`OnsetGrid` counts, over the training pieces, the position of each onset (a time at
which at least one note starts) given the position of the onset before it: ``counts[a, b]`` = onsets at
position b whose previous onset was at position a; row ``spq`` counts first onsets. The marginal (column sums)
is "the positions the training set uses". ``timesig[b]`` counts time-signature events at position b: beats are
counted from where a time signature starts, so one placed off the beat moves every beat after it. Training records
both in ``tokenizer.json`` (``"onset_grid"``), so that generation can mask tokens that would start notes (or time
signatures) elsewhere (constraints.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MIN_SHARE = (
    0.005  # a step pair used by fewer than this share of the onsets after its first step is masked
)
MAX_PIECES = 4000  # pieces counted (evenly spaced over the training set): enough for every common pair


@dataclass(frozen=True)
class OnsetGrid:
    steps_per_quarter: int
    counts: (
        np.ndarray
    )  # (spq + 1, spq) int64: row a = previous onset position (row spq: none), column = position
    timesig: np.ndarray | None = (
        None  # (spq,) int64: time-signature events at each position (None: not counted)
    )

    @property
    def positions(self) -> np.ndarray:
        """(spq,) int64: onsets at each position of the quarter."""
        return self.counts.sum(axis=0)

    def used(self) -> np.ndarray:
        """(spq,) bool: the positions the training set uses at all."""
        return self.positions > 0

    def timesig_allowed(self) -> np.ndarray:
        """(spq,) bool: where a time signature may start (where the training set starts them; with none counted,
        where it starts notes)."""
        if self.timesig is None or not self.timesig.any():
            return self.used()
        return self.timesig > 0

    def allowed(self, mode: str = "pairs", min_share: float = DEFAULT_MIN_SHARE) -> np.ndarray:
        """(spq + 1, spq) bool: may an onset at position b follow one at position a (row spq: the first onset)?

        ``"positions"``: every used position after anything. ``"pairs"``: the pairs the training set uses, each
        in at least ``min_share`` of the onsets after its first position; a previous position the training set
        never has (a prompt ending off the grid), and the first onset, fall back to the used positions.
        """
        used = self.used()
        out = np.tile(used, (self.steps_per_quarter + 1, 1))
        if mode == "positions":
            return out
        if mode != "pairs":
            raise ValueError(f"grid mode must be 'pairs' or 'positions', not {mode!r}")
        c = self.counts[: self.steps_per_quarter]
        total = c.sum(axis=1, keepdims=True)
        ok = (c > 0) & (c >= min_share * total)
        has = total[:, 0] > 0
        out[: self.steps_per_quarter][has] = ok[has]
        return out

    def to_json(self) -> dict:
        out = {"steps_per_quarter": self.steps_per_quarter, "counts": self.counts.tolist()}
        if self.timesig is not None:
            out["timesig"] = self.timesig.tolist()
        return out

    @classmethod
    def from_json(cls, d: dict | None) -> OnsetGrid | None:
        if not d:
            return None
        spq = int(d["steps_per_quarter"])
        counts = np.asarray(d["counts"], np.int64)
        if counts.shape != (spq + 1, spq) or (counts < 0).any():
            raise ValueError(f"onset_grid: counts must be a ({spq + 1}, {spq}) table of counts")
        ts = d.get("timesig")
        ts = None if ts is None else np.asarray(ts, np.int64)
        if ts is not None and (ts.shape != (spq,) or (ts < 0).any()):
            raise ValueError(f"onset_grid: timesig must be {spq} counts")
        return cls(spq, counts, ts)


def event_steps(tokenizer, ids, kind_name: str = "pitch") -> np.ndarray:
    """Sorted unique grid steps of the events of one kind (notes: "pitch") in token ids ``ids``."""
    v = tokenizer.vocab
    e = tokenizer.base_events(ids)
    kind = v.kind[e]
    time = np.cumsum(np.where(kind == v.k("shift"), v.value[e], 0))
    return np.unique(time[kind == v.k(kind_name)])


def add_piece(counts: np.ndarray, steps: np.ndarray, spq: int) -> None:
    """Count one piece's onsets (sorted unique grid steps) into ``counts`` (spq + 1, spq)."""
    if len(steps) == 0:
        return
    pos = steps % spq
    prev = np.concatenate([[spq], pos[:-1]])
    np.add.at(counts, (prev, pos), 1)


def count_grid(tokenizer, pieces, max_pieces: int = MAX_PIECES) -> OnsetGrid:
    """The onset grid of ``pieces`` (a sequence of token-id arrays, or a callable piece index → ids with a
    ``len``), counting at most ``max_pieces`` pieces spaced evenly over them."""
    spq = tokenizer.config.steps_per_quarter
    counts = np.zeros((spq + 1, spq), np.int64)
    timesig = np.zeros(spq, np.int64)
    n = len(pieces)
    pick = np.unique(np.linspace(0, n - 1, min(n, max_pieces)).astype(np.int64)) if n else []
    for i in pick:
        ids = pieces[int(i)]
        add_piece(counts, event_steps(tokenizer, ids), spq)
        np.add.at(timesig, event_steps(tokenizer, ids, "timesig") % spq, 1)
    return OnsetGrid(spq, counts, timesig)
