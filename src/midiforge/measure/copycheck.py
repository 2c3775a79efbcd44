"""Does a generated piece copy the training set? The longest run of consecutive notes it shares with any
training piece, transposition-invariant, from an index built once per training set and cached on disk.

A piece becomes a string of *symbols* (:mod:`midiforge.tokens.intervals`), one per pair of neighbouring
notes: (onset interval in grid steps, pitch interval). Intervals make it transposition-invariant; the grid makes
a sample and the piece it copies agree exactly. A shared run of ``s`` symbols is a run of ``s + 1`` notes.

The index holds a 64-bit hash of every ``NGRAM`` consecutive symbols of every training piece, sorted, with
where it occurs (piece, position): one numpy sort, seconds for 10,000 pieces. A query hashes its own n-grams,
finds the hits with a binary search, chains hits on the same diagonal (training position - query position)
into runs, and verifies the longest candidates symbol by symbol, extending them in both directions (hash
collisions cannot inflate a run, and n-grams skipped as too common are bridged). Runs shorter than
``NGRAM + 1`` notes are not measured and count as 0.

The index and the training set's token counts (the unigram baseline of ``midiforge evaluate``) are cached in
``CACHE/trainindex-KEY.npz``, KEY from the tokenizer fingerprint and the training files' paths, sizes and
modification times.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midiforge import checkpoint as ck
from midiforge.data.dataset import DATA_SUFFIXES, MidiDataset
from midiforge.data.tagging import split_specs
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.notes.midi import find_files
from midiforge.options import add_train_data
from midiforge.tokens.intervals import note_sequence, symbols  # noqa: F401 -- also this module's API

NGRAM = 8  # symbols per indexed n-gram: runs of at least NGRAM + 1 notes are found
MAX_POSTINGS = 2000  # an n-gram found more often than this in the training set is too common to start a match from
VERIFY = 16  # candidate runs verified per query
DEFAULT_THRESHOLD = 48  # notes: a sample sharing a longer run with a training piece is flagged
_MUL = np.uint64(0x9E3779B97F4A7C15)
_FORMAT = 1


def ngram_hashes(flat: np.ndarray) -> np.ndarray:
    """uint64 hash of flat[i : i + NGRAM] for every i (len(flat) - NGRAM + 1 values)."""
    m = len(flat) - NGRAM + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(NGRAM):  # polynomial hash, wrapping mod 2**64
            h = h * _MUL + (flat[j : j + m].astype(np.uint64) + np.uint64(1))
        h ^= h >> np.uint64(31)
    return h


@dataclass
class CopyIndex:
    """Sorted n-gram hashes of a training set with their (piece, position), and the pieces' symbols."""

    hashes: np.ndarray  # (H,) uint64, sorted
    piece: np.ndarray  # (H,) int32
    pos: np.ndarray  # (H,) int32
    flat: np.ndarray  # all pieces' symbols, concatenated
    offsets: np.ndarray  # (P + 1,) int64
    names: list[str]
    token_counts: np.ndarray  # (V,) int64 token counts of the training set (content ids + one EOS per piece)

    @classmethod
    def build(cls, seqs: list[np.ndarray], names: list[str], token_counts: np.ndarray) -> CopyIndex:
        lens = np.asarray([len(s) for s in seqs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        flat = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)
        h = ngram_hashes(flat)
        piece = np.repeat(np.arange(len(seqs), dtype=np.int32), lens)[: len(h)]
        pos = (np.arange(len(h)) - offsets[piece]).astype(np.int32)
        ok = pos + NGRAM <= lens[piece]  # n-grams inside one piece only
        h, piece, pos = h[ok], piece[ok], pos[ok]
        order = np.argsort(h, kind="stable")
        return cls(h[order], piece[order], pos[order], flat, offsets, list(names), np.asarray(token_counts))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.asarray(_FORMAT),
            ngram=np.asarray(NGRAM),
            hashes=self.hashes,
            piece=self.piece,
            pos=self.pos,
            flat=self.flat,
            offsets=self.offsets,
            names=np.asarray(self.names, dtype=str),
            token_counts=self.token_counts,
        )
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> CopyIndex | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != _FORMAT or int(z["ngram"]) != NGRAM:
                    return None
                return cls(
                    z["hashes"],
                    z["piece"],
                    z["pos"],
                    z["flat"],
                    z["offsets"],
                    z["names"].tolist(),
                    z["token_counts"],
                )
        except Exception:  # a damaged cache only costs a rebuild
            return None

    def symbols_of(self, piece: int) -> np.ndarray:
        return self.flat[self.offsets[piece] : self.offsets[piece + 1]]

    def longest_run(self, query: np.ndarray) -> dict:
        """The longest run of ``query``'s symbols found in one training piece: ``{"notes", "piece",
        "query_note", "train_note"}`` (``notes`` 0 and the rest None when it is shorter than NGRAM + 1 notes)."""
        best = {"notes": 0, "piece": None, "query_note": None, "train_note": None}
        q = ngram_hashes(np.asarray(query, np.int64))
        if len(q) == 0 or len(self.hashes) == 0:
            return best
        lo = np.searchsorted(self.hashes, q, side="left")
        hi = np.searchsorted(self.hashes, q, side="right")
        counts = hi - lo
        counts[counts > MAX_POSTINGS] = 0
        total = int(counts.sum())
        if total == 0:
            return best
        qpos = np.repeat(np.arange(len(q)), counts)
        first = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        hit = first + np.arange(total)  # index into the sorted postings of each hit
        piece, tpos = self.piece[hit].astype(np.int64), self.pos[hit].astype(np.int64)
        diag = tpos - qpos
        order = np.lexsort((qpos, diag, piece))
        piece, diag, qpos, tpos = piece[order], diag[order], qpos[order], tpos[order]
        # A chain: consecutive hits on one (piece, diagonal) whose query positions follow each other.
        new = np.ones(total, bool)
        new[1:] = (piece[1:] != piece[:-1]) | (diag[1:] != diag[:-1]) | (qpos[1:] != qpos[:-1] + 1)
        starts = np.flatnonzero(new)
        lengths = np.diff(np.append(starts, total))
        for s in starts[np.argsort(-lengths, kind="stable")[:VERIFY]]:
            run, q0, t0 = self._extend(query, int(piece[s]), int(qpos[s]), int(tpos[s]))
            if run + 1 > best["notes"] and run >= NGRAM:
                best = {
                    "notes": run + 1,
                    "piece": self.names[int(piece[s])],
                    "query_note": q0,
                    "train_note": t0,
                }
        return best

    def _extend(self, query: np.ndarray, piece: int, qpos: int, tpos: int) -> tuple[int, int, int]:
        """Exact length (symbols) of the common run through query[qpos] == train[tpos], and where it starts."""
        t = self.symbols_of(piece)
        if query[qpos] != t[tpos]:
            return 0, qpos, tpos
        # Backwards and forwards with vectorised comparisons over the longest possible stretch.
        back = min(qpos, tpos)
        eq_b = query[qpos - back : qpos][::-1] == t[tpos - back : tpos][::-1]
        nb = int(np.argmin(eq_b)) if not eq_b.all() else back
        fwd = min(len(query) - qpos, len(t) - tpos)
        eq_f = query[qpos : qpos + fwd] == t[tpos : tpos + fwd]
        nf = int(np.argmin(eq_f)) if not eq_f.all() else fwd
        return nb + nf, qpos - nb, tpos - nb


