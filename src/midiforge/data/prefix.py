"""The control prefix of training pieces: each piece's controls, measured from the piece, with control dropout.

The controls are measured from the piece's own tokens (decoded once per piece and transposition, then kept):
the tokens hold everything the estimator reads (programs, first tempo, time and key signature, notes), so the
token cache needs no second column, a transposed piece gets its transposed key, and the bench judges generated
samples with exactly the estimator that made the labels (:func:`midiforge.tokens.controls.measure`).

Each epoch, each control of each piece is dropped with probability ``dropout`` (seeded by seed, epoch, piece),
so the model also learns every control's absence; generating with no controls stays what it was. The prefix goes
after BOS, so only the window that starts a piece carries it (as at generation, where BOS + prefix start).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from midiforge.notes.midi import score_to_notes
from midiforge.tokens.controls import Controls, drop, measure, prefix_events

_CONTROL_STREAM = 0x11C0  # numpy stream id of control dropout (apart from the transposition stream)


@dataclass
class ControlPrefix:
    """``tags``: file path → tag name (files of ``-t NAME=DIR``); the tokenizer's ``tags`` fixes the slots."""

    tokenizer: object
    dropout: float = 0.5
    seed: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    _measured: dict = field(default_factory=dict)  # (piece file, transposition) → Controls

    def controls(self, path: str, ids: np.ndarray, transpose: int) -> Controls:
        key = (path, int(transpose))
        c = self._measured.get(key)
        if c is None:
            # The key label is the Krumhansl estimate of the notes, not the key signature: the estimator that
            # judges adherence makes the labels, and a signature names two keys (D minor and F major share one).
            c = measure(score_to_notes(self.tokenizer.decode(ids)), use_key_signature=False)
            c = self._measured[key] = replace(c, tag=self.tags.get(path))
        return c

    def room(self, path: str, ids: np.ndarray, transpose: int) -> int:
        """Tokens of the piece's whole control prefix (nothing dropped): what its windows leave free for it."""
        events = prefix_events(self.controls(path, ids, transpose), self.tokenizer.vocab, self.tokenizer.tags)
        return len(events)

    def prefix_ids(self, path: str, ids: np.ndarray, transpose: int, epoch: int, piece: int) -> np.ndarray:
        """Token ids of the piece's control prefix this epoch (dropout applied)."""
        c = self.controls(path, ids, transpose)
        c = drop(c, np.random.default_rng([self.seed, epoch, _CONTROL_STREAM, piece]), self.dropout)
        events = prefix_events(c, self.tokenizer.vocab, self.tokenizer.tags)
        return self.tokenizer.base_token_ids(events) if events else np.zeros(0, np.int64)
