"""Sharded binary prepared data: `midiforge prepare --format shards`, for corpora of 10⁴–10⁶ pieces.

Prepared JSON (one file per piece, base64 columns) is 3.6× the MIDI's size and costs a JSON parse per load. A
shard holds a few thousand pieces in one file, each piece one compressed blob:

    shard file  = b"MFSHARD1" | header length (uint64 LE) | SHA-256 of the header (32 bytes) | header | blobs
    header      = JSON: schema, codec, and per piece: source path, source SHA-256, blob SHA-256, blob offset,
                  blob length
    piece blob  = codec( meta length (uint32 LE) | meta JSON | array bytes )

The codec is LZ4 (high-compression mode): it decompresses 5× faster than zlib for 1.2× the bytes on POP909
(3.3 vs 2.7 MB for 300 songs of 4.3 MB MIDI), and decompression was a third of a shard load. Shards written
before the codec field existed are zlib and still read.

The blob is written from the :class:`~midiforge.notes.midi.NoteTable`'s dataclass fields, whatever they are: every
numpy array field is stored with its dtype and shape (integer columns as deltas when that makes their values
smaller, then in the smallest integer type that holds them), scalars and other values as JSON (tuples and
non-string dict keys tagged), and the prepared "sheet" (base events of the default tokenizer) as two arrays.
A table class with more columns than the reader's gets them dropped; one with fewer leaves the reader's
defaults. Reading a piece checks its blob's SHA-256 (and the header's own): a damaged shard is reported per
piece as :class:`CorruptShardError` (an OSError: not cached by the token cache, retried after a re-`prepare`).

A piece is addressed as ``PATH/shard-00003.mfshard#17`` (:func:`expand_pieces` lists them); its blob SHA-256 is
its content key for the token cache. Shards are read-only after writing and read with plain positioned reads,
so any number of processes (DataLoader workers, ranks, nodes on shared storage) can read them at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from midiforge.fsio import atomic_write_bytes, file_sha256
from midiforge.notes.midi import NOTE_LIMITS, MidiReadError, NoteTable, decode_sheet

SHARD_SUFFIX = ".mfshard"
MAGIC = b"MFSHARD1"
SCHEMA = "midiforge.shard/1"
DEFAULT_PIECES_PER_SHARD = (
    2048  # ~25 MB of POP909-like pieces: few files, yet a write buffer that stays small
)
_PREAMBLE = len(MAGIC) + 8 + 32
CODEC = "lz4"  # what new shards are written with; "zlib" (the first shards, no codec field) is still read


class CorruptShardError(OSError):
    """A shard whose bytes do not match their checksum (or cannot be parsed): damaged storage or a torn copy."""


def is_piece_ref(path) -> bool:
    """True for ``.../NAME.mfshard#INDEX`` (a piece inside a shard)."""
    name = os.fspath(path).rsplit("/", 1)[-1]
    stem, sep, index = name.rpartition("#")
    return bool(sep) and stem.endswith(SHARD_SUFFIX) and index.isdigit()


# ------------------------------------------------------------------------------------------- piece codec
def _small_int_dtype(lo: int, hi: int) -> np.dtype:
    for dt in ("<i1", "<i2", "<i4", "<i8"):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype("<i8")


