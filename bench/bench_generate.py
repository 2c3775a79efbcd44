"""Generation speed with and without the KV cache, and a check that both give the same tokens.

    .venv/bin/python bench/bench_generate.py [--presets tiny small] [--tokens 512] [--device cpu] [--threads N]

Untrained models of each preset (the speed does not depend on the weights), vocabulary of the default
untrained MidiTokenizer unless --vocab-size is given, one sample, EOS ignored so every run makes --tokens tokens.
Goal: the KV cache at least 5x faster for 512 tokens on a CPU, with identical output.
"""

from __future__ import annotations

import argparse
import time

import torch

from midiforge.generate import generate
from midiforge.model import PRESETS, ModelConfig, Transformer
from midiforge.tokenizer import MidiTokenizer


def timed(model, tok, tokens: int, use_kv_cache: bool, device: str) -> tuple[float, list[int]]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    (r,) = generate(
        model, tok, max_new_tokens=tokens, seed=0, ignore_eos=True, use_kv_cache=use_kv_cache, device=device
    )
    return time.perf_counter() - t0, r.ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab-size", type=int, help="default: the untrained tokenizer's vocabulary")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = MidiTokenizer()
    vocab = args.vocab_size or len(tok)
    print(
        f"{args.tokens} new tokens, vocab {vocab}, window {args.max_seq_len}, {args.device}, {torch.get_num_threads()} threads"
    )
    header = f"{'preset':<7} {'params':>8} {'cache s':>8} {'cache tok/s':>12} {'no-cache s':>11} {'tok/s':>8} {'speed-up':>9} identical"
    print(header)
    print("-" * len(header))
    for name in args.presets:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, max_seq_len=args.max_seq_len, **PRESETS[name])
        model = Transformer(cfg).to(args.device).eval()
        timed(model, tok, 16, True, args.device)  # warm-up (allocator, kernels)
        t_cache, ids_cache = timed(model, tok, args.tokens, True, args.device)
        t_full, ids_full = timed(model, tok, args.tokens, False, args.device)
        print(
            f"{name:<7} {model.num_parameters() / 1e6:>7.2f}M {t_cache:>8.2f} {args.tokens / t_cache:>12.0f} "
            f"{t_full:>11.2f} {args.tokens / t_full:>8.0f} {t_full / t_cache:>8.1f}x {ids_cache == ids_full}"
        )


if __name__ == "__main__":
    main()
