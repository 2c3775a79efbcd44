"""The checkpoint directory: atomic, consistent saves, safe loads, and the inference loader for `generate`.

Layout of ``ckpt/`` (see docs/CONTRACTS.md)::

    model.pth       model state_dict (tensors only, no ``module.``/``_orig_mod.`` prefix)
    optimizer.pth   AdamW state_dict
    state.pth       scaler, sampler, RNG states, counters, partial-epoch sums, file hashes
    metrics.json    per-epoch and per-step losses (human readable; `midiforge plot` draws it)
    config.json     {"model": ModelConfig.to_dict(), "train": {...hyper-parameters...}}
    tokenizer.json  MidiTokenizer.save (written once, before training starts)
    training.png    the curves (derived from metrics.json)

A save must never leave a mix of two steps behind, whatever instant the process dies at. Every file of a
save is first written and fsync'ed into ``ckpt/.pending/``; then a ``COMMIT`` marker is written there; only
then are the files renamed into place. A crash before the marker leaves the previous checkpoint untouched
(the half-written ``.pending`` is discarded on the next load); a crash after it is rolled forward by
:func:`recover`. ``state.pth`` also records the SHA-256 of the other files, and :func:`load` verifies them.

Every ``.pth`` is read with ``torch.load(weights_only=True)``: a file that would need to run code (a pickle
with a custom class or ``__reduce__``) is refused with a :class:`UsageError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from midiforge.errors import UsageError
from midiforge.midi import atomic_write_bytes

MODEL_FILE = "model.pth"
OPTIMIZER_FILE = "optimizer.pth"
STATE_FILE = "state.pth"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PLOT_FILE = "training.png"
PENDING_DIR = ".pending"
COMMIT_MARKER = "COMMIT"
# Files of one save, in rename order; state.pth last so that it is the final word on what was committed.
SAVE_FILES = (MODEL_FILE, OPTIMIZER_FILE, METRICS_FILE, CONFIG_FILE, STATE_FILE)
HASHED_FILES = (MODEL_FILE, OPTIMIZER_FILE, METRICS_FILE)
_PREFIXES = ("module.", "_orig_mod.")


# --- single files ---------------------------------------------------------------------------------------
def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (temp file + fsync + rename)."""
    atomic_write_bytes(path, torch_bytes(obj))


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def load_torch(path: str | os.PathLike, map_location="cpu"):
    """torch.load with ``weights_only=True``; anything that is not plain tensors/containers is refused."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise UsageError(f"{path}: missing") from e
    except Exception as e:  # UnpicklingError for code-carrying pickles, RuntimeError for corrupt zips
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UsageError(
                f"{path}: refused to load: it is not a plain tensor file (it could run code when unpickled)"
            ) from e
        raise UsageError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {first[:200]})") from e


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise UsageError(f"{path}: missing") from e
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable JSON ({e})") from e


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform/file system: rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def strip_prefixes(state_dict: dict) -> dict:
    """Keys without the ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) wrappers' prefixes."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


# --- the consistent multi-file save ---------------------------------------------------------------------
def recover(ckpt_dir: str | os.PathLike) -> None:
    """Finish a save whose COMMIT marker was written, or discard one that never got that far."""
    ckpt_dir = Path(ckpt_dir)
    pending = ckpt_dir / PENDING_DIR
    if not pending.is_dir():
        return
    marker = pending / COMMIT_MARKER
    if marker.is_file():
        try:
            names = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError):
            names = None  # a torn marker cannot happen (it is written atomically); be safe anyway
        if names is not None:
            for name in names:
                try:
                    os.replace(pending / name, ckpt_dir / name)
                except FileNotFoundError:  # renamed before the crash, or by another process recovering too
                    pass
            _fsync_dir(ckpt_dir)
    shutil.rmtree(pending, ignore_errors=True)


