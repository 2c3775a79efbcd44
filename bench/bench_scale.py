"""The data path at scale: prepare (JSON and shards), loading, BPE, token cache and train.py's first step on
synthetic corpora of 1k, 10k (and 100k) files, each step in its own process with its peak RSS.

    .venv/bin/python bench/bench_scale.py                          # 1k and 10k files (~15 min on 2 cores)
    .venv/bin/python bench/bench_scale.py --sizes 100000 --no-train  # 100k, when there is time and disk
    .venv/bin/python bench/bench_scale.py --bpe-check 10000        # sampled vs full BPE, tokens/note

Corpora come from bench/scale_corpus.py (deterministic transpositions, tempo changes and delays of the 300
POP909 songs in ../shared/corpus) and are kept in --work between runs; outputs of the steps are rebuilt.
Peak RSS: the step's own process (ru_maxrss of RUSAGE_SELF), and its worker processes (forkserver children, which
RUSAGE_CHILDREN misses) sampled from /proc every 0.25 s: the largest one and all of them together. Times are wall clock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))


# ------------------------------------------------------------------------------------- steps (subprocess)
def _files(data: str) -> list[str]:
    from midiforge.data.dataset import DATA_SUFFIXES
    from midiforge.notes.midi import find_files
    from midiforge.notes.shards import expand_pieces

    return expand_pieces(find_files([data], suffixes=DATA_SUFFIXES))


def step(name: str, a: dict) -> dict:
    """One measured step; runs in a fresh process. Returns what it measured besides time and RSS."""
    if name == "prepare":
        from midiforge.cli import main

        argv = ["prepare", "-q", "-j", str(a["jobs"]), a["src"], "-o", a["out"], "--format", a["format"]]
        code = main(argv)
        assert code == 0, code
        return {}
    if name == "load":
        from midiforge.notes.read import read_notes

        files = _files(a["data"])
        t = time.perf_counter()
        notes = sum(len(read_notes(f)) for f in files)
        return {"pieces": len(files), "notes": notes, "load_s": time.perf_counter() - t}
    if name == "bpe":
        from midiforge.tokens.bpe_sample import SampleStats
        from midiforge.tokens.tokenizer import MidiTokenizer

        tok, st = MidiTokenizer(), SampleStats()
        tok.train_bpe(_files(a["data"]), a["vocab"], sample_events=a["sample"], seed=0, stats=st)
        tok.save(a["out"])
        return {"events": st.events, "pieces_used": st.pieces_used, "vocab": len(tok)}
    if name == "cache":
        from midiforge.data.dataset import MidiDataset
        from midiforge.tokens.tokenizer import MidiTokenizer

        tok = MidiTokenizer.load(a["tok"])
        ds = MidiDataset([a["data"]], tok, 8, 1536, cache_dir=a["out"], augment=True, num_workers=a["jobs"])
        return {"pieces": ds.num_pieces, "windows": len(ds), "tokens": int(ds.lengths.sum())}
    if name == "train":
        from midiforge.cli import main

        argv = ["train", "1", a["out"], "-t", a["data"], "--max-steps", "1", "--preset", "tiny"]
        argv += ["--device", "cpu", "-b", str(512**2), "--vocab-size", str(a["vocab"])]
        argv += ["--bpe-sample-events", str(a["sample"])] if a.get("sample") else []
        code = main(argv)
        assert code == 0, code
        return {}
    if name == "tokens_per_note":
        import numpy as np

        from midiforge.notes.read import read_notes
        from midiforge.tokens.tokenizer import MidiTokenizer

        toks = {k: MidiTokenizer.load(p) for k, p in a["toks"].items()}
        base = next(iter(toks.values()))
        counts = dict.fromkeys(toks, 0)
        notes = 0
        for f in _files(a["data"]):
            table = read_notes(f)
            events, ws = base.events(table)
            notes += len(table)
            for k, tok in toks.items():
                counts[k] += len(tok.bpe_encode(events, ws))
        return {
            "notes": notes,
            "tokens_per_note": {k: v / notes for k, v in counts.items()},
            "np": np.__version__,
        }
    raise SystemExit(f"unknown step {name}")


def run_step(name: str, **a) -> dict:
    """Run a step in a fresh interpreter; its result plus wall time and peak RSS (MB)."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--step", name, json.dumps(a)], capture_output=True, text=True, cwd=REPO
    )
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def _descendant_rss_mb(root: int) -> tuple[float, float]:
    """(largest RSS of one descendant process, RSS of all descendants together) in MB, from /proc."""
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(d)] = int(fields[1])
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            continue
    mine, todo = set(), [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in mine]
        mine.update(kids)
        todo += kids
    values = [rss[c] for c in mine if c in rss]
    return (max(values, default=0.0), sum(values))


def _step_main(name: str, arg: str) -> None:
    import threading

    # Worker processes come from a forkserver, so RUSAGE_CHILDREN does not see them: sample /proc instead.
    peak = [0.0, 0.0]
    done = threading.Event()

    def watch():
        while not done.wait(0.25):
            one, total = _descendant_rss_mb(os.getpid())
            peak[0], peak[1] = max(peak[0], one), max(peak[1], total)

    threading.Thread(target=watch, daemon=True).start()
    res = step(name, json.loads(arg))
    done.set()
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["child_rss_mb"] = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, peak[0])
    res["children_total_mb"] = peak[1]
    print(json.dumps(res))


