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
(``"beat"``), so one piece is never one giant word. Encoding works on symusic's numpy arrays: no Python loop per
note. Decoding is total: every sequence of in-vocabulary ids gives a valid Score.
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
from midiforge.notes.midi import DRUM_PROGRAM, NoteTable, load_score, score_to_notes
from midiforge.notes.read import read_notes
from midiforge.tokens.bpe_sample import sample_texts
from midiforge.tokens.detok import events_to_score
from midiforge.tokens.sheet import sheet_events
from midiforge.tokens.vocab import TokenizerConfig, Vocab, changes
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
        c, v = self.config, self.vocab
        if transpose == 0 and notes.sheet and notes.sheet.get("config") == self.base_fingerprint:
            return sheet_events(notes.sheet, self.vocab, notes)  # checked: MidiReadError if it does not fit
        if notes.tpq <= 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        scale = c.steps_per_quarter / notes.tpq
        legacy = self.events_version < 4  # a tokenizer from before TRACK/KEYSIG/PEDAL: its BPE lacks them
        pitch = notes.pitch.astype(np.int64)
        program = notes.program.astype(np.int64)
        track = np.zeros(len(pitch), np.int64) if legacy else notes.track.astype(np.int64)
        if transpose:
            pitched = program != DRUM_PROGRAM
            pitch = np.where(pitched, pitch + transpose, pitch)
        if transpose:
            keep = (pitch >= 0) & (pitch <= 127)
            pitch, program, track = pitch[keep], program[keep], track[keep]
            time, duration, velocity = notes.time[keep], notes.duration[keep], notes.velocity[keep]
        else:  # read_notes already clipped pitches to 0..127
            time, duration, velocity = notes.time, notes.duration, notes.velocity
        # Times go through float32 quarters, as symusic's own tick→quarter conversion does, so that a note lying
        # exactly halfway between two grid steps rounds to the side its quarter-note time is actually on.
        onset, dur_steps = self._to_grid(np.stack([time, duration]), notes.tpq)
        dur_idx = v.duration_index[np.minimum(dur_steps, len(v.duration_index) - 1)]
        vel_bin = (velocity.astype(np.int64) - 1) * c.velocity_bins // 127  # velocities are 1..127

        # Meta events: tempo (consecutive duplicates after binning removed) and supported time signatures.
        t_on = np.rint(notes.tempo_time * scale).astype(np.int64)
        t_bin = np.abs(
            np.log(v.tempos)[None, :] - np.log(np.clip(notes.tempo_qpm, 1e-3, None))[:, None]
        ).argmin(1)
        if len(t_bin):
            # The last tempo at each grid time wins; then drop repeats of the same bin.
            last = changes(t_on[::-1])[::-1]
            t_on, t_bin = t_on[last], t_bin[last]
            keep_t = changes(t_bin)
            t_on, t_bin = t_on[keep_t], t_bin[keep_t]
        ts_tok = np.array(
            [
                v.time_sig_index.get((int(n), int(d)), -1)
                for n, d in zip(notes.ts_numerator, notes.ts_denominator, strict=True)
            ],
            dtype=np.int64,
        )
        ts_on = np.rint(notes.ts_time * scale).astype(np.int64)
        ok = ts_tok >= 0
        ts_on, ts_tok = ts_on[ok], ts_tok[ok]

        # Key signatures (transposed with the notes: the sharps of the moved tonic) and sustain pedals.
        ks_on, ks_tok, p_on, p_off, p_prog, p_track = (np.zeros(0, np.int64),) * 6
        if not legacy:
            ks_on = np.rint(notes.ks_time * scale).astype(np.int64)
            sharps = notes.ks_key.astype(np.int64)
            if transpose:
                sharps = (sharps + 7 * transpose) % 12  # tonic = 7 × sharps (mod 12), and 7 × 7 = 1 (mod 12)
                sharps = np.where(sharps > 6, sharps - 12, sharps)
            ks_tok = (sharps + 7) * 2 + notes.ks_tonality
            p_on, p_off = self._to_grid(
                np.stack([notes.pedal_time, notes.pedal_time + notes.pedal_duration]), notes.tpq
            )
            ok = p_off > p_on  # a press shorter than half a step vanishes on the grid
            p_on, p_off = p_on[ok], p_off[ok]
            p_prog, p_track = notes.pedal_program[ok].astype(np.int64), notes.pedal_track[ok].astype(np.int64)

        # Rows: kind 0 = time signature, 1 = key signature, 2 = tempo, 3 = pedal or note (sub 0 = pedal off,
        # 1 = pedal on, 2 = note), sorted by time, kind, program, track, sub, velocity, duration, pitch.
        n_note, n_tempo, n_ts, n_ks, n_ped = len(onset), len(t_on), len(ts_on), len(ks_on), len(p_on)
        n_meta = n_ts + n_ks + n_tempo
        r_time = np.concatenate([ts_on, ks_on, t_on, p_off, p_on, onset])
        r_kind = np.repeat([0, 1, 2, 3], [n_ts, n_ks, n_tempo, 2 * n_ped + n_note])
        r_sub = np.concatenate(
            [np.zeros(n_meta + n_ped, np.int64), np.ones(n_ped, np.int64), np.full(n_note, 2)]
        )
        zeros = np.zeros(n_meta, np.int64)
        r_prog = np.concatenate([zeros, p_prog, p_prog, program])
        r_track = np.concatenate([zeros, p_track, p_track, track])
        r_pitch = np.concatenate([zeros, np.zeros(2 * n_ped, np.int64), pitch])
        r_a = np.concatenate(
            [
                v.start["timesig"] + ts_tok,
                v.start["keysig"] + ks_tok,
                v.start["tempo"] + t_bin,
                np.full(n_ped, v.start["pedal"]),
                np.full(n_ped, v.start["pedal"] + 1),
                v.start["pitch"] + pitch,
            ]
        )
        r_dur = np.concatenate([np.full(n_meta + 2 * n_ped, -1), v.start["duration"] + dur_idx])
        r_vel = np.concatenate([np.full(n_meta + 2 * n_ped, -1), vel_bin])
        # One packed int64 key sorts 10x faster than lexsort. Bits: pitch 0-7, duration 8-15, velocity 16-21,
        # sub 22-23, track 24-26, program 27-34, kind 35-36, time 37-62 (2^26 steps: 5.6 M quarter notes).
        r_time = np.clip(r_time, 0, (1 << 26) - 1)
        rel_dur = np.where(r_dur >= 0, r_dur - v.start["duration"] + 1, 0)
        key = (
            (r_time << 37) | (r_kind << 35) | (r_prog << 27) | (r_track << 24) | (r_sub << 22)
            | ((r_vel + 1) << 16) | (rel_dur << 8) | r_pitch
        )  # fmt: skip
        order = np.argsort(key, kind="stable")
        r_time, r_kind, r_sub, r_prog, r_track, r_a, r_dur, r_vel = (
            a[order] for a in (r_time, r_kind, r_sub, r_prog, r_track, r_a, r_dur, r_vel)
        )
        nrow = len(r_time)
        if nrow == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)

        # Time shifts: SHIFT(max) repeated for long rests, then the remainder.
        delta = np.empty_like(r_time)
        delta[0] = r_time[0]
        np.subtract(r_time[1:], r_time[:-1], out=delta[1:])
        n_long = np.where(delta > 0, (delta - 1) // c.max_shift, 0)
        rem = delta - n_long * c.max_shift

        # Sticky state: PROGRAM / TRACK where they change from the previous note or pedal, VELOCITY / DURATION
        # where they change from the previous note. TRACK starts at 0 (the decoder's default), never written
        # by a legacy tokenizer.
        note_rows = np.flatnonzero((r_kind == 3) & (r_sub == 2))
        owned = np.flatnonzero(r_kind == 3)
        changed = np.zeros((4, nrow), bool)
        for j, (col, rows) in enumerate(
            ((r_prog, owned), (r_track, owned), (r_vel, note_rows), (r_dur, note_rows))
        ):
            if len(rows):
                changed[j, rows] = changes(col[rows])
        if len(owned):
            changed[1, owned[0]] = r_track[owned[0]] != 0

        # Fixed slots per row: [SHIFT rem, PROGRAM, TRACK, VELOCITY, PITCH|PEDAL|TEMPO|TIMESIG|KEYSIG, DURATION].
        # A DURATION right after a PITCH applies to that note and the following ones. This order (and notes
        # of an onset sorted by velocity, then duration) measured best for BPE: 1.77 tokens/note on POP909.
        # Slot 0 holds SHIFT(max), repeated n_long times for long rests; one np.repeat lays out every token.
        long_shift = np.full(nrow, v.start["shift"] + c.max_shift - 1)
        slots = np.stack(
            [
                long_shift,
                v.start["shift"] + rem - 1,
                v.start["program"] + r_prog,
                v.start["track"] + r_track,
                v.start["velocity"] + r_vel,
                r_a,
                r_dur,
            ],
            axis=1,
        )
        count = np.stack(
            [n_long, rem > 0, changed[0], changed[1], changed[2], np.ones(nrow, np.int64), changed[3]], axis=1
        )
        out = np.repeat(slots.ravel(), count.ravel())

        return out, self.word_starts_of_events(out)

    # The "sheet": a piece's base events stored in a prepared JSON file, so that loading it skips the work of
    # events() (the seed's JSON datasets stored their sheet too). Valid only for the same base configuration.
    def sheet(self, notes: NoteTable) -> dict:
        events, word_start = self.events(notes)
        return {
            "config": self.base_fingerprint,
            "num_events": len(events),
            "events_b64": base64.b64encode(events.astype("<u2").tobytes()).decode("ascii"),
            "word_starts_b64": base64.b64encode(np.packbits(word_start).tobytes()).decode("ascii"),
        }

    def _to_grid(self, ticks: np.ndarray, tpq: int) -> np.ndarray:
        """Nearest grid step of each tick time. Times go through float32 quarters, as symusic's tick→quarter
        conversion does; a time exactly halfway between two steps goes to the step whose float32 quarter value
        is nearer, so the error stays within half a step when measured in float32 quarters too."""
        spq = self.config.steps_per_quarter
        q = (ticks.astype(np.float64) / tpq).astype(np.float32)
        lo = np.floor(q.astype(np.float64) * spq)
        err_lo = np.abs((lo / spq).astype(np.float32) - q)
        err_hi = np.abs(((lo + 1) / spq).astype(np.float32) - q)
        return (lo + (err_hi < err_lo)).astype(np.int64)

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
        if doc.get("bpe") is not None:
            from tokenizers import Tokenizer

            tok._bpe = Tokenizer.from_str(json.dumps(doc["bpe"]))
            tok._set_tables()
        return tok
