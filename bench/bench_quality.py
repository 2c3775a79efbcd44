"""Which token stream learns better at equal compute: ours, or MidiTok REMI(use_programs) + BPE?

Both streams have the same vocabulary size (BPE trained on the same training pieces). The same model (a
midiforge Transformer of one preset, same seed) is trained for the same number of steps on batches of the same
number of tokens (random windows of ``--context`` tokens of ``[BOS] + ids + [EOS]``), with the same optimizer
and schedule. Then each model scores the held-out pieces with sliding windows (midiforge.measure.scoring: every token
once, stride = context / 2), and the table reports bits per note and bits per second: the total negative
log-likelihood over the number of notes (of the source files, the same for both) and over their length in
seconds. Those compare across tokenizers; bits per token and perplexity do not.

    .venv/bin/python bench/bench_quality.py            # POP909 from ../shared/corpus, ~15 min on 2 cores

Needs MidiTok 3.1 (the dev extra). A fixed split: the first ``--train`` files (sorted by name) train, the next
``--test`` are held out.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from midiforge.measure import scoring
from midiforge.measure.stats import piece_seconds
from midiforge.model import PRESETS, ModelConfig, Transformer
from midiforge.notes.read import read_notes
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train.trainer import lr_factor

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}"
    )


def ours(train: list[Path], test: list[Path], vocab: int):
    tok = MidiTokenizer()
    tok.train_bpe([str(f) for f in train], vocab)
    enc = [np.asarray(tok.encode(f), np.int64) for f in train + test]
    return "midiforge (ours) + BPE", len(tok), enc[: len(train)], enc[len(train) :]


def miditok(train: list[Path], test: list[Path], vocab: int):
    from miditok import REMI, TokenizerConfig

    tok = REMI(TokenizerConfig(use_programs=True))
    tok.train(vocab_size=vocab, files_paths=[str(f) for f in train])
    assert (tok["PAD_None"], tok["BOS_None"], tok["EOS_None"]) == (0, 1, 2)

    def ids(f):
        seq = tok.encode(f)
        return np.asarray(seq.ids if hasattr(seq, "ids") else seq[0].ids, np.int64)

    enc = [ids(f) for f in train + test]
    return "MidiTok 3.1 REMI(use_programs) + BPE", len(tok), enc[: len(train)], enc[len(train) :]


def full(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[1], ids, [2]])  # BOS ... EOS (ids 1 and 2 in both vocabularies)


def train_model(seqs: list[np.ndarray], vocab: int, args) -> tuple[Transformer, float]:
    torch.manual_seed(args.seed)
    shape = dict(PRESETS[args.preset])
    model = Transformer(ModelConfig(vocab_size=vocab, max_seq_len=args.context, dropout=0.0, **shape))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("tok_emb")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith("tok_emb"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup, 0.1))
    pieces = [full(s) for s in seqs]
    weights = np.asarray([max(1, len(p) - args.context) for p in pieces], np.float64)
    rng = np.random.default_rng(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.zeros(args.batch, args.context, dtype=torch.long)  # (B, T)
        y = torch.full((args.batch, args.context), -100, dtype=torch.long)
        for b, i in enumerate(rng.choice(len(pieces), args.batch, p=weights / weights.sum())):
            p = pieces[i]
            start = int(rng.integers(0, max(1, len(p) - args.context)))
            w = torch.from_numpy(p[start : start + args.context + 1])
            x[b, : len(w) - 1], y[b, : len(w) - 1] = w[:-1], w[1:]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval(), time.perf_counter() - t0


def held_out(model, seqs: list[np.ndarray], notes: list[int], seconds: list[float], context: int) -> dict:
    full_seqs = [full(s) for s in seqs]
    # Cuts anywhere (a MidiTok stream has no onset marks); every token scored once, stride = context / 2.
    plans = [scoring.windows(np.ones(len(s), bool), len(s), context, context // 2) for s in seqs]
    nll = scoring.token_nll(model, full_seqs, plans, "cpu")
    bits = sum(float(n.sum()) for n in nll) / math.log(2)
    tokens = sum(len(n) for n in nll)
    return {
        "tokens_per_note": tokens / sum(notes),
        "bits_per_token": bits / tokens,
        "bits_per_note": bits / sum(notes),
        "bits_per_second": bits / sum(seconds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "pop909")
    p.add_argument("--train", type=int, default=100, help="training pieces (default %(default)s)")
    p.add_argument("--test", type=int, default=20, help="held-out pieces (default %(default)s)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size of both (default %(default)s)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="windows per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    files = sorted(args.corpus.glob("*.mid"))
    if len(files) < args.train + args.test:
        sys.exit(f"{args.corpus}: {len(files)} MIDI files, need {args.train + args.test}")
    train, test = files[: args.train], files[args.train : args.train + args.test]
    tables = [read_notes(f) for f in test]
    notes, seconds = [len(t) for t in tables], [piece_seconds(t) for t in tables]
    print(f"machine: {machine()}")
    print(
        f"POP909: {len(train)} training pieces ({train[0].name}..{train[-1].name}), {len(test)} held out"
        f" ({sum(notes)} notes, {sum(seconds) / 60:.1f} min); preset {args.preset}, context {args.context},"
        f" {args.steps} steps x {args.batch} windows = {args.steps * args.batch * args.context:,} tokens each,"
        f" lr {args.lr}, vocabulary {args.vocab}\n"
    )
    rows = []
    for build in (ours, miditok):
        t0 = time.perf_counter()
        name, vocab, tr, te = build(train, test, args.vocab)
        t_tok = time.perf_counter() - t0
        print(
            f"{name}: vocabulary {vocab}, tokenized in {t_tok:.0f} s; training", file=sys.stderr, flush=True
        )
        model, t_train = train_model(tr, vocab, args)
        res = held_out(model, te, notes, seconds, args.context)
        train_tokens = sum(int(s.size) for s in tr)
        rows.append((name, vocab, train_tokens, t_train, res))
    print(
        "| token stream | vocab | training-set tokens | train s | tokens/note | bits/token | bits/note | bits/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, vocab, train_tokens, t_train, r in rows:
        print(
            f"| {name} | {vocab} | {train_tokens:,} | {t_train:.0f} | {r['tokens_per_note']:.2f} |"
            f" {r['bits_per_token']:.3f} | **{r['bits_per_note']:.2f}** | {r['bits_per_second']:.1f} |"
        )
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
