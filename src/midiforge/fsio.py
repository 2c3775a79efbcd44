"""Small file-system helpers every layer needs: atomic writes, content hashes, directory fsync.

They live here, not in the MIDI layer, so that writing a checkpoint or a plot never imports symusic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write a file so that a crash at any instant leaves either the old or the new content.

    ``durable=False`` skips the fsync: still atomic against a killed process, but after a power loss the file
    may be empty. Meant for derived files that are cheap to rebuild (prepared JSON), where fsync costs ~70%.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """``records`` as JSON Lines (one object a line, UTF-8), written atomically; none: an empty file."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (where the platform allows; the rename is atomic anyway)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
