"""The checkpoint directory: atomic, consistent saves, safe loads, and the inference loader for `generate`.

Layout of ``ckpt/`` (see docs/CONTRACTS.md)::

    model.pth       model state_dict (tensors only, no ``module.``/``_orig_mod.`` prefix)
    optimizer.pth   AdamW state_dict
    state.pth       TrainState, sampler, scaler, RNG states, data signature, SHA-256 of the other files
    metrics.json    per-epoch and per-step losses (human readable; `midiforge plot` draws it)
    config.json     {"model": ModelConfig.to_dict(), "train": {...hyper-parameters...}}
    tokenizer.json  MidiTokenizer.save (written once, before training starts)
    training.png    the curves (derived from metrics.json)
    split.json      without -v: the validation split (midiforge.data.split), written once
    best/           with validation: model.pth, config.json (+ the "best" record), tokenizer.json and state.pth
                    of the epoch with the lowest validation bits per note (:func:`save_best`, same journal)

One writer, many readers. The training run that writes holds an exclusive ``flock`` on ``ckpt/.lock`` for
its whole life (:class:`RunLock`); the kernel drops it when the process dies, so a stale lock never blocks.
A second run on the same directory is refused with the first one's pid.

A save must never leave a mix of two steps behind, whatever instant the process dies at. Every file of a
save is first written and fsync'ed into ``ckpt/.pending/``; then a ``COMMIT`` marker is written there; only
then are the files renamed into place. A crash before the marker leaves the previous checkpoint untouched
(the writer discards the half-written ``.pending`` when it next takes the lock); a crash after it is rolled
forward by :func:`recover`, again by the lock holder only.

Readers (``generate``, ``plot``, argument checks, the resume itself) never change the directory: they read the
committed save as :func:`committed_paths` resolves it (a COMMIT-ed ``.pending`` file wins over the one in
place, anything uncommitted is ignored), and check every byte they read against the SHA-256 sums that
``state.pth`` records, retrying for a few seconds while a writer is renaming files.

Every ``.pth`` is read with ``torch.load(weights_only=True)``: a file that would need to run code (a pickle
with a custom class or ``__reduce__``) is refused with a :class:`UsageError`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes, bytes_sha256, fsync_dir
from midiforge.model import ModelConfig, Transformer
from midiforge.tokens.tokenizer import MidiTokenizer

MODEL_FILE = "model.pth"
OPTIMIZER_FILE = "optimizer.pth"
STATE_FILE = "state.pth"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PLOT_FILE = "training.png"
SKIPPED_FILE = "skipped.jsonl"  # every training/validation file a run left out, and why (rewritten each run)
PENDING_DIR = ".pending"
COMMIT_MARKER = "COMMIT"
LOCK_FILE = ".lock"
# Files of one save, in rename order; state.pth last so that it is the final word on what was committed.
SAVE_FILES = (MODEL_FILE, OPTIMIZER_FILE, METRICS_FILE, CONFIG_FILE, STATE_FILE)
HASHED_FILES = (MODEL_FILE, OPTIMIZER_FILE, METRICS_FILE, CONFIG_FILE)  # config.json since format 2
BEST_DIR = "best"  # CKPT/best: inference files of the epoch with the lowest validation figure
BEST_FILES = (TOKENIZER_FILE, MODEL_FILE, CONFIG_FILE, STATE_FILE)  # rename order, state.pth last
_JOURNALED = frozenset(SAVE_FILES + BEST_FILES)
READ_RETRY_SECONDS = 10.0  # how long a reader waits for a writer to finish renaming a save
_PREFIXES = ("module.", "_orig_mod.")


# --- single files ---------------------------------------------------------------------------------------
def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")


def load_torch(path: str | os.PathLike, map_location="cpu", data: bytes | None = None):
    """torch.load with ``weights_only=True`` (of ``data`` when given, read from ``path`` otherwise); anything
    that is not plain tensors/containers is refused."""
    path = Path(path)
    try:
        src = io.BytesIO(data) if data is not None else path
        return torch.load(src, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise UsageError(f"{path}: missing") from e
    except Exception as e:  # UnpicklingError for code-carrying pickles, RuntimeError for corrupt zips
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UsageError(
                f"{path}: refused to load: it is not a plain tensor file (it could run code when unpickled)"
            ) from e
        raise UsageError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {first[:200]})") from e


def read_json(path: str | os.PathLike, data: bytes | None = None):
    path = Path(path)
    try:
        if data is not None:
            return json.loads(data.decode("utf-8"))
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise UsageError(f"{path}: missing") from e
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable JSON ({e})") from e


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


# --- the writer's lock ------------------------------------------------------------------------------------
class RunLock:
    """An exclusive ``flock`` on ``ckpt/.lock``, held by the one process that writes the directory.

    ``flock`` belongs to the open file, so the kernel releases it when the holder dies (SIGKILL included):
    a lock file left by a dead run never blocks. The file holds the holder's pid and start time, for the
    message a second run prints. The file itself is never deleted (a new inode would split the lock).
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.path = Path(ckpt_dir) / LOCK_FILE
        self._f = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 -- held open for the run's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise UsageError(
                f"{self.path.parent} is in use by another training run ({holder}); wait for it to finish"
                " or stop it, or train into another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the flock
            self._f = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- the writer: one consistent multi-file save -------------------------------------------------------------
