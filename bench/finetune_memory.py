"""Peak training memory of full fine-tuning and of LoRA, one fresh process per variant (used by bench_finetune).

    .venv/bin/python bench/finetune_memory.py --preset tiny --variant lora [--rank 8] [--targets qkv proj]
        [--malloc exact]

Prints one JSON line. The model is built at the preset (the weights' values do not change the memory), made
trainable as the variant would be (``full``: every parameter; ``lora``: :func:`midiforge.lora.attach`, the base
frozen; ``lora-peft``: the same adapters through peft's layer, the usual alternative, which midiforge used
before), and trained for a few optimizer steps by our :class:`~midiforge.train.trainer.Trainer` (AdamW, gradient
clipping) on a fixed batch the shape of the bench's (8 windows of 256 tokens). The figure is the peak resident
set size during those steps (the kernel's high-water mark, VmHWM, reset just before them) minus the resident size
before them (after one tiny forward and backward pass that loads what torch loads lazily): what training adds
on top of the model and the interpreter -- activations kept for backward, gradients, optimizer state.
tracemalloc cannot see torch's CPU tensors and torch has no CPU allocator statistics, so the kernel's count is the
one that sees everything. Not ``getrusage``'s ru_maxrss: a process keeps the ru_maxrss of the process it was
forked from (the bench, several hundred MB after scoring) across exec.

``--malloc exact`` fixes glibc's mmap threshold at 16 kB (``mallopt``; otherwise it rises to 32 MB after the
first large free) and trims the heap at every free: each tensor then gets pages of its own, given back when it
is freed, so the peak resident size is the peak of the live tensors. With the default allocator it is also
what the heap keeps after freeing (fragmentation), which many short-lived temporaries increase: what a user
of the default allocator sees. ``peak_mb`` (the whole process: interpreter, imports, model) is printed too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (VmRSS: resident now; VmHWM: the peak since exec or the last reset)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak() -> None:
    """Set VmHWM back to the current resident size (``clear_refs`` 5, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def exact_malloc() -> None:
    """glibc: every allocation of 16 kB or more gets its own mapping and is unmapped when freed."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (libc.mallopt(m_mmap_threshold, 16 * 1024) and libc.mallopt(m_trim_threshold, 0)):
        raise SystemExit("finetune_memory: mallopt failed")


def attach_peft(model, rank: int, alpha: float, targets) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model)


def main() -> None:
    from midiforge import lora
    from midiforge.model import PRESETS, ModelConfig, Transformer
    from midiforge.train.distributed import DistInfo
    from midiforge.train.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--variant", choices=["full", "lora", "lora-peft"], required=True)
    p.add_argument("--malloc", choices=["glibc", "exact"], default="glibc")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=list(lora.DEFAULT_TARGETS))
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if args.malloc == "exact":
        exact_malloc()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = ModelConfig(vocab_size=args.vocab, max_seq_len=args.window, **PRESETS[args.preset])
    model = Transformer(cfg)
    total = sum(t.numel() for t in model.parameters())
    if args.variant == "lora":
        lora.attach(model, args.rank, 2.0 * args.rank, args.targets)
    elif args.variant == "lora-peft":
        attach_peft(model, args.rank, 2.0 * args.rank, args.targets)
    trains = lora.trainable_parameters(model)
    trainer = Trainer(
        model, torch.device("cpu"), DistInfo(), learning_rate=1e-3, weight_decay=0.01,
        adapters_only=args.variant != "full",
    )  # fmt: skip
    trainer.set_schedule(0, args.steps)
    x = torch.randint(0, args.vocab, (args.batch, args.window))  # (B, T)
    y = torch.roll(x, -1, 1)  # (B, T)
    # The first backward pass loads kernels and libraries lazily (about 100-300 MB of resident code and
    # buffers whatever the model): pay it on a one-row, 8-token batch, with no optimizer step, before measuring.
    trainer.model(x[:1, :8]).sum().backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = status_mb("VmRSS")
    reset_peak()
    for _ in range(args.steps):
        trainer.train_step(x, y, float(x.numel()))
    peak = status_mb("VmHWM")
    out = {
        "preset": args.preset,
        "variant": args.variant,
        "malloc": args.malloc,
        "parameters": total,
        "trains": trains,
        "rss_before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "training_peak_mb": round(peak - before, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
