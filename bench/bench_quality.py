"""Which token stream learns better at equal compute: ours, ours carrying only what REMI carries, or MidiTok
REMI(use_programs) + BPE?

Three rows per corpus, all at the same vocabulary size (BPE trained on the same training pieces):

- **ours, full**: the default tokenizer (track identity within a program, sustain pedal, key signatures);
- **ours, same information as REMI**: ``TokenizerConfig(tracks=False, pedals=False, key_signatures=False)``,
  the tracks of one program merged, no pedal, no key signature, which is what REMI(use_programs) keeps;
- **REMI**: MidiTok 3.1 REMI(use_programs) + BPE.

The same model (a midiforge Transformer of one preset) is trained for each row and each seed for the same number
of steps on batches of the same number of tokens (random windows of ``--context`` tokens of
``[BOS] + ids + [EOS]``), with the same optimizer and schedule. Then it scores the held-out pieces with sliding
windows (midiforge.measure.scoring: every token once, stride = context / 2). The table reports bits per note and
bits per second (total negative log-likelihood over the notes of the source files, the same for every row, and
over their length in seconds) per seed, their mean and spread. Those compare across tokenizers; bits per token
and perplexity do not.

Two tables per corpus: the held-out bits at the end of training, and at the step where the run's validation
pieces (never the held-out ones) scored best, checked every ``--check-every`` steps. On a small corpus such as
the 328 training chorales, 300 steps are ~15 passes over a short stream, and a stream that writes the same music
in fewer tokens passes over it more often and overfits sooner: the end-of-training figure then measures
overfitting, and early stopping, which anyone training would use, measures the stream.

    .venv/bin/python bench/bench_quality.py --seeds 0 1 2                      # POP909: 9 runs, ~10 min each
    .venv/bin/python bench/bench_quality.py --seeds 0 1 2 --corpus demo/midi   # the demo's chorales

A corpus folder with ``train/`` and ``val/`` inside (the demo's layout) trains on ``train/`` and deals ``val/``
alternately into held-out and validation pieces; any other folder by name: the first ``--train`` files train,
the next ``--test`` are held out, the next ``--val`` validate. ``--results FILE`` keeps every
(corpus, row, seed) result as a JSON line and reuses the ones already there, so seeds can run in separate
processes and one last call prints the whole table (``--report-only``: print it, train nothing). Needs MidiTok
3.1 (the dev extra).
"""

from __future__ import annotations

import argparse
import json
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
from midiforge.tokens.vocab import TokenizerConfig
from midiforge.train.trainer import lr_factor

ROOT = Path(__file__).resolve().parents[1]
SAME_AS_REMI = TokenizerConfig(tracks=False, pedals=False, key_signatures=False)
ROWS = {
    "ours": "ours, full (tracks, pedal, key signature) + BPE",
    "same": "ours, same information as REMI + BPE",
    "remi": "MidiTok 3.1 REMI(use_programs) + BPE",
}


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}"
    )


def ours(train: list[Path], test: list[Path], vocab: int, config: TokenizerConfig | None = None):
    tok = MidiTokenizer(config)
    tok.train_bpe([str(f) for f in train], vocab)
    enc = [np.asarray(tok.encode(f), np.int64) for f in train + test]
    return len(tok), enc[: len(train)], enc[len(train) :]


def miditok(train: list[Path], test: list[Path], vocab: int):
    from miditok import REMI
    from miditok import TokenizerConfig as RemiConfig

    tok = REMI(RemiConfig(use_programs=True))
    tok.train(vocab_size=vocab, files_paths=[str(f) for f in train])
    assert (tok["PAD_None"], tok["BOS_None"], tok["EOS_None"]) == (0, 1, 2)

    def ids(f):
        seq = tok.encode(f)
        return np.asarray(seq.ids if hasattr(seq, "ids") else seq[0].ids, np.int64)

    enc = [ids(f) for f in train + test]
    return len(tok), enc[: len(train)], enc[len(train) :]


def tokenize(row: str, train: list[Path], test: list[Path], vocab: int):
    if row == "remi":
        return miditok(train, test, vocab)
    return ours(train, test, vocab, SAME_AS_REMI if row == "same" else None)


def full(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[1], ids, [2]])  # BOS ... EOS (ids 1 and 2 in both vocabularies)