# --- the training set --------------------------------------------------------------------------------------


def training_files(
    ckpt_config: dict | None, train: list | None, ckpt_dir: str | os.PathLike | None = None
) -> tuple[list[Path], str]:
    """The training files (``-t``, the training side of the checkpoint's ``split.json``, or its recorded
    training set, ``NAME=DIR`` read as in `midiforge train`) and where they came from; an empty list and the
    reason when there are none."""
    from midiforge.data.split import recorded_split

    split = None if train or ckpt_dir is None else recorded_split(ckpt_dir, ckpt_config)
    if train:
        specs, origin = train, "-t"
    elif split is not None:
        specs, origin = [str(p) for p in split[1].train_files], f"the training side of {split[0]}"
    else:
        specs = ((ckpt_config or {}).get("train") or {}).get("train_dataset") or []
        origin = "the checkpoint's training set"
        if not specs:
            return [], "the checkpoint records no training set (give -t)"
    problems: list[str] = []
    paths = split_specs(specs, origin, problems).paths
    missing = [str(p) for p in paths if not p.exists()]
    if problems or missing:
        hint = "" if train else " (give -t)"
        what = "; ".join(problems) or f"{origin}: no such file or directory: {', '.join(missing[:3])}"
        return [], what + hint
    return (paths if split is not None else find_files(paths, suffixes=DATA_SUFFIXES)), origin