def recover(ckpt_dir: str | os.PathLike) -> None:
    """Finish a save whose COMMIT marker was written, or discard one that never got that far.

    Only the holder of :class:`RunLock` may call this: for anyone else a ``.pending`` without COMMIT may be
    a save in flight.
    """
    ckpt_dir = Path(ckpt_dir)
    pending = ckpt_dir / PENDING_DIR
    if not pending.is_dir():
        return
    for name in _commit_list(pending):
        try:
            os.replace(pending / name, ckpt_dir / name)
        except FileNotFoundError:  # renamed before the crash
            pass
    fsync_dir(ckpt_dir)
    shutil.rmtree(pending, ignore_errors=True)


def save(
    ckpt_dir: str | os.PathLike, *, model: dict, optimizer: dict, state: dict, metrics: dict, config: dict
) -> None:
    """Write one consistent checkpoint (see the module docstring for how). The caller holds the RunLock."""
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
    state = dict(state, files={name: bytes_sha256(blobs[name]) for name in HASHED_FILES})
    blobs[STATE_FILE] = torch_bytes(state)
    _journal(pending, ckpt_dir, blobs, SAVE_FILES)


def _journal(pending: Path, ckpt_dir: Path, blobs: dict[str, bytes], order: tuple[str, ...]) -> None:
    for name in order:
        atomic_write_bytes(pending / name, blobs[name])
    atomic_write_bytes(pending / COMMIT_MARKER, json_bytes({"files": list(order)}))
    fsync_dir(pending)
    recover(ckpt_dir)


def save_best(ckpt_dir: str | os.PathLike, *, model: dict, config: dict, tokenizer: bytes, record: dict) -> None:
    """``CKPT/best``: what ``generate`` needs (model, tokenizer, config.json with the ``best`` record: epoch,
    step, validation figures), saved like :func:`save`, with state.pth holding the sums. The caller holds the
    RunLock."""
    best = Path(ckpt_dir) / BEST_DIR
    best.mkdir(parents=True, exist_ok=True)
    recover(best)
    (best / PENDING_DIR).mkdir()
    blobs = {
        TOKENIZER_FILE: tokenizer,
        MODEL_FILE: torch_bytes(strip_prefixes(model)),
        CONFIG_FILE: json_bytes(dict(config, best=record)),
    }
    sums = {name: bytes_sha256(blob) for name, blob in blobs.items()}
    blobs[STATE_FILE] = torch_bytes({"format": 2, "best": record, "files": sums})
    _journal(best / PENDING_DIR, best, blobs, BEST_FILES)


