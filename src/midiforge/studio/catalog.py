"""What the page offers for each checkpoint, read once when the studio starts: the style tags it was trained
with (the tag select is hidden when there are none), the time signatures its vocabulary knows, whether it
can edit inside a prompt, and whether ``--check-copies`` can find the training set it recorded.

The recorded training set may be a path relative to where training ran (``demo/json/train``): it is looked for
from the working directory first, then from each folder above the checkpoint. Found, the server passes it with
``-t`` itself (the client never names a path); not found, the option is greyed out with the reason.
"""

from __future__ import annotations

from pathlib import Path

from midiforge import checkpoint as ck
from midiforge.data.fim import supports_infill
from midiforge.data.tagging import TAG_NAME
from midiforge.measure.copycheck import training_files
from midiforge.tokens.controls import GM_NAMES, LEVELS, MODES, PITCH_CLASSES

KEYS = [f"{p} {m}" for p in PITCH_CLASSES for m in MODES]
INSTRUMENTS = [*GM_NAMES, "drums"]  # program numbers 0..127, then 128 = drums


def _rebased(specs: list[str], root: Path) -> list[str] | None:
    """``specs`` with each relative path read from ``root`` (NAME=DIR keeps its name); None if none is relative."""
    out, moved = [], False
    for spec in specs:
        name, eq, rest = spec.partition("=")
        tagged = bool(eq and TAG_NAME.fullmatch(name) and rest)
        path = Path(rest if tagged else spec)
        if not path.is_absolute():
            path, moved = root / path, True
        out.append(f"{name}={path}" if tagged else str(path))
    return out if moved else None


def copy_source(ckpt: Path, config: dict | None) -> tuple[list[str] | None, str]:
    """(the -t values the server gives --check-copies, [] when generate finds the set by itself; the reason
    when it cannot be used, "" when it can)."""
    files, why = training_files(config, None, ckpt)
    if files:
        return [], ""
    specs = [str(s) for s in ((config or {}).get("train") or {}).get("train_dataset") or []]
    for root in ckpt.resolve().parents:
        rebased = _rebased(specs, root)
        if rebased is None:
            break
        if training_files(config, rebased, ckpt)[0]:
            return rebased, ""
    return None, f"the checkpoint's training set is not here ({why})"


def checkpoint_info(ckpt: Path, name: str, index: int) -> dict:
    """What the page shows and offers for one checkpoint (the ``train`` entry stays on the server)."""
    config = ck.read_config(ckpt)
    tok = ck.load_tokenizer(ckpt)
    train, copies_off = copy_source(ckpt, config)
    infill_rate = ((config or {}).get("train") or {}).get("infill_rate") or 0
    return {
        "index": index,
        "name": name,
        "tags": list(tok.tags) if tok is not None else [],
        "time_sigs": [f"{n}/{d}" for n, d in tok.vocab.time_sigs] if tok is not None else [],
        "controls": bool(tok is not None and tok.has_controls),
        "infill": bool(tok is not None and supports_infill(tok) and infill_rate > 0),
        "copies_off": copies_off,  # why --check-copies is greyed out ("" when it can run)
        "train": train,
    }


def choices() -> dict:
    """The select lists that do not depend on the checkpoint."""
    return {"instruments": INSTRUMENTS, "keys": KEYS, "levels": list(LEVELS)}
