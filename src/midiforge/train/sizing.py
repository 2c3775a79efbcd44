"""What a new run decides from its own data: the validation split without ``-v``, the preset without ``--preset``.

Both are decided once and kept. The split goes to ``CKPT/split.json`` before the tokenizer learns its BPE
(from the training side only), and every resume reads it back unchanged; a run that began without validation
(``--val-share 0``, or a checkpoint from before splits) continues without. The preset is chosen once the
training set is tokenized; config.json then records the model's shape like any other.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from midiforge.data.split import SPLIT_FILE, make_split, read_split, write_split
from midiforge.errors import UsageError
from midiforge.model import PRESETS
from midiforge.train import distributed as dist
from midiforge.train.config import RunConfig, flag

SPLIT_GIVEN, SPLIT_NEW, SPLIT_RECORDED, SPLIT_NONE = "given", "new", "recorded", "none"
CPU_LARGEST = (
    "small"  # base and large take hours an epoch on a CPU at the sizes of data they would be picked for
)


def plan_split(
    cfg: RunConfig,
    ckpt_dir: Path,
    ckpt_config: dict | None,
    train_files: list[Path],
    val_files: list[Path],
    errors: list[str],
    notes: list[str],
) -> tuple[str, list[Path], list[Path]]:
    """How this run gets its validation set, and its (training, validation) files as far as known before
    anything is written: a recorded split is read here, a new one is made by :func:`build_split`."""
    if cfg.val_dataset:
        return SPLIT_GIVEN, train_files, val_files
    path = ckpt_dir / SPLIT_FILE
    if path.is_file():
        try:
            split = read_split(path)
        except UsageError as e:
            errors.append(str(e))
            return SPLIT_NONE, train_files, []
        missing = [f for f in split.files if not Path(f).exists()]
        if missing:
            errors.append(
                f"{path} lists {len(missing)} file(s) that are gone (e.g. {missing[0]}); put them back, or"
                " train into a new directory to split afresh"
            )
        new = len({str(f) for f in train_files} - set(split.files))
        if new:
            notes.append(
                f"{new} file(s) under {flag('train_dataset')} are not in {path} and are left out: a run keeps"
                " the split it began with (train into a new directory to split afresh)"
            )
        if cfg.val_share != split.share:
            notes.append(
                f"{flag('val_share')} {cfg.val_share} ignored: {path} keeps its share of {split.share}"
            )
        return SPLIT_RECORDED, split.train_files, split.val_files
    if ckpt_config is not None or cfg.val_share == 0:
        if cfg.patience is not None:
            errors.append(
                f"{flag('patience')} needs validation data: give {flag('val_dataset')}, or a new run with"
                f" {flag('val_share')} above 0"
            )
        return SPLIT_NONE, train_files, []
    return SPLIT_NEW, train_files, []


def build_split(setup, info: dist.DistInfo) -> None:
    """A new run without -v: rank 0 groups and splits the -t files into ``CKPT/split.json``, every rank reads it;
    a recorded split is announced. Sets ``setup.train_files`` and ``setup.val_files``."""
    path = setup.ckpt_dir / SPLIT_FILE
    if setup.split == SPLIT_NEW:
        t0 = time.perf_counter()
        if info.is_main:
            split = make_split(setup.train_files, setup.cfg.val_share, setup.cfg.seed)
            setup.ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_split(path, split)
        dist.barrier()
        took = f" in {time.perf_counter() - t0:.1f} s"
    elif setup.split == SPLIT_RECORDED:
        took = ", kept from the run's start"
    else:
        return
    split = read_split(path)
    setup.train_files, setup.val_files = split.train_files, split.val_files
    dist.print0(f"validation split{took}: {split.summary()} (see {path})")
    if not split.val_files:
        dist.note0(f"no validation: {split.why_no_validation()}; give -v to validate anyway")


def body_parameters(shape: dict) -> int:
    """Parameters outside the embeddings: per layer, attention (q, k, v, out: 4 d^2) and the SwiGLU MLP
    (gate, up, down: 3 d d_ff); norms are negligible."""
    d = shape["d_model"]
    return shape["n_layer"] * (4 * d * d + 3 * d * shape["d_ff"])


def choose_preset(train_tokens: int, device: torch.device) -> tuple[str, str]:
    """(preset, why): the largest preset with at most one parameter outside the embeddings per training token
    (tiny at the least); on a CPU never above CPU_LARGEST."""
    names = list(PRESETS)  # growing sizes
    allowed = names[: names.index(CPU_LARGEST) + 1] if device.type == "cpu" else names
    chosen = allowed[0]
    for name in allowed:
        if body_parameters(PRESETS[name]) <= train_tokens:
            chosen = name
    why = (
        f"{train_tokens:,} training tokens on {device.type}: the largest preset with at most one parameter per"
        f" training token ({chosen}: {body_parameters(PRESETS[chosen]) / 1e6:.1f}M outside the embeddings)"
    )
    bigger = names[names.index(chosen) + 1] if chosen != names[-1] else None
    if bigger in allowed:
        why += f"; {bigger} would need {body_parameters(PRESETS[bigger]):,}"
    elif bigger is not None:
        why += f"; never above {CPU_LARGEST} on a CPU"
    return chosen, why
