"""MidiTokenizer: notes → score events (the "sheet") → BPE tokens, and back.

The event language (one base event = one character for BPE):

    SHIFT(k)      advance time by k grid steps (12 per quarter note; k = 1..96, longer rests repeat SHIFT(96))
    PROGRAM(p)    the following notes belong to program p (0..127) or to the drums (128); sticky
    VELOCITY(b)   the following notes have velocity bin b (16 bins of 8); sticky
    PITCH(p) DUR(d)   one note at the current time; a PITCH without its DUR (or a DUR alone) is skipped
    TEMPO(b)      tempo change to bin b (128 log-spaced bins, 16..320 quarters/min, ±1.2 %)
    TIMESIG(n/d)  time-signature change
    TRACK(i)      the following notes/pedals belong to the i-th track (0..7) of their program; sticky
    KEYSIG(k)     key-signature change (sharps -7..7 × major/minor)
    PEDAL(0|1)    sustain pedal (CC64) off / on, for the current program and track, on the grid
    CTL_*         control prefix events (see controls.py); never produced by events(), only prepended

Times are absolute grid positions rounded once (no drift); PROGRAM and VELOCITY are emitted only when they change,
which is what makes the stream short. BPE words end where time moves (``word_split="onset"``) or at beats
(``"beat"``), so one piece is never one giant word. ``TokenizerConfig(tracks=False, pedals=False,
key_signatures=False)`` writes no TRACK, PEDAL or KEYSIG: the information REMI(use_programs) keeps (the events v3
stream), for comparing the two ways of writing it (bench/bench_quality.py). Encoding (tokens/encode.py) works on
symusic's numpy arrays: no Python loop per note. Decoding is total: every sequence of in-vocabulary ids gives a
valid Score.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import asdict
from functools import cached_property

import numpy as np
import symusic

from midiforge.fsio import atomic_write_bytes
from midiforge.notes.midi import NoteTable, load_score, score_to_notes
from midiforge.notes.read import read_notes
from midiforge.tokens.bpe_sample import sample_texts
from midiforge.tokens.detok import events_to_score
from midiforge.tokens.encode import note_events
from midiforge.tokens.onsetgrid import OnsetGrid
from midiforge.tokens.sheet import sheet_events
from midiforge.tokens.vocab import LAYOUT_FLAGS, TokenizerConfig, Vocab, changes
from midiforge.version import __version__

FORMAT = "midiforge.tokenizer/1"
# Bump when events() changes its output for the same config: fingerprints (token caches, prepared JSON sheets)
# then stop matching, so nothing encoded by older code is reused.
EVENTS_VERSION = 4
LEGACY_EVENTS_VERSION = 3  # tokenizer.json files without "events_version": no TRACK/KEYSIG/PEDAL, no controls
SPECIALS = ("<pad>", "<bos>", "<eos>")
CHAR_BASE = 0x4E00  # base event i is the character chr(CHAR_BASE + i): printable, never whitespace
WORD_SEP = " "


class MidiTokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, config: TokenizerConfig | None = None):
        self.config = config or TokenizerConfig()
        if self.config.word_split not in ("onset", "beat"):
            raise ValueError(f"word_split must be 'onset' or 'beat', not {self.config.word_split!r}")
        self.vocab = Vocab(self.config)
        self._bpe = None  # tokenizers.Tokenizer once trained
        # What events() writes: EVENTS_VERSION for a new tokenizer; a loaded one keeps the version it was saved
        # with (LEGACY_EVENTS_VERSION for files without the field), so that its BPE merges, its fingerprint and
        # the checkpoints trained with it stay valid.
        self.events_version = EVENTS_VERSION
        self.tags: list[str] = []  # style-tag names of the CTL_TAG slots, in slot order (set by training)
        self.onset_grid: OnsetGrid | None = None  # where the training set starts notes (recorded by training)
        self._set_tables()

    # ------------------------------------------------------------------ vocabulary
    def _set_tables(self) -> None:
        """id → base-event sequences as a flat array + offsets (decode is one gather, no loop per token)."""
        nspec = len(SPECIALS)
        if self._bpe is None:
            seqs = [np.zeros(0, np.int64)] * nspec + [np.array([i]) for i in range(self.vocab.size)]
        else:
            vocab = self._bpe.get_vocab()
            seqs = [None] * len(vocab)
            for tok, i in vocab.items():
                seqs[i] = (
                    np.zeros(0, np.int64)
                    if tok in SPECIALS
                    else np.array([ord(ch) - CHAR_BASE for ch in tok])
                )
            assert all(self._bpe.token_to_id(s) == i for i, s in enumerate(SPECIALS)), (
                "specials must be 0,1,2"
            )
        self._lens = np.array([len(s) for s in seqs], dtype=np.int64)
        self._offs = np.concatenate([[0], np.cumsum(self._lens)])
        self._flat = np.concatenate(seqs).astype(np.int64)
        first = np.full(len(seqs), -1, dtype=np.int64)
        has = self._lens > 0
        first[has] = self._flat[self._offs[:-1][has]]
        self._starts_with_shift = has & (first >= 0) & (first < self.config.max_shift)
        self.__dict__.pop("fingerprint", None)

    def __len__(self) -> int:
        return len(self._lens)

    @property
    def is_trained(self) -> bool:
        return self._bpe is not None

    @property
    def has_controls(self) -> bool:
        """Whether this tokenizer's vocabulary has the CTL_* control events (not one saved before them)."""
        return self.events_version >= 4

    def base_token_ids(self, events) -> np.ndarray:
        """The token id of each single base event (every base event is a token of its own, BPE or not)."""
        events = np.asarray(events, dtype=np.int64)
        if self._bpe is None:
            return events + len(SPECIALS)
        return np.array([self._bpe.token_to_id(chr(CHAR_BASE + int(e))) for e in events], dtype=np.int64)

    @cached_property
    def base_fingerprint(self) -> str:
        """Identifies the base event vocabulary (the config, not the BPE merges)."""
        blob = json.dumps([self.events_version, self._state()["config"]], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @cached_property
    def fingerprint(self) -> str:
        blob = json.dumps([self.events_version, self._state()], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def token_names(self, ids) -> list[str]:
        """Human-readable base events of each id (for debugging and docs)."""
        names = self.vocab.names()
        return [
            SPECIALS[i]
            if i < len(SPECIALS)
            else "+".join(names[b] for b in self._flat[self._offs[i] : self._offs[i + 1]])
            for i in np.asarray(ids).tolist()
        ]

    # ------------------------------------------------------------------ encoding
    def encode(self, x, transpose: int = 0) -> list[int]:
        """Token ids of a piece (path to MIDI/JSON, MIDI bytes or symusic.Score); no BOS/EOS."""
        if isinstance(x, str | os.PathLike):
            notes = read_notes(x, require_notes=False)  # MIDI or prepared JSON; a piece without notes → []
        else:
            notes = score_to_notes(load_score(x))
        return self.encode_notes(notes, transpose).tolist()

    def encode_notes(self, notes: NoteTable, transpose: int = 0) -> np.ndarray:
        events, word_start = self.events(notes, transpose)
        return self.bpe_encode(events, word_start)

    def events(self, notes: NoteTable, transpose: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Base event ids (int64) of a piece and a bool mask of where BPE words start."""
        if transpose == 0 and notes.sheet and notes.sheet.get("config") == self.base_fingerprint:
            return sheet_events(notes.sheet, self.vocab, notes)  # checked: MidiReadError if it does not fit
        if notes.tpq <= 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        # A tokenizer from before TRACK/KEYSIG/PEDAL (events v3): its BPE lacks them, so it never writes them.
        out = note_events(self.config, self.vocab, notes, transpose, extras=self.events_version >= 4)
        return out, self.word_starts_of_events(out)

    # The "sheet": a piece's base events stored in a prepared JSON file, so that loading it skips the work of
    # events() (as the JSON datasets of the original specification did). Valid only for the same base configuration.
    def sheet(self, notes: NoteTable) -> dict:
        events, word_start = self.events(notes)
        return {
            "config": self.base_fingerprint,
            "num_events": len(events),
            "events_b64": base64.b64encode(events.astype("<u2").tobytes()).decode("ascii"),
            "word_starts_b64": base64.b64encode(np.packbits(word_start).tobytes()).decode("ascii"),
        }

    def bpe_encode(self, events: np.ndarray, word_start: np.ndarray) -> np.ndarray:
        nspec = len(SPECIALS)
        if self._bpe is None:
            return (events + nspec).astype(np.int32)
        if len(events) == 0:
            return np.zeros(0, np.int32)
        # Words repeat within a piece: a word → ids cache for this call saves ~20% (1.14 vs 1.41 ms per POP909
        # song), with identical ids. Only for this call: across pieces words rarely repeat (~950 new words per
        # encoded song), so the cache once kept in the tokenizer grew to ~0.5 GB per worker process at its 1M
        # entries and made encoding slower (300 songs x 7 transpositions: 4.5 s and 538 MB, now 3.5 s, 190 MB).
        cache: dict[str, list[int]] = {}
        model, out = self._bpe.model, []
        for word in self._to_text(events, word_start).split(WORD_SEP):
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = [t.id for t in model.tokenize(word)]
            out += ids
        return np.asarray(out, dtype=np.int32)

    @staticmethod
    def _to_text(events: np.ndarray, word_start: np.ndarray) -> str:
        """Base events as one character each, words separated by spaces (built in numpy, decoded once)."""
        codes = (events + CHAR_BASE).astype("<u4")
        cut = np.flatnonzero(word_start[1:]) + 1
        codes = np.insert(codes, cut, ord(WORD_SEP))
        return codes.tobytes().decode("utf-32-le")

    # ------------------------------------------------------------------ decoding
    def base_events(self, ids) -> np.ndarray:
        """Base event ids of a token sequence: PAD/BOS dropped, everything from the first EOS on dropped."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise ValueError(f"token id {int(bad)} is out of the vocabulary (size {len(self)})")
        eos = np.flatnonzero(ids == self.eos_id)
        if len(eos):
            ids = ids[: eos[0]]
        lens = self._lens[ids]
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        starts = np.repeat(self._offs[ids] - (np.cumsum(lens) - lens), lens)
        return self._flat[starts + np.arange(total)]

    def word_starts(self, ids) -> np.ndarray:
        """True where a token begins with a time shift: a safe place to start a training window."""
        return self._starts_with_shift[np.asarray(ids, dtype=np.int64)]

    def decode(self, ids, track_names: dict | None = None) -> symusic.Score:
        """A Score of token ids; ``track_names`` ((program, index) → name, e.g. a NoteTable's) names tracks."""
        return self.decode_with_stats(ids, track_names)[0]

    def decode_with_stats(self, ids, track_names: dict | None = None) -> tuple[symusic.Score, int, int]:
        """(score, number of base events, number of events skipped as invalid)."""
        return events_to_score(self.config, self.vocab, self.base_events(ids), track_names)

    # ------------------------------------------------------------------ BPE
    def train_bpe(
        self,
        sources,
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
        sample_events: int | None = None,
        seed: int = 0,
        stats=None,
    ) -> None:
        """Learn BPE merges from paths (MIDI/JSON) or already-encoded id sequences of this (untrained) tokenizer.

        ``sample_events``: learn from at most this many base events, drawn as whole pieces in a ``seed``-ed
        random order across all of ``sources`` (see :mod:`midiforge.tokens.bpe_sample`); None: from every source.
        ``stats``: a :class:`midiforge.tokens.bpe_sample.SampleStats` to fill in (pieces and events used).
        """
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        base = self.vocab.size + len(SPECIALS)
        if vocab_size < base:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the base vocabulary ({base})")
        texts = sample_texts(self, sources, sample_events, seed, stats)

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        alphabet = [chr(CHAR_BASE + i) for i in range(self.vocab.size)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIALS),
            initial_alphabet=alphabet,
            limit_alphabet=len(alphabet),
            show_progress=show_progress,
        )
        bpe.train_from_iterator(texts, trainer)
        missing = [ch for ch in alphabet if bpe.token_to_id(ch) is None]
        assert not missing, f"{len(missing)} base events missing from the BPE vocabulary"
        self._bpe = bpe
        self._set_tables()

    def word_starts_of_events(self, events: np.ndarray) -> np.ndarray:
        """Where BPE words start: the one definition, used by events() and by BPE training from ids.

        A word starts at the first token and at every time shift that follows a non-shift ("onset") or that
        moves into a new beat ("beat"); a rest spelled as several SHIFT tokens stays one word in "onset" mode.
        """
        is_shift = events < self.config.max_shift
        if self.config.word_split == "onset":
            ws = is_shift.copy()
            ws[1:] &= ~is_shift[:-1]
        else:
            t = np.cumsum(np.where(is_shift, self.vocab.value[events], 0))
            ws = is_shift & changes(t // self.config.steps_per_quarter)
        ws[:1] = True
        return ws

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict:
        cfg = asdict(self.config)
        cfg["ts_denominators"] = list(cfg["ts_denominators"])
        for name in LAYOUT_FLAGS:  # written only when off, so that older tokenizers keep their fingerprints
            if cfg[name]:
                del cfg[name]
        return {"config": cfg, "bpe": json.loads(self._bpe.to_str()) if self._bpe is not None else None}

    def save(self, path: str | os.PathLike) -> None:
        import tokenizers

        doc = {
            "format": FORMAT,
            "versions": {
                "midiforge": __version__,
                "symusic": symusic.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "vocab_size": len(self),
            "fingerprint": self.fingerprint,
            "events_version": self.events_version,
            "tags": list(self.tags),
            **({"onset_grid": self.onset_grid.to_json()} if self.onset_grid is not None else {}),
            **self._state(),
        }
        atomic_write_bytes(path, json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MidiTokenizer:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: not a midiforge tokenizer (format {doc.get('format')!r})")
        cfg = doc["config"]
        cfg["ts_denominators"] = tuple(cfg["ts_denominators"])
        tok = cls(TokenizerConfig(**cfg))
        tok.events_version = int(doc.get("events_version", LEGACY_EVENTS_VERSION))
        tok.tags = [str(t) for t in doc.get("tags", [])]
        tok.onset_grid = OnsetGrid.from_json(doc.get("onset_grid"))
        if doc.get("bpe") is not None:
            from tokenizers import Tokenizer

            tok._bpe = Tokenizer.from_str(json.dumps(doc["bpe"]))
            tok._set_tables()
        return tok
