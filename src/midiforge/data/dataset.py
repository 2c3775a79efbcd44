"""Training data: an on-disk token cache and a windowed dataset (the Σ len² sampler and collate: sampler.py).

Flow: files (MIDI or prepared JSON) → ``read_notes`` → ``tokenizer.encode_notes(notes, transpose=t)`` → ids
cached on disk (memory-mapped) → pieces ``[BOS] + ids + [EOS]`` cut into windows of at most
``max_sequence_length`` predictions at onset boundaries → batches whose ``sum(L ** 2)`` stays under a budget.

Lengths are always counted in model tokens: a window of ``L + 1`` tokens gives ``L`` inputs and ``L`` labels,
and ``L`` is what ``dataset.lengths``, ``min_sequence_length`` and ``max_sequence_length`` refer to.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from midiforge.data.workers import map_isolated
from midiforge.fsio import atomic_write_bytes
from midiforge.notes.midi import MidiReadError, find_files
from midiforge.notes.read import read_notes
from midiforge.notes.shards import content_sha256, expand_pieces

DEFAULT_CACHE_DIR = ".midiforge-cache"
DATA_SUFFIXES = (".mid", ".midi", ".json", ".mfshard")  # .mfshard: many pieces (midiforge.notes.shards)
_PACK_TOKENS = 1 << 24  # flush a cache pack every ~16M tokens so building never holds the corpus in memory
_MIN_FILES_FOR_POOL = 16  # below this, starting worker processes costs more than it saves
# A scan over every piece (window cuts, control prefixes) unmaps the packs this often: pages read through a
# memory map count in the process's RSS until unmapped (at 10k files, ~470 MB of the 486 MB cache).
_RELEASE_EVERY = 1024
# Dataset and sampler usually get the same seed: separate streams keep transpositions and order independent.
_TRANSPOSE_STREAM = 1  # the sampler's batch order draws from stream 2 (sampler._ORDER_STREAM)


# --------------------------------------------------------------------------------------------- token cache


class TokenCache:
    """Encoded pieces on disk, keyed by file content hash (sha256) and tokenizer fingerprint.

    The cache is a folder of immutable *packs*. A pack is ``pack-KEY.npy`` (all ids of its pieces, one flat
    uint16/int32 array, memory-mapped when read) and ``pack-KEY.index.npz`` (per file hash: offset and
    length of each transposition, plus the reasons of files that could not be read). Packs are written
    once, atomically (ids first, index last, so an index never points at a missing array), and never
    modified: a later run that meets new files adds a pack, and concurrent builders at worst write the
    same pack twice.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, vocab_size: int):
        self.fingerprint = fingerprint
        self.dir = Path(root) / f"tokens-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"
        self.dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
        self.packs: list[Path] = []  # ids file of each pack
        # The index of each pack, as numpy arrays (~180 bytes a piece, not ~1.5 KB of dicts and tuples: at 10⁵–10⁶
        # pieces the difference is gigabytes): sorted shas (S64), the pack's transpositions, and for each sha
        # (row) the offset and length of each transposition (column).
        self._index: list[tuple[np.ndarray, dict[int, int], np.ndarray, np.ndarray]] = []
        self.failures: dict[str, str] = {}  # sha → reason the file is unusable
        self._mmaps: dict[int, np.ndarray] = {}
        if self.dir.is_dir():
            for index_path in sorted(self.dir.glob("pack-*.index.npz")):
                self._load_index(index_path)

    def _load_index(self, index_path: Path) -> None:
        ids_path = index_path.with_name(index_path.name.replace(".index.npz", ".npy"))
        try:
            with np.load(index_path, allow_pickle=False) as z:
                if str(z["fingerprint"]) != self.fingerprint or not ids_path.is_file():
                    return
                transposes = z["transpose"].tolist()
                shas, offsets, lengths = z["sha"], z["offset"], z["length"]
                fail_sha, fail_reason = z["fail_sha"], z["fail_reason"]
        except Exception as e:  # a damaged index only costs a re-encode
            warnings.warn(f"ignoring unreadable token cache index {index_path}: {e}", stacklevel=3)
            return
        self.packs.append(ids_path)
        keys = shas.astype("S64")
        order = np.argsort(keys, kind="stable")  # write_pack sorts already; a pack from elsewhere may not be
        offsets = np.asarray(offsets, np.int64).reshape(len(keys), len(transposes))
        lengths = np.asarray(lengths, np.int64).reshape(len(keys), len(transposes))
        column = {int(t): j for j, t in enumerate(transposes)}
        self._index.append((keys[order], column, offsets[order], lengths[order]))
        self.failures.update(zip(fail_sha.tolist(), fail_reason.tolist(), strict=True))

    def lookup(self, sha: str, transposes: Sequence[int]) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(pack, offsets, lengths) with one offset/length per transposition, or None if not all cached."""
        key = sha.encode("ascii")
        for pack, (keys, column, offsets, lengths) in enumerate(self._index):
            if not all(t in column for t in transposes):
                continue
            i = int(np.searchsorted(keys, key))
            if i < len(keys) and keys[i] == key:
                cols = [column[t] for t in transposes]
                return pack, offsets[i, cols], lengths[i, cols]
        return None

    def write_pack(
        self, transposes: Sequence[int], encoded: dict[str, list[np.ndarray]], failures: dict[str, str]
    ) -> None:
        """Store one pack: ``encoded`` maps file hash → ids of each transposition (in ``transposes`` order)."""
        shas = sorted(encoded)
        key = hashlib.sha256(
            "\n".join([self.fingerprint, repr(list(transposes)), *shas, *sorted(failures)]).encode()
        ).hexdigest()[:24]
        arrays = [a for sha in shas for a in encoded[sha]]
        lengths = np.asarray([len(a) for a in arrays], np.int64).reshape(len(shas), len(transposes))
        offsets = (np.cumsum(lengths.ravel()) - lengths.ravel()).reshape(lengths.shape)
        ids = np.concatenate(arrays).astype(self.dtype) if arrays else np.zeros(0, self.dtype)
        self.dir.mkdir(parents=True, exist_ok=True)
        ids_path = self.dir / f"pack-{key}.npy"
        buf = io.BytesIO()
        np.save(buf, ids)
        atomic_write_bytes(ids_path, buf.getvalue())
        buf = io.BytesIO()
        fail_sha = sorted(failures)
        np.savez(
            buf,
            fingerprint=np.asarray(self.fingerprint),
            transpose=np.asarray(list(transposes), np.int64),
            sha=np.asarray(shas, dtype="U64"),
            offset=offsets,
            length=lengths,
            fail_sha=np.asarray(fail_sha, dtype="U64"),
            fail_reason=np.asarray([failures[s] for s in fail_sha], dtype=str),
        )
        atomic_write_bytes(self.dir / f"pack-{key}.index.npz", buf.getvalue())
        self._load_index(self.dir / f"pack-{key}.index.npz")

    def ids(self, pack: int) -> np.ndarray:
        """The memory-mapped ids array of a pack (opened once per process)."""
        m = self._mmaps.get(pack)
        if m is None:
            m = self._mmaps[pack] = np.load(self.packs[pack], mmap_mode="r")
        return m

    def release(self) -> None:
        """Unmap the packs (reopened by the next ``ids``): the pages read so far stop counting in this
        process's RSS; they stay in the OS page cache, so reading them again costs no disk access."""
        self._mmaps.clear()

    def __getstate__(self):
        # DataLoader workers get a copy: pickling a memmap would copy its whole content, so reopen instead.
        state = self.__dict__.copy()
        state["_mmaps"] = {}
        return state


