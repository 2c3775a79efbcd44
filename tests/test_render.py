import shutil
import wave

import numpy as np
import pytest
import symusic

from midiforge import render
from midiforge.errors import UsageError


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


def read_wav(path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return frames, w.getnchannels(), w.getframerate()


def test_builtin_wav_is_normalised(tmp_path):
    path = tmp_path / "out.wav"
    assert render.render_wav(small_score(), path, sample_rate=16000, backend="builtin") == "builtin"
    pcm, channels, rate = read_wav(path)
    assert channels == 1 and rate == 16000
    assert len(pcm) >= 2 * 16000  # 4 quarters at 120 qpm = 2 s (plus release)
    peak = np.abs(pcm).max() / 32767
    assert peak == pytest.approx(10 ** (-1 / 20), abs=1e-3)  # -1 dBFS, no clipping
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary behind


def test_builtin_handles_empty_score(tmp_path):
    render.render_wav(symusic.Score(480), tmp_path / "e.wav", sample_rate=8000, backend="builtin")
    pcm, _, _ = read_wav(tmp_path / "e.wav")
    assert not pcm.any()


@pytest.mark.skipif(not render.fluidsynth_available(), reason="fluidsynth or a soundfont not installed")
def test_fluidsynth_wav(tmp_path):
    path = tmp_path / "fs.wav"
    assert render.render_wav(small_score(), path, sample_rate=22050, backend="fluidsynth") == "fluidsynth"
    pcm, channels, rate = read_wav(path)
    assert channels == 2 and rate == 22050 and len(pcm) > 22050
    assert np.abs(pcm).max() / 32767 == pytest.approx(10 ** (-1 / 20), abs=1e-3)


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


def test_pianoroll_png(tmp_path):
    path = tmp_path / "roll.png"
    render.render_pianoroll(small_score(), path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    render.render_pianoroll(symusic.Score(480), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
