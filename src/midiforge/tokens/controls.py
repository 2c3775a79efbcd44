"""Controls: the attributes of a piece that a model can be conditioned on, measured from the piece itself.

One estimator (:func:`measure`) makes the training labels (the control prefix of every training piece, see
:func:`prefix_events`) and judges adherence of generated samples (bench/bench_controls.py), so "follows the
control" means "the same measurement gives the requested value back".

Controls are base events of the tokenizer (``CTL_*`` kinds, one BPE word each), prepended after BOS::

    BOS CTL_TAG? CTL_PROGRAM* CTL_TEMPO? CTL_TIMESIG? CTL_KEY? CTL_DENSITY? CTL_POLY? <music...>

Any of them may be absent (control dropout in training; not asked for at generation). This module also parses
the user's spelling of each control (GM names, "D minor", "3/4", bins) into :class:`Controls`, raising UsageError
with the valid values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from midiforge.errors import UsageError

MAX_TAGS = 32  # tag slots in the base vocabulary; names are recorded per tokenizer (tokenizer.json "tags")
TEMPO_EDGES = (60.0, 76.0, 90.0, 104.0, 118.0, 134.0, 156.0)  # quarters/min: 8 bins
DENSITY_EDGES = (10.0, 20.0)  # notes per bar (as the piece's first time signature counts bars)
POLYPHONY_EDGES = (2.0, 3.5)  # mean number of notes sounding while any sounds
LEVELS = ("low", "medium", "high")
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")

# Sizes of the control kinds in the base vocabulary (a function of the vocabulary, for the time signatures).
CONTROL_SIZES = {
    "ctl_tag": lambda v: MAX_TAGS,
    "ctl_program": lambda v: 129,  # 0..127, 128 = drums
    "ctl_tempo": lambda v: len(TEMPO_EDGES) + 1,
    "ctl_timesig": lambda v: len(v.time_sigs) + 1,  # the last one: a time signature outside the vocabulary
    "ctl_key": lambda v: 24,  # tonic * 2 + mode
    "ctl_density": lambda v: len(LEVELS),
    "ctl_poly": lambda v: len(LEVELS),
}

GM_NAMES = (
    "acoustic grand piano", "bright acoustic piano", "electric grand piano", "honky-tonk piano",
    "electric piano 1", "electric piano 2", "harpsichord", "clavinet", "celesta", "glockenspiel", "music box",
    "vibraphone", "marimba", "xylophone", "tubular bells", "dulcimer", "drawbar organ", "percussive organ",
    "rock organ", "church organ", "reed organ", "accordion", "harmonica", "tango accordion",
    "acoustic guitar nylon", "acoustic guitar steel", "electric guitar jazz", "electric guitar clean",
    "electric guitar muted", "overdriven guitar", "distortion guitar", "guitar harmonics", "acoustic bass",
    "electric bass finger", "electric bass pick", "fretless bass", "slap bass 1", "slap bass 2", "synth bass 1",
    "synth bass 2", "violin", "viola", "cello", "contrabass", "tremolo strings", "pizzicato strings",
    "orchestral harp", "timpani", "string ensemble 1", "string ensemble 2", "synth strings 1",
    "synth strings 2", "choir aahs", "voice oohs", "synth voice", "orchestra hit", "trumpet", "trombone", "tuba",
    "muted trumpet", "french horn", "brass section", "synth brass 1", "synth brass 2", "soprano sax",
    "alto sax", "tenor sax", "baritone sax", "oboe", "english horn", "bassoon", "clarinet", "piccolo", "flute",
    "recorder", "pan flute", "blown bottle", "shakuhachi", "whistle", "ocarina", "lead 1 square",
    "lead 2 sawtooth", "lead 3 calliope", "lead 4 chiff", "lead 5 charang", "lead 6 voice", "lead 7 fifths",
    "lead 8 bass lead", "pad 1 new age", "pad 2 warm", "pad 3 polysynth", "pad 4 choir", "pad 5 bowed",
    "pad 6 metallic", "pad 7 halo", "pad 8 sweep", "fx 1 rain", "fx 2 soundtrack", "fx 3 crystal",
    "fx 4 atmosphere", "fx 5 brightness", "fx 6 goblins", "fx 7 echoes", "fx 8 sci-fi", "sitar", "banjo",
    "shamisen", "koto", "kalimba", "bagpipe", "fiddle", "shanai", "tinkle bell", "agogo", "steel drums",
    "woodblock", "taiko drum", "melodic tom", "synth drum", "reverse cymbal", "guitar fret noise",
    "breath noise", "seashore", "bird tweet", "telephone ring", "helicopter", "applause", "gunshot",
)  # fmt: skip
ALIASES = {"piano": 0, "organ": 19, "guitar": 24, "bass": 32, "strings": 48, "choir": 52, "sax": 65,
           "drums": 128, "drum": 128, "percussion": 128}  # fmt: skip
# Krumhansl-Kessler key profiles (major, minor), tonic first.
KK_PROFILES = np.array(
    [
        [6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88],
        [6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17],
    ]
)


@dataclass(frozen=True)
class Controls:
    """Requested (or measured) attributes of a piece; None = not specified."""

    instruments: tuple[int, ...] | None = None  # sorted programs, 128 = drums
    tempo: int | None = None  # bin of TEMPO_EDGES
    time_sig: tuple[int, int] | None = None
    key: int | None = None  # tonic * 2 + mode (0 major, 1 minor)
    density: int | None = None  # index into LEVELS
    polyphony: int | None = None  # index into LEVELS
    tag: str | None = None

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def describe(self) -> dict:
        """Human-readable values (for logs, the bench and README tables)."""
        return {
            "instruments": None if self.instruments is None else [program_name(p) for p in self.instruments],
            "tempo": None if self.tempo is None else tempo_bin_name(self.tempo),
            "time_sig": None if self.time_sig is None else f"{self.time_sig[0]}/{self.time_sig[1]}",
            "key": None if self.key is None else key_name(self.key),
            "density": None if self.density is None else LEVELS[self.density],
            "polyphony": None if self.polyphony is None else LEVELS[self.polyphony],
            "tag": self.tag,
        }


# ------------------------------------------------------------------------------------------- names
def program_name(p: int) -> str:
    return "drums" if p == 128 else GM_NAMES[p]


def key_name(k: int) -> str:
    return f"{PITCH_CLASSES[k // 2]} {MODES[k % 2]}"


def tempo_bin(qpm: float) -> int:
    return int(np.searchsorted(TEMPO_EDGES, qpm, side="right"))


def tempo_bin_name(b: int) -> str:
    lo = "" if b == 0 else f"{TEMPO_EDGES[b - 1]:g}"
    hi = "" if b == len(TEMPO_EDGES) else f"{TEMPO_EDGES[b]:g}"
    return f"{lo}-{hi} bpm" if lo and hi else (f"< {hi} bpm" if hi else f">= {lo} bpm")


def _norm(s: str) -> str:
    return " ".join(s.lower().replace("_", " ").replace("(", " ").replace(")", " ").split())


def parse_instruments(text: str) -> tuple[int, ...]:
    """``"piano,bass,drums"`` or ``"0,33,128"`` → sorted programs. UsageError names the valid spellings."""
    out = set()
    names = {_norm(n): i for i, n in enumerate(GM_NAMES)} | ALIASES
    for part in text.split(","):
        word = _norm(part)
        if not word:
            continue
        if word.isdigit() and 0 <= int(word) <= 128:
            out.add(int(word))
        elif word in names:
            out.add(names[word])
        else:
            raise UsageError(
                f"--instruments: unknown instrument {part.strip()!r}; use program numbers 0..127 (128 = drums),"
                f" {', '.join(sorted(ALIASES))}, or a General MIDI name such as {', '.join(GM_NAMES[:3])}, ..."
            )
    if not out:
        raise UsageError("--instruments: give at least one instrument, e.g. 'piano,bass,drums'")
    return tuple(sorted(out))


def parse_key(text: str) -> int:
    """``"D minor"``, ``"Eb major"``, ``"f# minor"``, ``"C"`` (major) → tonic * 2 + mode."""
    parts = text.strip().split()
    enh = {
        "DB": "C#",
        "D#": "Eb",
        "GB": "F#",
        "G#": "Ab",
        "A#": "Bb",
        "CB": "B",
        "FB": "E",
        "E#": "F",
        "B#": "C",
    }
    valid = f"a tonic ({', '.join(PITCH_CLASSES)}) and major or minor, e.g. 'D minor'"
    if not 1 <= len(parts) <= 2:
        raise UsageError(f"--key: {text!r} is not a key; give {valid}")
    tonic = parts[0][:1].upper() + parts[0][1:].lower()
    tonic = enh.get(tonic.upper(), tonic) if tonic not in PITCH_CLASSES else tonic
    mode = parts[1].lower() if len(parts) == 2 else "major"
    mode = {"maj": "major", "min": "minor"}.get(mode, mode)
    if tonic not in PITCH_CLASSES or mode not in MODES:
        raise UsageError(f"--key: {text!r} is not a key; give {valid}")
    return PITCH_CLASSES.index(tonic) * 2 + MODES.index(mode)


def parse_time_sig(text: str, vocab) -> tuple[int, int]:
    try:
        n, d = (int(x) for x in text.split("/"))
    except ValueError:
        n = d = -1
    if (n, d) not in vocab.time_sig_index:
        raise UsageError(
            f"--time-sig: {text!r} is not supported; give n/d with n in 1..{vocab.c.ts_max_numerator} and d in"
            f" {', '.join(map(str, vocab.c.ts_denominators))}, e.g. 3/4"
        )
    return n, d


def parse_level(text: str, option: str) -> int:
    if text.lower() not in LEVELS:
        raise UsageError(f"{option}: {text!r} is not a level; give one of {', '.join(LEVELS)}")
    return LEVELS.index(text.lower())


def parse_tempo(text) -> int:
    try:
        qpm = float(text)
    except (TypeError, ValueError):
        qpm = float("nan")
    if not 1 <= qpm <= 1000:
        raise UsageError(
            f"--tempo: {text!r} is not a tempo; give beats per minute between 1 and 1000, e.g. 90"
        )
    return tempo_bin(qpm)


def parse_tag(text: str, tags: list[str]) -> str:
    if text not in tags:
        have = ", ".join(tags) if tags else "none (it was trained without -t NAME=DIR)"
        raise UsageError(f"--tag: this checkpoint never saw the tag {text!r}; its tags: {have}")
    return text


# ------------------------------------------------------------------------------------------- measuring
def estimate_key(notes) -> int | None:
    """Krumhansl-Kessler key of the duration-weighted pitch-class histogram (drums excluded)."""
    pitched = notes.program != 128
    if not pitched.any():
        return None
    w = np.maximum(notes.duration[pitched].astype(np.float64), 1.0)
    hist = np.bincount(notes.pitch[pitched].astype(np.int64) % 12, weights=w, minlength=12)
    if hist.sum() <= 0:
        return None
    # 24 correlations at once: rows = (tonic, mode), profiles rolled to each tonic.
    prof = np.stack([np.roll(KK_PROFILES[m], t) for t in range(12) for m in range(2)])  # (24, 12)
    x = hist - hist.mean()
    p = prof - prof.mean(axis=1, keepdims=True)
    r = p @ x / (np.linalg.norm(p, axis=1) * np.linalg.norm(x) + 1e-12)
    return int(np.argmax(r))


def key_of_signature(sharps: int, tonality: int) -> int:
    major_tonic = (7 * int(sharps)) % 12
    tonic = major_tonic if tonality == 0 else (major_tonic + 9) % 12
    return tonic * 2 + int(tonality)


def signature_of_key(key: int) -> tuple[int, int]:
    """(sharps -7..7, tonality 0 major / 1 minor) of the usual key signature of ``key`` (tonic * 2 + mode): the
    fewest accidentals, flats for E-flat minor (its relative major is spelled G-flat, not F-sharp)."""
    tonic, tonality = divmod(int(key), 2)
    major_tonic = (tonic + 3) % 12 if tonality else tonic
    sharps = (7 * major_tonic) % 12  # tonic = 7 x sharps (mod 12), and 7 x 7 = 1 (mod 12)
    if sharps > 6 or (sharps == 6 and tonality):
        sharps -= 12
    return sharps, tonality


def measure(notes, *, use_key_signature: bool = True) -> Controls:
    """The controls of a piece (a NoteTable), as training labels and as the adherence judge."""
    if len(notes) == 0:
        return Controls()
    tpq = max(int(notes.tpq), 1)
    first_tempo = float(notes.tempo_qpm[np.argmin(notes.tempo_time)]) if len(notes.tempo_qpm) else 120.0
    if len(notes.ts_time):
        i = int(np.argmin(notes.ts_time))
        ts = (int(notes.ts_numerator[i]), int(notes.ts_denominator[i]))
    else:
        ts = (4, 4)
    key = None
    if use_key_signature and len(notes.ks_time):
        i = int(np.argmin(notes.ks_time))
        key = key_of_signature(int(notes.ks_key[i]), int(notes.ks_tonality[i]))
    if key is None:
        key = estimate_key(notes)
    end = int((notes.time + notes.duration).max())
    start = int(notes.time.min())
    bar = tpq * 4 * ts[0] / ts[1]
    bars = max(np.ceil((end - start) / bar), 1.0)
    density = len(notes) / bars
    # Polyphony on a 1/12-quarter grid: mean count of sounding notes over the steps where any sounds.
    step = tpq / 12
    on = np.floor((notes.time - start) / step).astype(np.int64)
    off = np.maximum(np.floor((notes.time + notes.duration - start) / step).astype(np.int64), on + 1)
    diff = np.zeros(int(off.max()) + 2, np.int64)
    np.add.at(diff, on, 1)
    np.add.at(diff, off, -1)
    sounding = np.cumsum(diff)
    poly = float(sounding[sounding > 0].mean()) if (sounding > 0).any() else 0.0
    return Controls(
        instruments=tuple(sorted({int(p) for p in np.unique(notes.program)})),
        tempo=tempo_bin(first_tempo),
        time_sig=ts,
        key=key,
        density=int(np.searchsorted(DENSITY_EDGES, density, side="right")),
        polyphony=int(np.searchsorted(POLYPHONY_EDGES, poly, side="right")),
    )


# ------------------------------------------------------------------------------------------- prefix
def prefix_events(c: Controls, vocab, tags: list[str]) -> list[int]:
    """Base event ids of the control prefix of ``c`` (absent controls give no event), in the fixed order."""
    s = vocab.start
    out = []
    if c.tag is not None and c.tag in tags:
        out.append(s["ctl_tag"] + tags.index(c.tag))
    if c.instruments is not None:
        out += [s["ctl_program"] + p for p in c.instruments]
    if c.tempo is not None:
        out.append(s["ctl_tempo"] + c.tempo)
    if c.time_sig is not None:
        out.append(s["ctl_timesig"] + vocab.time_sig_index.get(tuple(c.time_sig), len(vocab.time_sigs)))
    if c.key is not None:
        out.append(s["ctl_key"] + c.key)
    if c.density is not None:
        out.append(s["ctl_density"] + c.density)
    if c.polyphony is not None:
        out.append(s["ctl_poly"] + c.polyphony)
    return out


def drop(c: Controls, rng: np.random.Generator, p: float) -> Controls:
    """``c`` with each control independently removed with probability ``p`` (control dropout)."""
    if p <= 0:
        return c
    kept = {f.name: (getattr(c, f.name) if rng.random() >= p else None) for f in fields(c)}
    return Controls(**kept)
