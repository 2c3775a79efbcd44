"""The base event vocabulary of :class:`~midiforge.tokens.tokenizer.MidiTokenizer`: one contiguous id range per event
kind (see the event list in tokenizer.py), and the per-id kind/value tables that encoding and decoding use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from midiforge.notes.midi import DRUM_PROGRAM, MAX_TRACK_INDEX
from midiforge.tokens.controls import CONTROL_SIZES


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything that fixes the base event vocabulary. Saved in tokenizer.json."""

    steps_per_quarter: int = 12  # grid: 16ths and triplets exact
    max_shift: int = 96  # longest single SHIFT, in steps (8 quarters)
    velocity_bins: int = 16
    max_short_duration: int = 96  # durations 0..96 steps are exact...
    max_long_duration_quarters: int = 32  # ...then whole quarters up to this
    tempo_bins: int = 128
    tempo_min: float = 16.0
    tempo_max: float = 320.0
    ts_max_numerator: int = 12
    ts_denominators: tuple[int, ...] = (2, 4, 8, 16)
    word_split: str = "onset"  # "onset" or "beat": where BPE words end
    output_tpq: int = 480  # ticks per quarter of decoded scores
    # What the stream carries beyond notes, tempo and meter (all three off: the information REMI(use_programs)
    # keeps, and the events v3 stream). Off, the base vocabulary still has the kinds; they are never written.
    tracks: bool = True  # TRACK: several tracks of one program stay apart (off: merged into one)
    pedals: bool = True  # PEDAL: the sustain pedal
    key_signatures: bool = True  # KEYSIG


LAYOUT_FLAGS = ("tracks", "pedals", "key_signatures")


class Vocab:
    """Base event layout: contiguous id ranges per event type."""

    def __init__(self, c: TokenizerConfig):
        self.c = c
        spq = c.steps_per_quarter
        self.durations = np.concatenate(
            [
                np.arange(c.max_short_duration + 1),
                np.arange(c.max_short_duration // spq + 1, c.max_long_duration_quarters + 1) * spq,
            ]
        ).astype(np.int64)
        # Nearest duration value of every whole number of steps (ties go to the shorter value).
        mids = (self.durations[1:] + self.durations[:-1]) / 2
        self.duration_index = np.searchsorted(mids, np.arange(self.durations[-1] + 1), side="left")
        self.tempos = np.geomspace(c.tempo_min, c.tempo_max, c.tempo_bins)
        self.log_tempos = np.log(self.tempos)
        self.time_sigs = [(n, d) for d in c.ts_denominators for n in range(1, c.ts_max_numerator + 1)]
        self.time_sig_index = {ts: i for i, ts in enumerate(self.time_sigs)}
        sizes = {
            "shift": c.max_shift,
            "program": DRUM_PROGRAM + 1,
            "velocity": c.velocity_bins,
            "pitch": 128,
            "duration": len(self.durations),
            "tempo": c.tempo_bins,
            "timesig": len(self.time_sigs),
            # Added with EVENTS_VERSION 4, after the old kinds so that older tokenizers' ids are unchanged.
            "track": MAX_TRACK_INDEX + 1,
            "keysig": 30,  # (sharps + 7) * 2 + tonality
            "pedal": 2,  # 0 = off, 1 = on
            **{k: CONTROL_SIZES[k](self) for k in CONTROL_SIZES},
            # Infilling sentinels (fim.py): never produced by events(), so ordinary pieces, EVENTS_VERSION and
            # token caches are unchanged; only the rearranged training windows and infill prompts hold them.
            "fim": 4,  # 0 = FIM_SUFFIX, 1 = FIM_MIDDLE, 2 = FIM_END, 3 = FIM_TRACKS
        }
        self.start: dict[str, int] = {}
        n = 0
        for name, size in sizes.items():
            self.start[name] = n
            n += size
        self.size = n
        self.sizes = sizes
        self.kind = np.empty(n, dtype=np.int8)  # event type index per base id
        self.value = np.empty(n, dtype=np.int64)  # value within its type
        for k, (name, size) in enumerate(sizes.items()):
            self.kind[self.start[name] : self.start[name] + size] = k
            self.value[self.start[name] : self.start[name] + size] = np.arange(size)
        self.value[: c.max_shift] += 1  # SHIFT(k) advances k steps, k >= 1
        self.kinds = list(sizes)

    def k(self, name: str) -> int:
        return self.kinds.index(name)

    def names(self) -> list[str]:
        out = []
        for name, size in self.sizes.items():
            out += [f"{name.upper()}_{v}" for v in range(size)]
        return out


def changes(x: np.ndarray) -> np.ndarray:
    """True where an element differs from the one before it (always True for the first)."""
    out = np.empty(len(x), dtype=bool)
    if len(x):
        out[0] = True
        np.not_equal(x[1:], x[:-1], out=out[1:])
    return out
