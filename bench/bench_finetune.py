"""Fine-tuning against training from scratch, LoRA against full fine-tuning, and what the base forgets.

    nice -n 10 .venv/bin/python bench/bench_finetune.py [--work DIR] [--preset tiny] [--pretrain-epochs 3]
                                                      [--epochs 10] [--folk-train 40]

1. Pre-train a model on POP909 songs (../shared/corpus) and music21's multi-style corpus (Bach chorales,
   Palestrina, Monteverdi, trecento pieces; built by `midiforge demo-data --styles`), each folder a style tag.
2. From it, on 40 folk tunes (music21's Ryan's Mammoth Collection, tag ``folk``): full fine-tuning
   (``--init-from``), LoRA rank 8 on every projection and on attention only (``--lora 8``), ``--freeze 2``; and
   the usual alternative, the same model trained from scratch on the same 40 tunes for the same steps (same
   tokenizer, so that only the starting weights differ).
3. Held-out bits per note (midiforge.measure.scoring, as `midiforge evaluate` reports it) on other folk tunes,
   in neither training set, and on the pre-training held-out set (forgetting); trainable parameters; peak
   resident memory of each training process (``wait4``'s ru_maxrss).

Every run is a real `midiforge train` process; files are cached in --work between runs (delete it to start
afresh). Prints one table (Markdown).
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
    """Run `midiforge train` in a child process; its seconds and peak resident memory."""
    cmd = [sys.executable, "-m", "midiforge", "train", *argv]
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 -- closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        sys.exit(f"bench_finetune: {name} failed ({proc.returncode}); see {work / f'{name}.log'}")
    return {"seconds": time.perf_counter() - t0, "peak_mb": usage.ru_maxrss / 1024}


def bits_per_note(ckpt: Path, folders) -> float:
    import torch

    from midiforge import checkpoint as ck
    from midiforge.evaluate import _data_files, read_pieces
    from midiforge.measure import scoring

    model, tok = ck.load_inference(ckpt)
    pieces, _, _ = read_pieces(_data_files([str(f) for f in folders]), tok)
    with torch.no_grad():
        return scoring.score(model, tok, pieces, stride=model.config.max_seq_len // 2)["total"][
            "bits_per_note"
        ]


def parameters(ckpt: Path) -> tuple[int, int]:
    """(trainable parameters, parameters of the model) of a run, from its checkpoint."""
    from midiforge import checkpoint as ck

    model, _ = ck.load_inference(ckpt)
    total = sum(p.numel() for p in model.parameters())
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
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument(
        "--epochs", type=int, default=10, help="fine-tuning epochs (every variant: the same steps)"
    )
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning and scratch learning rate")
    p.add_argument("--lora-lr", type=float, default=3e-3)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, args)
    common = ["-e", str(args.window), "-b", str(8 * args.window**2), "--num-workers", "0", "--seed", "0"]
    base = work / "base"
    runs: dict[str, dict] = {}
    # Every run is the same command again when the bench is re-run: it resumes, or finds nothing to do.
    pre = [x for t in data["pre_train"] for x in ("-t", t)] + [x for v in data["pre_val"] for x in ("-v", v)]
    runs["base"] = train("base", [str(args.pretrain_epochs), str(base), *pre, "--preset", args.preset,
                                   "--vocab-size", "1024", *common], work)  # fmt: skip
    folk = ["-t", f"folk={data['folk_train']}", *common]
    variants = {
        "scratch": ["--preset", args.preset, "-l", str(args.lr)],
        "full fine-tune": ["--init-from", str(base), "-l", str(args.lr)],
        "LoRA r8, all projections": ["--init-from", str(base), "--lora", "8", "-l", str(args.lora_lr)],
        "LoRA r8, attention": [
            "--init-from",
            str(base),
            "--lora",
            "8",
            "--lora-targets",
            "qkv",
            "proj",
            "-l",
            str(args.lora_lr),
        ],  # fmt: skip
        "--freeze 2": ["--init-from", str(base), "--freeze", "2", "-l", str(args.lr)],
    }
    for i, (name, extra) in enumerate(variants.items()):
        ckpt = work / f"run{i}"
        if name == "scratch" and not (ckpt / "tokenizer.json").exists():
            ckpt.mkdir(exist_ok=True)  # the base's tokenizer: only the starting weights differ
            (ckpt / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
        runs[name] = train(f"run{i}", [str(args.epochs), str(ckpt), *folk, *extra], work)
        runs[name]["ckpt"] = ckpt
    rows = []
    base_pre = bits_per_note(base, data["pre_val"])
    rows.append(
        ("base (pre-trained only)", bits_per_note(base, [data["folk_heldout"]]), base_pre, None, None)
    )
    for name, r in runs.items():
        if name == "base":
            continue
        folk_bpn = bits_per_note(r["ckpt"], [data["folk_heldout"]])
        pre_bpn = bits_per_note(r["ckpt"], data["pre_val"])
        n, total = parameters(r["ckpt"])
        rows.append((name, folk_bpn, pre_bpn, (n, total), r))
    scratch = rows[1][1]
    full = rows[2][1]
    steps = json.loads((runs["scratch"]["ckpt"] / "metrics.json").read_text())["epochs"][-1]["step"]
    print(f"\n{args.preset} model, {steps} fine-tuning steps each; held-out bits per note (lower is better);"
          " 2-core CPU, no GPU\n")  # fmt: skip
    print(
        "| run | folk held-out | vs scratch | vs full FT | pre-training held-out (forgetting) | trains | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, folk_bpn, pre_bpn, params, r in rows:
        vs_s = f"{folk_bpn / scratch - 1:+.1%}" if r else ""
        vs_f = f"{folk_bpn / full - 1:+.1%}" if r else ""
        forget = f"{pre_bpn:.3f} ({pre_bpn - base_pre:+.3f})" if r else f"{pre_bpn:.3f}"
        trains = f"{params[0]:,} ({params[0] / params[1]:.2%})" if params else ""
        peak = f"{r['peak_mb']:.0f} MB" if r else ""
        print(f"| {name} | {folk_bpn:.3f} | {vs_s} | {vs_f} | {forget} | {trains} | {peak} |")


if __name__ == "__main__":
    main()
