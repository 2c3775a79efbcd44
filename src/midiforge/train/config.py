"""The one description of a training run: :class:`RunConfig`.

Every option of `midiforge train` is a field here, with its type, default, flags and help text. The command
line is derived from the fields (:func:`add_arguments`), :func:`value_problems` checks them all at once, and
``config.json["train"]`` is :meth:`RunConfig.to_dict`. Nothing else defines a default.

Fields that are ``None`` by default mean "not given": for a new run the documented default applies, when
resuming the checkpoint's own value is kept (model shape, dropout, vocabulary, context length).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from midiforge.model import PRESETS
from midiforge.options import DATA_HELP, DEVICE_DEFAULT, TRAIN_FLAGS, VAL_FLAGS, Parser, data_keywords
from midiforge.tokens.bpe_sample import DEFAULT_SAMPLE_EVENTS as DEFAULT_BPE_SAMPLE_EVENTS

PRESETS_CHOICES = ("tiny", "small", "base", "large")
DEFAULT_PRESET = "small"
DEFAULT_DROPOUT = 0.1
DEFAULT_VOCAB = 2048
SHAPE_FIELDS = ("n_layer", "n_head", "d_model", "d_ff")

EPILOG = """
Re-running the same command resumes from CKPT (mid-epoch included); NUM_EPOCHS is the total, so a larger
number extends a finished run (the learning-rate schedule is then rebuilt for the new total and continues from
that curve). -l and -w from the command line replace the checkpointed values on purpose.
The model shape options apply to a new run; with a checkpoint they must match it (or be omitted).
Only one training run may write to CKPT at a time; generate and plot may read it meanwhile. CKPT receives the
model, the optimizer and training state, metrics.json, config.json, the tokenizer (learned from the training
set first when absent), training.png, skipped.jsonl (every file left out, and why) and cache/ (tokenized data).
split.json without -v (the validation split, kept for good) and best/ when there is validation: the weights of
the epoch with the lowest validation bits per note (generate, evaluate and studio take CKPT/best).
"""


def opt(default=None, *flags: str, help: str, type=None, group: str = "", **argparse_kw):
    """A RunConfig field with its command-line spelling. No flags: a positional argument."""
    meta = dict(flags=flags, help=help, type=type, group=group, argparse=argparse_kw)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything a user can set for a training run (see ``midiforge train --help``)."""

    num_epochs: int = opt(
        MISSING, type=int, metavar="NUM_EPOCHS", help="total epochs (a larger number than before extends a run)"
    )
    ckpt_path: Path = opt(
        MISSING, type=Path, metavar="CKPT", help="checkpoint folder; re-running the same command resumes"
    )
    train_dataset: list[Path] = opt(
        [],
        *TRAIN_FLAGS,
        type=Path,
        required=True,
        metavar="TRAIN",
        help=f"training data: {DATA_HELP}. NAME=DIR tags DIR's pieces with the style tag NAME (generate --tag"
        " NAME); a bare DIR has none",
    )
    val_dataset: list[Path] = opt(
        [], *VAL_FLAGS, type=Path, metavar="VAL", help="validation data, as -t (NAME=DIR included)"
    )
    val_share: float = opt(
        0.2,
        "--val-share",
        type=float,
        metavar="SHARE",
        help="without -v: hold out up to this share of the -t files for validation, in groups that never"
        " straddle the split (copies, transpositions, pieces sharing a long run of notes), seeded by --seed,"
        " recorded in CKPT/split.json and reused on resume; 0: no validation (default: %(default)s)",
    )
    min_sequence_length: int = opt(
        8,
        "-m",
        "--min-sequence-length",
        type=int,
        help="skip pieces shorter than this many tokens (default: %(default)s)",
    )
    max_sequence_length: int = opt(
        2**17,
        "-e",
        "--max-sequence-length",
        type=int,
        help="longest training window in tokens; longer pieces are cut into windows at note onsets;"
        " lowered to isqrt(-b) (and to the model's context length) when larger (default: %(default)s)",
    )
    # Spelled --max-batch-size on the command line (the name it was specified with); it is a budget of
    # sum(len**2) per batch, not a number of samples.
    batch_budget: int = opt(
        8 * 1536**2,
        "-b",
        "--max-batch-size",
        type=int,
        help="batch budget: sum of squared sample lengths (tokens) per batch (default: 8*1536**2 = %(default)s)",
    )
    learning_rate: float = opt(
        3e-3,
        "-l",
        "--learning-rate",
        type=float,
        help="peak AdamW learning rate: warmup over min(100, 10%% of the steps), cosine decay to 10%%;"
        " overrides a checkpoint's; consider 1e-3 or less for base and large (default: %(default)s)",
    )
    weight_decay: float = opt(
        0.01,
        "-w",
        "--weight-decay",
        type=float,
        help="AdamW weight decay (not on norms, biases, embeddings); overrides a checkpoint's"
        " (default: %(default)s)",
    )
    preset: str | None = opt(
        None,
        "--preset",
        group="model",
        choices=PRESETS_CHOICES,
        help="model size preset (default for a new run: chosen from the training tokens and the device, one"
        f" line says which and why; {DEFAULT_PRESET} under shape options given without --preset)",
    )
    n_layer: int | None = opt(
        None, "--n-layer", type=int, group="model", help="override the preset's n_layer"
    )
    n_head: int | None = opt(None, "--n-head", type=int, group="model", help="override the preset's n_head")
    d_model: int | None = opt(
        None, "--d-model", type=int, group="model", help="override the preset's d_model"
    )
    d_ff: int | None = opt(None, "--d-ff", type=int, group="model", help="override the preset's d_ff")
    context_length: int | None = opt(
        None,
        "--context-length",
        type=int,
        group="model",
        help="the model's context in tokens (default for a new run: the training window); a checkpoint keeps"
        " its own, and a larger -b on resume never changes it",
    )
    dropout: float | None = opt(
        None,
        "--dropout",
        type=float,
        group="model",
        help=f"dropout rate (default for a new run: {DEFAULT_DROPOUT}; may change on resume)",
    )
    vocab_size: int | None = opt(
        None,
        "--vocab-size",
        type=int,
        group="model",
        help=f"BPE vocabulary size when the checkpoint has no tokenizer.json yet (default {DEFAULT_VOCAB};"
        " fewer when the data has no more merges to offer)",
    )
    pedals: bool = opt(
        True,
        "--no-pedal",
        group="model",
        help="a new tokenizer writes no sustain pedal (tracks and key signatures stay): fewer bits per note to"
        " learn on pedalled piano, and music without pedal (docs/tokenizer-levers.md)",
    )
    bpe_sample_events: int = opt(
        DEFAULT_BPE_SAMPLE_EVENTS,
        "--bpe-sample-events",
        type=int,
        group="model",
        help="a new tokenizer learns its BPE merges from at most this many base events (tokens before BPE),"
        " whole pieces in a seeded random order across the training set; memory grows with it; 0: every"
        " file (default: %(default)s)",
    )
    seed: int = opt(
        0,
        "--seed",
        type=int,
        group="run",
        help="seed of model init, data order and augmentation (default: %(default)s)",
    )
    amp: str = opt(
        "auto",
        "--amp",
        group="run",
        choices=("auto", "off", "fp16", "bf16"),
        help="mixed precision: auto = bf16 on CUDA when supported, else fp16 with loss scaling; fp32 on CPU"
        " (default: %(default)s)",
    )
    device: str = opt(
        DEVICE_DEFAULT, "--device", group="run", metavar="DEVICE",
        help="where to train: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: %(default)s)",
    )
    compile: str = opt(
        "auto",
        "--compile",
        group="run",
        choices=("auto", "on", "off"),
        help="compile the model with torch.compile (dynamic shapes): auto = on for CUDA, off on the CPU"
        " (default: %(default)s)",
    )
    augment: bool = opt(
        True, "--no-augment", group="run", help="no random transposition of the training pieces"
    )
    infill_rate: float = opt(
        0.5,
        "--infill-rate",
        type=float,
        group="run",
        help="share of training windows rearranged as infilling examples (a span given both sides, or a track given"
        " the others), so that generate --infill/--add-track/--replace-track/--harmonize work; 0: plain"
        " continuation only. Validation windows stay ordinary (default: %(default)s)",
    )
    infill_track_share: float = opt(
        0.5,
        "--infill-track-share",
        type=float,
        group="run",
        help="of the infilling examples, the share that write one track given others (windows with two tracks"
        " or more); the rest fill a span (default: %(default)s)",
    )
    num_workers: int | None = opt(
        None,
        "--num-workers",
        type=int,
        group="run",
        help="DataLoader worker processes (default: 0 on CPU, where workers steal compute cores; up to 4 per GPU)",
    )
    save_every_minutes: float = opt(
        10.0,
        "--save-every-minutes",
        type=float,
        group="run",
        help="also checkpoint mid-epoch this often (default: %(default)s; epoch ends always save)",
    )
    cache_dir: Path | None = opt(
        None,
        "--cache-dir",
        type=Path,
        group="run",
        help="token cache folder (default: CKPT/cache). Several machines: either shared storage that every"
        " node sees (--cache-scope shared) or a disk of each node's own (--cache-scope node)",
    )
    cache_scope: str = opt(
        "shared",
        "--cache-scope",
        group="run",
        choices=("shared", "node"),
        help="who fills the token cache while the other processes wait: shared = global rank 0, for a cache"
        " every process sees; node = local rank 0 of each node, for a node-local --cache-dir (default:"
        " %(default)s)",
    )
    patience: int | None = opt(
        None,
        "--patience",
        type=int,
        group="run",
        metavar="N",
        help="stop after N epochs without a lower validation bits per note than CKPT/best holds"
        " (default: off)",
    )
    max_steps: int | None = opt(
        None,
        "--max-steps",
        type=int,
        group="run",
        help="checkpoint and stop once the run has taken this many optimizer steps in all (re-run without it"
        " to go on); for trials and tests",
    )
    tensorboard: str | None = opt(
        None,
        "--tensorboard",
        group="run",
        nargs="?",
        const="",
        metavar="DIR",
        help="write TensorBoard logs to DIR (given bare: CKPT/tensorboard): loss, perplexity, bits per note,"
        " learning rate, tokens/s, gradient norm, and a short sample per epoch as piano roll and audio; needs"
        " pip install 'midiforge[tensorboard]'. Put a bare --tensorboard after the positional arguments",
    )

    controls: str | None = opt(
        None,
        "--controls",
        group="controls",
        choices=("on", "off"),
        help="prefix each training piece with its measured controls (instruments, tempo, time signature, key,"
        " density, polyphony, style tag) so that generate can be steered (default for a new run: on; a"
        " checkpoint keeps its own, off for checkpoints and tokenizers from before controls)",
    )
    control_dropout: float | None = opt(
        None,
        "--control-dropout",
        type=float,
        group="controls",
        metavar="P",
        help="drop each control of each training piece with probability P per epoch, so that the model also"
        " generates without it (default for a new run: 0.5; validation pieces keep all their controls)",
    )
    tags_csv: Path | None = opt(
        None,
        "--tags-csv",
        type=Path,
        group="controls",
        metavar="FILE",
        help="style tags from a CSV of 'path,tag' rows (paths relative to FILE's folder, files or folders of"
        " the -t/-v data); applied after -t NAME=DIR",
    )

    init_from: Path | None = opt(
        None,
        "--init-from",
        type=Path,
        group="finetune",
        metavar="CKPT",
        help="start a new run from CKPT's weights and tokenizer (fresh optimizer, schedule and state); new style"
        " tags take free slots with fresh embedding rows. The shape options must be omitted or match CKPT's",
    )
    lora: int | None = opt(
        None,
        "--lora",
        type=int,
        group="finetune",
        metavar="RANK",
        help="with --init-from: train low-rank adapters of this rank only; the checkpoint holds the"
        " adapters and refers to CKPT, which must stay where it is (midiforge merge folds them in). With"
        " LoRA+ (the default) -l about 1-2x full fine-tuning's; plain LoRA about 3x (docs/results.md)",
    )
    lora_alpha: float | None = opt(
        None,
        "--lora-alpha",
        type=float,
        group="finetune",
        metavar="A",
        help="LoRA scaling numerator: updates are scaled by A/RANK (default: 2*RANK)",
    )
    lora_plus: float | None = opt(
        None,
        "--lora-plus",
        type=float,
        group="finetune",
        metavar="RATIO",
        help="LoRA+: the adapters' B matrices learn at RATIO x -l (Hayou et al. 2024; default: 16; 1: plain LoRA)",
    )
    lora_targets: list[str] | None = opt(
        None,
        "--lora-targets",
        group="finetune",
        metavar="NAME",
        help="projections that get adapters: qkv, proj (attention), gate, up, down (MLP), head (the output"
        " head, tied to the embedding: its adapter adapts the output side only) (default: qkv head)",
    )
    freeze: int | None = opt(
        None,
        "--freeze",
        type=int,
        group="finetune",
        metavar="N",
        help="keep the embedding (and the tied output head) and the first N blocks fixed: for small collections",
    )

    # -- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, list):
                d[k] = [str(x) for x in v]
        return d

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @property
    def window(self) -> int:
        """The longest training sample: -e, lowered so that one window always fits the batch budget."""
        if self.batch_budget <= 0 or self.max_sequence_length <= 0:
            return self.max_sequence_length
        return min(self.max_sequence_length, math.isqrt(self.batch_budget))

    def shape_differences(self, have: dict) -> list[str]:
        """The shape options (context included) that contradict an existing model's config, as "name=has
        (asked value)"; resuming and --init-from both refuse them."""
        diff = [f"{k}={have.get(k)} (asked {v})" for k, v in self.shape().items() if have.get(k) != v]
        if self.context_length is not None and self.context_length != have.get("max_seq_len"):
            diff.append(f"context_length={have.get('max_seq_len')} (asked {self.context_length})")
        return diff

    def shape(self) -> dict:
        """The model-shape fields the user gave (preset expanded, then overrides)."""
        asked = dict(PRESETS[self.preset]) if self.preset else {}
        asked.update({n: getattr(self, n) for n in SHAPE_FIELDS if getattr(self, n) is not None})
        return asked


