"""The parts a training run is built from, in the order :mod:`midiforge.train.command` uses them.

:func:`resolve` turns a :class:`~midiforge.train.config.RunConfig` into a :class:`Setup`: files found, window and
device decided, the checkpoint (if any) read and checked against the options, every problem reported in one
UsageError. It only reads. Then :func:`build_tokenizer`, :func:`build_datasets`, :func:`model_config`,
:func:`restore` and :func:`loader` build the run.
"""

from __future__ import annotations

import collections
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from midiforge import checkpoint as ckpt_io
from midiforge.data import fim, tagging
from midiforge.data.dataset import DATA_SUFFIXES, MidiDataset
from midiforge.data.prefix import ControlPrefix
from midiforge.data.prepare import reason_category
from midiforge.data.sampler import collate
from midiforge.data.workers import default_jobs
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_jsonl
from midiforge.model import PRESETS, ModelConfig
from midiforge.notes.midi import find_files
from midiforge.notes.shards import expand_pieces
from midiforge.tokens.bpe_sample import SampleStats
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.tokens.vocab import TokenizerConfig
from midiforge.train import distributed as dist
from midiforge.train import finetune, sizing
from midiforge.train.config import (
    DEFAULT_DROPOUT,
    DEFAULT_PRESET,
    DEFAULT_VOCAB,
    RunConfig,
    flag,
    value_problems,
)
from midiforge.train.rng import rng_state, set_rng_state
from midiforge.train.trainer import Trainer, TrainState


@dataclass
class Setup:
    """A checked run: everything decided before anything is written."""

    cfg: RunConfig
    ckpt_dir: Path
    train_files: list[Path]
    val_files: list[Path]
    window: int  # the longest training sample: min(-e, isqrt(-b), the model's context)
    context: int  # the model's context length (max_seq_len)
    device: torch.device
    amp: str  # resolved: off, fp16 or bf16
    num_workers: int
    shape: dict  # n_layer/n_head/d_model/d_ff of a new run (a resumed run keeps the checkpoint's)
    ckpt_config: dict | None = None  # the checkpoint's config.json when resuming
    resume_state: dict | None = None  # its TrainState as a dict when resuming
    tokenizer: object = None  # the checkpoint's tokenizer, when it has one
    notes: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # piece → style tag (-t NAME=DIR, --tags-csv)
    tag_names: list[str] = field(default_factory=list)  # this run's tag names, in the order given
    split: str = sizing.SPLIT_NONE  # where the validation set comes from (sizing.plan_split)
    found_files: list[Path] = field(default_factory=list)  # every -t file, before any split
    auto_preset: bool = False  # a new run with no shape option: the preset is chosen from the training tokens
    base: object = None  # finetune.Base: the run this one starts from (--init-from; a LoRA run's base)


def _dataset_files(paths, what: str, errors: list[str]) -> list[Path]:
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        errors.append(f"{what}: no such file or directory: {', '.join(missing)}")
        return []
    files = find_files(paths, suffixes=DATA_SUFFIXES)
    if not files:
        errors.append(f"{what}: no .mid/.midi/.json file in {', '.join(map(str, paths))}")
    return files


