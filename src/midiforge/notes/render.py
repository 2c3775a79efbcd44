"""Listen to and look at generated music: WAV audio and piano-roll images of a symusic Score.

Audio backends, in the order ``backend="auto"`` tries them:

* ``fluidsynth``: the FluidSynth command line (``apt install fluidsynth fluid-soundfont-gm``) with a General MIDI
  soundfont, found in this order: ``$MIDIFORGE_SOUNDFONT``, ``/usr/share/sounds/sf2/FluidR3_GM.sf2``, the
  TimGM6mb.sf2 bundled with pretty_midi (``pip install pretty_midi``).
* ``builtin``: a small numpy preview synthesizer (harmonic tones with ADSR envelopes, noise-burst drums) that
  always works and sounds like a sketch, not like the instruments.

symusic 0.6.0 has a synthesizer too, but ``Synthesizer.render`` raises ``TypeError: Unable to convert function
return value`` for every call signature here, so it is not used.

Every WAV is normalised to a peak of -1 dBFS (never clips) and written as 16-bit PCM, atomically.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import tempfile
import warnings
import wave
from pathlib import Path

import numpy as np
import symusic

from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes

PEAK_DBFS = -1.0
SYSTEM_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
FLUIDSYNTH_TAIL_S = 2.0  # release and reverb kept after the last note-off
INSTALL_HINT = "install FluidSynth and a soundfont: apt install fluidsynth fluid-soundfont-gm"


# --- audio ---------------------------------------------------------------------------------------------------


def find_soundfont() -> Path | None:
    """The first soundfont of: $MIDIFORGE_SOUNDFONT, Debian's FluidR3_GM.sf2, pretty_midi's TimGM6mb.sf2."""
    env = os.environ.get("MIDIFORGE_SOUNDFONT")
    if env:
        if not Path(env).is_file():
            raise UsageError(f"MIDIFORGE_SOUNDFONT={env} is not a file")
        return Path(env)
    if Path(SYSTEM_SOUNDFONT).is_file():
        return Path(SYSTEM_SOUNDFONT)
    spec = importlib.util.find_spec("pretty_midi")  # locate without importing (pretty_midi imports slowly)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "TimGM6mb.sf2").is_file():
            return Path(folder) / "TimGM6mb.sf2"
    return None


def fluidsynth_available() -> bool:
    return shutil.which("fluidsynth") is not None and find_soundfont() is not None


def render_wav(
    score: symusic.Score, path: str | os.PathLike, sample_rate: int = 44100, backend: str = "auto"
) -> str:
    """Render ``score`` to a 16-bit WAV file at ``path``; returns the backend used ("fluidsynth" or "builtin").

    ``backend="auto"`` uses FluidSynth when it and a soundfont are installed, else the builtin preview synth.
    Asking for ``"fluidsynth"`` when it is missing raises UsageError naming what to install.
    """
    if backend not in ("auto", "fluidsynth", "builtin"):
        raise UsageError(f"unknown audio backend {backend!r} (auto, fluidsynth, builtin)")
    if backend == "fluidsynth" and not fluidsynth_available():
        missing = "the fluidsynth program" if shutil.which("fluidsynth") is None else "a soundfont"
        raise UsageError(f"--wav with FluidSynth needs {missing}; {INSTALL_HINT}")
    audio = None
    if backend != "builtin" and fluidsynth_available():
        try:
            audio = _render_fluidsynth(score, sample_rate)
            backend = "fluidsynth"
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            if backend == "fluidsynth":
                raise UsageError(f"FluidSynth failed: {e}") from e
            warnings.warn(f"FluidSynth failed ({e}); using the builtin preview synthesizer", stacklevel=2)
    if audio is None:
        audio = synthesize(score, sample_rate)
        backend = "builtin"
    write_wav(path, audio, sample_rate)
    return backend


def _render_fluidsynth(score: symusic.Score, sample_rate: int) -> np.ndarray:
    """(N, 2) float32 samples from the fluidsynth CLI (raw float output, so that we normalise before 16-bit)."""
    with tempfile.TemporaryDirectory(prefix="midiforge-fs-") as tmp:
        mid, raw = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.raw")
        score.dump_midi(mid)
        cmd = ["fluidsynth", "-ni", "-q", "-T", "raw", "-O", "float", "-E", "little", "-r", str(sample_rate)]
        cmd += ["-F", raw, str(find_soundfont()), mid]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not os.path.exists(raw):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise OSError(tail[0])
        data = np.fromfile(raw, dtype="<f4")
    audio = data[: len(data) // 2 * 2].reshape(-1, 2)
    # FluidSynth plays until every voice has died away, which with its reverb is 4+ s after a 2 s piece: keep at
    # most FLUIDSYNTH_TAIL_S after the music's last note-off, minus the silent end (below -80 dB of the peak).
    end = int(round(score.to("second").end() * sample_rate))
    audio = audio[: end + int(FLUIDSYNTH_TAIL_S * sample_rate)]
    level = np.abs(audio).max(axis=1)  # (N,) peak of the two channels
    loud = np.flatnonzero(level > 1e-4 * max(float(level.max(initial=0.0)), 1e-12))
    return audio[: max(end, int(loud[-1]) + 1 if len(loud) else 0)]


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write float audio (N,) or (N, channels) as 16-bit PCM, peak-normalised to -1 dBFS, atomically."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim == 1:
        audio = audio[:, None]
    peak = np.abs(audio).max() if audio.size else 0.0
    if peak > 0:
        audio = audio * (10 ** (PEAK_DBFS / 20) / peak)
    pcm = np.round(audio * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(audio.shape[1])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    atomic_write_bytes(path, buf.getvalue())


# The builtin preview synthesizer: a timbre (relative harmonic amplitudes, envelope) per General MIDI family.
_PLUCKED = dict(harmonics=(1.0, 0.5, 0.25, 0.12), attack=0.005, decay=0.4, sustain=0.25, release=0.15)
_SUSTAINED = dict(harmonics=(1.0, 0.35, 0.3, 0.1, 0.08), attack=0.03, decay=0.1, sustain=0.8, release=0.2)
_SOFT = dict(harmonics=(1.0, 0.15, 0.05), attack=0.06, decay=0.2, sustain=0.7, release=0.3)


def _timbre(program: int) -> dict:
    family = program // 8  # General MIDI: 8 programs per family
    if family in (0, 1, 3, 4):  # piano, chromatic percussion, guitar, bass
        return _PLUCKED
    if family in (10, 11, 12, 13):  # ensemble pads, synth leads/pads... are soft
        return _SOFT
    return _SUSTAINED  # organ, strings, brass, reed, pipe, ...


def _tone(pitch: int, n: int, sr: int, timbre: dict) -> np.ndarray:
    """One note of ``n`` samples plus release: harmonic partials under an ADSR envelope."""
    rel = int(timbre["release"] * sr)
    t = np.arange(n + rel) / sr
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    wave_ = np.zeros_like(t)
    for k, amp in enumerate(timbre["harmonics"], start=1):
        if k * f0 < sr / 2:  # skip partials above Nyquist (they would alias)
            wave_ += amp * np.sin(2 * np.pi * k * f0 * t)
    a, d, s = timbre["attack"], timbre["decay"], timbre["sustain"]
    env = np.interp(t, [0, a, a + d, 1e9], [0, 1, s, s])  # attack, decay, then sustain level
    held = env[min(n, len(env) - 1)] if n > 0 else 0.0
    env[n:] = held * np.linspace(1, 0, rel, endpoint=False)  # release from where the note was let go
    return wave_ * env


def _drum(pitch: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A short filtered noise burst (a pitched thump for kicks) standing in for a GM drum sound."""
    if pitch in (35, 36):  # kick: sine sweeping down
        t = np.arange(int(0.25 * sr)) / sr
        return np.sin(2 * np.pi * (50 + 60 * np.exp(-t * 30)) * t) * np.exp(-t * 12)
    length = 0.08 if pitch in (42, 44) else 0.3 if pitch in (46, 49, 51, 52, 55, 57, 59) else 0.18
    t = np.arange(int(length * sr)) / sr
    noise = rng.standard_normal(len(t))
    if pitch in (42, 44, 46, 49, 51, 52, 55, 57, 59):  # hats and cymbals: high-passed (first difference)
        noise = np.diff(noise, prepend=0.0)
    else:  # snares, toms, hand percussion: a little low-passing keeps some body
        noise = np.convolve(noise, np.ones(4) / 4, mode="same")
    return noise * np.exp(-t * 5 / length)