# -------------------------------------------------------------------------------------------- encoding


def _encode_file(path: str, transposes: tuple[int, ...], tokenizer) -> tuple[list | None, str | None, bool]:
    """Encode one file in every transposition: (ids per transposition | None, reason | None, cacheable)."""
    stage = "unreadable"
    try:
        notes = read_notes(path)
        stage = "tokenizer failed"
        ids = [np.asarray(tokenizer.encode_notes(notes, transpose=t), np.int32) for t in transposes]
    except MidiReadError as e:  # a bad file, or a prepared sheet whose ids do not fit the tokenizer: cached
        return None, str(e), True
    except Exception as e:  # a permission error, a tokenizer bug: never stops the build; retried next run
        return None, f"{stage}: {type(e).__name__}: {e}", False
    return ids, None, True


def _encode_all(
    tasks: list[tuple], tokenizer, num_workers: int
) -> Iterator[tuple[int, list | None, str | None, bool]]:
    """(task index, ids, reason, cacheable) for each ``_encode_file`` task ``(path, transposes)``, in completion
    order."""
    if num_workers <= 1 or len(tasks) < _MIN_FILES_FOR_POOL:
        for i, task in enumerate(tasks):
            yield i, *_encode_file(*task, tokenizer)
        return

    # The tokenizer goes to each worker once, when it starts. Sent with every batch, each batch unpickled a fresh
    # copy, and a copy that has encoded keeps ~9 MB inside the `tokenizers` library after it is dropped
    # (gc.collect() does not return it): at 10k files each worker grew to ~920 MB.
    for i, ok, value in map_isolated(_encode_file, tasks, num_workers, shared=(tokenizer,)):
        # not ok: the worker crashed or timed out on this file; not cached, so the next run tries again
        yield (i, *value) if ok else (i, None, value, False)