def train_model(seqs: list[np.ndarray], vocab: int, args, seed: int, check=None) -> tuple[Transformer, dict]:
    """Train; every ``--check-every`` steps (and at the end) ``check(model)`` gives validation bits per note.

    Returns the model as it ends and what the checks found: the curve, the best step and the weights at that step
    (a copy of the state dict, the size of the tiny model), so that a stream that overfits a small corpus is
    also judged where it was best, as anyone training it would stop it."""
    torch.manual_seed(seed)
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
    rng = np.random.default_rng(seed)
    found = {"curve": [], "best_step": None, "best_val": math.inf, "best_state": None, "check_s": 0.0}
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.zeros(args.batch, args.context, dtype=torch.long)  # (B, T)
        y = torch.full((args.batch, args.context), -100, dtype=torch.long)  # (B, T)
        for b, i in enumerate(rng.choice(len(pieces), args.batch, p=weights / weights.sum())):
            p = pieces[i]
            start = int(rng.integers(0, max(1, len(p) - args.context)))
            w = torch.from_numpy(p[start : start + args.context + 1])
            x[b, : len(w) - 1], y[b, : len(w) - 1] = w[:-1], w[1:]
        logits = model(x)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
        if check is not None and ((step + 1) % args.check_every == 0 or step + 1 == args.steps):
            # Scoring needs no gradient and draws no random number (no dropout, its own windows): the run's
            # batches and weights are the same with or without checks, so its end figures are too.
            t = time.perf_counter()
            val = check(model.eval())
            model.train()
            found["check_s"] += time.perf_counter() - t
            found["curve"].append([step + 1, val])
            if val < found["best_val"]:
                found["best_val"], found["best_step"] = val, step + 1
                found["best_state"] = {k: v.clone() for k, v in model.state_dict().items()}
    found["train_s"] = time.perf_counter() - t0 - found["check_s"]
    return model.eval(), found


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


def split(corpus: Path, args) -> tuple[list[Path], list[Path], list[Path]]:
    """(training, held-out, validation) files. The demo's layout: train/, and its val/ folder (split by tune from
    train/) dealt alternately into held-out and validation pieces; any other folder by name: the first ``--train``
    files, the next ``--test``, the next ``--val``. The validation pieces only choose the early-stopping step."""
    if (corpus / "train").is_dir() and (corpus / "val").is_dir():
        held = sorted((corpus / "val").glob("*.mid"))
        return sorted((corpus / "train").glob("*.mid")), held[0::2], held[1::2]
    files = sorted(corpus.glob("*.mid"))
    n_train, n_test, n_val = args.train, args.test, args.val
    if len(files) < n_train + n_test + n_val:
        sys.exit(f"{corpus}: {len(files)} MIDI files, need {n_train + n_test + n_val}")
    return (
        files[:n_train],
        files[n_train : n_train + n_test],
        files[n_train + n_test : n_train + n_test + n_val],
    )


def settings(args) -> dict:
    """What a result depends on besides corpus, row and seed: a saved result is reused only when these match."""
    keys = ("train", "test", "val", "check_every", "vocab", "preset", "context", "batch", "steps", "lr")
    return {k: getattr(args, k) for k in keys}