def synthesize(score: symusic.Score, sample_rate: int = 44100) -> np.ndarray:
    """Mono float audio of ``score`` from the builtin preview synth (not a soundfont: a sketch of the music).

    Notes that share pitch, length and timbre share one computed waveform; each note adds it at its onset,
    scaled by velocity.
    """
    sec = score.to("second")
    end = max(sec.end(), 0.0)
    out = np.zeros(int((end + 0.6) * sample_rate) + 1)
    rng = np.random.default_rng(0)  # drums use noise: seeded so that renders are reproducible
    cache: dict[tuple, np.ndarray] = {}
    for track in sec.tracks:
        if len(track.notes) == 0:
            continue
        a = track.notes.numpy()
        starts = np.round(a["time"] * sample_rate).astype(np.int64)
        lengths = np.maximum(np.round(a["duration"] * sample_rate).astype(np.int64), 1)
        gains = (a["velocity"].astype(np.float64) / 127.0) ** 1.5
        timbre = _timbre(track.program)
        for start, n, pitch, gain in zip(starts, lengths, a["pitch"].tolist(), gains, strict=True):
            key = ("drum", pitch) if track.is_drum else (pitch, int(n), track.program // 8)
            if key not in cache:
                cache[key] = (
                    _drum(pitch, sample_rate, rng) if track.is_drum else _tone(pitch, n, sample_rate, timbre)
                )
            w = cache[key]
            stop = min(start + len(w), len(out))
            if start < stop:
                out[start:stop] += gain * w[: stop - start]
    return out.astype(np.float32)


# --- piano roll ----------------------------------------------------------------------------------------------


def render_pianoroll(score: symusic.Score, path: str | os.PathLike, title: str | None = None) -> None:
    """Save a piano-roll PNG of ``score``: time (seconds) × pitch, one colour per track, legend by track/program."""
    # A bare Figure renders with Agg on its own: no pyplot, so a notebook user's global backend stays as it is.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    sec = score.to("second")
    fig = Figure(figsize=(12, 5), dpi=100)
    ax = fig.subplots()
    colors = colormaps["tab10"].colors
    lo, hi = 127, 0
    for i, track in enumerate(t for t in sec.tracks if len(t.notes)):
        a = track.notes.numpy()
        color = colors[i % len(colors)]
        name, kind = track.name or f"track {i + 1}", "drums" if track.is_drum else f"program {track.program}"
        label = name if kind in name.lower() else f"{name} ({kind})"
        # One broken_barh call per pitch row: a few dozen artists instead of one per note.
        for pitch in np.unique(a["pitch"]):
            sel = a["pitch"] == pitch
            bars = list(
                zip(a["time"][sel].tolist(), np.maximum(a["duration"][sel], 0.01).tolist(), strict=True)
            )
            ax.broken_barh(bars, (pitch - 0.4, 0.8), facecolors=color, label=label)
            label = None  # one legend entry per track
        lo, hi = min(lo, int(a["pitch"].min())), max(hi, int(a["pitch"].max()))
    if hi >= lo:
        ax.set_ylim(lo - 2, hi + 2)
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no notes", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, max(sec.end(), 1.0))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MIDI pitch")
    ax.grid(True, axis="y", alpha=0.2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
