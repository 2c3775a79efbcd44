"""`midiforge train` / `python train.py`: train a Transformer on MIDI/JSON datasets, resuming automatically.

This module is the command and the wiring of a run: :func:`validate` turns the command line into a :class:`Plan`
(every problem reported at once, nothing written); :func:`train` gets the tokenizer and datasets, builds the model
and :class:`~midiforge.trainer.Trainer`, restores a checkpoint when resuming and hands over to
:func:`midiforge.trainer.fit`, which runs the epochs. The training machinery (optimizer step, AMP, evaluation,
RNG states) is in :mod:`midiforge.trainer`, checkpoint files in :mod:`midiforge.checkpoint`, data-parallel
plumbing in :mod:`midiforge.distributed`.
"""

from __future__ import annotations

import os

from midiforge.workers import default_jobs as _cpu_cores  # affinity-aware core count; imports no torch

# OpenMP/MKL size their thread pools when torch is first imported, so this must run before `import torch`.
# Processes sharing the machine (DDP workers) split the cores. A value the user set wins.
_LOCAL_PROCS = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(max(1, _cpu_cores() // _LOCAL_PROCS)))

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from midiforge import checkpoint as ckpt_io  # noqa: E402
from midiforge import distributed as dist  # noqa: E402
from midiforge.data import DATA_SUFFIXES  # noqa: E402
from midiforge.errors import UsageError  # noqa: E402
from midiforge.trainer import (  # noqa: E402
    IGNORE_INDEX,  # noqa: F401 -- the F401 names are re-exported for tests and bench/bench_train.py
    MAX_BAD_STEPS,  # noqa: F401
    STOP_ENV,  # noqa: F401
    TrainConfig,
    Trainer,
    fit,
    fresh_epoch_counters,
    rng_state,
    seed_everything,
    set_rng_state,
    token_loss_sum,  # noqa: F401
)

SHAPE_FIELDS = ("n_layer", "n_head", "d_model", "d_ff")
DEFAULT_PRESET = "small"
DEFAULT_MIN_LEN = 8
DEFAULT_MAX_LEN = 2**17
DEFAULT_BATCH = 8 * 1536**2
DEFAULT_LR = 3e-3  # measured: see the -l help
DEFAULT_WD = 0.01
DEFAULT_VOCAB = 2048
DEFAULT_DROPOUT = 0.1


HELP_EPILOG = """

Re-running the same command resumes from CKPT_PATH (mid-epoch included); num_epochs is the total, so a larger
number extends a finished run (the warmup+cosine schedule is then rebuilt for the new total and the learning rate
continues from that curve). -l and -w from the command line replace the checkpointed values on purpose.
The model shape options apply to a new run; with a checkpoint they must match it (or be omitted).
CKPT_PATH receives model.pth, optimizer.pth, state.pth, metrics.json, config.json, tokenizer.json (trained on the
training set first when absent), training.png and cache/ (tokenized data).
"""


# ------------------------------------------------------------------------------------------ command line
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (p.description or "") + HELP_EPILOG
    p.add_argument("num_epochs", type=int, help="total epochs (a larger number than before extends a run)")
    p.add_argument("ckpt_path", type=Path, help="checkpoint directory; re-running the same command resumes")
    p.add_argument(
        "-t",
        "--train-dataset",
        action="extend",
        nargs="+",
        required=True,
        type=Path,
        help="training files/directories (.mid/.midi and prepared .json, mixed); may repeat",
    )
    p.add_argument(
        "-v",
        "--val-dataset",
        action="extend",
        nargs="+",
        type=Path,
        default=None,
        help="validation files/directories; may repeat",
    )
    p.add_argument(
        "-m",
        "--min-sequence-length",
        type=int,
        default=DEFAULT_MIN_LEN,
        help="skip pieces shorter than this many tokens (default: %(default)s; the seed's 2**32 would skip every piece)",
    )
    p.add_argument(
        "-e",
        "--max-sequence-length",
        type=int,
        default=DEFAULT_MAX_LEN,
        help="longest training window in tokens; longer pieces are cut into windows at note onsets;"
        " lowered to isqrt(-b) when larger, so that every window fits a batch (default: %(default)s)",
    )
    p.add_argument(
        "-b",
        "--max-batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help="batch budget: sum of squared sample lengths (tokens) per batch (default: 8*1536**2 = %(default)s)",
    )
    p.add_argument(
        "-l",
        "--learning-rate",
        type=float,
        default=DEFAULT_LR,
        help="peak AdamW learning rate: warmup over min(100, 10%% of the steps), cosine decay to 10%%; overrides a"
        " checkpoint's (default: %(default)s). Measured on 8 POP909 songs, 6 epochs (468 steps): validation loss"
        " 6.20/6.12/6.13 (tiny) and 6.19/5.97/6.24 (small) for 1e-2/3e-3/1e-3 -- the seed's 0.01 did not"
        " diverge but learned slower and noisier; consider 1e-3 or less for base/large",
    )
    p.add_argument(
        "-w",
        "--weight-decay",
        type=float,
        default=DEFAULT_WD,
        help="AdamW weight decay (not on norms, biases, embeddings); overrides a checkpoint's (default: %(default)s)",
    )
    g = p.add_argument_group("model shape (a new run; a checkpoint keeps its own shape)")
    g.add_argument(
        "--preset",
        choices=("tiny", "small", "base", "large"),
        default=None,
        help=f"model size preset (default for a new run: {DEFAULT_PRESET})",
    )
    for name in SHAPE_FIELDS:
        g.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}"
        )
    g.add_argument(
        "--dropout",
        type=float,
        default=None,
        help=f"dropout rate (default for a new run: {DEFAULT_DROPOUT}; may change on resume)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"BPE vocabulary size when the checkpoint has no tokenizer.json yet (default"
        f" {DEFAULT_VOCAB}; fewer when the data has no more merges to offer)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of model init, data order and augmentation (default: %(default)s)",
    )
    r.add_argument(
        "--amp",
        choices=("auto", "off", "fp16", "bf16"),
        default="auto",
        help="mixed precision: auto = bf16 on CUDA when supported, else fp16 with loss scaling; fp32 on CPU (default: %(default)s)",
    )
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random transposition of the training pieces",
    )
    r.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: 0 on CPU, where workers steal compute cores;"
        " up to 4 per GPU)",
    )
    r.add_argument(
        "--save-every-minutes",
        type=float,
        default=10.0,
        help="also checkpoint mid-epoch this often (default: %(default)s; epoch ends always save)",
    )


