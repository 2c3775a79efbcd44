"""The words every command shares, declared once: how the checkpoint, the data, the device and the sampling
settings are spelled on the command line, with one default and one help text each.

Every command builds its parser from these (`train` through :class:`~midiforge.train.config.RunConfig`, whose
fields take their spellings from here), so ``-t`` is the training data and ``--seed`` means the same thing in
every command. No torch here: ``prepare`` and ``--help`` stay light.
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from midiforge.errors import UsageError

CKPT_HELP = "checkpoint folder written by `midiforge train`"
TRAIN_FLAGS = ("-t", "--train-dataset")
VAL_FLAGS = ("-v", "--val-dataset")
DATA_HELP = ".mid/.midi files, prepared .json or .mfshard files, or folders of them; may repeat"
DEVICE_DEFAULT = "auto"
DEVICE_HELP = "where the model runs: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps"
MAX_TOKENS_DEFAULT = 1024
TEMPERATURE_DEFAULT = 1.0


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line and exit code 2 (a UsageError, which
    :func:`midiforge.errors.report` prints) instead of the usage text; ``--help`` prints and exits 0 as usual.
    Subcommand parsers inherit the class."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_checkpoint(p, help: str = CKPT_HELP, *, many: bool = False) -> None:
    """The checkpoint folder, the first positional argument: ``CKPT`` (``many``: one or more, ``checkpoints``)."""
    if many:
        p.add_argument("checkpoints", nargs="+", metavar="CKPT", help=help)
    else:
        p.add_argument("checkpoint", metavar="CKPT", help=help)


def data_keywords(metavar: str, help: str, *, required: bool = False) -> dict:
    """argparse keywords of a data option: paths, several after one flag, the flag may repeat."""
    return dict(action="extend", nargs="+", type=Path, default=None, required=required, metavar=metavar, help=help)


def add_train_data(p, help: str, *, required: bool = False) -> None:
    """``-t/--train-dataset TRAIN``: training data, spelled as in `midiforge train`."""
    p.add_argument(*TRAIN_FLAGS, dest="train_dataset", **data_keywords("TRAIN", help, required=required))


def add_val_data(p, help: str, *, required: bool = False) -> None:
    """``-v/--val-dataset VAL``: held-out data, spelled as in `midiforge train`."""
    p.add_argument(*VAL_FLAGS, dest="val_dataset", **data_keywords("VAL", help, required=required))


def add_device(p) -> None:
    """``--device``, default ``auto``; :func:`midiforge.device.resolve_device` turns it into a device."""
    p.add_argument("--device", default=DEVICE_DEFAULT, metavar="DEVICE", help=f"{DEVICE_HELP} (default: %(default)s)")


def add_sampling(p) -> None:
    """How pieces are drawn from a model: ``--max-tokens --max-seconds --temperature --top-k --top-p --seed``."""
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS_DEFAULT, metavar="N",
                   help="new tokens per piece at most (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="stop a piece once it has S seconds of new music (a prompt is never cut)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=TEMPERATURE_DEFAULT, metavar="T",
                   help="sampling temperature > 0: lower is safer, higher more adventurous (default: %(default)s)")  # fmt: skip
    p.add_argument("--top-k", type=int, metavar="K", help="draw only from the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="nucleus sampling: draw only from the most likely tokens that together hold P, in (0, 1]")  # fmt: skip
    p.add_argument("--seed", type=int, metavar="S",
                   help="random seed: the same seed, checkpoint and settings give the same music (default: a random"
                   " seed, printed)")  # fmt: skip


def seed_of(args) -> int:
    """``--seed``, or a fresh random one when it was not given (the commands print the seed they used)."""
    return args.seed if args.seed is not None else secrets.randbelow(2**31)
