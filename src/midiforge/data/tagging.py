"""Style tags and the control settings of a training run, decided before anything is built.

Tags come from where the files are: ``-t jazz=data/jazz`` tags every piece found under ``data/jazz`` with
``jazz``; a bare ``-t DIR`` tags nothing. A spelling ``NAME=DIR`` is read as a tag only when no file or
directory of that exact name exists, so paths that contain ``=`` keep working. ``--tags-csv FILE`` (rows
``path,tag``; paths relative to FILE's folder, a file or a directory) tags pieces too; the last tag naming a
piece wins (csv after -t/-v).

The tag names are recorded in the tokenizer (``tokenizer.json`` ``"tags"``, slot order = CTL_TAG index), which
generate reads to validate ``--tag``. A resumed run may bring new tags: they get the next free slots.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from midiforge.errors import UsageError
from midiforge.notes.midi import find_files
from midiforge.notes.shards import expand_pieces
from midiforge.tokens.controls import MAX_TAGS

TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")
DEFAULT_CONTROL_DROPOUT = 0.5


@dataclass
class Tagged:
    """The data paths to search, and which pieces carry which tag."""

    paths: list[Path] = field(default_factory=list)  # every -t/-v path, tagged or not
    roots: list[tuple[str, Path]] = field(default_factory=list)  # (tag, file or directory), in order given

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self.roots))


def split_specs(specs, what: str, errors: list[str]) -> Tagged:
    """``-t``/``-v`` values → paths and (tag, path) pairs. A NAME=DIR whose DIR is missing is reported."""
    out = Tagged()
    for spec in specs or []:
        s = os.fspath(spec)
        name, eq, rest = s.partition("=")
        if Path(s).exists() or not eq or not TAG_NAME.fullmatch(name) or not rest:
            out.paths.append(Path(s))  # a path (a missing one is reported by the caller)
            continue
        if not Path(rest).exists():
            errors.append(f"{what} {s}: no such file or directory: {rest}")
            continue
        out.paths.append(Path(rest))
        out.roots.append((name, Path(rest)))
    return out


def read_tags_csv(path: Path, errors: list[str]) -> list[tuple[str, Path]]:
    """``path,tag`` rows (a header row ``path,tag`` is allowed) → (tag, path) pairs."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        errors.append(f"--tags-csv {path}: cannot read it ({e})")
        return []
    if rows and [c.strip().lower() for c in rows[0]] == ["path", "tag"]:
        rows = rows[1:]
    out = []
    for n, row in enumerate(rows, 1):
        if len(row) != 2 or not TAG_NAME.fullmatch(row[1].strip()):
            errors.append(
                f"--tags-csv {path}: row {n} {row!r} is not 'path,tag' with a tag of letters/digits"
            )
            return []
        target = Path(path).parent / row[0].strip()
        if not target.exists():
            errors.append(f"--tags-csv {path}: row {n}: no such file or directory: {target}")
            return []
        out.append((row[1].strip(), target))
    return out


def tag_map(roots: list[tuple[str, Path]], suffixes) -> dict[str, str]:
    """piece (as MidiDataset names it: find_files + expand_pieces) → tag; later roots win."""
    out: dict[str, str] = {}
    for tag, root in roots:
        for piece in expand_pieces(find_files([root], suffixes=suffixes)):
            out[piece] = tag
    return out


def check_tag_names(names: list[str], errors: list[str]) -> None:
    if len(names) > MAX_TAGS:
        errors.append(f"{len(names)} style tags given; at most {MAX_TAGS} fit the vocabulary")


def merged_tags(old: list[str], names: list[str]) -> list[str]:
    """The tokenizer's tag slots after this run: the old ones kept in place, new names appended."""
    return list(old) + [n for n in names if n not in old]


def resolve_controls(
    cfg, ckpt_config: dict | None, tok, tags: list[str], errors: list[str], notes: list[str]
):
    """(controls "on"/"off", control dropout) of this run: given > the checkpoint's > the default (on for a
    new run whose tokenizer has control events; off for checkpoints from before controls and legacy
    tokenizers, so that they resume exactly as before)."""
    old = (ckpt_config or {}).get("train", {}) if ckpt_config is not None else None
    if cfg.controls is not None:
        on = cfg.controls
    elif old is not None:
        on = old.get("controls") or "off"
    else:
        on = "on" if tok is None or tok.has_controls else "off"
    if old is not None and cfg.controls is not None and cfg.controls != (old.get("controls") or "off"):
        notes.append(f"--controls {cfg.controls} replaces the checkpoint's {old.get('controls') or 'off'}")
    dropout = cfg.control_dropout
    if dropout is None:
        dropout = (old or {}).get("control_dropout")
        dropout = DEFAULT_CONTROL_DROPOUT if dropout is None else float(dropout)
    if not 0 <= dropout <= 1:
        errors.append(f"--control-dropout must be in [0, 1], got {dropout}")
    if on == "on" and tok is not None and not tok.has_controls:
        errors.append(
            f"--controls on: the checkpoint's tokenizer (events v{tok.events_version}) predates control events;"
            " train a new model in a new directory to use controls"
        )
    if tags and on != "on":
        why = (
            "the checkpoint trains without them"
            if tok is not None and not tok.has_controls
            else "--controls off"
        )
        errors.append(f"style tags ({', '.join(tags)}) need controls, but {why}")
    check_tag_names(merged_tags(tok.tags if tok is not None else [], tags), errors)
    return on, dropout


def signature(tags: dict[str, str], dropout: float) -> dict:
    """What the control prefix depends on, for the checkpoint's data signature (a change restarts the epoch)."""
    blob = "\n".join(f"{k}\t{v}" for k, v in sorted(tags.items())).encode("utf-8")
    return {"controls": {"dropout": dropout, "tags": hashlib.sha256(blob).hexdigest()[:16]}}


def apply_tags(tok, names: list[str], path, note, write: bool = True) -> None:
    """Record this run's tag names in the tokenizer (``write``: save tokenizer.json when they are new)."""
    new = merged_tags(tok.tags, names)
    if new == tok.tags:
        return
    if len(new) > MAX_TAGS:
        raise UsageError(f"{len(new)} style tags; at most {MAX_TAGS} fit the vocabulary")
    if tok.tags:
        note(f"new style tags {', '.join(new[len(tok.tags) :])} take the next CTL_TAG slots")
    tok.tags = new
    if write:
        tok.save(path)