@dataclass
class Plan:
    """A validated command: everything the run needs to know before it writes anything."""

    args: argparse.Namespace
    ckpt_dir: Path
    train_files: list[Path]
    val_files: list[Path]
    window: int
    device: torch.device
    amp: str
    num_workers: int
    shape: dict  # n_layer/n_head/d_model/d_ff for a new run (ignored when resuming)
    ckpt_config: dict | None = None  # the checkpoint's config.json when resuming
    counters: dict = field(default_factory=dict)  # the checkpoint's counters when resuming
    notes: list[str] = field(default_factory=list)

    @property
    def resume(self) -> bool:
        return self.ckpt_config is not None and bool(self.counters)


def _dataset_files(paths, what: str, errors: list[str]) -> list[Path]:
    from midiforge.midi import find_files

    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        errors.append(f"{what}: no such file or directory: {', '.join(missing)}")
        return []
    files = find_files(paths, suffixes=DATA_SUFFIXES)
    if not files:
        errors.append(f"{what}: no .mid/.midi/.json file in {', '.join(map(str, paths))}")
    return files


def validate(args: argparse.Namespace) -> Plan:
    """Check every argument (and the checkpoint) before anything is written; one UsageError lists all."""
    from midiforge.model import PRESETS, ModelConfig
    from midiforge.tokenizer import MidiTokenizer

    errors: list[str] = []
    notes: list[str] = []
    positive = {
        "num_epochs": args.num_epochs,
        "-m/--min-sequence-length": args.min_sequence_length,
        "-e/--max-sequence-length": args.max_sequence_length,
        "-b/--max-batch-size": args.max_batch_size,
        "-l/--learning-rate": args.learning_rate,
        "--save-every-minutes": args.save_every_minutes,
    }
    positive.update({f"--{n.replace('_', '-')}": getattr(args, n) for n in SHAPE_FIELDS})
    errors += [f"{k} must be positive, got {v}" for k, v in positive.items() if v is not None and not v > 0]
    if not args.weight_decay >= 0:
        errors.append(f"-w/--weight-decay must be >= 0, got {args.weight_decay}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        errors.append(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.num_workers is not None and args.num_workers < 0:
        errors.append(f"--num-workers must be >= 0, got {args.num_workers}")
    base_vocab = len(MidiTokenizer())
    if args.vocab_size is not None and args.vocab_size < base_vocab:
        errors.append(
            f"--vocab-size must be at least the base vocabulary ({base_vocab}), got {args.vocab_size}"
        )
    window = args.max_sequence_length
    if args.max_batch_size > 0 and args.max_sequence_length > 0:
        window = min(args.max_sequence_length, math.isqrt(args.max_batch_size))
        if window < args.max_sequence_length:
            notes.append(
                f"-e lowered from {args.max_sequence_length} to isqrt(-b) = {window} tokens so that"
                " every window fits a batch"
            )
        if args.min_sequence_length > window:
            errors.append(
                f"-m/--min-sequence-length ({args.min_sequence_length}) exceeds the window ({window})"
            )
    train_files = _dataset_files(args.train_dataset, "-t/--train-dataset", errors)
    val_files = _dataset_files(args.val_dataset, "-v/--val-dataset", errors) if args.val_dataset else []
    errors += [f"distributed launch: {p}" for p in dist.env_problems()]
    device, amp = _resolve_device(args, errors)

    # Model shape: a checkpoint's own, or a preset plus overrides for a new run.
    asked = dict(PRESETS[args.preset]) if args.preset else {}
    asked.update({n: getattr(args, n) for n in SHAPE_FIELDS if getattr(args, n) is not None})
    ckpt_dir = Path(args.ckpt_path)
    ckpt_config, counters = None, {}
    shape = dict(PRESETS[DEFAULT_PRESET], **asked)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        errors.append(f"{ckpt_dir}: exists and is not a directory")
    elif ckpt_dir.is_dir():
        try:
            if ckpt_io.has_checkpoint(ckpt_dir):
                ckpt_config = ckpt_io.read_config(ckpt_dir)
                state = ckpt_io.load_torch(ckpt_dir / ckpt_io.STATE_FILE)
                counters = dict(state.get("counters", {})) if isinstance(state, dict) else {}
                if not counters:
                    errors.append(f"{ckpt_dir / ckpt_io.STATE_FILE}: no training counters")
            elif (ckpt_dir / ckpt_io.MODEL_FILE).exists():  # never overwrite weights we cannot resume from
                errors.append(
                    f"{ckpt_dir} has {ckpt_io.MODEL_FILE} but no {ckpt_io.STATE_FILE}: not a resumable"
                    " checkpoint; use a new directory"
                )
        except UsageError as e:
            errors.append(str(e))
    if ckpt_config is not None:
        have = ckpt_config["model"]
        diff = [f"{k}={have.get(k)} (asked {v})" for k, v in asked.items() if have.get(k) != v]
        if diff:
            errors.append(
                f"{ckpt_dir} holds a model of another shape: {', '.join(diff)}; omit the shape options"
                " to continue it, or use a new checkpoint directory"
            )
        if args.vocab_size is not None:
            notes.append("--vocab-size ignored: the checkpoint already has its tokenizer")
    elif not any("must be positive" in e for e in errors):
        try:
            ModelConfig(vocab_size=base_vocab, **shape)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise UsageError("; ".join(errors))
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else min(4, max(0, _cpu_cores() // _LOCAL_PROCS - 1))
    return Plan(
        args,
        ckpt_dir,
        train_files,
        val_files,
        window,
        device,
        amp,
        num_workers,
        shape,
        ckpt_config,
        counters,
        notes,
    )


def _resolve_device(args, errors: list[str]) -> tuple[torch.device, str]:
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError) as e:
        errors.append(f"--device {args.device!r}: {e}")
        return torch.device("cpu"), "off"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            errors.append(f"--device {args.device}: CUDA is not available")
            return torch.device("cpu"), "off"
        if device.index is None:
            device = torch.device("cuda", dist.from_env().local_rank)
    elif device.type != "cpu":
        errors.append(f"--device {args.device!r}: only cpu and cuda are supported")
    amp = args.amp
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type != "cuda":
        errors.append("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    return device, amp


def main(argv: list[str] | None = None) -> int:
    """Entry point of the repository's ``train.py`` (same messages and exit codes as `midiforge train`)."""
    parser = argparse.ArgumentParser(
        prog="midiforge train",
        description="train a Transformer on MIDI/JSON datasets (resumes automatically)",
    )
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"midiforge train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("midiforge train: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    plan = validate(args)
    info = dist.from_env()
    dist.set_current(info)
    if plan.resume and plan.counters.get("epoch", 0) >= args.num_epochs:
        dist.print0(
            f"{plan.ckpt_dir}: already trained {plan.counters['epoch']} epochs (asked {args.num_epochs});"
            " nothing to do. Pass a larger num_epochs to train further."
        )
        return 0
    n_gpu = torch.cuda.device_count() if plan.device.type == "cuda" else 0
    if not info.enabled and args.device is None and n_gpu > 1:
        dist.print0(f"starting {n_gpu} data-parallel workers, one per GPU")
        import torch.multiprocessing as mp

        try:
            dist.spawn(_spawned_worker, n_gpu, (args,))
        except mp.ProcessExitedException as e:
            return e.exit_code or 1
        return 0
    return train(plan)


def _spawned_worker(args: argparse.Namespace) -> int:
    try:
        return train(validate(args))
    except UsageError as e:
        print(f"midiforge train: error: {e}", file=sys.stderr)
        return e.exit_code


# ---------------------------------------------------------------------------------------------- the run
def train(plan: Plan) -> int:
    """Train per a validated plan in this process (one rank of a job when launched by torchrun/spawn)."""
    info = dist.from_env()
    dist.set_current(info)
    torch.set_num_threads(max(1, _cpu_cores() // max(_LOCAL_PROCS, info.local_world_size)))
    if plan.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for note in plan.notes:
        dist.note0(note)
    dist.init(info, plan.device)
    created = not plan.ckpt_dir.exists()
    try:
        try:
            tokenizer = _tokenizer(plan, info)
            train_ds, val_ds = _datasets(plan, tokenizer, info)
        except UsageError:
            if created and info.is_main:  # a failed start leaves nothing behind
                shutil.rmtree(plan.ckpt_dir, ignore_errors=True)
            raise
        return _setup_and_fit(plan, tokenizer, train_ds, val_ds, info)
    finally:
        dist.shutdown()


def _tokenizer(plan: Plan, info: dist.DistInfo):
    """The checkpoint's tokenizer; a new run without one trains BPE on the training set (rank 0) first."""
    from midiforge.tokenizer import MidiTokenizer

    tok = ckpt_io.load_tokenizer(plan.ckpt_dir)
    if tok is not None:
        if not plan.resume:  # e.g. left by a first run interrupted before its first checkpoint
            path = plan.ckpt_dir / ckpt_io.TOKENIZER_FILE
            dist.note0(f"reusing {path} ({len(tok)} tokens); delete {plan.ckpt_dir} to start afresh")
            asked = plan.args.vocab_size
            if asked is not None and asked != len(tok):
                dist.note0(f"--vocab-size {asked} ignored: {path} has {len(tok)} tokens")
        return tok
    if plan.resume:
        raise UsageError(f"{plan.ckpt_dir}: the checkpoint has no {ckpt_io.TOKENIZER_FILE}")
    if info.is_main:
        size = plan.args.vocab_size or DEFAULT_VOCAB
        dist.print0(f"training a BPE tokenizer of up to {size} tokens on {len(plan.train_files)} files")
        tok = MidiTokenizer()
        tok.train_bpe([str(f) for f in plan.train_files], size)
        plan.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tok.save(plan.ckpt_dir / ckpt_io.TOKENIZER_FILE)
        dist.print0(f"tokenizer: {len(tok)} tokens, saved to {plan.ckpt_dir / ckpt_io.TOKENIZER_FILE}")
    dist.barrier()
    return tok or ckpt_io.load_tokenizer(plan.ckpt_dir)


def _datasets(plan: Plan, tok, info: dist.DistInfo):
    from midiforge.data import MidiDataset

    a = plan.args

    def build(files, augment: bool) -> MidiDataset:
        return MidiDataset(
            files,
            tok,
            a.min_sequence_length,
            plan.window,
            cache_dir=plan.ckpt_dir / "cache",
            augment=augment,
            seed=a.seed,
            encode_missing=info.is_main,  # ranks > 0 read what rank 0 encoded, never encode themselves
        )

    if not info.is_main:
        dist.barrier()  # rank 0 fills the token cache first; the others then read it
    train_ds = build(plan.train_files, a.augment)
    val_ds = build(plan.val_files, False) if plan.val_files else None
    if info.is_main:
        dist.barrier()
    for name, ds in (("training", train_ds), ("validation", val_ds)):
        if ds is None:
            continue
        first = next(iter(ds.skipped.items()), None)
        example = f" (e.g. {first[0]}: {first[1]})" if first else ""
        if len(ds) == 0:
            raise UsageError(f"no usable piece in the {name} set: {ds.num_skipped} files skipped{example}")
        if ds.num_skipped:
            dist.note0(f"{ds.num_skipped} {name} files skipped{example}")
        dist.print0(f"{name} data: {ds.num_pieces} pieces, {len(ds)} windows, {int(ds.lengths.sum())} tokens")
    return train_ds, val_ds


def _model_config(plan: Plan, tok):
    from midiforge.model import ModelConfig

    a = plan.args
    if plan.ckpt_config is None:
        d = dict(
            plan.shape,
            vocab_size=len(tok),
            max_seq_len=plan.window,
            dropout=DEFAULT_DROPOUT if a.dropout is None else a.dropout,
        )
        return ModelConfig.from_dict(d)
    d = dict(plan.ckpt_config["model"])
    if d.get("vocab_size") != len(tok):
        raise UsageError(
            f"{plan.ckpt_dir}: tokenizer.json has {len(tok)} tokens but the model was built for"
            f" {d.get('vocab_size')}"
        )
    if d.get("max_seq_len") != plan.window:
        dist.note0(f"training window changes from {d.get('max_seq_len')} to {plan.window} tokens")
    d["max_seq_len"] = plan.window  # rotary positions: the weights do not depend on it
    if a.dropout is not None:
        d["dropout"] = a.dropout
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{plan.ckpt_dir / ckpt_io.CONFIG_FILE}: bad model config ({e})") from e


def _loader(dataset, batch_sampler, tok, plan: Plan, seed: int):
    from functools import partial

    from midiforge.data import collate

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=partial(collate, pad_id=tok.pad_id),
        num_workers=plan.num_workers,
        pin_memory=plan.device.type == "cuda",
        # An explicit generator: creating the iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of rank > 0 when resuming at ``step``: deterministic and different for every rank."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**63


def _check_same_data(info: dist.DistInfo, device: torch.device, windows: int, batches: int) -> None:
    """Every rank must hold the same windows and take the same number of steps, or DDP hangs or diverges."""
    if not info.enabled:
        return
    mine = torch.tensor([windows, batches], dtype=torch.int64, device=device)
    lo, hi = dist.all_reduce_min(mine.clone()), dist.all_reduce_max(mine.clone())
    if not torch.equal(lo, hi):
        raise UsageError(
            f"ranks built different datasets: windows {int(lo[0])}..{int(hi[0])}, batches per epoch"
            f" {int(lo[1])}..{int(hi[1])} (rank {info.rank}: {windows} windows, {batches} batches);"
            " are the data files the same for every process?"
        )


def _setup_and_fit(plan: Plan, tok, train_ds, val_ds, info: dist.DistInfo) -> int:
    """Build the model and Trainer, restore the checkpoint when resuming, then run :func:`fit`."""
    from midiforge.data import MidiDatasetSampler
    from midiforge.model import Transformer

    a, device = plan.args, plan.device
    cfg = TrainConfig(
        num_epochs=a.num_epochs,
        learning_rate=a.learning_rate,
        weight_decay=a.weight_decay,
        min_sequence_length=a.min_sequence_length,
        max_sequence_length=a.max_sequence_length,
        max_batch_size=a.max_batch_size,
        window=plan.window,
        seed=a.seed,
        amp=plan.amp,
        augment=a.augment,
        vocab_size=len(tok),
        train_dataset=[str(p) for p in a.train_dataset],
        val_dataset=[str(p) for p in a.val_dataset or []],
        world_size=info.world_size,
    )
    model_cfg = _model_config(plan, tok)
    seed_everything(a.seed)
    model = Transformer(model_cfg)
    if info.enabled:
        torch.manual_seed(a.seed + 1_000_003 * info.rank)  # the same init everywhere, different dropout masks
    trainer = Trainer(model, cfg, device, info)
    sampler = MidiDatasetSampler(
        train_ds, a.max_batch_size, shuffle=True, seed=a.seed, rank=info.rank, world_size=info.world_size
    )
    batches_per_epoch = len(sampler)
    _check_same_data(info, device, len(train_ds), batches_per_epoch)
    data_sig = {
        "files": [str(f) for f in plan.train_files],
        "window": plan.window,
        "augment": a.augment,
        "min": a.min_sequence_length,
        "budget": a.max_batch_size,
        "seed": a.seed,
        "world_size": info.world_size,
        "tokenizer": tok.fingerprint,
    }
    counters = {"epoch": 0, "step": 0, "tokens": 0, "bad": 0, **fresh_epoch_counters()}
    metrics: dict = {"epochs": [], "steps": []}
    if plan.resume:
        ck = ckpt_io.load(plan.ckpt_dir)
        try:
            trainer.raw.load_state_dict(ck.model)
            trainer.optimizer.load_state_dict(ck.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(
                f"{plan.ckpt_dir}: model/optimizer state does not fit config.json"
                f" ({str(e).strip().splitlines()[0]})"
            ) from e
        if ck.state.get("scaler") and trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(ck.state["scaler"])
        counters.update(ck.state["counters"])
        metrics = ck.metrics
        set_rng_state(ck.state["rng"])
        if info.rank > 0:
            # The checkpoint holds rank 0's RNG state only: the other ranks would replay its dropout masks.
            torch.manual_seed(_rank_seed(a.seed, info.rank, counters["step"]))  # CPU and every CUDA device
        old = ck.config.get("train", {})
        for key, flag in (("learning_rate", "-l"), ("weight_decay", "-w")):
            if key in old and old[key] != getattr(cfg, key):
                dist.note0(
                    f"{flag} {getattr(cfg, key)} from the command line replaces the checkpoint's {old[key]}"
                )
        if old.get("num_epochs", a.num_epochs) != a.num_epochs:
            dist.note0(
                f"num_epochs {old['num_epochs']} -> {a.num_epochs}: the cosine schedule is rebuilt for"
                f" {a.num_epochs * batches_per_epoch} steps (the learning rate continues from that curve)"
            )
        if counters["batch"]:
            if ck.state.get("data") == data_sig:
                sampler.load_state_dict(dict(ck.state["sampler"], position=counters["batch"]))
            else:
                dist.note0(
                    f"data settings changed since the checkpoint: epoch {counters['epoch'] + 1} restarts"
                )
                counters.update(fresh_epoch_counters())
                metrics["steps"] = [s for s in metrics["steps"] if s[0] <= counters["epoch"]]
        dist.print0(
            f"resuming {plan.ckpt_dir} at epoch {counters['epoch'] + 1}, batch {counters['batch']},"
            f" step {counters['step']}"
        )
    total_steps = a.num_epochs * batches_per_epoch
    cfg.warmup_steps = min(cfg.warmup_steps, max(1, total_steps // 10))  # short runs must not stay in warmup
    trainer.set_hyperparameters(counters["step"], total_steps)
    dist.print0(
        f"model: {trainer.raw.num_parameters() / 1e6:.2f}M parameters ({model_cfg.n_layer} layers,"
        f" d_model {model_cfg.d_model}), window {plan.window} tokens, device {device}, amp {plan.amp},"
        f" {info.world_size} process(es), {batches_per_epoch} batches/epoch/process"
    )

    val_loader = None
    if val_ds is not None:
        val_batches = list(MidiDatasetSampler(val_ds, a.max_batch_size, shuffle=False, seed=a.seed))
        val_loader = _loader(val_ds, val_batches[info.rank :: info.world_size], tok, plan, a.seed)

    def save() -> None:
        # fit() decides when: not mid-epoch while non-finite steps go on (the last good checkpoint must
        # survive a divergence), always at an epoch end (skipped steps leave the weights unchanged).
        if info.is_main:
            state = {
                "scaler": trainer.scaler.state_dict(),
                "sampler": dict(sampler.state_dict(), position=counters["batch"]),
                "rng": rng_state(),
                "counters": dict(counters),
                "data": data_sig,
            }
            ckpt_io.save(
                plan.ckpt_dir,
                model=trainer.raw.state_dict(),
                optimizer=trainer.optimizer.state_dict(),
                state=state,
                metrics=metrics,
                config={"model": model_cfg.to_dict(), "train": asdict(cfg)},
            )

    return fit(
        trainer,
        sampler,
        lambda epoch: _loader(train_ds, sampler, tok, plan, a.seed + epoch),
        val_loader,
        counters,
        metrics,
        save,
        plan.ckpt_dir,
        a.save_every_minutes,
    )
