"""The validation split of a run trained without ``-v``: pieces grouped first, so that no group straddles it.

Two files fall into one group when they share a long run of notes, transposition-invariant, in the copy
check's terms (:mod:`midiforge.tokens.intervals`: one symbol per pair of neighbouring notes, their onset interval on
the tokenizer's grid and their pitch interval):

- the whole texture shares a run of ``TEXTURE_NOTES`` notes: the copy check's own measure, so a validation
  piece never shares more than ``TEXTURE_NOTES - 1`` notes with a training piece (exact duplicates and
  transpositions share everything);
- one part shares a run of ``LINE_NOTES`` notes (a part: the top note of each onset of one track): another
  harmonisation or arrangement of the same tune, whose other parts differ.

Groups are the connected components of these links. Runs are found by hashing every window of that many
notes of every piece; a window of fewer than ``MIN_DISTINCT`` different symbols (a repeated note, a trill, an
alternating bass) links nothing, since unrelated pieces share those.

Then the groups are shuffled with the seed and taken into validation while they fit under
``floor(share * files)`` files: the validation share is never exceeded, and a group larger than the room
left stays in training. The split is written to ``CKPT/split.json`` and reused unchanged on resume.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midiforge.data.workers import map_isolated
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.notes.midi import DRUM_PROGRAM, MidiReadError
from midiforge.notes.read import read_notes
from midiforge.notes.shards import expand_pieces, is_piece_ref, read_piece
from midiforge.tokens.intervals import note_sequence, symbols
from midiforge.tokens.tokenizer import MidiTokenizer

TEXTURE_NOTES = 25  # the longest run a validation piece may share with training is one note less
LINE_NOTES = 16  # one part this long in common: the same tune (a hymn tune's phrase is ~8 notes)
MIN_DISTINCT = 3  # different symbols a window needs to link two pieces
SPLIT_FILE = "split.json"
FORMAT = 1
_MUL = np.uint64(0x9E3779B97F4A7C15)
_SALT_LINE = np.uint64(0x5DEECE66D)  # keeps part windows and texture windows apart


def window_hashes(sym: np.ndarray, k: int) -> np.ndarray:
    """uint64 hash of every window of ``k`` consecutive symbols that has at least MIN_DISTINCT different ones."""
    m = len(sym) - k + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(sym, np.int64), k)  # (m, k)
    ordered = np.sort(windows, axis=1)
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(axis=1)  # (m,)
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):  # polynomial hash, wrapping mod 2**64
            h = h * _MUL + (windows[:, j].astype(np.uint64) + np.uint64(1))
        h ^= h >> np.uint64(31)
    return h[distinct >= MIN_DISTINCT]


def part_lines(notes, steps_per_quarter: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(onset in grid steps, pitch) of each pitched track's top line: its highest note at each onset."""
    onset = np.rint(notes.time.astype(np.float64) * steps_per_quarter / max(1, notes.tpq)).astype(np.int64)
    pitched = notes.program != DRUM_PROGRAM
    key = notes.program.astype(np.int64) * 1024 + notes.track.astype(np.int64)
    out = []
    for k in np.unique(key[pitched]):
        m = pitched & (key == k)
        o, p = onset[m], notes.pitch[m].astype(np.int64)
        order = np.lexsort((-p, o))  # by onset, highest first
        o, p = o[order], p[order]
        top = np.ones(len(o), bool)
        top[1:] = o[1:] != o[:-1]
        out.append((o[top], p[top]))
    return out


def piece_hashes(notes, tokenizer) -> np.ndarray:
    """The distinct window hashes of one piece: whole-texture windows and part windows."""
    texture = symbols(*note_sequence(tokenizer, tokenizer.encode_notes(notes)))
    parts = [window_hashes(texture, TEXTURE_NOTES - 1)]
    for onset, pitch in part_lines(notes, tokenizer.config.steps_per_quarter):
        parts.append(window_hashes(symbols(onset, pitch), LINE_NOTES - 1) ^ _SALT_LINE)
    return np.unique(np.concatenate(parts))


def file_hashes(path: str, tokenizer) -> np.ndarray:
    """Every piece's window hashes of one data file (a shard: all its pieces); none for an unreadable file,
    which training will skip and report anyway."""
    out = [np.zeros(0, np.uint64)]
    try:
        for ref in expand_pieces([path]):
            notes = read_piece(ref) if is_piece_ref(ref) else read_notes(ref)
            out.append(piece_hashes(notes, tokenizer))
    except (MidiReadError, OSError, ValueError):
        pass
    return np.unique(np.concatenate(out))