def _device(cfg: RunConfig, errors: list[str]) -> tuple[torch.device, str]:
    auto = cfg.device in (None, "auto")  # None: a config.json["train"] from before "auto" was spelled out
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else cfg.device)
    except (RuntimeError, ValueError) as e:
        errors.append(f"--device {cfg.device!r}: {e}")
        return torch.device("cpu"), "off"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            errors.append(f"--device {cfg.device}: CUDA is not available")
            return torch.device("cpu"), "off"
        info = dist.from_env()
        errors += dist.device_problems(info, device, explicit_index=device.index is not None)
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    elif device.type != "cpu":
        errors.append(f"--device {cfg.device!r}: only cpu and cuda are supported")
    amp = cfg.amp
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type != "cuda":
        errors.append("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    return device, amp


def _read_checkpoint(ckpt_dir: Path, errors: list[str]):
    """(config, TrainState dict, tokenizer) of a committed checkpoint, or Nones for a new run. Read-only."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        errors.append(f"{ckpt_dir}: exists and is not a directory")
        return None, None, None
    try:
        tok = ckpt_io.load_tokenizer(ckpt_dir) if ckpt_dir.is_dir() else None
        if not ckpt_io.has_checkpoint(ckpt_dir):
            if ckpt_dir.is_dir() and (ckpt_dir / ckpt_io.MODEL_FILE).exists():
                # Never overwrite weights we cannot resume from.
                errors.append(
                    f"{ckpt_dir} has {ckpt_io.MODEL_FILE} but no {ckpt_io.STATE_FILE}: not a resumable"
                    " checkpoint; use a new directory"
                )
            return None, None, tok
        blobs = ckpt_io.read_committed(ckpt_dir, [ckpt_io.CONFIG_FILE])  # both from one save
        config = ckpt_io.read_config(ckpt_dir, blobs.get(ckpt_io.CONFIG_FILE))
        state = ckpt_io.load_torch(ckpt_dir / ckpt_io.STATE_FILE, data=blobs[ckpt_io.STATE_FILE])
        ts = (state.get("train_state") or state.get("counters")) if isinstance(state, dict) else None
        if not ts or config is None:
            errors.append(f"{ckpt_dir / ckpt_io.STATE_FILE}: no training state")
            return None, None, tok
        if tok is None:
            errors.append(f"{ckpt_dir}: the checkpoint has no {ckpt_io.TOKENIZER_FILE}")
        else:
            ckpt_io.check_tokenizer(ckpt_dir, tok, config, state)
        return config, dict(ts), tok
    except UsageError as e:
        errors.append(str(e))
        return None, None, None


def resolve(cfg: RunConfig, known: Setup | None = None) -> Setup:
    """Check every option against the files, the device and the checkpoint; one UsageError lists all.

    ``known``: an earlier resolve of the same ``cfg`` whose file lists are reused (walking a large corpus's
    folders again would only find the same files); the checkpoint is always read afresh.
    """
    base_vocab = len(MidiTokenizer())
    errors, notes = value_problems(cfg, base_vocab), []
    train_spec = tagging.split_specs(cfg.train_dataset, flag("train_dataset"), errors)
    val_spec = tagging.split_specs(cfg.val_dataset, flag("val_dataset"), errors)
    if known is not None:
        train_files, val_files = known.found_files, known.val_files
    else:
        train_files = _dataset_files(train_spec.paths, flag("train_dataset"), errors)
        val_files = _dataset_files(val_spec.paths, flag("val_dataset"), errors) if cfg.val_dataset else []
    roots = train_spec.roots + val_spec.roots
    roots += tagging.read_tags_csv(cfg.tags_csv, errors) if cfg.tags_csv is not None else []
    tag_names = list(dict.fromkeys(t for t, _ in roots))
    errors += [f"distributed launch: {p}" for p in dist.env_problems()]
    device, amp = _device(cfg, errors)
    ckpt_dir = Path(cfg.ckpt_path)
    config, state, tok = _read_checkpoint(ckpt_dir, errors)
    base = finetune.resolve_base(cfg, config, tok, errors, notes)
    if base is not None and config is None:
        tok = copy.deepcopy(base.tokenizer)  # the base's language; this run may add tags to its copy
    controls, control_dropout = tagging.resolve_controls(cfg, config, tok, tag_names, errors, notes)
    found_files = train_files
    split, train_files, val_files = sizing.plan_split(
        cfg, ckpt_dir, config, train_files, val_files, errors, notes
    )

    asked, window = cfg.shape(), cfg.window
    shape = dict(PRESETS[DEFAULT_PRESET], **asked)
    if window < cfg.max_sequence_length:
        notes.append(
            f"-e lowered from {cfg.max_sequence_length} to isqrt(-b) = {window} tokens so that every"
            " window fits a batch"
        )
    context = _context(cfg, config, base, shape, window, base_vocab, errors, notes)
    if errors:
        raise UsageError("; ".join(errors))
    if context < window:
        notes.append(f"training window lowered from {window} to the model's context of {context} tokens")
        window = context
    num_workers = cfg.num_workers if cfg.num_workers is not None else _default_workers(device)
    if cfg.freeze is None and config is not None:
        cfg = replace(cfg, freeze=config.get("train", {}).get("freeze"))  # a resumed run stays frozen
    cfg = replace(cfg, controls=controls, control_dropout=control_dropout)  # config.json records them
    setup = Setup(cfg, ckpt_dir, train_files, val_files, window, context, device, amp, num_workers, shape,
                  config, state, tok, notes)  # fmt: skip
    setup.tags, setup.tag_names = tagging.tag_map(roots, DATA_SUFFIXES), tag_names
    setup.split, setup.auto_preset = split, config is None and not asked
    setup.found_files = found_files
    setup.base = base
    return setup


def _context(cfg, config, base, shape: dict, window: int, base_vocab: int, errors, notes) -> int:
    """The model's context: the checkpoint's when resuming (whose shape the options must not contradict), the
    base's when fine-tuning, else the option (default: the window), checked by building the ModelConfig."""
    if config is not None:
        have = config["model"]
        diff = cfg.shape_differences(have)
        if diff:
            errors.append(
                f"{Path(cfg.ckpt_path)} holds a model of another shape: {', '.join(diff)}; omit the shape options"
                " to continue it, or use a new checkpoint directory"
            )
        if cfg.vocab_size is not None:
            notes.append("--vocab-size ignored: the checkpoint already has its tokenizer")
        return int(have.get("max_seq_len") or window)
    if base is not None:
        return int(base.config["model"]["max_seq_len"])
    context = cfg.context_length or window
    if not any("must be positive" in e for e in errors):
        try:
            ModelConfig(vocab_size=base_vocab, max_seq_len=max(1, context), **shape)
        except ValueError as e:
            errors.append(str(e))
    return context


def _default_workers(device) -> int:
    """Data-loader workers per process: none on the CPU (they would compete with the step), else up to 4."""
    local = max(1, dist.from_env().local_world_size)
    return 0 if device.type == "cpu" else min(4, max(0, default_jobs() // local - 1))


# ------------------------------------------------------------------------------------------- building
def build_tokenizer(setup: Setup, info: dist.DistInfo):
    """The checkpoint's tokenizer; a new run without one trains BPE on the training set (rank 0) first."""
    tok, ckpt_dir = setup.tokenizer, setup.ckpt_dir
    if tok is not None:
        if not setup.cfg.pedals and tok.config.pedals:  # the layout belongs to the tokenizer, not to the run
            dist.note0("--no-pedal ignored: the tokenizer this run continues with writes the pedal")
        if setup.base is not None and setup.resume_state is None:
            if info.is_main:  # a copy of the base's tokenizer.json; this run's new tags are added below
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                tok.save(ckpt_dir / ckpt_io.TOKENIZER_FILE)
            dist.print0(f"tokenizer: {len(tok)} tokens, from {setup.base.path}")
        elif setup.resume_state is None:  # e.g. left by a first run interrupted before its first checkpoint
            path = ckpt_dir / ckpt_io.TOKENIZER_FILE
            dist.note0(f"reusing {path} ({len(tok)} tokens); delete {ckpt_dir} to start afresh")
            asked = setup.cfg.vocab_size
            if asked is not None and asked != len(tok):
                dist.note0(f"--vocab-size {asked} ignored: {path} has {len(tok)} tokens")
        if setup.cfg.controls == "on":  # new tag names take the next slots (rank 0 writes tokenizer.json)
            path = ckpt_dir / ckpt_io.TOKENIZER_FILE
            tagging.apply_tags(tok, setup.tag_names, path, dist.note0, write=info.is_main)
        return tok
    if info.is_main:
        size = setup.cfg.vocab_size or DEFAULT_VOCAB
        dist.print0(f"training a BPE tokenizer of up to {size} tokens on {len(setup.train_files)} files")
        tok = MidiTokenizer(TokenizerConfig(pedals=setup.cfg.pedals))

        stats, budget = SampleStats(), setup.cfg.bpe_sample_events or None
        sources = expand_pieces(setup.train_files)  # a shard → its pieces, so the sample draws pieces
        tok.train_bpe(sources, size, sample_events=budget, seed=setup.cfg.seed, stats=stats)
        tok.tags = list(setup.tag_names) if setup.cfg.controls == "on" else []
        whole = "all of them" if stats.exhausted else f"a seeded sample of {budget:,} base events"
        dist.print0(f"BPE learned from {stats.pieces_used:,} pieces ({stats.events:,} base events, {whole})")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tok.save(ckpt_dir / ckpt_io.TOKENIZER_FILE)
        dist.print0(f"tokenizer: {len(tok)} tokens, saved to {ckpt_dir / ckpt_io.TOKENIZER_FILE}")
    dist.barrier()
    return tok or ckpt_io.load_tokenizer(ckpt_dir)


def build_datasets(setup: Setup, tok, info: dist.DistInfo):
    cfg = setup.cfg

    def build(files, augment: bool) -> MidiDataset:
        # Training pieces drop controls (seeded per epoch and piece); validation pieces keep them all.
        controls = None
        if cfg.controls == "on":
            p = cfg.control_dropout if files is setup.train_files else 0.0
            controls = ControlPrefix(tok, dropout=p, seed=cfg.seed, tags=setup.tags)
        return MidiDataset(
            files,
            tok,
            cfg.min_sequence_length,
            setup.window,
            cache_dir=cfg.cache_dir or setup.ckpt_dir / "cache",
            augment=augment,
            seed=cfg.seed,
            encode_missing=builder,  # the others read what their builder encoded, never encode themselves
            controls=controls,
        )

    # One builder per cache: global rank 0 for a shared cache, local rank 0 of each node for node-local ones
    # (every node then encodes the same files into its own disk). One global barrier is enough for both:
    # builders fill their caches (in parallel across nodes) while everyone else waits.
    builder = info.is_main if cfg.cache_scope == "shared" else info.local_rank == 0
    if not builder:
        dist.barrier()
    train_ds = build(setup.train_files, cfg.augment)

    train_ds.infill = fim.from_config(cfg, tok)  # infilling examples in training windows only (fim.py)
    val_ds = build(setup.val_files, False) if setup.val_files else None
    if builder:
        dist.barrier()
    record_grid(train_ds, tok, setup.ckpt_dir / ckpt_io.TOKENIZER_FILE, info.is_main)
    sets = {"training": train_ds, "validation": val_ds}
    listing = setup.ckpt_dir / ckpt_io.SKIPPED_FILE
    if info.is_main:  # every run rewrites it: what this run left out
        atomic_write_jsonl(listing, ({"path": f, "set": name, "reason": why} for name, ds in sets.items()
                                     if ds is not None for f, why in ds.skipped.items()))  # fmt: skip
    for name, ds in sets.items():
        if ds is None:
            continue
        if ds.skipped:
            whys = collections.Counter(reason_category(r) for r in ds.skipped.values()).most_common()
            first = next(iter(ds.skipped.items()))
            skipped = (f"{ds.num_skipped} {name} files skipped ({', '.join(f'{k}: {n}' for k, n in whys)};"
                       f" e.g. {first[0]}: {first[1]})")  # fmt: skip
            if len(ds) == 0:
                raise UsageError(f"no usable piece in the {name} set: {skipped}")
            dist.note0(f"{skipped}; every one with its reason in {listing}")
        elif len(ds) == 0:
            raise UsageError(f"no usable piece in the {name} set")
        dist.print0(f"{name} data: {ds.num_pieces} pieces, {len(ds)} windows, {int(ds.lengths.sum())} tokens")
    return train_ds, val_ds


def record_grid(train_ds, tok, path, write: bool) -> None:
    """Where the training pieces start notes (onsetgrid.py), kept in tokenizer.json for generate's grid mask.
    Counted untransposed (transposing moves no onset); every rank computes the same table, rank 0 writes it."""
    from midiforge.tokens.onsetgrid import count_grid

    class Pieces:  # the pieces' token ids, read only when counted
        def __len__(self):
            return train_ds.num_pieces

        def __getitem__(self, i):
            return train_ds.piece_ids(i, 0)

    grid = count_grid(tok, Pieces())
    train_ds.cache.release()
    old = tok.onset_grid
    tok.onset_grid = grid
    if write and (old is None or not np.array_equal(old.counts, grid.counts)):
        tok.save(path)


def model_config(setup: Setup, tok, train_tokens: int):
    """A new run's ModelConfig (its preset chosen from ``train_tokens`` and the device when no shape option was
    given), or the checkpoint's or the base's (their shape and context never change; dropout may)."""
    cfg = setup.cfg
    if setup.ckpt_config is None and setup.base is None:
        dropout = DEFAULT_DROPOUT if cfg.dropout is None else cfg.dropout
        shape = setup.shape
        if setup.auto_preset:
            name, why = sizing.choose_preset(train_tokens, setup.device)
            shape = dict(PRESETS[name])
            dist.print0(f"preset {name} chosen: {why} (--preset overrides)")
        return ModelConfig.from_dict(dict(shape, vocab_size=len(tok), max_seq_len=setup.context, dropout=dropout))
    d = dict((setup.ckpt_config or setup.base.config)["model"])  # a resumed run's, or the --init-from base's
    if cfg.dropout is not None:
        d["dropout"] = cfg.dropout
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{setup.ckpt_dir / ckpt_io.CONFIG_FILE}: bad model config ({e})") from e


def loader(dataset, batch_sampler, tok, setup: Setup, seed: int):
    from functools import partial

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=partial(collate, pad_id=tok.pad_id),
        num_workers=setup.num_workers,
        pin_memory=setup.device.type == "cuda",
        # An explicit generator: creating the iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )


def check_same_data(info: dist.DistInfo, device: torch.device, windows: int, batches: int) -> None:
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


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of rank > 0 when resuming at ``step``: deterministic and different for every rank."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**63


def restore(
    setup: Setup, trainer, state: TrainState, sampler, data_sig: dict, batches_per_epoch: int
) -> dict:
    """Load the checkpoint into the trainer, the state, the sampler and the RNGs; returns its metrics."""
    cfg, ckpt_dir, info = setup.cfg, setup.ckpt_dir, dist.current()
    ck = ckpt_io.load(ckpt_dir)
    try:
        trainer.load_state_dict(
            {"model": ck.model, "optimizer": ck.optimizer, "scaler": ck.state.get("scaler")}
        )
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(
            f"{ckpt_dir}: model/optimizer state does not fit config.json ({str(e).strip().splitlines()[0]})"
        ) from e
    # Format 2 stores TrainState.state_dict(); older checkpoints a "counters" dict with the same keys.
    state.load_state_dict(ck.state.get("train_state") or ck.state["counters"])
    metrics = ck.metrics
    set_rng_state(ck.state["rng"])
    if info.rank > 0:
        # The checkpoint holds rank 0's RNG state only: the other ranks would replay its dropout masks.
        torch.manual_seed(rank_seed(cfg.seed, info.rank, state.step))  # CPU and every CUDA device
    old = ck.config.get("train", {})
    for key in ("learning_rate", "weight_decay"):
        if key in old and old[key] != getattr(cfg, key):
            dist.note0(
                f"{flag(key).split('/')[0]} {getattr(cfg, key)} from the command line replaces the"
                f" checkpoint's {old[key]}"
            )
    if old.get("num_epochs", cfg.num_epochs) != cfg.num_epochs:
        dist.note0(
            f"num_epochs {old['num_epochs']} -> {cfg.num_epochs}: the cosine schedule is rebuilt for"
            f" {cfg.num_epochs * batches_per_epoch} steps (the learning rate continues from that curve)"
        )
    if state.batch:
        if ck.state.get("data") == data_sig:
            sampler.load_state_dict(dict(ck.state["sampler"], position=state.batch))
        else:
            dist.note0(f"data settings changed since the checkpoint: epoch {state.epoch + 1} restarts")
            state.new_epoch(state.epoch)
            metrics["steps"] = [s for s in metrics["steps"] if s[0] <= state.epoch]
    dist.print0(f"resuming {ckpt_dir} at epoch {state.epoch + 1}, batch {state.batch}, step {state.step}")
    return metrics


# ------------------------------------------------------------------------------------------- writing
@contextmanager
def writer_lock(ckpt_dir: Path, info: dist.DistInfo):
    """Rank 0 holds the directory's lock for the whole run (the other ranks never write); every rank learns
    whether it got it, so that a refused start ends all ranks at once instead of leaving them at a barrier."""
    lock, problem = ckpt_io.RunLock(ckpt_dir), None
    if info.is_main:
        try:
            lock.acquire()
            ckpt_io.recover(ckpt_dir)  # only the lock holder may finish or discard an interrupted save
            ckpt_io.recover(ckpt_dir / ckpt_io.BEST_DIR)
        except UsageError as e:
            problem = str(e)
    failed = dist.all_reduce_sum(torch.tensor([float(problem is not None)], device=_collective_device(info)))
    if float(failed[0]):
        raise UsageError(problem or "rank 0 could not lock the checkpoint directory")
    try:
        yield
    finally:
        lock.release()


def _collective_device(info: dist.DistInfo) -> torch.device:
    import torch.distributed as tdist

    if info.enabled and tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class RunParts:
    """The parts of a run that a checkpoint holds (besides the model and optimizer files)."""

    trainer: Trainer
    state: TrainState
    sampler: object
    metrics: dict = field(default_factory=lambda: {"epochs": [], "steps": []})

    def checkpoint_state(self, data_sig: dict) -> dict:
        """state.pth: every stateful part's state_dict (model and optimizer go to their own files)."""
        return {
            "format": 2,
            "train_state": self.state.state_dict(),
            # The DataLoader prefetches: the sampler has handed out more batches than were trained on.
            "sampler": dict(self.sampler.state_dict(), position=self.state.batch),
            "scaler": self.trainer.scaler.state_dict(),
            "rng": rng_state(),
            "data": data_sig,
        }