# -- the command line ----------------------------------------------------------------------------------------
GROUP_TITLES = {
    "model": "model shape (a new run; a checkpoint keeps its own shape)",
    "run": "run",
    "controls": "controls and style tags (what generate can be steered by)",
    "finetune": "starting from another run (--init-from, --lora, --freeze)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `midiforge train` command line, derived from :class:`RunConfig`'s fields."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (parser.description or "") + "\n" + EPILOG
    groups = {"": parser}
    for f in fields(RunConfig):
        m = f.metadata
        if m["group"] not in groups:
            groups[m["group"]] = parser.add_argument_group(GROUP_TITLES[m["group"]])
        target = groups[m["group"]]
        kw = dict(m["argparse"], help=m["help"])
        if not m["flags"]:
            target.add_argument(f.name, type=m["type"], **kw)
            continue
        kw["dest"] = f.name
        if f.type == "bool":  # the only booleans default to on and have a --no-... switch
            target.add_argument(*m["flags"], action="store_false", **kw)
        elif f.type.startswith("list"):  # the data options, spelled as in every command
            data = data_keywords(kw["metavar"], kw["help"], required=kw.get("required", False))
            target.add_argument(*m["flags"], dest=f.name, **data)
        else:
            if m["type"] is not None:
                kw["type"] = m["type"]
            target.add_argument(*m["flags"], default=f.default, **kw)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    parser = Parser(prog="midiforge train", description="train a model on MIDI files, or resume a run")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return RunConfig.from_args(args)


def flag(name: str) -> str:
    """How the user spells a field on the command line, for messages (e.g. ``-b/--max-batch-size``)."""
    meta = next(f.metadata for f in fields(RunConfig) if f.name == name)
    return "/".join(meta["flags"]) or name


def value_problems(cfg: RunConfig, base_vocab: int) -> list[str]:
    """Every problem with the values themselves (files, device and checkpoint are checked by the caller)."""
    errors = []
    for name in (
        "num_epochs",
        "min_sequence_length",
        "max_sequence_length",
        "batch_budget",
        "learning_rate",
        "save_every_minutes",
        "max_steps",
        "context_length",
        *SHAPE_FIELDS,
    ):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            errors.append(f"{flag(name)} must be positive, got {v}")
    if cfg.bpe_sample_events < 0:
        errors.append(
            f"{flag('bpe_sample_events')} must be >= 0 (0: every file), got {cfg.bpe_sample_events}"
        )
    for name in ("infill_rate", "infill_track_share"):
        if not 0 <= getattr(cfg, name) <= 1:
            errors.append(f"{flag(name)} must be in [0, 1], got {getattr(cfg, name)}")
    if not cfg.weight_decay >= 0:
        errors.append(f"{flag('weight_decay')} must be >= 0, got {cfg.weight_decay}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        errors.append(f"{flag('dropout')} must be in [0, 1), got {cfg.dropout}")
    if not 0 <= cfg.val_share < 1:
        errors.append(f"{flag('val_share')} must be in [0, 1) (0: no validation), got {cfg.val_share}")
    if cfg.patience is not None and cfg.patience < 1:
        errors.append(f"{flag('patience')} must be at least 1, got {cfg.patience}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        errors.append(f"{flag('num_workers')} must be >= 0, got {cfg.num_workers}")
    if cfg.vocab_size is not None and cfg.vocab_size < base_vocab:
        errors.append(
            f"{flag('vocab_size')} must be at least the base vocabulary ({base_vocab}), got {cfg.vocab_size}"
        )
    if cfg.batch_budget > 0 and cfg.max_sequence_length > 0 and cfg.min_sequence_length > cfg.window:
        errors.append(
            f"{flag('min_sequence_length')} ({cfg.min_sequence_length}) exceeds the window ({cfg.window})"
        )
    return errors
