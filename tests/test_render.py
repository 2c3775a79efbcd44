import os
import shutil

import numpy as np
import pytest
import symusic
from conftest import color_mask, read_png, read_wav

from midiforge.errors import UsageError
from midiforge.notes import render

PEAK = 10 ** (-1 / 20)  # -1 dBFS, the level every WAV is normalised to


def small_score() -> symusic.Score:
    s = symusic.Score(480)
    piano = symusic.Track("piano", program=0)
    for i, pitch in enumerate([60, 64, 67, 72]):
        piano.notes.append(symusic.Note(i * 480, 480, pitch, 90))
    strings = symusic.Track("strings", program=48)
    strings.notes.append(symusic.Note(0, 1920, 48, 70))
    drums = symusic.Track("drums", program=0, is_drum=True)
    for i, pitch in enumerate([36, 42, 38, 42]):
        drums.notes.append(symusic.Note(i * 480, 120, pitch, 100))
    s.tracks.extend([piano, strings, drums])
    s.tempos.append(symusic.Tempo(0, 120.0))
    return s


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) / 32767) ** 2))) if len(x) else 0.0


def test_builtin_wav_is_normalised(tmp_path):
    path = tmp_path / "out.wav"
    assert render.render_wav(small_score(), path, sample_rate=16000, backend="builtin") == "builtin"
    pcm, rate = read_wav(path)
    assert pcm.shape[1] == 1 and rate == 16000
    assert 2.0 <= len(pcm) / rate <= 2.0 + 1.0  # 4 quarters at 120 qpm = 2 s, plus a short release tail
    peak = np.abs(pcm).max() / 32767
    assert peak == pytest.approx(PEAK, abs=1e-3)  # -1 dBFS, no clipping
    # Sound where the notes are, every half second of them; (nearly) silence once the releases are over.
    for k in range(4):
        assert rms(pcm[int((0.5 * k + 0.05) * rate) : int((0.5 * k + 0.45) * rate)]) > 0.02, k
    assert rms(pcm[int(2.5 * rate) :]) < 1e-3
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary behind


def test_builtin_handles_empty_score(tmp_path):
    render.render_wav(symusic.Score(480), tmp_path / "e.wav", sample_rate=8000, backend="builtin")
    pcm, rate = read_wav(tmp_path / "e.wav")
    assert rate == 8000 and len(pcm) > 0 and not pcm.any()


@pytest.mark.skipif(
    not render.fluidsynth_available() and os.environ.get("CI") != "true",
    reason="fluidsynth or a soundfont not installed (scripts/test.sh installs them as root; CI requires them)",
)
def test_fluidsynth_wav(tmp_path):
    path = tmp_path / "fs.wav"
    assert render.render_wav(small_score(), path, sample_rate=22050, backend="fluidsynth") == "fluidsynth"
    pcm, rate = read_wav(path)
    assert pcm.shape[1] == 2 and rate == 22050
    assert 2.0 <= len(pcm) / rate <= 2.0 + render.FLUIDSYNTH_TAIL_S  # the music plus at most the kept tail
    assert np.abs(pcm).max() / 32767 == pytest.approx(PEAK, abs=1e-3)
    assert rms(pcm[: 2 * rate]) > 0.01


def test_missing_fluidsynth_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="apt install fluidsynth"):
        render.render_wav(small_score(), tmp_path / "x.wav", backend="fluidsynth")
    # auto falls back to the builtin synth
    assert render.render_wav(small_score(), tmp_path / "x.wav", sample_rate=8000) == "builtin"


def test_soundfont_env_must_exist(monkeypatch):
    monkeypatch.setenv("MIDIFORGE_SOUNDFONT", "/nonexistent.sf2")
    with pytest.raises(UsageError, match="MIDIFORGE_SOUNDFONT"):
        render.find_soundfont()


def column_span(mask: np.ndarray) -> tuple[int, int]:
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(cols[-1])


def test_pianoroll_png(tmp_path):
    path = tmp_path / "roll.png"
    render.render_pianoroll(small_score(), path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = read_png(path)
    assert img.shape == (500, 1200, 3)  # 12 x 5 inches at 100 dpi
    # One colour per track, in track order: piano (4 notes, 60-72), strings (one 2 s note, 48), drums (36-42).
    piano, strings, drums = (color_mask(img, c) for c in ("tab:blue", "tab:orange", "tab:green"))
    assert piano.sum() > 500 and strings.sum() > 500 and drums.sum() > 100
    # Pitch runs upwards: the piano notes lie above the strings note, which lies above the drums. (The
    # legend's swatches sit top right, above all notes, so compare the lowest rows each colour reaches.)
    lowest = [int(np.flatnonzero(m.any(axis=1))[-1]) for m in (piano, strings, drums)]
    assert lowest[0] < lowest[1] < lowest[2]
    # Time runs left to right on one scale: in the lower half (no legend there) the strings note spans the
    # whole 2 s and the drums 0 to 1.625 s (last hit at 1.5 s, 0.125 s long).
    low = slice(250, None)
    s0, s1 = column_span(strings[low])
    d0, d1 = column_span(drums[low])
    assert abs(d0 - s0) <= 2
    assert (d1 - d0) / (s1 - s0) == pytest.approx(1.625 / 2.0, abs=0.01)

    render.render_pianoroll(symusic.Score(480), tmp_path / "empty.png")
    empty = read_png(tmp_path / "empty.png")
    assert empty.shape == (500, 1200, 3)
    assert not any(color_mask(empty, c).any() for c in ("tab:blue", "tab:orange", "tab:green"))
    assert (empty.max(axis=-1) < 0.5).sum() > 100  # axes, tick labels and the "no notes" text


def test_pianoroll_leaves_the_global_matplotlib_backend_alone(tmp_path):
    # A notebook user has chosen a backend; drawing a piano roll must not switch it (it once called
    # matplotlib.use("Agg")). svg stands in for the user's choice: it needs no display and is not Agg.
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert matplotlib.get_backend() == "svg"
        render.render_pianoroll(small_score(), tmp_path / "roll.png")
        assert matplotlib.get_backend() == "svg"
        assert matplotlib.rcParams["backend"] == "svg"
    finally:
        matplotlib.use(before)
    # ...and the picture is still a PNG of the notes, drawn with Agg on its own.
    img = read_png(tmp_path / "roll.png")
    assert img.shape == (500, 1200, 3)
    assert all(color_mask(img, c).sum() > 100 for c in ("tab:blue", "tab:orange", "tab:green"))