# ------------------------------------------------------------------------------------------- reporting
def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6 if path.exists() else 0.0


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{os.cpu_count()} vCPU {cpu}, {mem:.0f} GB, no GPU, Python {platform.python_version()},"
        f" torch {torch.__version__}"
    )


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def rss(r: dict) -> str:
    if r["child_rss_mb"] <= 1:
        return f"{r['rss_mb']:,.0f}"
    return f"{r['rss_mb']:,.0f} (largest other process {r['child_rss_mb']:,.0f}, all others {r['children_total_mb']:,.0f})"


def scale(args) -> None:
    from scale_corpus import make_corpus

    rows, sizes = [], []
    for n in args.sizes:
        work = args.work / f"n{n}"
        midi = work / "midi"
        t = time.perf_counter()
        make_corpus(n, midi)
        print(f"[{n}] corpus ready ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        for d in ("json", "shards", "cache", "ckpt"):
            shutil.rmtree(work / d, ignore_errors=True)
        res = {}
        for fmt in ("json", "shards"):
            res[f"prepare {fmt}"] = run_step(
                "prepare", src=str(midi), out=str(work / fmt), format=fmt, jobs=args.jobs
            )
            res[f"load {fmt}"] = run_step("load", data=str(work / fmt))
            print(f"[{n}] {fmt}: {res[f'prepare {fmt}']['wall_s']:.0f} s", file=sys.stderr, flush=True)
        tok = work / "tokenizer.json"
        res["bpe"] = run_step(
            "bpe", data=str(work / "shards"), out=str(tok), vocab=args.vocab, sample=args.sample_events
        )
        res["cache"] = run_step(
            "cache", data=str(work / "shards"), tok=str(tok), out=str(work / "cache"), jobs=args.jobs
        )
        if n in args.train_sizes:
            res["train"] = run_step(
                "train",
                data=str(work / "shards"),
                out=str(work / "ckpt"),
                vocab=args.vocab,
                sample=args.sample_events,
            )
        print(f"[{n}] done", file=sys.stderr, flush=True)
        sizes.append(
            [
                n,
                du_mb(midi),
                du_mb(work / "json"),
                du_mb(work / "shards"),
                du_mb(work / "cache"),
                res["cache"]["tokens"],
            ]
        )
        for key, r in res.items():
            extra = ""
            if key.startswith("load"):
                extra = f"{r['pieces']:,} pieces, {r['load_s']:.1f} s reading ({r['pieces'] / r['load_s']:,.0f} pieces/s)"
            elif key == "bpe":
                extra = f"{r['events']:,} base events from {r['pieces_used']:,} pieces, {r['vocab']} tokens"
            elif key == "cache":
                extra = f"{r['pieces']:,} pieces × 7 transpositions, {r['windows']:,} windows"
            elif key == "train":
                extra = "BPE + cache + one step (tiny model); from shards"
            rows.append([n, key, f"{r['wall_s']:.1f}", rss(r), extra])
    print(table(["files", "step", "wall s", "peak RSS MB: main process (workers)", "notes"], rows))
    print()
    print(table(["files", "MIDI MB", "JSON MB", "shards MB", "token cache MB", "cached tokens"], sizes))


def bpe_check(args) -> None:
    from scale_corpus import make_corpus

    n = args.bpe_check
    work = args.work / f"n{n}"
    make_corpus(n, work / "midi")
    rows, toks = [], {}
    for b in args.budgets:
        out = work / f"tok-{b}.json"
        sample = None if b == "all" else int(float(b))
        r = run_step("bpe", data=str(work / "midi"), out=str(out), vocab=args.vocab, sample=sample)
        toks[b] = str(out)
        rows.append([b, r["events"], r["pieces_used"], f"{r['wall_s']:.1f}", f"{r['rss_mb']:,.0f}"])
    tpn = run_step("tokens_per_note", data=str(work / "midi"), toks=toks)
    ref = tpn["tokens_per_note"]["all"] if "all" in toks else None
    for row in rows:
        v = tpn["tokens_per_note"][row[0]]
        row += [f"{v:.4f}", f"{100 * (v / ref - 1):+.2f} %" if ref else ""]
    print(
        f"BPE on samples of the {n}-file corpus, vocabulary {args.vocab}; tokens/note over all {tpn['notes']:,} notes"
    )
    print()
    print(
        table(
            [
                "sample (base events)",
                "events used",
                "pieces",
                "wall s",
                "peak RSS MB",
                "tokens/note",
                "vs all",
            ],
            rows,
        )
    )


def main(argv=None) -> int:
    from midiforge.tokens.bpe_sample import DEFAULT_SAMPLE_EVENTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument(
        "--train-sizes", type=int, nargs="*", default=[1000, 10000], help="sizes that also run train.py"
    )
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/midiforge-scale"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--sample-events", type=int, default=DEFAULT_SAMPLE_EVENTS)
    ap.add_argument(
        "--bpe-check", type=int, metavar="FILES", help="compare sampled BPE with BPE on everything"
    )
    ap.add_argument("--budgets", nargs="+", default=["1e6", "2e6", "4e6", "16e6", "all"])
    args = ap.parse_args(argv)
    if args.step:
        _step_main(*args.step)
        return 0
    if args.no_train:
        args.train_sizes = []
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start\n")
    if args.bpe_check:
        bpe_check(args)
    else:
        scale(args)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
