"""Starting a run from another run: ``--init-from``, ``--lora``, ``--freeze``.

``--init-from BASE`` takes BASE's weights and tokenizer and nothing else: the optimizer, the schedule and the
training state start afresh, on the new run's data. The tokenizer is copied (its BPE merges and token ids are
the model's language, so they cannot change); style tags that the new data brings take the next free CTL_TAG
slots, whose embedding rows are initialised from the base (:func:`midiforge.lora.new_tag_rows`) while every
other row is carried over bit for bit. ``config.json["init_from"]`` records the base's path, fingerprint (of
its ``model.pth``) and step.

``--lora RANK`` (with ``--init-from``) trains low-rank adapters only (:mod:`midiforge.lora`); the checkpoint
stores them and ``config.json["lora"]``, which names the base. ``--freeze N`` keeps the embedding (and the
tied output head) and the first N blocks fixed.

Everything here is read and checked before the run writes anything (see :func:`read_base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from midiforge import checkpoint as ckpt_io
from midiforge import lora
from midiforge.errors import UsageError


@dataclass
class Base:
    """The checkpoint a run starts from, as read once (weights, tokenizer, where it was)."""

    path: Path
    config: dict  # its config.json
    weights: dict  # its model.pth state_dict
    tokenizer: object  # its MidiTokenizer
    fingerprint: str
    step: int | None

    def record(self) -> dict:
        """What config.json stores about the base: enough to find it again and to notice it changed."""
        return {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "step": self.step,
            "tags": len(self.tokenizer.tags),
        }


def read_base(path: Path, errors: list[str]) -> Base | None:
    """Read the base checkpoint; a problem is appended to ``errors`` (one line) and None returned."""
    flag = f"--init-from {path}"
    try:
        if not Path(path).is_dir():
            raise UsageError("no such checkpoint directory")
        weights, config, fingerprint, state = ckpt_io.read_weights(path)
        step = (state.get("train_state") or {}).get("step", config.get("step"))
        if "lora" in config:
            raise UsageError(
                "it is a LoRA checkpoint (adapters only); fold it into a plain one first with"
                f" `midiforge merge {path} -o DIR` and start from DIR"
            )
        tok = ckpt_io.load_tokenizer(path)
        if tok is None:
            raise UsageError(f"it has no {ckpt_io.TOKENIZER_FILE}")
        ckpt_io.check_tokenizer(path, tok, config)
    except UsageError as e:
        errors.append(f"{flag}: {e}")
        return None
    return Base(Path(path).resolve(), config, weights, tok, fingerprint, step)


def base_problems(base: Base, cfg, own_tok, errors: list[str], notes: list[str]) -> None:
    """Options that contradict the base: another shape, another tokenizer, another context."""
    diff = cfg.shape_differences(base.config["model"])
    if diff:
        errors.append(
            f"--init-from {base.path}: its model has another shape: {', '.join(diff)}; omit the shape options"
            " (a fine-tuned model keeps its base's shape)"
        )
    if own_tok is not None and own_tok.fingerprint != base.tokenizer.fingerprint:
        errors.append(
            f"--init-from {base.path}: {cfg.ckpt_path} already holds another tokenizer (fingerprint"
            f" {own_tok.fingerprint}, the base's is {base.tokenizer.fingerprint}); use a new directory"
        )
    if cfg.vocab_size is not None:
        notes.append("--vocab-size ignored: --init-from takes the base's tokenizer")


def option_problems(cfg, n_layer: int | None, errors: list[str]) -> None:
    """--lora/--lora-alpha/--lora-plus/--lora-targets/--freeze on their own and together (n_layer: the
    model's, when known)."""
    if cfg.lora is not None:
        if cfg.lora < 1:
            errors.append(f"--lora must be a positive rank, got {cfg.lora}")
        if cfg.init_from is None:
            errors.append("--lora needs --init-from BASE: adapters adapt a trained model")
        if cfg.freeze is not None:
            errors.append("--lora and --freeze exclude each other (LoRA keeps every base weight fixed)")
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        errors.append(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    if cfg.lora_plus is not None and not cfg.lora_plus > 0:
        errors.append(f"--lora-plus must be positive, got {cfg.lora_plus}")
    bad = [
        str(t) for t in cfg.lora_targets or () if str(t) not in lora.TARGETS
    ]  # list options parse as paths
    if bad:
        errors.append(f"--lora-targets: unknown {', '.join(bad)}; choose from {', '.join(lora.TARGETS)}")
    if cfg.freeze is not None and not 0 <= cfg.freeze <= (n_layer if n_layer is not None else cfg.freeze):
        errors.append(f"--freeze must be between 0 and the model's {n_layer} blocks, got {cfg.freeze}")


def lora_record(cfg, base: Base) -> dict:
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else lora.DEFAULT_ALPHA_PER_RANK * cfg.lora
    return {
        "rank": cfg.lora,
        "alpha": alpha,
        "targets": list(dict.fromkeys(str(t) for t in cfg.lora_targets or lora.DEFAULT_TARGETS)),
        "b_lr_ratio": cfg.lora_plus if cfg.lora_plus is not None else lora.DEFAULT_B_LR_RATIO,
        "base": base.record(),
    }


def init_weights(model: torch.nn.Module, base: Base, tok) -> None:
    """Copy the base's weights into ``model`` exactly, then give the tags new since the base their rows."""
    try:
        model.load_state_dict(base.weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"--init-from {base.path}: its weights do not fit ({first})") from e
    # An untied head (a merged head adapter) keeps its rows of the new tags: the base pushed them down as outputs,
    # which is what a tag's output row should be (tags are read, never written).
    lora.new_tag_rows(
        model.tok_emb.weight.data, lora.tag_token_ids(tok), len(base.tokenizer.tags), len(tok.tags)
    )


def freeze(model: torch.nn.Module, n: int) -> None:
    """Fix the embedding, the output head (the same tensor unless a merged head adapter untied them) and the
    first ``n`` blocks."""
    model.tok_emb.weight.requires_grad_(False)
    model.head.weight.requires_grad_(False)
    for block in model.blocks[:n]:
        for p in block.parameters():
            p.requires_grad_(False)


def prepare(model: torch.nn.Module, setup, tok) -> str:
    """Turn the freshly built model into this run's starting point; returns a line for the log.

    A new run from a base gets its weights; a LoRA run (new or resumed) gets the base's weights and then
    adapters (a resumed one loads its own adapter tensors afterwards, in :func:`restore`); --freeze fixes
    parameters. Resumed full runs load their own weights later and need nothing here but the freeze.
    """
    cfg, base = setup.cfg, setup.base
    line = ""
    resuming = setup.resume_state is not None
    if base is not None and (not resuming or "lora" in (setup.ckpt_config or {})):
        init_weights(model, base, tok)
        line = f"starting from {base.path} (step {base.step}, fingerprint {base.fingerprint})"
    rec = records(setup).get("lora")
    if rec is not None:
        lora.attach(model, rec["rank"], rec["alpha"], rec["targets"])
        n, total = lora.trainable_parameters(model), sum(p.numel() for p in model.parameters())
        line += f"; LoRA rank {rec['rank']}: {n:,} trainable parameters ({n / total:.2%})"
    if cfg.freeze is not None:  # --freeze 0: the embedding (and tied head) only
        freeze(model, cfg.freeze)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        line += f"; embedding and {cfg.freeze} blocks frozen, {n:,} parameters train"
    return line.lstrip("; ")


def resolve_base(cfg, ckpt_config: dict | None, own_tok, errors: list[str], notes: list[str]) -> Base | None:
    """The base this run needs (None: none), read and checked; problems go to ``errors``.

    A new run needs it for ``--init-from``; a resumed LoRA run needs it again (its checkpoint holds only the
    adapters), and it must still be the model the adapters were trained on.
    """
    if ckpt_config is None:
        base = read_base(cfg.init_from, errors) if cfg.init_from is not None else None
        if base is not None:
            base_problems(base, cfg, own_tok, errors, notes)
        option_problems(cfg, base.config["model"].get("n_layer") if base else None, errors)
        return base
    rec, started = ckpt_config.get("lora"), ckpt_config.get("init_from")
    option_problems(cfg, ckpt_config["model"].get("n_layer"), errors)
    if cfg.lora is not None and (rec or {}).get("rank") != cfg.lora:
        have = f"rank {rec['rank']}" if rec else "no adapters"
        errors.append(f"--lora {cfg.lora}: {cfg.ckpt_path} was trained with {have}; use a new directory")
    if cfg.init_from is not None and started and Path(cfg.init_from).resolve() != Path(started["path"]):
        notes.append(f"--init-from ignored: resuming {cfg.ckpt_path}, which started from {started['path']}")
    if not rec:
        return None
    base = read_base(Path(rec["base"]["path"]), errors)
    if base is not None and base.fingerprint != rec["base"]["fingerprint"]:
        errors.append(
            f"{cfg.ckpt_path}: its base {base.path} has changed since the adapters were trained (fingerprint"
            f" {base.fingerprint}, expected {rec['base']['fingerprint']})"
        )
    return base


def records(setup) -> dict:
    """config.json's ``init_from`` and ``lora`` sections (a resumed run keeps the ones it started with)."""
    if setup.ckpt_config is not None:
        return {k: setup.ckpt_config[k] for k in ("init_from", "lora") if k in setup.ckpt_config}
    if setup.base is None:
        return {}
    out = {"init_from": setup.base.record()}
    if setup.cfg.lora is not None:
        out["lora"] = lora_record(setup.cfg, setup.base)
    return out
