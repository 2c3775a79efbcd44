"""Shared fixtures and helpers: the real corpus beside the project, MIDI files written by symusic, and readers
for the WAV and PNG files the project writes."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest
import symusic

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def corpus_dir(*parts: str) -> Path:
    """A file or folder of the shared corpus (``../shared/corpus`` beside the repository).

    When it is not there the test is skipped on a developer's machine, but fails under CI (environment
    variable ``CI=true``), where a missing corpus means the real-data tests would silently not run.
    """
    p = CORPUS.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(
                f"shared corpus not found at {p}, and CI=true: the real-data tests must run in CI "
                f"(put the corpus at {CORPUS}, see its SOURCES.md)",
                pytrace=False,
            )
        pytest.skip(f"shared corpus not found at {p}")
    return p


def make_score(
    seed: int = 0, num_notes: int = 200, programs=(0, 33), drums: bool = True, tpq: int = 480
) -> symusic.Score:
    """A small multi-track piece: random-walk melodies on a 16th/triplet grid, plus a drum track."""
    rng = np.random.default_rng(seed)
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, qpm=float(rng.integers(70, 160))))
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    step = tpq // 12
    for prog in programs:
        track = symusic.Track(f"p{prog}", prog, False)
        t = 0
        pitch = int(rng.integers(48, 72))
        for _ in range(num_notes):
            t += int(rng.choice([3, 4, 6, 12])) * step
            pitch = int(np.clip(pitch + rng.integers(-4, 5), 21, 108))
            dur = int(rng.choice([3, 4, 6, 12, 24])) * step
            track.notes.append(symusic.Note(t, dur, pitch, int(rng.integers(30, 120))))
        score.tracks.append(track)
    if drums:
        track = symusic.Track("drums", 0, True)
        for i in range(num_notes // 2):
            track.notes.append(symusic.Note(i * 6 * step, step, int(rng.choice([36, 38, 42])), 100))
        score.tracks.append(track)
    return score


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Every test but those marked ``cuda`` runs as on a machine without a GPU, also on one with a GPU.

    The tests state CPU behaviour (exact losses, the reference loop's tokens); on a GPU machine the commands'
    default device would be the GPU (bf16, compiled), which they do not describe. Subprocesses inherit the
    hidden device through CUDA_VISIBLE_DEVICES. Tests marked ``cuda`` (tests/test_cuda.py) check the GPU paths.
    """
    if request.node.get_closest_marker("cuda") is None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead: extra threads only contend with other test processes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def midi_files(tmp_path):
    """Four small MIDI files written with symusic; returns their paths."""
    paths = []
    for i in range(4):
        p = tmp_path / f"piece{i}.mid"
        make_score(seed=i).dump_midi(str(p))
        paths.append(p)
    return paths


def read_wav(path) -> tuple[np.ndarray, int]:
    """(int16 samples (frames, channels), sample rate) of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, "not 16-bit PCM"
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.reshape(-1, w.getnchannels()), w.getframerate()


def read_png(path) -> np.ndarray:
    """The pixels of a PNG file as floats in [0, 1], shape (height, width, RGB)."""
    from matplotlib.image import imread

    img = imread(str(path), format="png")
    return img[..., :3]


def color_mask(img: np.ndarray, color: str, tol: float = 0.02) -> np.ndarray:
    """Where ``img`` (from :func:`read_png`) has ``color`` (any matplotlib colour spec), as a bool (H, W) mask."""
    from matplotlib.colors import to_rgb

    return np.all(np.abs(img - np.array(to_rgb(color))) < tol, axis=-1)


def tiny_model(tok, max_seq_len: int, seed: int = 0, n_layer: int = 1):
    """An untrained, seeded Transformer of the smallest useful shape for ``tok``'s vocabulary (eval mode)."""
    import torch

    from midiforge.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=len(tok), n_layer=n_layer, n_head=2, d_model=32, d_ff=64, max_seq_len=max_seq_len
    )
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """A BPE tokenizer whose merged tokens carry PROGRAM events of several programs (0, 33, 40, drums)."""
    from midiforge.tokens.tokenizer import MidiTokenizer

    root = tmp_path_factory.mktemp("bpe")
    paths = []
    for i in range(4):
        p = root / f"p{i}.mid"
        make_score(seed=i, num_notes=150, programs=(0, 33, 40)).dump_midi(str(p))
        paths.append(str(p))
    tok = MidiTokenizer()
    tok.train_bpe(paths, len(tok) + 300)
    return tok


@pytest.fixture(scope="session")
def studio_ckpt(tmp_path_factory) -> Path:
    """The studio tests' tiny checkpoint (test_studio.train_tiny), trained once for all three studio files."""
    from test_studio import train_tiny

    return train_tiny(tmp_path_factory.mktemp("studio_ckpt"))
