"""Training throughput: our length-budget MidiDatasetSampler against naive fixed-size random batches.

    .venv/bin/python bench/bench_train.py [--files 60] [--steps 30] [--budget 524288] [--window 256]
                                          [--preset tiny]
                                          [--num-workers 0] [--device cpu]

Both batchers get the same memory budget: ours packs sum(L**2) <= budget per batch; the naive one takes
B = budget // T_max**2 random samples per batch (T_max = the window), the usual fixed batch size that is safe for
the longest sample. Same tiny model, same optimizer step (midiforge.train.trainer.Trainer), a fixed number of steps.
Reported: real (non-padding) tokens per second, padding fraction (over the whole epoch plan), and the share of
the step time spent waiting for the next batch (goal < 5%).

--mode models [--presets small base] [--compile-rows] [--rows ...] [--profile]: ours against a Hugging Face
LlamaForCausalLM of the same shape on the same batches, eager and compiled (ours by region: one block compiled
for every layer; HF whole), bf16 autocast on CUDA. "first step s" includes compilation; MFU is against the
card's dense bf16 peak (benchlib.peak_flops). --profile prints one eager step's busiest kernels.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import FLOP_FORMULA, HFLogits, flops_per_token, hf_llama, machine, peak_memory, rate, reset_peak

from midiforge.data.dataset import MidiDataset
from midiforge.data.sampler import IGNORE_INDEX, MidiDatasetSampler, collate, padding_fraction
from midiforge.model import PRESETS, ModelConfig, Transformer
from midiforge.notes.midi import find_files
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import distributed as dist
from midiforge.train.trainer import Trainer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pop909"


def naive_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(len(lengths))
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def run(name, dataset, batches, tok, args, window) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tok), max_seq_len=window, dropout=0.0, **PRESETS[args.preset])
    device = torch.device(args.device)
    trainer = Trainer(Transformer(cfg), device, dist.DistInfo(), learning_rate=1e-3, weight_decay=0.01)
    trainer.set_schedule(0, args.steps)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches[: args.steps + 2],
        num_workers=args.num_workers,
        collate_fn=lambda b: collate(b, tok.pad_id),
        generator=torch.Generator().manual_seed(0),
    )
    it = iter(loader)
    x, y = next(it)  # warm-up step (first-call overheads), not timed
    trainer.train_step(x.to(device), y.to(device), float((y != IGNORE_INDEX).sum()))
    wait = tokens = padded = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t
        n = int((y != IGNORE_INDEX).sum())
        trainer.train_step(x.to(device), y.to(device), float(n))
        tokens += n
        padded += y.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {
        "batcher": name,
        "batches": len(batches),
        "tok/s": tokens / total,
        "padding (epoch)": padding_fraction(dataset.lengths, batches),
        "padding (timed)": 1 - tokens / padded,
        "data wait": wait / total,
        "mean batch": float(np.mean([len(b) for b in batches])),
    }


ROWS = ("ours-eager", "ours-compiled", "hf-eager", "hf-compiled")


def model_rows(dataset, batches, tok, args, window) -> list[dict]:
    """Ours and HF LlamaForCausalLM, eager and compiled (ours: one block compiled for every layer; HF: the
    whole model): same shape, same batches, same Trainer step, rows in the order of --rows."""
    device = torch.device(args.device)
    amp = "bf16" if device.type == "cuda" else "off"
    data = [collate([dataset[i] for i in b], tok.pad_id) for b in batches[: args.steps + 1]]
    print(f"\n{machine(device)}; amp {amp}; FLOPs: {FLOP_FORMULA}")
    rows = []
    for preset in args.presets:
        cfg = ModelConfig(vocab_size=len(tok), max_seq_len=window, dropout=0.0, **PRESETS[preset])
        for kind in args.rows:
            if kind.endswith("compiled") and not args.compile_rows:
                continue
            torch.manual_seed(0)
            model = Transformer(cfg) if kind.startswith("ours") else hf_llama(cfg, device)
            if model is None:
                print(f"{kind}: transformers not installed (pip install -e '.[bench]')")
                continue
            model = model if kind.startswith("ours") else HFLogits(model)
            trainer = Trainer(model, device, dist.DistInfo(), learning_rate=1e-3, weight_decay=0.01, amp=amp,
                              compile=kind.endswith("compiled"))  # fmt: skip
            trainer.set_schedule(0, args.steps + 2)
            rows.append(timed_row(trainer, data, cfg, device, preset, kind))
            print(rows[-1], flush=True)
            if args.profile and kind.endswith("eager"):
                profile_step(trainer, data[-1], device, f"{preset} {kind}")
    return rows


def timed_row(trainer, data, cfg, device, preset: str, kind: str) -> dict:
    """The first step (compilation, first-call costs) timed alone, then the rest without host syncs."""
    reset_peak(device)
    t = time.perf_counter()
    x, y = data[0]  # first step: compilation (when on) and first-call overheads
    trainer.train_step(x.to(device), y.to(device), float((y != IGNORE_INDEX).sum()))
    first = time.perf_counter() - t
    tokens = flops = 0.0
    t0 = time.perf_counter()
    for x, y in data[1:]:
        n = float((y != IGNORE_INDEX).sum())
        trainer.train_step_async(x.to(device, non_blocking=True), y.to(device, non_blocking=True), n)
        tokens += n
        flops += n * flops_per_token(cfg, x.size(1), training=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    return {
        "preset": preset,
        "model": kind.replace("-", " ").replace("hf", "HF Llama"),
        "tok/s": f"{tokens / total:,.0f}",
        "FLOP rate": rate(flops, total, device),
        "peak memory": peak_memory(device),
        "first step s (compile)": f"{first:.1f}",
        "steady s/step": f"{total / max(1, len(data) - 1):.3f}",
    }


def profile_step(trainer, batch, device, label: str) -> None:
    """One more step under torch.profiler: kernel count and the ops that took the most device (CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    x, y = batch
    n = float((y != IGNORE_INDEX).sum())
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        trainer.train_step(x.to(device), y.to(device), n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\nprofile of one step, {label}: {kernels} device kernels, {wall:.3f} s wall (profiled)")
    print(events.table(sort_by=key, row_limit=12, max_name_column_width=60))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--files", type=int, default=60)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--budget", type=int, default=8 * 256**2, help="-b: sum(L**2) per batch (default 8*256**2)"
    )
    p.add_argument("--window", type=int, default=256, help="-e: longest window (default 256: naive B = 8)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed runs per batcher, alternating; best is shown"
    )
    p.add_argument(
        "--mode",
        choices=("batcher", "models"),
        default="batcher",
        help="batcher: our sampler vs naive batches; models: ours vs HF Llama, eager/compiled, per preset",
    )
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    p.add_argument("--compile-rows", action="store_true", help="models mode: also the compiled rows")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="models mode: rows, in order")
    p.add_argument("--profile", action="store_true", help="models mode: profile one step of each eager row")
    args = p.parse_args()
    if not args.corpus.is_dir():
        print(f"corpus not found: {args.corpus}", file=sys.stderr)
        return 1
    files = find_files([args.corpus])[: args.files]
    window = min(args.window, math.isqrt(args.budget))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        tok = MidiTokenizer()
        tok.train_bpe([str(f) for f in files], args.vocab_size)
        ds = MidiDataset(files, tok, 8, window, cache_dir=tmp, augment=False)
        print(
            f"{len(files)} files, {len(ds)} windows <= {window} tokens, {int(ds.lengths.sum())} tokens,"
            f" vocabulary {len(tok)}, setup {time.perf_counter() - t:.1f} s; preset {args.preset},"
            f" budget {args.budget}, {args.steps} timed steps, {torch.get_num_threads()} threads"
        )
        ours = list(MidiDatasetSampler(ds, args.budget, shuffle=True, seed=0))
        if args.mode == "models":
            rows = model_rows(ds, ours, tok, args, window)
            _table(rows)
            return 0
        naive = naive_batches(ds.lengths, max(1, args.budget // window**2), seed=0)
        naive_name = f"naive B={max(1, args.budget // window**2)}"
        rows = {}
        for _ in range(args.repeats):  # alternate, keep each batcher's best run: the machine may be shared
            for name, batches in (("MidiDatasetSampler", ours), (naive_name, naive)):
                r = run(name, ds, batches, tok, args, window)
                if name not in rows or r["tok/s"] > rows[name]["tok/s"]:
                    rows[name] = r
        rows = list(rows.values())
    _table(
        [
            {
                k: f"{v:.1%}"
                if k.startswith(("padding", "data"))
                else f"{v:,.0f}"
                if isinstance(v, float) and k == "tok/s"
                else f"{v:.1f}"
                if isinstance(v, float)
                else str(v)
                for k, v in r.items()
            }
            for r in rows
        ]
    )
    print(f"speed-up (tok/s): {rows[0]['tok/s'] / rows[1]['tok/s']:.2f}x")
    return 0


def _table(rows: list[dict]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