def _tag(value):
    """A JSON-able form of a field value that is not an array: tuples and non-string dict keys tagged."""
    if isinstance(value, tuple):
        return {"__tuple__": [_tag(v) for v in value]}
    if isinstance(value, dict):
        return {"__items__": [[_tag(k), _tag(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _untag(value):
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_untag(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__items__" in value:
        return {_untag(k): _untag(v) for k, v in value["__items__"]}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


def _pack_array(name: str, a: np.ndarray, metas: list, chunks: list) -> None:
    a = np.asarray(a)
    stored, delta = a, False
    if a.dtype.kind in "iu" and a.size:
        flat = a.reshape(-1).astype(np.int64)
        d = np.diff(flat, prepend=0) if a.ndim == 1 else flat
        delta = a.ndim == 1 and int(np.abs(d).max()) < int(np.abs(flat).max())
        src = d if delta else flat
        stored = src.astype(_small_int_dtype(int(src.min()), int(src.max())))
    elif a.dtype.kind == "b":  # bit-packed: word-start masks are one bool per event
        stored = np.packbits(a.reshape(-1))
    else:
        stored = a.astype(a.dtype.newbyteorder("<"))
    metas.append([name, a.dtype.str, stored.dtype.str, list(a.shape), delta])
    chunks.append(np.ascontiguousarray(stored).tobytes())


def _compress(raw: bytes, codec: str) -> bytes:
    if codec == "lz4":
        import lz4.block

        return lz4.block.compress(raw, mode="high_compression", compression=9, store_size=True)
    if codec == "zlib":
        return zlib.compress(raw, 6)
    raise ValueError(f"unknown shard codec {codec!r}")


def _decompress(blob: bytes, codec: str) -> bytes:
    if codec == "lz4":
        import lz4.block

        size = int.from_bytes(blob[:4], "little")
        if size > 255 * len(blob):  # LZ4 expands at most ~255×: a bigger size prefix is damage, not a piece
            raise CorruptShardError(f"undecodable piece: LZ4 size {size} for a blob of {len(blob)} bytes")
        try:
            return lz4.block.decompress(blob)
        except lz4.block.LZ4BlockError as e:
            raise CorruptShardError(f"undecodable piece: {e}") from e
    if codec == "zlib":
        return zlib.decompress(blob)
    raise CorruptShardError(f"unknown shard codec {codec!r}")


def encode_piece(table: NoteTable, codec: str = CODEC) -> bytes:
    """One NoteTable (all its dataclass fields; the sheet as arrays) as a compressed blob."""
    metas: list = []
    chunks: list[bytes] = []
    values: dict = {}
    sheet_config = None
    for f in dataclasses.fields(table):
        v = getattr(table, f.name)
        if f.name == "sheet":
            if v is not None:
                d = decode_sheet(v)
                sheet_config = d["config"]
                _pack_array("sheet.events", np.asarray(d["events"]).astype(np.uint16), metas, chunks)
                _pack_array("sheet.word_starts", np.asarray(d["word_starts"], bool), metas, chunks)
        elif isinstance(v, np.ndarray):
            _pack_array(f.name, v, metas, chunks)
        else:
            values[f.name] = _tag(v)
    meta = json.dumps(
        {"arrays": metas, "values": values, "sheet": sheet_config}, separators=(",", ":")
    ).encode()
    return _compress(struct.pack("<I", len(meta)) + meta + b"".join(chunks), codec)


_TABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(NoteTable))


@functools.lru_cache(maxsize=64)
def _dtype(text: str) -> np.dtype:
    return np.dtype(text)


def decode_piece(blob: bytes, codec: str = CODEC) -> NoteTable:
    """The NoteTable of a blob from :func:`encode_piece` (sheet checked like a prepared JSON's)."""
    try:
        raw = _decompress(blob, codec)
        (n,) = struct.unpack_from("<I", raw)
        meta = json.loads(raw[4 : 4 + n])
        pos = 4 + n
        arrays = {}
        for name, dtype, stored, shape, delta in meta["arrays"]:
            count = math.prod(shape)
            if count == 0:  # most pieces have several empty columns (key signatures, pedals): no numpy calls
                arrays[name] = np.zeros(shape, _dtype(dtype))
                continue
            if _dtype(dtype).kind == "b":
                a = np.frombuffer(raw, dtype=np.uint8, count=(count + 7) // 8, offset=pos)
                pos += a.nbytes
                arrays[name] = np.unpackbits(a, count=count).astype(bool).reshape(shape)
                continue
            a = np.frombuffer(raw, dtype=_dtype(stored), count=count, offset=pos)
            pos += a.nbytes
            if delta:
                a = np.cumsum(a, dtype=np.int64)
            if a.dtype.str != dtype:
                a = a.astype(dtype)
            arrays[name] = a if len(shape) == 1 else a.reshape(shape)
    except (zlib.error, struct.error, ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(f"undecodable piece: {type(e).__name__}: {e}") from e
    known = _TABLE_FIELDS
    kw = {k: v for k, v in arrays.items() if k in known}
    kw.update({k: _untag(v) for k, v in meta["values"].items() if k in known and k != "sheet"})
    try:
        table = NoteTable(**kw)
    except TypeError as e:  # a field this reader needs and the writer did not have
        raise MidiReadError(f"shard piece lacks a field: {e}") from e
    for name, (lo, hi) in NOTE_LIMITS.items():  # the same note limits a prepared JSON is held to
        a = kw.get(name)
        if a is not None and len(a) and not (a.min() >= lo and a.max() <= hi):
            bad = a[(a < lo) | (a > hi)][0]
            raise MidiReadError(f"invalid shard piece: {name} {bad.item()!r} (allowed {lo}..{hi})")
    if meta.get("sheet") is not None:
        events, ws = arrays["sheet.events"].astype(np.int64), arrays["sheet.word_starts"]
        events.flags.writeable = ws.flags.writeable = False
        table.sheet = {
            "config": meta["sheet"],
            "events": events,
            "word_starts": ws,
        }  # checked where it is used
    return table


# ------------------------------------------------------------------------------------------- shard files
def write_shard(path: str | os.PathLike, pieces: list[tuple[str, str, bytes]]) -> None:
    """Write one shard atomically: ``pieces`` = (source path, source SHA-256, blob) in order."""
    offsets = np.cumsum([0] + [len(b) for _, _, b in pieces[:-1]]).tolist() if pieces else []
    header = json.dumps(
        {
            "schema": SCHEMA,
            "codec": CODEC,
            "source": [s for s, _, _ in pieces],
            "source_sha256": [h for _, h, _ in pieces],
            "sha256": [hashlib.sha256(b).hexdigest() for _, _, b in pieces],
            "offset": offsets,
            "length": [len(b) for _, _, b in pieces],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    out = [MAGIC, struct.pack("<Q", len(header)), hashlib.sha256(header).digest(), header]
    out += [b for _, _, b in pieces]
    atomic_write_bytes(path, b"".join(out), durable=False)


_OPEN: OrderedDict = OrderedDict()  # (path, size, mtime) → header; per process, a few shards
_OPEN_MAX = 8


def shard_header(path: str | os.PathLike) -> dict:
    """The checked header of a shard (cached per process while the file is unchanged)."""
    p = os.fspath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns)
    header = _OPEN.get(key)
    if header is not None:
        _OPEN.move_to_end(key)
        return header
    # The header is read through the descriptor kept for the pieces, and the cache key comes from that same
    # descriptor: a shard replaced meanwhile cannot pair one file's header with another file's bytes.
    fd = os.open(p, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        key = (p, st.st_size, st.st_mtime_ns)
        pre = os.pread(fd, _PREAMBLE, 0)
        if len(pre) != _PREAMBLE or pre[: len(MAGIC)] != MAGIC:
            raise CorruptShardError(f"{p}: not a midiforge shard (bad magic or truncated)")
        (n,) = struct.unpack_from("<Q", pre, len(MAGIC))
        raw = os.pread(fd, n, _PREAMBLE) if n <= st.st_size else b""
        if len(raw) != n or hashlib.sha256(raw).digest() != pre[len(MAGIC) + 8 :]:
            raise CorruptShardError(f"{p}: shard header fails its checksum")
        header = json.loads(raw)
        if header.get("schema") != SCHEMA:
            raise CorruptShardError(f"{p}: unknown shard schema {header.get('schema')!r}")
    except BaseException:
        os.close(fd)
        raise
    header["base"] = _PREAMBLE + n
    header["fd"] = fd  # kept open: one positioned read per piece (os.pread: no shared offset across forks)
    _OPEN[key] = header
    if len(_OPEN) > _OPEN_MAX:
        os.close(_OPEN.popitem(last=False)[1]["fd"])
    return header


def _split_ref(ref) -> tuple[str, int]:
    p, _, i = os.fspath(ref).rpartition("#")
    return p, int(i)


def piece_sha256(ref) -> str:
    """The SHA-256 of a piece's blob (its content key), from the shard header."""
    path, i = _split_ref(ref)
    header = shard_header(path)
    if not 0 <= i < len(header["sha256"]):
        raise CorruptShardError(f"{ref}: the shard holds {len(header['sha256'])} pieces")
    return header["sha256"][i]


def read_piece(ref) -> NoteTable:
    """The NoteTable of ``SHARD#INDEX``; CorruptShardError when its bytes fail their checksum."""
    path, i = _split_ref(ref)
    header = shard_header(path)
    if not 0 <= i < len(header["sha256"]):
        raise CorruptShardError(f"{ref}: the shard holds {len(header['sha256'])} pieces")
    length = header["length"][i]
    blob = os.pread(header["fd"], length, header["base"] + header["offset"][i])  # no shared file offset
    if len(blob) != length or hashlib.sha256(blob).hexdigest() != header["sha256"][i]:
        raise CorruptShardError(f"{ref}: piece fails its checksum (damaged shard; run prepare again)")
    return decode_piece(blob, header.get("codec", "zlib"))


def expand_pieces(paths) -> list[str]:
    """Paths as strings, each shard file replaced by its pieces (``SHARD#0``, ``SHARD#1``, ...); a shard whose
    header is unreadable becomes one entry ``SHARD#0``, so that reading it reports why."""
    out = []
    for p in paths:
        s = os.fspath(p)
        if s.endswith(SHARD_SUFFIX):
            try:
                n = len(shard_header(s)["sha256"])
            except (OSError, ValueError):
                out.append(s + "#0")
                continue
            out.extend(f"{s}#{i}" for i in range(n))
        else:
            out.append(s)
    return out


def content_sha256(path) -> str:
    """The content key of a data file or a shard piece (what the token cache is keyed by)."""
    return piece_sha256(path) if is_piece_ref(path) else file_sha256(path)


def shard_files(out_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(out_dir).glob(f"shard-*{SHARD_SUFFIX}"))