# --------------------------------------------------------------------------------------------- dataset


def window_starts(word_starts: np.ndarray, num_ids: int, max_length: int) -> np.ndarray:
    """Start positions (in ``[BOS] + ids + [EOS]`` coordinates) of the windows that cover a piece.

    Window k spans tokens ``starts[k] .. starts[k+1]`` inclusive (the next window's first token is this one's
    last label), so every token is predicted exactly once. Each cut is the last onset start at or before the
    length limit; a hard cut only when a single onset is longer than the limit.
    """
    safe = np.flatnonzero(np.asarray(word_starts, bool)) + 1  # +1: BOS shifts ids by one
    last = num_ids + 1  # index of EOS
    starts = [0]
    while last - starts[-1] > max_length:
        s = starts[-1]
        j = int(np.searchsorted(safe, s + max_length, side="right")) - 1
        starts.append(int(safe[j]) if j >= 0 and safe[j] > s else s + max_length)
    return np.asarray(starts, np.int64)


class MidiDataset(torch.utils.data.Dataset):
    """Windows of tokenized pieces; ``dataset[i] = (inputs, labels)``, LongTensors of length ``lengths[i]``.

    ``paths``: files and/or folders of ``.mid``/``.midi`` and prepared ``.json`` files, searched recursively.
    Unusable files land in ``skipped`` (path → reason), as do pieces shorter than ``min_sequence_length``
    (judged untransposed, so the set of pieces is the same in every epoch); nothing is dropped silently. A piece longer than ``max_sequence_length`` becomes several windows cut at
    onset boundaries; only a real piece start has BOS and only a real end has EOS. With a sampler budget
    ``B`` (``sum(L ** 2) <= B``), pass ``max_sequence_length <= math.isqrt(B)`` so every window fits a batch.

    With ``augment``, every transposition in ``[-transpose_range, transpose_range]`` (pitched notes only) is
    encoded and cached once; ``set_epoch(e)`` picks one per piece from ``(seed, e, piece index)`` and
    recomputes the windows, so ``len(dataset)`` and ``lengths`` may change between epochs.

    Files missing from the token cache (``cache_dir``, default ``./.midiforge-cache``) are encoded in up to
    ``num_workers`` (default: CPUs, at most 8) crash-isolated processes when there are many; like any
    multiprocessing code, a script doing this needs an ``if __name__ == "__main__":`` guard. With
    ``encode_missing=False`` nothing is encoded: a file the cache lacks is skipped ("not in the token cache").
    Data-parallel ranks > 0 load so after rank 0 filled the cache, so that every rank sees the same pieces.

    DataLoader workers hold a copy of the dataset: do not use ``persistent_workers=True`` (they would keep
    the windows of an old epoch).
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike],
        tokenizer,
        min_sequence_length: int = 32,
        max_sequence_length: int = 1536,
        *,
        cache_dir: str | os.PathLike | None = None,
        augment: bool = True,
        transpose_range: int = 3,
        seed: int = 0,
        num_workers: int | None = None,
        encode_missing: bool = True,
        controls=None,
    ):
        if min_sequence_length < 1 or max_sequence_length < 1:
            raise ValueError("sequence lengths must be at least 1")
        if transpose_range < 0:
            raise ValueError(f"transpose_range must be >= 0, got {transpose_range}")
        self.tokenizer = tokenizer
        self.min_sequence_length = int(min_sequence_length)
        self.max_sequence_length = int(max_sequence_length)
        self.augment = augment
        self.seed = seed
        r = transpose_range if augment else 0
        self.transposes = np.arange(-r, r + 1, dtype=np.int64)  # all transpositions cached per piece
        self._t0 = r  # column of transposition 0
        self.cache = TokenCache(
            DEFAULT_CACHE_DIR if cache_dir is None else cache_dir, tokenizer.fingerprint, len(tokenizer)
        )
        self.skipped: dict[str, str] = {}
        self.num_encoded = 0  # files encoded by this construction (0 when everything came from the cache)
        self.encode_missing = encode_missing
        self.controls = controls  # a midiforge.data.prefix.ControlPrefix: control prefix after BOS (None: none)
        self.infill = None  # a midiforge.data.fim.Rearranger: some windows become infilling examples (None: none)

        files = expand_pieces(find_files(paths, suffixes=DATA_SUFFIXES))  # a shard → SHARD#0, SHARD#1, ...
        shas: dict[str, str] = {}
        for f in files:
            try:
                shas[f] = content_sha256(f)  # a shard piece: its blob SHA-256, from the shard header
            except OSError as e:
                self.skipped[f] = f"unreadable: {e}"
        transient = self._build_cache(shas, tokenizer, os.cpu_count() if num_workers is None else num_workers)

        pieces, packs, offsets, lengths = [], [], [], []
        for f in files:
            if f in self.skipped:
                continue
            sha = shas[f]
            if sha in self.cache.failures:
                self.skipped[f] = self.cache.failures[sha]
                continue
            found = self.cache.lookup(sha, self.transposes.tolist())
            if found is None:  # encoding failed this run with a reason not worth caching
                self.skipped[f] = transient[sha]
                continue
            pack, offs, lens = found
            if lens[self._t0] + 1 < self.min_sequence_length:
                self.skipped[f] = f"too short: {lens[self._t0] + 1} tokens < {self.min_sequence_length}"
                continue
            pieces.append(f)
            packs.append(pack)
            offsets.append(offs)
            lengths.append(lens)
        self.files = pieces  # path of each piece, in piece-index order
        nt = len(self.transposes)
        self._pack = np.asarray(packs, np.int64)
        self._offset = np.asarray(offsets, np.int64).reshape(-1, nt)
        self._length = np.asarray(lengths, np.int64).reshape(-1, nt)
        self._cuts: dict[tuple[int, int], np.ndarray] = {}  # (piece, transposition column) → window starts
        self.set_epoch(0)

    def _build_cache(self, shas: dict[str, str], tokenizer, num_workers: int) -> dict[str, str]:
        """Encode the files (path → sha) the cache lacks. Returns sha → reason for failures not cached."""
        todo: dict[str, str] = {}  # sha → one path with that content
        transposes = tuple(self.transposes.tolist())
        for f, sha in shas.items():
            if sha not in self.cache.failures and self.cache.lookup(sha, transposes) is None:
                todo.setdefault(sha, f)
        transient: dict[str, str] = {}
        if not todo:
            return transient
        if not self.encode_missing:
            return dict.fromkeys(todo, "not in the token cache (encode_missing=False: not encoded here)")
        shas_todo = list(todo)
        tasks = [(todo[sha], transposes) for sha in shas_todo]
        encoded: dict[str, list[np.ndarray]] = {}
        failures: dict[str, str] = {}
        num_tokens = 0
        for i, ids, reason, cacheable in _encode_all(tasks, tokenizer, min(num_workers, 8)):
            sha = shas_todo[i]
            self.num_encoded += 1
            if ids is None:
                (failures if cacheable else transient)[sha] = reason
                continue
            encoded[sha] = ids
            num_tokens += sum(len(a) for a in ids)
            if num_tokens >= _PACK_TOKENS:
                self.cache.write_pack(transposes, encoded, failures)
                encoded, failures, num_tokens = {}, {}, 0
        if encoded or failures:
            self.cache.write_pack(transposes, encoded, failures)
        return transient

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_pieces(self) -> int:
        return len(self.files)

    def piece_ids(self, piece: int, transpose: int | None = None) -> np.ndarray:
        """Content ids (no BOS/EOS) of a piece, in this epoch's transposition unless one is given."""
        col = self._tcol[piece] if transpose is None else int(transpose) + self._t0
        if not 0 <= col < len(self.transposes):
            raise ValueError(f"transposition {transpose} was not cached (range ±{self._t0})")
        off, n = self._offset[piece, col], self._length[piece, col]
        return self.cache.ids(int(self._pack[piece]))[off : off + n]

    def set_epoch(self, epoch: int) -> None:
        """Choose each piece's transposition for this epoch and recompute the windows and ``lengths``."""
        self.epoch = epoch
        n = len(self.files)
        if len(self.transposes) > 1:
            rng = np.random.default_rng([self.seed, epoch, _TRANSPOSE_STREAM])
            self._tcol = rng.integers(0, len(self.transposes), size=n)
        else:
            self._tcol = np.zeros(n, np.int64)
        self.transpositions = self.transposes[self._tcol]  # semitones per piece this epoch
        num_ids = self._length[np.arange(n), self._tcol]
        # Every window carries its piece's control prefix (after BOS in the first window, first in the others),
        # so the model learns the controls everywhere in a piece; windows leave room for the whole prefix.
        self._prefix: dict[int, np.ndarray] = {}
        room = np.zeros(n, np.int64)
        if self.controls is not None:
            for p in range(n):
                if p % _RELEASE_EVERY == 0:
                    self.cache.release()
                ids, t = self.piece_ids(p), self.transpositions[p]
                self._prefix[p] = self.controls.prefix_ids(self.files[p], ids, t, epoch, p)
                room[p] = min(self.controls.room(self.files[p], ids, t), self.max_sequence_length // 2)
        limit = self.max_sequence_length - room
        long = np.flatnonzero(num_ids + 1 > limit)
        win_piece, win_start, win_stop = [np.arange(n)], [np.zeros(n, np.int64)], [num_ids + 2]
        if len(long):
            keep = np.ones(n, bool)
            keep[long] = False
            win_piece, win_start, win_stop = [win_piece[0][keep]], [win_start[0][keep]], [win_stop[0][keep]]
            for k, p in enumerate(long.tolist()):
                if k % _RELEASE_EVERY == 0:
                    self.cache.release()
                starts = self._window_starts(p, int(limit[p]))
                win_piece.append(np.full(len(starts), p))
                win_start.append(starts)
                win_stop.append(np.append(starts[1:] + 1, num_ids[p] + 2))
        piece, start, stop = (np.concatenate(a).astype(np.int64) for a in (win_piece, win_start, win_stop))
        order = np.lexsort((start, piece))  # windows grouped by piece, in reading order
        self._win_piece, self._win_start, self._win_stop = piece[order], start[order], stop[order]
        pre_len = np.array([len(self._prefix.get(int(p), ())) for p in self._win_piece], np.int64)
        self.lengths = self._win_stop - self._win_start - 1 + pre_len
        self.cache.release()  # the scans above touched (nearly) every page of the cache

    def _window_starts(self, piece: int, limit: int) -> np.ndarray:
        key = (piece, int(self._tcol[piece]), limit)
        starts = self._cuts.get(key)
        if starts is None:
            ids = self.piece_ids(piece)
            ws = self.tokenizer.word_starts(np.asarray(ids, np.int64))
            starts = self._cuts[key] = window_starts(ws, len(ids), limit)
        return starts

    def __len__(self) -> int:
        return len(self._win_piece)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, a, b = int(self._win_piece[i]), int(self._win_start[i]), int(self._win_stop[i])
        ids = self.piece_ids(p)
        n = len(ids)
        # Window = tokens a..b-1 of [BOS] + ids + [EOS]; ids[k] sits at position k + 1.
        w = np.empty(b - a, np.int64)
        body = ids[max(a, 1) - 1 : min(b, n + 1) - 1]
        lo = 1 if a == 0 else 0
        if a == 0:
            w[0] = self.tokenizer.bos_id
        w[lo : lo + len(body)] = body
        if b == n + 2:
            w[-1] = self.tokenizer.eos_id
        pre = self._prefix.get(p)
        # Infilling examples are seeded per (seed, epoch, window): a resumed run rebuilds the same examples.
        # A window that starts its piece keeps its prefix and is never one; the others may become one first.
        if self.infill is not None and not (a == 0 and pre is not None and len(pre)):
            fim = self.infill(w, self.infill.rng(self.seed, self.epoch, i))
            if fim is not None:
                return torch.from_numpy(fim[0]), torch.from_numpy(fim[1])
        if pre is not None and len(pre):  # [BOS] + prefix + music, or prefix + music; no loss on the controls
            w = np.concatenate([w[:1], pre, w[1:]]) if a == 0 else np.concatenate([pre, w])
            w = torch.from_numpy(w)
            labels = w[1:].clone()
            labels[: len(pre)] = -100  # sampler.IGNORE_INDEX (a later window: its first token is not new)
            return w[:-1], labels
        w = torch.from_numpy(w)
        return w[:-1], w[1:]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cuts"] = {}  # workers only read windows; the memo can be large
        return state