def read_best(ckpt_dir: str | os.PathLike) -> dict | None:
    """The record of what ``CKPT/best`` holds (epoch, step, val_bits_per_note, val_loss); None when none."""
    best = Path(ckpt_dir) / BEST_DIR
    if not has_checkpoint(best):
        return None
    record = (read_config(best) or {}).get("best")
    return record if isinstance(record, dict) else None


# --- readers: never write -----------------------------------------------------------------------------------
def _commit_list(pending: Path) -> list[str]:
    """The files a COMMIT-ed pending save holds ([] when it has no COMMIT marker: not a save yet)."""
    try:
        names = json.loads((pending / COMMIT_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if n in _JOURNALED]


def committed_paths(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """Where each file of the last committed save is right now: in ``.pending`` for a committed save whose
    renames have not all happened yet, in place otherwise. Changes nothing on disk."""
    ckpt_dir = Path(ckpt_dir)
    pending = ckpt_dir / PENDING_DIR
    rolled = set(_commit_list(pending)) if pending.is_dir() else set()
    paths = {}
    for name in _JOURNALED:
        p = pending / name
        paths[name] = p if name in rolled and p.is_file() else ckpt_dir / name
    return paths


class _Torn(Exception):
    """The files read belong to different saves."""


class _Moved(Exception):
    """A file moved from .pending into place between listing and reading it: a writer is renaming."""


def read_committed(
    ckpt_dir: str | os.PathLike, names, *, verify: bool = True, first=None
) -> dict[str, bytes]:
    """The bytes of ``names`` (and of state.pth) from one committed save, checked against state.pth's sums.

    Missing files are absent from the result. ``first(blobs)`` runs before the sums are compared (loaders
    use it to refuse code-carrying pickles as such). While a save is in flight (``.pending`` exists) a
    mismatch is retried for up to READ_RETRY_SECONDS; without one it is final: a file was replaced by hand.
    """
    ckpt_dir = Path(ckpt_dir)
    wanted = [STATE_FILE, *[n for n in names if n != STATE_FILE]]
    deadline = time.monotonic() + READ_RETRY_SECONDS
    settled = 0  # torn reads in a row with no save in flight
    while True:
        try:
            blobs = _read_once(ckpt_dir, wanted)
            if first is not None:
                first(blobs)
            if verify:
                _verify(ckpt_dir, blobs)
            return blobs
        except (_Torn, _Moved) as e:
            in_flight = isinstance(e, _Moved) or (ckpt_dir / PENDING_DIR).exists()
            # A save may have started and finished while we read (we saw old and new files, and .pending is
            # gone again): read again. Only a mix that stays put with no save in flight is for good.
            settled = 0 if in_flight else settled + 1
            if settled >= 3:
                raise UsageError(
                    f"{ckpt_dir}: inconsistent checkpoint: {e} does not belong to the save recorded in"
                    f" {STATE_FILE} (was a file replaced by hand?)"
                ) from None
            if time.monotonic() > deadline:
                raise UsageError(
                    f"{ckpt_dir}: a save is in progress and did not finish in time; retry"
                ) from None
            time.sleep(0.05)


def _read_once(ckpt_dir: Path, names: list[str]) -> dict[str, bytes]:
    paths = committed_paths(ckpt_dir)
    out: dict[str, bytes] = {}
    for name in names:
        path = paths.get(name, ckpt_dir / name)
        try:
            out[name] = path.read_bytes()
        except FileNotFoundError:
            if path.parent.name == PENDING_DIR:
                raise _Moved(name) from None
    return out


def _verify(ckpt_dir: Path, blobs: dict[str, bytes]) -> None:
    if STATE_FILE not in blobs:
        return  # an inference-only directory: nothing records what belongs together
    state = load_torch(ckpt_dir / STATE_FILE, data=blobs[STATE_FILE])
    sums = state.get("files") if isinstance(state, dict) else None
    if not isinstance(sums, dict):
        raise UsageError(f"{ckpt_dir / STATE_FILE}: not a midiforge training state")
    for name, digest in sums.items():
        if name in blobs and bytes_sha256(blobs[name]) != digest:
            raise _Torn(name)


def has_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    """Whether the directory holds a committed training checkpoint. Read-only."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.is_dir() and committed_paths(ckpt_dir)[STATE_FILE].is_file()


@dataclass
class Checkpoint:
    model: dict
    optimizer: dict
    state: dict
    metrics: dict
    config: dict


def read_config(ckpt_dir: str | os.PathLike, blob: bytes | None = None) -> dict | None:
    """config.json of the committed save (or parsed from ``blob``), None when there is none; UsageError
    when it is unreadable."""
    ckpt_dir = Path(ckpt_dir)
    if blob is None:
        blob = read_committed(ckpt_dir, [CONFIG_FILE], verify=False).get(CONFIG_FILE)
    return None if blob is None else _config(ckpt_dir, blob)


def _config(ckpt_dir: Path, blob: bytes) -> dict:
    path = ckpt_dir / CONFIG_FILE
    cfg = read_json(path, blob)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UsageError(f"{path}: not a midiforge checkpoint config (no 'model' section)")
    return cfg


def load(ckpt_dir: str | os.PathLike, map_location="cpu") -> Checkpoint:
    """Every file of a training checkpoint, from one committed save. Read-only."""
    ckpt_dir = Path(ckpt_dir)
    parsed: dict = {}

    def parse(blobs: dict[str, bytes]) -> None:
        missing = [n for n in SAVE_FILES if n not in blobs]
        if missing:
            raise UsageError(f"{ckpt_dir}: incomplete checkpoint, missing {', '.join(missing)}")
        for name in (STATE_FILE, MODEL_FILE, OPTIMIZER_FILE):
            parsed[name] = load_torch(ckpt_dir / name, map_location, blobs[name])

    blobs = read_committed(ckpt_dir, SAVE_FILES, first=parse)
    if not isinstance(parsed[MODEL_FILE], dict):
        raise UsageError(f"{ckpt_dir / MODEL_FILE}: not a state_dict")
    return Checkpoint(
        model=strip_prefixes(parsed[MODEL_FILE]),
        optimizer=parsed[OPTIMIZER_FILE],
        state=parsed[STATE_FILE],
        metrics=read_json(ckpt_dir / METRICS_FILE, blobs[METRICS_FILE]),
        config=_config(ckpt_dir, blobs[CONFIG_FILE]),
    )


# --- tokenizer and inference --------------------------------------------------------------------------------
def load_tokenizer(ckpt_dir: str | os.PathLike):
    """The checkpoint's MidiTokenizer, or None when it has none yet."""
    path = committed_paths(ckpt_dir)[TOKENIZER_FILE]  # CKPT/best journals its copy with its saves
    if not path.is_file():
        return None
    try:
        return MidiTokenizer.load(path)
    except Exception as e:
        raise UsageError(f"{path}: unreadable tokenizer ({type(e).__name__}: {e})") from e


def tokenizer_record(tok) -> dict:
    """What config.json stores about the tokenizer a model was trained with."""
    return {"fingerprint": tok.fingerprint, "size": len(tok)}


def check_tokenizer(ckpt_dir: str | os.PathLike, tok, config: dict, state: dict | None = None) -> None:
    """Refuse a tokenizer.json that is not the one the model was trained with.

    The size alone proves little (two BPE runs with the same --vocab-size agree on it and decode each
    other's ids into garbage), so the fingerprint of config.json (or, in checkpoints older than that
    field, the one in state.pth) must match.
    """
    path = Path(ckpt_dir) / TOKENIZER_FILE
    record = config.get("tokenizer") if isinstance(config.get("tokenizer"), dict) else {}
    want = record.get("fingerprint") or ((state or {}).get("data") or {}).get("tokenizer")
    if want is not None and want != tok.fingerprint:
        raise UsageError(
            f"{path} is not the tokenizer this model was trained with (fingerprint {tok.fingerprint}, the"
            f" checkpoint expects {want}); put the run's own tokenizer.json back"
        )
    size = config["model"].get("vocab_size")
    if len(tok) != size:
        raise UsageError(
            f"{Path(ckpt_dir)}: tokenizer.json has {len(tok)} tokens but the model was built for {size}:"
            " the files do not belong together"
        )


def read_weights(ckpt_dir: str | os.PathLike) -> tuple[dict, dict, str, dict]:
    """(state_dict, config.json, fingerprint: 16 hex of model.pth's SHA-256, state.pth or {}) of the committed
    save, or of a folder without training state (``midiforge merge``). Read-only."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UsageError(f"{ckpt_dir}: no such checkpoint directory")
    parsed: dict = {}

    def parse(blobs: dict[str, bytes]) -> None:  # refuse a code-carrying pickle as such, before any sum
        for name in (STATE_FILE, MODEL_FILE):
            if name in blobs:
                parsed[name] = load_torch(ckpt_dir / name, data=blobs[name])

    blobs = read_committed(ckpt_dir, [MODEL_FILE, CONFIG_FILE], first=parse)
    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in blobs:
            raise UsageError(f"{ckpt_dir}: not a trained checkpoint (no {name})")
    cfg = _config(ckpt_dir, blobs[CONFIG_FILE])
    if not isinstance(parsed[MODEL_FILE], dict):
        raise UsageError(f"{ckpt_dir / MODEL_FILE}: not a state_dict")
    state = parsed.get(STATE_FILE) if isinstance(parsed.get(STATE_FILE), dict) else {}
    return strip_prefixes(parsed[MODEL_FILE]), cfg, bytes_sha256(blobs[MODEL_FILE])[:16], state


def provenance(ckpt_dir: str | os.PathLike) -> dict:
    """Where weights come from, as config.json records it: path, fingerprint, step."""
    _, cfg, fingerprint, state = read_weights(ckpt_dir)
    step = (state.get("train_state") or state.get("counters") or {}).get("step", cfg.get("step"))
    return {"path": str(Path(ckpt_dir).resolve()), "fingerprint": fingerprint, "step": step}


def load_inference(ckpt_dir: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None, *, merged=True):
    """(Transformer in eval mode on ``device``, MidiTokenizer) from a checkpoint directory, its weights cast to
    ``dtype`` when given (see Transformer.cast). Read-only: sees one consistent save of a run in progress.
    A LoRA checkpoint goes onto its base (where it was, same fingerprint), adapters folded in unless not
    ``merged``. Raises UsageError when the directory is missing, incomplete, or its files do not fit together."""
    ckpt_dir = Path(ckpt_dir)
    weights, cfg, _, state = read_weights(ckpt_dir)
    if not (ckpt_dir / TOKENIZER_FILE).is_file():
        raise UsageError(f"{ckpt_dir}: not a trained checkpoint (no {TOKENIZER_FILE})")
    try:
        config = ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{ckpt_dir / CONFIG_FILE}: bad model config ({e})") from e
    tokenizer = load_tokenizer(ckpt_dir)
    check_tokenizer(ckpt_dir, tokenizer, cfg, state)
    model = Transformer(config)
    try:
        if "lora" in cfg:  # adapters only: onto the base's weights, found and checked by read_weights
            from midiforge import lora

            lora.assemble(model, cfg["lora"], tokenizer, weights, merged, read_weights, ckpt_dir)
        else:
            model.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{ckpt_dir / MODEL_FILE}: does not fit config.json ({first})") from e
    model = model.to(device).eval()
    return (model.cast(dtype) if dtype is not None else model), tokenizer