def load_results(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_corpus(corpus: Path, args, saved: list[dict]) -> list[dict]:
    train, test, val = split(corpus, args)
    tables = [read_notes(f) for f in test]
    notes, seconds = [len(t) for t in tables], [piece_seconds(t) for t in tables]
    val_tables = [read_notes(f) for f in val]
    val_notes, val_seconds = [len(t) for t in val_tables], [piece_seconds(t) for t in val_tables]
    print(
        f"{corpus.name}: {len(train)} training pieces ({train[0].name}..{train[-1].name}), {len(test)} held out"
        f" ({sum(notes)} notes, {sum(seconds) / 60:.1f} min), {len(val)} for validation ({sum(val_notes)} notes);"
        f" preset {args.preset}, context {args.context}, {args.steps} steps x {args.batch} windows ="
        f" {args.steps * args.batch * args.context:,} tokens each, lr {args.lr}, vocabulary {args.vocab}",
        file=sys.stderr,
    )
    here = settings(args)
    out = []
    for row in args.rows:
        todo = []
        for seed in args.seeds:
            key = {"corpus": str(corpus.resolve()), "row": row, "seed": seed, "settings": here}
            got = [r for r in saved if all(r.get(k) == v for k, v in key.items())]
            out.append(got[-1]) if got else todo.append((seed, key))
        if not todo or args.report_only:
            continue
        t0 = time.perf_counter()
        vocab, tr, held = tokenize(row, train, test + val, args.vocab)
        te, va = held[: len(test)], held[len(test) :]
        print(
            f"{ROWS[row]}: vocabulary {vocab}, tokenized in {time.perf_counter() - t0:.0f} s", file=sys.stderr
        )

        def check(model, va=va):
            return held_out(model, va, val_notes, val_seconds, args.context)["bits_per_note"]

        for seed, key in todo:
            model, found = train_model(tr, vocab, args, seed, check)
            rec = {
                **key,
                "vocab": vocab,
                "train_tokens": sum(int(s.size) for s in tr),
                "train_s": found["train_s"],
            }
            rec |= held_out(model, te, notes, seconds, args.context)  # at the end of training
            model.load_state_dict(found["best_state"])
            best = held_out(model, te, notes, seconds, args.context)  # at the best validation step
            rec |= {f"best_{k}": v for k, v in best.items()}
            rec |= {"best_step": found["best_step"], "val_curve": found["curve"]}
            if args.results is not None:
                with open(args.results, "a") as f:  # one line per result: a crash keeps what was done
                    f.write(json.dumps(rec) + "\n")
            out.append(rec)
    return out


def print_table(corpus: Path, results: list[dict], args, best: bool = False) -> None:
    """One table: bits per note at the end of training, or (``best``) at each run's best validation step."""
    seeds, pre = list(args.seeds), "best_" if best else ""
    when = "at the step with the lowest validation bits/note" if best else f"after {args.steps} steps"
    print(
        f"\n{corpus.name}: bits per note on the held-out pieces {when}, seeds {', '.join(map(str, seeds))}\n"
    )
    head = " | ".join(f"seed {s}" for s in seeds)
    extra = " best steps |" if best else ""
    print(
        f"| token stream | tokens/note | {head} | mean | spread (max − min) | bits/s (mean) |{extra} vs REMI |"
    )
    print("|---|---|" + "---|" * len(seeds) + "---|---|---|" + ("---|" if best else "") + "---|")
    rows = {}
    for row in args.rows:
        by_seed = {
            r["seed"]: r
            for r in results
            if r["row"] == row and r["seed"] in seeds and pre + "bits_per_note" in r
        }
        if by_seed:
            rows[row] = by_seed
    means = {row: np.mean([r[pre + "bits_per_note"] for r in rs.values()]) for row, rs in rows.items()}
    for row, by_seed in rows.items():
        bits = np.array([r[pre + "bits_per_note"] for r in by_seed.values()])
        cells = " | ".join(f"{by_seed[s][pre + 'bits_per_note']:.2f}" if s in by_seed else "–" for s in seeds)
        tpn = np.mean([r["tokens_per_note"] for r in by_seed.values()])
        bps = np.mean([r[pre + "bits_per_second"] for r in by_seed.values()])
        steps = " " + ", ".join(str(by_seed[s]["best_step"]) if s in by_seed else "–" for s in seeds) + " |"
        vs = f"{means[row] / means['remi'] - 1:+.1%}" if "remi" in means and row != "remi" else ""
        n = "" if len(by_seed) == len(seeds) else f" ({len(by_seed)} of {len(seeds)} seeds)"
        print(
            f"| {ROWS[row]} | {tpn:.2f} | {cells} | **{means[row]:.2f}**{n} | {np.ptp(bits):.2f} | {bps:.1f} |"
            f"{steps if best else ''} {vs} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--corpus", type=Path, action="append",
        help="MIDI folder; may repeat (default: POP909 from ../shared/corpus)",
    )  # fmt: skip
    p.add_argument("--train", type=int, default=100, help="training pieces (default %(default)s)")
    p.add_argument("--test", type=int, default=20, help="held-out pieces (default %(default)s)")
    p.add_argument(
        "--val", type=int, default=10,
        help="validation pieces after the held-out ones, to choose the early-stopping step (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--check-every", type=int, default=60, help="steps between validation checks (default %(default)s)"
    )
    p.add_argument(
        "--vocab", type=int, default=2048, help="vocabulary size of every row (default %(default)s)"
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="windows per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    p.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default all)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--results", type=Path, help="JSON lines file: results appended, and reused when there")
    p.add_argument(
        "--report-only", action="store_true",
        help="print the tables from --results and train nothing (a missing seed shows as –)",
    )  # fmt: skip
    args = p.parse_args()
    if args.report_only and args.results is None:
        p.error("--report-only needs --results")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpora = args.corpus or [ROOT.parent / "shared" / "corpus" / "pop909"]
    print(f"machine: {machine()}")
    saved = load_results(args.results)
    for corpus in corpora:
        results = run_corpus(corpus, args, saved)
        print_table(corpus, results, args)
        print_table(corpus, results, args, best=True)
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
