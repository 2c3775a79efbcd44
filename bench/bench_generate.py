"""Generation speed: our decode loop (decode.py) against the reference loop it replaced (logits to the host every
token), full recomputation, and Hugging Face ``generate()`` of a LlamaForCausalLM of the same shape.

    .venv/bin/python bench/bench_generate.py [--presets tiny small] [--batches 1 8] [--tokens 512]
                                             [--device cpu] [--threads N] [--no-full]

Untrained models (the speed does not depend on the weights), vocabulary of the default untrained MidiTokenizer
unless --vocab-size is given, EOS never sampled so every row makes --tokens tokens, fp32. "identical" says whether
the decode loop, the reference loop and (batch 1) full recomputation gave the same tokens for the same seed.
HF rows need `pip install -e '.[bench]'`; they sample with top_k=0 (full distribution), like ours.
"""

from __future__ import annotations

import argparse
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


def ours(loop, model, tok, B: int, tokens: int, device, use_kv_cache=True) -> tuple[float, torch.Tensor]:
    banned = [tok.pad_id, tok.bos_id, tok.eos_id]
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids, _ = loop(
            model, tok, [tok.bos_id], B, tokens, None, use_kv_cache, banned, {"generator": g}, device, None
        )
    return time.perf_counter() - t0, ids


def hf(model, B: int, tokens: int, device) -> float:
    bos = torch.ones(B, 1, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert out.shape == (B, tokens + 1)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab-size", type=int, help="default: the untrained tokenizer's vocabulary")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-full", action="store_true", help="skip full recomputation (slow)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = MidiTokenizer()
    vocab = args.vocab_size or len(tok)
    print(
        f"{machine(device)}; {args.tokens} new tokens per row, vocab {vocab}, window {args.max_seq_len}, fp32"
    )
    print(f"FLOPs: {FLOP_FORMULA}; T = mean context")
    cols = ["preset", "batch", "loop", "new tok/s", "FLOP rate", "peak memory", "s", "identical"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name in args.presets:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, max_seq_len=args.max_seq_len, **PRESETS[name])
        model = Transformer(cfg).to(device).eval()
        flops = flops_per_token(cfg, args.tokens // 2, training=False)
        hf_model = hf_llama(cfg, device)
        for B in args.batches:
            ours(decode, model, tok, B, 16, device)  # warm-up (allocator, kernels, CUDA graph capture path)
            rows = []
            reset_peak(device)
            t_fast, ids_fast = ours(decode, model, tok, B, args.tokens, device)
            rows.append(("decode.py", t_fast, peak_memory(device)))
            reset_peak(device)
            t_ref, ids_ref = ours(reference_loop, model, tok, B, args.tokens, device)
            rows.append(("reference loop", t_ref, peak_memory(device)))
            same = torch.equal(ids_fast.cpu(), ids_ref.cpu())
            if B == 1 and not args.no_full:
                t_full, ids_full = ours(decode, model, tok, B, args.tokens, device, use_kv_cache=False)
                rows.append(("full recompute", t_full, peak_memory(device)))
                same = same and torch.equal(ids_full.cpu(), ids_fast.cpu())
            if hf_model is not None:
                hf(hf_model.eval(), B, 16, device)  # warm-up
                reset_peak(device)
                rows.append(("HF generate()", hf(hf_model, B, args.tokens, device), peak_memory(device)))
            for loop, t, mem in rows:
                n = B * args.tokens
                cells = [name, B, loop, f"{n / t:,.0f}", rate(n * flops, t, device), mem, f"{t:.2f}"]
                cells.append(str(same) if loop == "decode.py" else "")
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