def save(
    ckpt_dir: str | os.PathLike, *, model: dict, optimizer: dict, state: dict, metrics: dict, config: dict
) -> None:
    """Write one consistent checkpoint (see the module docstring for how)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    recover(ckpt_dir)
    pending = ckpt_dir / PENDING_DIR
    pending.mkdir()
    blobs = {
        MODEL_FILE: torch_bytes(strip_prefixes(model)),
        OPTIMIZER_FILE: torch_bytes(optimizer),
        METRICS_FILE: json_bytes(metrics),
        CONFIG_FILE: json_bytes(config),
    }
    state = dict(state, files={name: _sha256(blobs[name]) for name in HASHED_FILES})
    blobs[STATE_FILE] = torch_bytes(state)
    for name in SAVE_FILES:
        atomic_write_bytes(pending / name, blobs[name])
    atomic_write_bytes(pending / COMMIT_MARKER, json_bytes({"files": list(SAVE_FILES)}))
    _fsync_dir(pending)
    recover(ckpt_dir)


@dataclass
class Checkpoint:
    model: dict
    optimizer: dict
    state: dict
    metrics: dict
    config: dict


def has_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    """Whether the directory holds a committed training checkpoint (after finishing any pending save)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return False
    recover(ckpt_dir)
    return (ckpt_dir / STATE_FILE).is_file()


def read_config(ckpt_dir: str | os.PathLike) -> dict | None:
    """config.json of a checkpoint, or None when there is none. UsageError when it is unreadable."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    cfg = read_json(path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UsageError(f"{path}: not a midiforge checkpoint config (no 'model' section)")
    return cfg


def load(ckpt_dir: str | os.PathLike, map_location="cpu") -> Checkpoint:
    """Every file of a training checkpoint, verified to belong to the same save."""
    ckpt_dir = Path(ckpt_dir)
    recover(ckpt_dir)
    missing = [n for n in SAVE_FILES if not (ckpt_dir / n).is_file()]
    if missing:
        raise UsageError(f"{ckpt_dir}: incomplete checkpoint, missing {', '.join(missing)}")
    # Unpickle everything (weights_only) before anything else, so a code-carrying file is always refused as such.
    state = load_torch(ckpt_dir / STATE_FILE, map_location)
    model = load_torch(ckpt_dir / MODEL_FILE, map_location)
    optimizer = load_torch(ckpt_dir / OPTIMIZER_FILE, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise UsageError(f"{ckpt_dir / STATE_FILE}: not a midiforge training state")
    for name, digest in state["files"].items():
        if _file_sha256(ckpt_dir / name) != digest:
            raise UsageError(
                f"{ckpt_dir}: inconsistent checkpoint: {name} does not belong to the save recorded in "
                f"{STATE_FILE} (was a file replaced by hand?)"
            )
    if not isinstance(model, dict):
        raise UsageError(f"{ckpt_dir / MODEL_FILE}: not a state_dict")
    return Checkpoint(
        model=strip_prefixes(model),
        optimizer=optimizer,
        state=state,
        metrics=read_json(ckpt_dir / METRICS_FILE),
        config=read_config(ckpt_dir),
    )


# --- inference --------------------------------------------------------------------------------------------
def load_tokenizer(ckpt_dir: str | os.PathLike):
    """The checkpoint's MidiTokenizer, or None when it has none yet."""
    from midiforge.tokenizer import MidiTokenizer

    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        return MidiTokenizer.load(path)
    except Exception as e:
        raise UsageError(f"{path}: unreadable tokenizer ({type(e).__name__}: {e})") from e


def load_inference(ckpt_dir: str | os.PathLike, device="cpu"):
    """(Transformer in eval mode on ``device``, MidiTokenizer) from a checkpoint directory.

    Raises UsageError when the directory is missing, incomplete, or its files do not fit together.
    """
    from midiforge.model import ModelConfig, Transformer

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UsageError(f"{ckpt_dir}: no such checkpoint directory")
    for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (ckpt_dir / name).is_file():
            raise UsageError(f"{ckpt_dir}: not a trained checkpoint (no {name})")
    cfg = read_config(ckpt_dir)
    try:
        config = ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{ckpt_dir / CONFIG_FILE}: bad model config ({e})") from e
    tokenizer = load_tokenizer(ckpt_dir)
    if len(tokenizer) != config.vocab_size:
        raise UsageError(
            f"{ckpt_dir}: tokenizer.json has {len(tokenizer)} tokens but the model was built for "
            f"{config.vocab_size}: the files do not belong together"
        )
    model = Transformer(config)
    state_dict = load_torch(ckpt_dir / MODEL_FILE, map_location="cpu")
    if not isinstance(state_dict, dict):
        raise UsageError(f"{ckpt_dir / MODEL_FILE}: not a state_dict")
    state_dict = strip_prefixes(state_dict)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{ckpt_dir / MODEL_FILE}: does not fit config.json ({first})") from e
    return model.to(device).eval(), tokenizer
