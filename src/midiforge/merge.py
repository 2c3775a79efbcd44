"""`midiforge merge CKPT -o OUT`: fold a LoRA checkpoint's adapters into a plain model directory.

OUT gets ``model.pth`` (base weights + ``alpha/rank * B @ A`` per adapted projection; an adapted head gets
weights of its own, the embedding stays the base's),
``tokenizer.json`` and ``config.json``, whose ``merged_from`` names the LoRA checkpoint and ``init_from`` its
base. It holds no training state: `generate`, `evaluate`, `studio`, `export` and ``train --init-from`` read it;
training does not resume into it.
"""

from __future__ import annotations

from pathlib import Path

from midiforge import checkpoint as ckpt_io
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.options import add_checkpoint


def merge(ckpt: str | Path, out: str | Path) -> dict:
    """Write the merged directory; returns its config.json. UsageError for anything but a LoRA checkpoint."""
    ckpt, out = Path(ckpt), Path(out)
    cfg = ckpt_io.read_config(ckpt) if ckpt.is_dir() else None
    if cfg is None:
        raise UsageError(f"{ckpt}: no such checkpoint directory")
    if "lora" not in cfg:
        raise UsageError(f"{ckpt}: not a LoRA checkpoint (its weights are plain already; nothing to merge)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"-o {out}: exists and is not an empty directory; choose a new one")
    model, _ = ckpt_io.load_inference(ckpt)  # the base, checked by fingerprint, with the adapters folded in
    source = ckpt_io.provenance(ckpt)
    lora = {k: cfg["lora"][k] for k in ("rank", "alpha", "targets")}
    config = {
        "model": model.config.to_dict(),  # a merged head adapter unties the head (tie_head: false)
        "train": cfg.get("train", {}),
        "tokenizer": cfg["tokenizer"],
        "init_from": cfg["lora"]["base"],
        "merged_from": dict(source, lora=lora),
        "step": source["step"],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ckpt_io.TOKENIZER_FILE, (ckpt / ckpt_io.TOKENIZER_FILE).read_bytes())
    atomic_write_bytes(out / ckpt_io.MODEL_FILE, ckpt_io.torch_bytes(model.state_dict()))
    atomic_write_bytes(out / ckpt_io.CONFIG_FILE, ckpt_io.json_bytes(config))  # last: the directory is whole
    return config


def configure_parser(p) -> None:
    add_checkpoint(p, "a LoRA checkpoint folder (train --lora)")
    p.add_argument("-o", "--output", type=Path, required=True, help="new directory for the merged model")


def run(args) -> int:
    config = merge(args.checkpoint, args.output)
    print(f"merged {args.checkpoint} (LoRA rank {config['merged_from']['lora']['rank']}) into {args.output}")
    return 0
