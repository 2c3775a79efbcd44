"""`midiforge train` / `python train.py`: train a Transformer on MIDI/JSON datasets, resuming automatically.

Read top to bottom, a run is: the :class:`~midiforge.train.config.RunConfig` from the command line; :func:`resolve`
checks it against the files, the device and the checkpoint (every problem at once, nothing written); the
process that writes takes the checkpoint directory's lock; then the tokenizer, the datasets, the model and
:class:`~midiforge.train.trainer.Trainer`, restored from the checkpoint when resuming; then
:func:`midiforge.train.loop.fit`. Checkpoint files are :mod:`midiforge.checkpoint`, process groups
:mod:`midiforge.train.distributed`.
"""

from __future__ import annotations

import os

from midiforge.data.workers import default_jobs as _cpu_cores  # affinity-aware core count; imports no torch

# OpenMP/MKL size their thread pools when torch is first imported, so this must run before `import torch`.
# Processes sharing the machine (DDP workers) split the cores. A value the user set wins.
_LOCAL_PROCS = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(max(1, _cpu_cores() // _LOCAL_PROCS)))

import argparse  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

from midiforge import checkpoint as ckpt_io  # noqa: E402
from midiforge.data.sampler import MidiDatasetSampler  # noqa: E402
from midiforge.data.tagging import signature as controls_signature  # noqa: E402
from midiforge.errors import UsageError, report  # noqa: E402
from midiforge.measure.scoring import count_notes  # noqa: E402
from midiforge.model import Transformer  # noqa: E402
from midiforge.train import accel, finetune, sizing  # noqa: E402
from midiforge.train import distributed as dist  # noqa: E402
from midiforge.train.config import RunConfig, add_arguments, parse_args  # noqa: E402
from midiforge.train.loop import BestKeeper, Loop, SavePolicy, fit  # noqa: E402
from midiforge.train.plot import plot_metrics  # noqa: E402
from midiforge.train.rng import seed_everything  # noqa: E402
from midiforge.train.setup import (  # noqa: E402
    RunParts,
    Setup,
    build_datasets,
    build_tokenizer,
    check_same_data,
    loader,
    model_config,
    resolve,
    restore,
    writer_lock,
)
from midiforge.train.tblog import TensorBoardLog, check_available, log_dir  # noqa: E402
from midiforge.train.trainer import Trainer, TrainState  # noqa: E402

__all__ = ["configure_parser", "main", "run", "train", "resolve"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the repository's ``train.py`` (same messages and exit codes as `midiforge train`)."""
    return report("midiforge train", lambda: launch(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    """`midiforge train` (the dispatcher parsed the command line with :func:`configure_parser`)."""
    return launch(RunConfig.from_args(args))


def launch(cfg: RunConfig) -> int:
    """Check the run, then train in this process, or spawn one worker per GPU when there are several."""
    if cfg.tensorboard is not None:
        check_available()  # before anything is trained
    dist.set_current(dist.from_env())  # one voice per job: messages below come from rank 0 only
    setup = resolve(cfg)
    if setup.resume_state is not None:
        done = setup.resume_state
        if done.get("epoch", 0) >= cfg.num_epochs:
            dist.print0(
                f"{setup.ckpt_dir}: already trained {done['epoch']} epochs (asked {cfg.num_epochs}); nothing to"
                " do. Pass a larger num_epochs to train further."
            )
            return 0
        if cfg.max_steps is not None and done.get("step", 0) >= cfg.max_steps:
            dist.print0(
                f"{setup.ckpt_dir}: already at step {done['step']} (--max-steps {cfg.max_steps}); nothing to do."
            )
            return 0
    n_gpu = torch.cuda.device_count() if setup.device.type == "cuda" else 0
    if not dist.from_env().enabled and cfg.device in (None, "auto") and n_gpu > 1:
        print(f"starting {n_gpu} data-parallel workers, one per GPU", flush=True)
        import torch.multiprocessing as mp

        try:
            dist.spawn(_spawned_worker, n_gpu, (cfg,))
        except mp.ProcessExitedException as e:
            return e.exit_code or 1
        return 0
    return train(cfg, setup)


def _spawned_worker(cfg: RunConfig) -> int:
    return report("midiforge train", train, cfg)


def train(cfg: RunConfig, setup: Setup | None = None) -> int:
    """Train in this process (one rank of a job when launched by torchrun or spawned); ``setup``: the
    launcher's resolve of ``cfg`` in this same process, when it has one."""
    info = dist.from_env()
    dist.set_current(info)
    setup = setup or resolve(cfg)
    torch.set_num_threads(max(1, _cpu_cores() // max(_LOCAL_PROCS, info.local_world_size)))
    if setup.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dist.init(info, setup.device)
    created = not setup.ckpt_dir.exists()
    try:
        with writer_lock(setup.ckpt_dir, info):
            setup = resolve(cfg, setup)  # under the lock: the checkpoint as it is now is what we continue
            for note in setup.notes:
                dist.note0(note)
            try:
                sizing.build_split(setup, info)  # before BPE, which learns from the training side only
                tokenizer = build_tokenizer(setup, info)
                train_ds, val_ds = build_datasets(setup, tokenizer, info)
            except UsageError:
                if created and info.is_main:  # a failed start leaves nothing behind (we hold the lock)
                    shutil.rmtree(setup.ckpt_dir, ignore_errors=True)
                raise
            return _fit(setup, tokenizer, train_ds, val_ds, info)
    finally:
        dist.shutdown()


def _fit(setup, tok, train_ds, val_ds, info: dist.DistInfo) -> int:
    """Build the model and Trainer, restore the checkpoint when resuming, then run :func:`fit`."""
    cfg, device = setup.cfg, setup.device
    model_cfg = model_config(setup, tok, int(train_ds.lengths.sum()))
    trainer, compiled = _build_trainer(setup, model_cfg, tok, info)
    sampler = MidiDatasetSampler(
        train_ds, cfg.batch_budget, shuffle=True, seed=cfg.seed, rank=info.rank, world_size=info.world_size
    )
    batches_per_epoch = len(sampler)
    check_same_data(info, device, len(train_ds), batches_per_epoch)
    data_sig = _data_signature(setup, tok, info)
    run = RunParts(trainer, TrainState(), sampler)
    if setup.resume_state is not None:
        run.metrics = restore(setup, trainer, run.state, sampler, data_sig, batches_per_epoch)
    trainer.set_schedule(run.state.step, cfg.num_epochs * batches_per_epoch)
    dist.print0(
        f"model: {trainer.raw.num_parameters() / 1e6:.2f}M parameters ({model_cfg.n_layer} layers, d_model"
        f" {model_cfg.d_model}, context {model_cfg.max_seq_len}), window {setup.window} tokens, device {device},"
        f" amp {setup.amp}, compile {'on' if compiled else 'off'}, {info.world_size} process(es),"
        f" {batches_per_epoch} batches/epoch/process"
    )
    val_loader, val_notes = _validation(setup, tok, val_ds, info)
    config = _run_config(setup, model_cfg, tok, info, compiled)

    def save() -> None:
        if info.is_main:
            t = trainer.state_dict()
            ckpt_io.save(
                setup.ckpt_dir,
                model=t["model"],
                optimizer=t["optimizer"],
                state=run.checkpoint_state(data_sig),
                metrics=run.metrics,
                config=config,
            )

    best = _best_keeper(setup, trainer, config, info) if val_loader is not None else None

    on = cfg.tensorboard is not None and info.is_main
    tb = TensorBoardLog(log_dir(cfg.tensorboard, setup.ckpt_dir)) if on else None

    def tb_step(status: str, loss_sum: float, tokens: int) -> None:
        tb.step(trainer, run.state, status, loss_sum, tokens)

    def draw() -> None:
        if info.is_main:
            try:
                plot_metrics(run.metrics, setup.ckpt_dir / ckpt_io.PLOT_FILE)
            except Exception as e:  # a plotting problem must never stop training
                dist.note0(f"could not draw {ckpt_io.PLOT_FILE}: {type(e).__name__}: {e}")
        if tb is not None:
            try:
                tb.epoch(run.metrics["epochs"][-1], trainer.raw, tok, device)
            except Exception as e:  # nor a TensorBoard problem
                dist.note0(f"--tensorboard: {type(e).__name__}: {e}")

    code = fit(
        Loop(
            trainer=trainer, state=run.state, metrics=run.metrics, sampler=sampler,  # fmt: skip
            make_loader=lambda epoch: loader(train_ds, sampler, tok, setup, cfg.seed + epoch),
            val_loader=val_loader,
            save=save,
            end_of_epoch=draw,
            val_notes=val_notes,
            on_step=tb_step if tb is not None else None,
            policy=SavePolicy(cfg.save_every_minutes, cfg.max_steps),
            num_epochs=cfg.num_epochs,
            where=str(setup.ckpt_dir),
            # CUDA (fused step): results stay on the GPU for up to READBACK_EVERY steps; CPU: read every step
            readback_every=accel.READBACK_EVERY if trainer.fused else 1,
            best=best,
        )
    )
    if tb is not None:
        tb.close()
    return code


def _best_keeper(setup, trainer, config: dict, info: dist.DistInfo) -> BestKeeper:
    """CKPT/best (rank 0 writes it; every rank keeps the same record) and --patience."""

    def save_best(record: dict) -> None:
        if info.is_main:
            model = trainer.state_dict()["model"]
            tok_bytes = (setup.ckpt_dir / ckpt_io.TOKENIZER_FILE).read_bytes()  # as rank 0 wrote it last
            ckpt_io.save_best(setup.ckpt_dir, model=model, config=config, tokenizer=tok_bytes, record=record)

    return BestKeeper(save_best, ckpt_io.read_best(setup.ckpt_dir), setup.cfg.patience)


def _run_config(setup, model_cfg, tok, info: dist.DistInfo, compiled: bool) -> dict:
    """What config.json records about this run: the model, the options, how it runs, the tokenizer."""
    run = {"window": setup.window, "amp": setup.amp, "world_size": info.world_size, "device": str(setup.device),
           "compile": compiled}  # fmt: skip
    return {
        "model": model_cfg.to_dict(),
        "train": setup.cfg.to_dict(),
        "run": run,
        "tokenizer": ckpt_io.tokenizer_record(tok),
        **finetune.records(setup),  # where the weights came from (--init-from, --lora)
    }


def _build_trainer(setup, model_cfg, tok, info: dist.DistInfo):
    """(the Trainer of a freshly initialised model, whether it is compiled); every rank starts the same."""
    cfg, device = setup.cfg, setup.device
    seed_everything(cfg.seed)
    model = Transformer(model_cfg)
    started = finetune.prepare(model, setup, tok)  # the base's weights, adapters, frozen blocks (finetune.py)
    if started:
        dist.print0(started)
    if info.enabled:
        # The same init everywhere (drawn above), different dropout masks from here on.
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
    compiled = accel.compile_enabled(cfg.compile, device)
    rec = finetune.records(setup).get("lora")
    trainer = Trainer(model, device, info, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                      amp=setup.amp, compile=compiled, adapters_only=rec is not None,
                      b_lr_ratio=(rec or {}).get("b_lr_ratio", 1.0))  # fmt: skip
    return trainer, compiled


def _data_signature(setup, tok, info: dist.DistInfo) -> dict:
    """What the saved sampler position means: a resume with other data, batching or tokenizer is refused."""
    cfg = setup.cfg
    return {
        "files": [str(f) for f in setup.train_files],
        "window": setup.window,
        "augment": cfg.augment,
        "min": cfg.min_sequence_length,
        "budget": cfg.batch_budget,
        "seed": cfg.seed,
        "world_size": info.world_size,
        "tokenizer": tok.fingerprint,
        # Only runs with controls carry the key: checkpoints from before controls keep their signature.
        **(controls_signature(setup.tags, cfg.control_dropout) if cfg.controls == "on" else {}),
    }


def _validation(setup, tok, val_ds, info: dist.DistInfo):
    """(this rank's validation loader, the notes behind the validation tokens), or (None, 0) without -v."""
    if val_ds is None:
        return None, 0
    cfg = setup.cfg
    # Once per run: the notes behind the validation tokens, for validation bits per note.
    val_notes = sum(count_notes(tok, val_ds.piece_ids(p, 0)) for p in range(val_ds.num_pieces))
    val_batches = list(MidiDatasetSampler(val_ds, cfg.batch_budget, shuffle=False, seed=cfg.seed))
    return loader(val_ds, val_batches[info.rank :: info.world_size], tok, setup, cfg.seed), val_notes