def group_ids(hash_sets: list[np.ndarray]) -> list[int]:
    """Group of each piece (0, 1, ... in order of first member): pieces sharing a hash, transitively."""
    n = len(hash_sets)
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    lens = [len(h) for h in hash_sets]
    if sum(lens):
        h = np.concatenate(hash_sets)
        owner = np.repeat(np.arange(n), lens)
        order = np.argsort(h, kind="stable")
        h, owner = h[order], owner[order]
        same = np.flatnonzero(h[1:] == h[:-1])  # neighbours in sorted order holding the same hash
        for a, b in zip(owner[same].tolist(), owner[same + 1].tolist(), strict=True):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = [root(i) for i in range(n)]
    number: dict[int, int] = {}
    return [number.setdefault(r, len(number)) for r in roots]


def choose_validation(groups: list[int], share: float, seed: int) -> set[int]:
    """The groups that go to validation: seeded order, taken while they fit under floor(share * files)."""
    room = int(share * len(groups) + 1e-9)
    sizes = Counter(groups)
    chosen: set[int] = set()
    for g in np.random.default_rng(seed).permutation(sorted(sizes)).tolist():
        if room == 0:
            break
        if sizes[g] <= room:
            chosen.add(g)
            room -= sizes[g]
    return chosen


@dataclass
class Split:
    """Which file is in training and which in validation, with the group of each."""

    files: list[str]
    groups: list[int]
    val: list[bool]
    share: float
    seed: int

    @property
    def train_files(self) -> list[Path]:
        return [Path(f) for f, v in zip(self.files, self.val, strict=True) if not v]

    @property
    def val_files(self) -> list[Path]:
        return [Path(f) for f, v in zip(self.files, self.val, strict=True) if v]

    def summary(self) -> str:
        n_val, n_groups = sum(self.val), len(set(self.groups))
        val_groups = len({g for g, v in zip(self.groups, self.val, strict=True) if v})
        linked = len(self.files) - n_groups
        return (
            f"{len(self.files) - n_val} training / {n_val} validation files ({val_groups} of {n_groups} groups;"
            f" {linked} files joined a group by a shared run), seed {self.seed}"
        )

    def why_no_validation(self) -> str:
        room = int(self.share * len(self.files) + 1e-9)
        if room == 0:
            return f"{len(self.files)} file(s) are too few to hold out a share of {self.share} (not one file)"
        return f"every group of files is larger than the {room} file(s) a share of {self.share} allows"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "val_share": self.share,
            "seed": self.seed,
            "rule": f"groups: a run of {TEXTURE_NOTES} notes of the whole texture or {LINE_NOTES} of one part in"
            " common, transposition-invariant",
            "files": [
                {"path": f, "group": g, "split": "val" if v else "train"}
                for f, g, v in zip(self.files, self.groups, self.val, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> Split:
        rows = d["files"]
        return cls(
            [str(r["path"]) for r in rows],
            [int(r["group"]) for r in rows],
            [r["split"] == "val" for r in rows],
            float(d["val_share"]),
            int(d["seed"]),
        )


def make_split(files: list[Path], share: float, seed: int, jobs: int | None = None) -> Split:
    """Group ``files`` by shared runs and split them (reads every file once; workers for many files)."""
    tok = MidiTokenizer()  # base events: BPE is learned later, from the training files only
    tasks = [(str(f),) for f in files]
    hashes: list[np.ndarray] = [np.zeros(0, np.uint64)] * len(files)
    if len(tasks) < 16 or jobs == 1:
        for i, (path,) in enumerate(tasks):
            hashes[i] = file_hashes(path, tok)
    else:
        for i, ok, value in map_isolated(file_hashes, tasks, jobs, shared=(tok,)):
            if ok:  # a crashed worker: the file stands alone (training reports it as unreadable)
                hashes[i] = value
    groups = group_ids(hashes)
    val = choose_validation(groups, share, seed)
    return Split([str(f) for f in files], groups, [g in val for g in groups], share, seed)


def write_split(path: str | os.PathLike, split: Split) -> None:
    atomic_write_bytes(Path(path), (json.dumps(split.to_json(), indent=1) + "\n").encode("utf-8"))


def read_split(path: str | os.PathLike) -> Split:
    """The recorded split; UsageError when the file is not one."""
    try:
        return Split.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: unreadable split record ({type(e).__name__}: {e})") from e


def recorded_split(ckpt_dir: str | os.PathLike, config: dict | None = None) -> tuple[Path, Split] | None:
    """(path, split) of the run's ``split.json``: in ``ckpt_dir``, or beside it for ``CKPT/best`` (whose
    config.json has a ``best`` section); None when the run was given -v or trained without validation."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / SPLIT_FILE
    if not path.is_file() and isinstance(config, dict) and "best" in config:
        path = ckpt_dir.parent / SPLIT_FILE
    return (path, read_split(path)) if path.is_file() else None