def validation_files(
    ckpt_config: dict | None, val: list | None, ckpt_dir: str | os.PathLike | None = None
) -> tuple[list[Path], str]:
    """The held-out files (``-v``, the validation side of the checkpoint's ``split.json``, or the ``-v`` it was
    trained with) and where they came from; an empty list and the reason when there are none. The twin of
    :func:`training_files`: a run trained without ``-v`` is evaluated on exactly the pieces it held out."""
    from midiforge.data.split import recorded_split

    split = None if val or ckpt_dir is None else recorded_split(ckpt_dir, ckpt_config)
    if val:
        specs, origin = [str(p) for p in val], "-v"
    elif split is not None:
        specs, origin = [str(p) for p in split[1].val_files], f"the validation side of {split[0]}"
        if not specs:
            return [], f"{split[0]} holds no validation pieces (give -v)"
    else:
        specs = ((ckpt_config or {}).get("train") or {}).get("val_dataset") or []
        origin = "the checkpoint's validation set"
        if not specs:
            return [], "the checkpoint records no validation set (give -v)"
    missing = [s for s in specs if not Path(s).exists()]
    if missing:
        hint = "" if val else " (give -v)"
        return [], f"{origin}: no such file or directory: {', '.join(missing[:3])}{hint}"
    paths = [Path(s) for s in specs]
    return (paths if split is not None else find_files(paths, suffixes=DATA_SUFFIXES)), origin


def _cache_key(tokenizer, files: list[Path]) -> str:
    h = hashlib.sha256(f"{tokenizer.fingerprint}|{NGRAM}|{_FORMAT}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def training_index(tokenizer, files: list[Path], cache_dir: str | os.PathLike) -> tuple[CopyIndex, bool]:
    """(index of the training files, whether it came from the cache). Encodes through the token cache in
    ``cache_dir`` (shared with training) and writes ``trainindex-KEY.npz`` there."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"trainindex-{_cache_key(tokenizer, files)}.npz"
    if path.is_file():
        index = CopyIndex.from_file(path)
        if index is not None:
            return index, True
    ds = MidiDataset(files, tokenizer, 1, 1 << 30, cache_dir=cache_dir, augment=False)
    counts = np.zeros(len(tokenizer), np.int64)
    seqs = []
    for p in range(ds.num_pieces):
        ids = np.asarray(ds.piece_ids(p, 0), np.int64)
        counts += np.bincount(ids, minlength=len(tokenizer))
        counts[tokenizer.eos_id] += 1
        seqs.append(symbols(*note_sequence(tokenizer, ids)))
    index = CopyIndex.build(seqs, [str(f) for f in ds.files], counts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, index.to_bytes(), durable=False)
    return index, False


def check(index: CopyIndex, tokenizer, id_seqs, threshold: int = DEFAULT_THRESHOLD) -> list[dict]:
    """The longest shared run of each token sequence, with ``flagged`` when it exceeds ``threshold`` notes."""
    out = []
    for ids in id_seqs:
        run = index.longest_run(symbols(*note_sequence(tokenizer, ids)))
        out.append({**run, "flagged": run["notes"] > threshold})
    return out


# --- `midiforge generate --check-copies` ---------------------------------------------------------------------


def add_arguments(p) -> None:
    """generate's copy-check options."""
    p.add_argument(
        "--check-copies",
        action="store_true",
        help="after generating, print the longest run of notes each sample shares with a training piece"
        " (transposition-invariant) and flag copies",
    )
    add_train_data(p, "the training data for --check-copies, as given to `midiforge train`"
                   " (default: the checkpoint's own)")  # fmt: skip
    p.add_argument(
        "--copy-threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        metavar="NOTES",
        help="--check-copies flags a sample sharing more notes than this (default: %(default)s)",
    )


def cli_training_files(args) -> list[Path] | None:
    """The training files for --check-copies, checked before anything is generated (None without it)."""
    if not getattr(args, "check_copies", False):
        return None
    if args.copy_threshold < 1:
        raise UsageError(f"--copy-threshold must be >= 1 (got {args.copy_threshold})")
    files, origin = training_files(ck.read_config(Path(args.checkpoint)), args.train_dataset, args.checkpoint)
    if not files:
        raise UsageError(f"--check-copies: {origin}")
    return files


def print_check(args, tokenizer, files: list[Path], id_seqs, names) -> list[dict]:
    """Build or load the index (CKPT/cache), check every sample and print one line each."""
    import time

    t0 = time.perf_counter()
    index, cached = training_index(tokenizer, files, Path(args.checkpoint) / "cache")
    results = check(index, tokenizer, id_seqs, args.copy_threshold)
    how = "cached index" if cached else "index built"
    print(f"copy check against {len(index.names)} training pieces ({how}, {time.perf_counter() - t0:.1f} s):")
    for name, r in zip(names, results, strict=True):
        where = f" with {r['piece']} (its note {r['train_note']})" if r["piece"] else ""
        flag = f"  <- COPY? more than {args.copy_threshold} notes" if r["flagged"] else ""
        print(f"  {name}: longest shared run {r['notes']} notes{where}{flag}")
    return results
