"""Fine-tuning against training from scratch, LoRA against full fine-tuning, and what the base forgets.

    flock /work/cpu.lock .venv/bin/python bench/bench_finetune.py [--work DIR] [--preset tiny]
        [--pretrain-epochs 4] [--epochs 4] [--max-minutes 15]

1. Pre-train a model on POP909 songs (../shared/corpus) and music21's multi-style corpus (Bach chorales,
   Palestrina, Monteverdi, trecento pieces; built by `midiforge demo-data --styles`), each folder a style tag.
2. From it, on 40 folk tunes (music21's Ryan's Mammoth Collection, tag ``folk``): full fine-tuning
   (``--init-from``) at two learning rates; LoRA rank 8 (``--lora 8``) at three learning rates each: the
   default (targets qkv+head, LoRA+ ratio 16), the same with proj, the default targets as plain LoRA
   (``--lora-plus 1``), and plain LoRA on the five projections of the blocks (the first default, no head);
   ``--freeze 2``; and the usual alternative, the same model trained from scratch on the same 40 tunes for the
   same steps at three learning rates (same tokenizer, so that only the starting weights differ). Of each
   group's learning rates, the one with the lowest validation bits/note (its own split of the 40 tunes) stands
   for the group.
3. Held-out bits per note (midiforge.measure.scoring, as `midiforge evaluate` reports it) on other folk tunes,
   in neither training set, and on the pre-training held-out set (forgetting); trainable parameters; peak
   resident memory of each `train` process (``wait4``'s ru_maxrss), and peak training memory of full
   fine-tuning and LoRA at several presets (bench/finetune_memory.py); the adapters' share at every preset.

Every run is a real `midiforge train` process. Checkpoints, scores and measurements are kept in --work
(runs.json): the same command again reuses what is finished and resumes the rest, so the bench can run in
pieces (--max-minutes, --pretrain-only). Delete --work to start afresh. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "pop909"
STYLES = ["bach", "palestrina", "monteverdi", "trecento"]
PRESET_NAMES = ("tiny", "small", "base", "large")


def _link_all(files, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = folder / f.name
        if not dst.exists():
            dst.symlink_to(f.resolve())
    return folder


def _order(p: Path) -> bytes:
    return hashlib.sha256(p.name.encode()).digest()


def build_data(work: Path, args) -> dict:
    """Folders of the pre-training set (train/val, one per tag), the fine-tuning set and the folk held-out set."""
    from midiforge.data.demo import build_styles_corpus

    if not CORPUS.is_dir():
        sys.exit(f"bench_finetune: the POP909 corpus is missing at {CORPUS}")
    styles = build_styles_corpus(work / "styles", STYLES, per_style=args.per_style, jobs=1, progress=False)
    folk = build_styles_corpus(work / "folk", ["folk"], per_style=args.folk_train + args.folk_heldout,
                               jobs=1, progress=False)  # fmt: skip
    print(f"music21 corpus: {styles.line()}\nfolk: {folk.line()}", flush=True)
    pop = sorted(CORPUS.glob("*.mid"))[: args.pop909 + args.pop909 // 5]
    tunes = sorted(((work / "folk").rglob("*.mid")), key=_order)
    d = {
        "pre_train": [f"pop909={_link_all(pop[: args.pop909], work / 'pre' / 'train' / 'pop909')}"]
        + [f"{s}={work / 'styles' / 'train' / s}" for s in STYLES],
        "pre_val": [str(_link_all(pop[args.pop909 :], work / "pre" / "val" / "pop909"))]
        + [str(work / "styles" / "val" / s) for s in STYLES],
        "folk_train": _link_all(tunes[: args.folk_train], work / "folk_train"),
        "folk_heldout": _link_all(tunes[args.folk_train :], work / "folk_heldout"),
    }
    return d


def train(name: str, argv: list[str], work: Path) -> dict:
    """Run `midiforge train` in a child process; its seconds and peak resident memory (``wait4``'s ru_maxrss).

    A finished run with the same arguments is not run again: its figures come from ``work/runs.json`` (a rerun
    of a finished checkpoint would find nothing to do, and measure nothing). An unfinished one resumes."""
    book = work / "runs.json"
    done = json.loads(book.read_text()) if book.exists() else {}
    if done.get(name, {}).get("argv") == argv:
        return done[name]
    cmd = [sys.executable, "-m", "midiforge", "train", *argv]
    log = open(work / f"{name}.log", "a")  # noqa: SIM115 -- closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        sys.exit(f"bench_finetune: {name} failed ({proc.returncode}); see {work / f'{name}.log'}")
    done[name] = {"argv": argv, "seconds": time.perf_counter() - t0, "peak_mb": usage.ru_maxrss / 1024}
    book.write_text(json.dumps(done, indent=1))
    return done[name]


def bits_per_note(ckpt: Path, folders) -> float:
    import torch

    from midiforge import checkpoint as ck
    from midiforge.evaluate import _data_files, read_pieces
    from midiforge.measure import scoring

    model, tok = ck.load_inference(ckpt)
    pieces, _, _ = read_pieces(_data_files([Path(f) for f in folders], ckpt)[0], tok)
    with torch.no_grad():
        return scoring.score(model, tok, pieces, stride=model.config.max_seq_len // 2)["total"][
            "bits_per_note"
        ]


def parameters(ckpt: Path) -> tuple[int, int]:
    """(trainable parameters, parameters of the model) of a run, from its checkpoint."""
    from midiforge import checkpoint as ck

    model, _ = ck.load_inference(ckpt, merged=False)  # merged, a head adapter would untie the head
    total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    cfg = ck.read_config(ckpt)
    if "lora" in cfg:
        return sum(t.numel() for t in ck.load(ckpt).model.values()), total
    frozen = cfg["train"].get("freeze") or 0
    if frozen:
        fixed = model.tok_emb.weight.numel() + sum(
            p.numel() for b in model.blocks[:frozen] for p in b.parameters()
        )
        return total - fixed, total
    return total, total


def adapter_share(preset: str, vocab: int, rank: int, targets) -> float:
    """Rank-``rank`` adapters on ``targets`` as a share of the model's parameters (counted, not trained)."""
    import torch

    from midiforge import lora
    from midiforge.model import PRESETS, ModelConfig, Transformer

    with torch.device("meta"):  # shapes only: no memory, no time
        model = Transformer(ModelConfig(vocab_size=vocab, **PRESETS[preset]))
        total = sum(p.numel() for p in model.parameters())
        lora.attach(model, rank, 2.0 * rank, targets)
        return lora.trainable_parameters(model) / total


class Budget:
    """Stop starting new work after ``minutes`` (a rerun of the same command continues where this one stopped)."""

    def __init__(self, minutes: float):
        self.end = time.monotonic() + 60 * minutes

    def check(self, what: str) -> None:
        if time.monotonic() > self.end:
            print(
                f"bench_finetune: time budget spent before {what}; rerun the same command to go on",
                flush=True,
            )
            sys.exit(3)


def _record(work: Path, name: str, key: str, compute):
    """``compute()``, cached under runs.json[name][key] (a new training run of ``name`` drops it)."""
    book = work / "runs.json"
    done = json.loads(book.read_text()) if book.exists() else {}
    if key not in done.setdefault(name, {}):
        done[name][key] = compute()
        book.write_text(json.dumps(done, indent=1))
    return done[name][key]


FIVE = ("qkv", "proj", "gate", "up", "down")  # every projection of the blocks: the first default


def lora_groups(args) -> dict[str, tuple[list[str], float, list[float]]]:
    """LoRA groups: name -> (targets, LoRA+ ratio, learning rates). The default (targets and LoRA+), the same
    with the attention's output projection too, the default targets as plain LoRA (ratio 1), and the first
    default: plain LoRA on the five projections of the blocks, no head."""
    from midiforge import lora

    plus, more = lora.DEFAULT_B_LR_RATIO, ["qkv", "proj", "head"]
    return {
        f"LoRA r{args.rank}, {'+'.join(lora.DEFAULT_TARGETS)}, LoRA+ {plus:g} (default)": (
            list(lora.DEFAULT_TARGETS), plus, args.lora_plus_lrs),
        f"LoRA r{args.rank}, {'+'.join(more)}, LoRA+ {plus:g}": (more, plus, args.lora_plus_lrs),
        f"LoRA r{args.rank}, {'+'.join(lora.DEFAULT_TARGETS)}, plain": (list(lora.DEFAULT_TARGETS), 1.0, args.lora_lrs),
        f"LoRA r{args.rank}, {'+'.join(FIVE)}, plain": (list(FIVE), 1.0, args.lora_lrs),
    }  # fmt: skip


def variants(args, base: Path) -> dict[str, tuple[str, list[str]]]:
    """Fine-tuning runs: directory name -> (group, options). Every group but freeze is tried at each learning
    rate of its list, and the one with the lowest validation bits/note (the runs' own split of the 40 tunes,
    never the held-out tunes) stands for the group."""
    out = {
        f"scratch-{lr:g}": ("scratch", ["--preset", args.preset, "-l", str(lr)]) for lr in args.scratch_lrs
    }
    for lr in args.full_lrs:
        out[f"full-{lr:g}"] = ("full fine-tune", ["--init-from", str(base), "-l", str(lr)])
    for group, (targets, plus, lrs) in lora_groups(args).items():
        for lr in lrs:
            opts = ["--init-from", str(base), "--lora", str(args.rank), "--lora-targets", *targets]
            name = f"lora-{'-'.join(targets)}-plus{plus:g}-{lr:g}"
            out[name] = (group, [*opts, "--lora-plus", str(plus), "-l", str(lr)])
    out["freeze2"] = ("--freeze 2", ["--init-from", str(base), "--freeze", "2", "-l", str(args.full_lrs[0])])
    return out


def val_bits(ckpt: Path) -> float:
    return json.loads((ckpt / "metrics.json").read_text())["epochs"][-1]["val_bits_per_note"]


MEMORY_VARIANTS = ("full", "lora", "lora-peft")  # full fine-tuning, our LoRA layer, peft's (the alternative)


def memory(work: Path, args, budget: Budget) -> list[dict]:
    """Peak training memory of full fine-tuning, LoRA and LoRA through peft at each preset of
    --memory-presets, with glibc's allocator as it is and with exact accounting (bench/finetune_memory.py,
    a fresh process each)."""
    rows = []
    for preset in args.memory_presets:
        for malloc in ("glibc", "exact"):
            for variant in MEMORY_VARIANTS:

                def probe(preset=preset, variant=variant, malloc=malloc):
                    budget.check(f"the memory probe {preset} {variant} {malloc}")
                    cmd = [sys.executable, str(ROOT / "bench" / "finetune_memory.py"), "--preset", preset,
                           "--variant", variant, "--rank", str(args.rank), "--window", str(args.window),
                           "--malloc", malloc]  # fmt: skip
                    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
                    return json.loads(out.stdout.strip().splitlines()[-1])

                rows.append(_record(work, "memory3", f"{preset}:{variant}:{malloc}", probe))
    return rows


def memory_table(args, mem: list[dict]) -> None:
    from midiforge import lora

    print(f"\nPeak training memory (bench/finetune_memory.py, a fresh process each: peak resident size (VmHWM)"
          f" during 3 AdamW steps on 8 x {args.window} tokens minus the resident size before them; rank"
          f" {args.rank} on {'+'.join(lora.DEFAULT_TARGETS)}; `exact`: glibc told to give every freed tensor"
          " back at once, so the figure is the live tensors' peak). In brackets: the whole process's peak.\n")  # fmt: skip
    print("| preset | parameters | allocator | full fine-tune | LoRA | LoRA through peft | LoRA trains |")
    print("|---|---|---|---|---|---|---|")
    by = {(m["preset"], m["variant"], m["malloc"]): m for m in mem}
    for preset, malloc in dict.fromkeys((m["preset"], m["malloc"]) for m in mem):
        f = by[preset, "full", malloc]
        cells = [f"{f['training_peak_mb']:.0f} MB ({f['peak_mb']:.0f})"]
        for v in MEMORY_VARIANTS[1:]:
            m = by[preset, v, malloc]
            cells.append(f"{m['training_peak_mb']:.0f} MB ({m['peak_mb']:.0f}),"
                         f" {m['training_peak_mb'] / f['training_peak_mb'] - 1:+.0%}")  # fmt: skip
        lo = by[preset, "lora", malloc]
        print(f"| {preset} | {f['parameters']:,} | {malloc} | " + " | ".join(cells)
              + f" | {lo['trains'] / lo['parameters']:.2%} |")  # fmt: skip


def run_all(args, work: Path, data: dict, budget: Budget) -> dict[str, dict]:
    """Pre-train the base, then every variant; name -> its train record plus group, ckpt and scores."""
    common = ["-e", str(args.window), "-b", str(8 * args.window**2), "--num-workers", "0",
              "--seed", str(args.seed)]  # fmt: skip
    base = work / "base"
    pre = [x for t in data["pre_train"] for x in ("-t", t)] + [x for v in data["pre_val"] for x in ("-v", v)]
    train("base", [str(args.pretrain_epochs), str(base), *pre, "--preset", args.preset,
                   "--vocab-size", "1024", *common], work)  # fmt: skip
    if args.pretrain_only:
        sys.exit(0)
    folk = ["-t", f"folk={data['folk_train']}", *common]
    runs = {}
    for name, (group, extra) in variants(args, base).items():
        ckpt = work / name
        if name.startswith("scratch") and not (ckpt / "tokenizer.json").exists():
            ckpt.mkdir(exist_ok=True)  # the base's tokenizer: only the starting weights differ
            (ckpt / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
        budget.check(f"training {name}")
        runs[name] = dict(
            train(name, [str(args.epochs), str(ckpt), *folk, *extra], work), group=group, ckpt=ckpt
        )
    runs = {"base": {"ckpt": base, "group": "base"}, **runs}
    for name, r in runs.items():
        budget.check(f"scoring {name}")
        r["folk"] = _record(work, name, "folk", lambda c=r["ckpt"]: bits_per_note(c, [data["folk_heldout"]]))
        r["pre"] = _record(work, name, "pre", lambda c=r["ckpt"]: bits_per_note(c, data["pre_val"]))
    return runs


def chosen(runs: dict) -> dict[str, str]:
    """Group -> the run that stands for it: the lowest validation bits/note among its learning rates."""
    best: dict[str, str] = {}
    for name, r in runs.items():
        g = r["group"]
        if g == "base" or g in best and val_bits(runs[best[g]]["ckpt"]) <= val_bits(r["ckpt"]):
            continue
        best[g] = name
    return best


def report(args, runs: dict, mem: list[dict]) -> None:
    """The Markdown tables and the goals."""
    from midiforge import lora

    pick = chosen(runs)
    scratch, full = runs[pick["scratch"]]["folk"], runs[pick["full fine-tune"]]["folk"]
    base_pre = runs["base"]["pre"]
    steps = json.loads((runs[pick["scratch"]]["ckpt"] / "metrics.json").read_text())["epochs"][-1]["step"]
    print(f"\n{args.preset} model, {steps} fine-tuning steps each; bits per note (lower is better); 2-core CPU,"
          " no GPU. Each group's row marked * is its learning rate with the lowest validation bits/note.\n")  # fmt: skip
    print("| run | lr | folk held-out | vs scratch | vs full FT | pre-training held-out (forgetting) | trains |"
          " peak RSS of `train` |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| base (pre-trained only) | | {runs['base']['folk']:.3f} | | | {base_pre:.3f} | | |")
    for name, r in runs.items():
        if name == "base":
            continue
        n, total = parameters(r["ckpt"])
        lr = json.loads((r["ckpt"] / "config.json").read_text())["train"]["learning_rate"]
        mark = " *" if pick.get(r["group"]) == name else ""
        print(f"| {r['group']}{mark} | {lr:g} | {r['folk']:.3f} | {r['folk'] / scratch - 1:+.1%} |"
              f" {r['folk'] / full - 1:+.1%} | {r['pre']:.3f} ({r['pre'] - base_pre:+.3f}) |"
              f" {n:,} ({n / total:.2%}) | {r['peak_mb']:.0f} MB |")  # fmt: skip
    memory_table(args, mem)
    print(f"\nRank-{args.rank} adapters as a share of the model's parameters (counted; vocabulary 1,024 as here,"
          " and 2,048, train's default):\n")  # fmt: skip
    print(
        "| targets | vocabulary | " + " | ".join(PRESET_NAMES) + " |\n|---|---|" + "---|" * len(PRESET_NAMES)
    )
    for targets in (lora.DEFAULT_TARGETS, ("qkv", "proj", "head"), FIVE, lora.TARGETS):
        for vocab in (1024, 2048):
            shares = [f"{adapter_share(p, vocab, args.rank, targets):.2%}" for p in PRESET_NAMES]
            print(f"| {'+'.join(targets)} | {vocab:,} | " + " | ".join(shares) + " |")
    default = runs[pick[next(g for g in pick if g.endswith("(default)"))]]
    n, total = parameters(default["ckpt"])
    print(f"\nGoals: fine-tune vs scratch {full / scratch - 1:+.1%} (goal <= -10%); LoRA (default)"
          f" vs full fine-tune {default['folk'] / full - 1:+.1%} (goal within 3%); its adapter"
          f" {n / total:.2%} of the model (goal <= 3%)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/midiforge-bench-finetune"))
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--pop909", type=int, default=20, help="POP909 songs to pre-train on (and 1/5 as many held out)"
    )
    p.add_argument(
        "--per-style", type=int, default=15, help="music21 pieces per style (split train/val by name)"
    )
    p.add_argument("--folk-train", type=int, default=40)
    p.add_argument("--folk-heldout", type=int, default=20)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--pretrain-only", action="store_true", help="stop after the base (a piece of the bench)")
    p.add_argument(
        "--epochs", type=int, default=4, help="fine-tuning epochs (every variant: the same steps)"
    )
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--scratch-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--full-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--lora-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="plain LoRA's")
    p.add_argument(
        "--lora-plus-lrs", type=float, nargs="+", default=[2e-3, 3e-3, 5e-3], help="LoRA+'s (A's rate)"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="of every run, the base's too (a replicate: a new --work)")
    p.add_argument("--memory-presets", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--memory-only", action="store_true", help="only the memory table (no data, no training)")
    p.add_argument(
        "--max-minutes", type=float, default=1e9, help="start no new work after this (rerun goes on)"
    )
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.max_minutes)
    if args.memory_only:
        memory_table(args, memory(args.work, args, budget))
        return
    data = build_data(args.work, args)
    runs = run_all(args, args.work, data, budget)
    report(args, runs, memory(args.work, args, budget))


if __name__ == "__main__":
    main()
