"""Shared fixtures: the real corpus beside the project (skipped when absent) and MIDI files written by symusic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def corpus_dir(*parts: str) -> Path:
    """A folder of the shared corpus, or skip the test when it is not there."""
    p = CORPUS.joinpath(*parts)
    if not p.exists():
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
