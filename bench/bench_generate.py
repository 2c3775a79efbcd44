"""Generation speed: our decode loop (decode.py) against the reference loop it replaced (logits to the host every
token), full recomputation, and Hugging Face ``generate()`` of a LlamaForCausalLM of the same shape (dynamic
cache, and a static cache that transformers compiles itself on CUDA).

    .venv/bin/python bench/bench_generate.py [--presets tiny small] [--batches 1 8] [--tokens 512]
                                             [--device cpu] [--dtype auto] [--threads N]
                                             [--loops decode reference full hf hf-static graph-uncompiled]

Untrained models (the speed does not depend on the weights), vocabulary of the default untrained MidiTokenizer
unless --vocab-size is given, EOS never sampled so every row makes --tokens tokens; weights in --dtype (auto =
bf16 on CUDA, fp32 on the CPU), the same for every row. On CUDA "decode.py" is the whole token step as one CUDA
graph over compiled blocks; "graph-uncompiled" is that graph without compilation. "first s" is the first call
(compilation, capture) of as many tokens, not timed in "new tok/s". "identical" says whether decode.py, the
reference loop and (batch 1) full recomputation gave the same tokens for the same seed: on the CPU only, where
they share the random stream (on CUDA the reference loop samples on the host with a CPU generator).
HF rows need `pip install -e '.[bench]'`; they sample with top_k=0 (full distribution), like ours.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from benchlib import FLOP_FORMULA, flops_per_token, hf_llama, machine, peak_memory, rate, reset_peak

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "tests")
)  # the reference loop lives with the tests
from reference_loop import reference_loop  # noqa: E402

from midiforge.generate.decode import decode  # noqa: E402
from midiforge.model import PRESETS, ModelConfig, Transformer  # noqa: E402
from midiforge.tokens.tokenizer import MidiTokenizer  # noqa: E402

LOOPS = ("decode", "graph-uncompiled", "reference", "full", "hf", "hf-static")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(loop, model, tok, B: int, tokens: int, device, use_kv_cache=True) -> tuple[float, torch.Tensor]:
    banned = [tok.pad_id, tok.bos_id, tok.eos_id]
    # The reference loop samples on the host: its generator is the CPU's, whatever the model's device.
    gen_device = "cpu" if loop is reference_loop else device
    g = torch.Generator(device=gen_device).manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids, _ = loop(
            model, tok, [tok.bos_id], B, tokens, None, use_kv_cache, banned, {"generator": g}, device, None
        )
    sync(device)
    return time.perf_counter() - t0, ids


def hf(model, B: int, tokens: int, device, static: bool = False) -> float:
    bos = torch.ones(B, 1, dtype=torch.long, device=device)
    extra = {"cache_implementation": "static"} if static else {}
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=bos,
            attention_mask=torch.ones_like(bos),
            do_sample=True,
            top_k=0,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=0,
            **extra,
        )
    sync(device)
    assert out.shape == (B, tokens + 1)
    return time.perf_counter() - t0


def rows_for(loops, model, hf_model, tok, B: int, args, device) -> tuple[list, bool | None]:
    """(loop, first-call s or None, timed s, peak memory) per loop, and whether the tokens agreed."""
    rows, ids = [], {}
    runs = {
        "decode": functools.partial(ours, decode, model),
        "graph-uncompiled": functools.partial(ours, functools.partial(decode, compile=False), model),
        "reference": functools.partial(ours, reference_loop, model),
        "full": functools.partial(ours, decode, model, use_kv_cache=False),
    }
    for loop in loops:
        if loop in ("graph-uncompiled",) and device.type != "cuda":
            continue
        if loop == "full" and B != 1:
            continue
        if loop.startswith("hf"):
            if hf_model is None:
                print(f"{loop}: transformers not installed (pip install -e '.[bench]')")
                continue
            static = loop == "hf-static"
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            first = hf(hf_model, B, args.tokens if static else 16, device, static)  # warm-up (compiles)
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
            reset_peak(device)
            t = hf(hf_model, B, args.tokens, device, static)
            name = "HF static cache" + (" (compiled)" if compiled else "") if static else "HF generate()"
            rows.append((name, first if static else None, t, peak_memory(device)))
            continue
        run = runs[loop]
        first = None
        if loop in ("decode", "graph-uncompiled"):  # warm-up of the same length: compile + capture
            first, _ = run(tok, B, args.tokens, device)
        elif device.type == "cuda":
            run(tok, B, 16, device)  # kernels, allocator
        reset_peak(device)
        t, ids[loop] = run(tok, B, args.tokens, device)
        rows.append(({"decode": "decode.py"}.get(loop, loop), first, t, peak_memory(device)))
    same = None
    if device.type == "cpu" and "decode" in ids and len(ids) > 1:
        same = all(
            torch.equal(ids["decode"], other) for k, other in ids.items() if k in ("reference", "full")
        )
    return rows, same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab-size", type=int, help="default: the untrained tokenizer's vocabulary")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--loops", nargs="+", default=["decode", "reference", "full", "hf"], choices=LOOPS)
    p.add_argument("--no-full", action="store_true", help="skip full recomputation (slow)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loops = [x for x in args.loops if not (x == "full" and args.no_full)]
    tok = MidiTokenizer()
    vocab = args.vocab_size or len(tok)
    print(
        f"{machine(device)}; {args.tokens} new tokens per row, vocab {vocab}, window {args.max_seq_len},"
        f" weights {str(dtype).removeprefix('torch.')}"
    )
    print(f"FLOPs: {FLOP_FORMULA}; T = mean context")
    cols = ["preset", "batch", "loop", "new tok/s", "FLOP rate", "peak memory", "s", "first s", "identical"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name in args.presets:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, max_seq_len=args.max_seq_len, **PRESETS[name])
        model = Transformer(cfg).to(device).eval().cast(dtype)
        flops = flops_per_token(cfg, args.tokens // 2, training=False)
        hf_model = hf_llama(cfg, device, dtype) if any(x.startswith("hf") for x in loops) else None
        for B in args.batches:
            rows, same = rows_for(loops, model, hf_model and hf_model.eval(), tok, B, args, device)
            for loop, first, t, mem in rows:
                n = B * args.tokens
                cells = [name, B, loop, f"{n / t:,.0f}", rate(n * flops, t, device), mem, f"{t:.2f}"]
                cells.append("" if first is None else f"{first:.1f}")
                cells.append(str(same) if loop == "decode.py" and same is not None else "")
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
