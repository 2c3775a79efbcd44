"""Tokenizer benchmark: midiforge vs bare symusic parsing vs MidiTok 3.1 REMI.

Run from the repository root::

    .venv/bin/python bench/bench_tokenizer.py            # ~2-3 minutes on 2 cores
    .venv/bin/python bench/bench_tokenizer.py --repeat 1 --no-extra-vocab   # quicker

Prints markdown tables:

1. encoding speed (one process, parse included, BPE excluded unless said so),
2. tokens per note at the same vocabulary size (BPE trained on the first --train files, counted on the next --test),
3. loading prepared JSON vs parsing MIDI,
4. decoding speed.

Timings use time.perf_counter: one warm-up call, then every file is timed --repeat times, interleaved across the
pipelines being compared, and the best time per file is summed (robust to load from other processes on a shared
machine; the load average is printed). MidiTok is only timed on the test files unless --miditok-all is given (it
takes ~0.1 s per POP909 file).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

import symusic  # noqa: E402

from midiforge.data.prepare import json_document  # noqa: E402
from midiforge.fsio import file_sha256  # noqa: E402
from midiforge.notes.midi import find_files  # noqa: E402
from midiforge.notes.read import read_notes  # noqa: E402
from midiforge.tokens.tokenizer import MidiTokenizer  # noqa: E402
from midiforge.tokens.vocab import TokenizerConfig  # noqa: E402

try:
    import miditok
except ImportError:  # MidiTok is a dev dependency; the midiforge rows still make sense without it
    miditok = None


# ---------------------------------------------------------------------------------------------- helpers
def best_time(fn: Callable, items: Sequence, repeat: int) -> float:
    """Best wall time of ``repeat`` passes of ``fn`` over ``items``, after one warm-up call."""
    return best_times({"x": (fn, items)}, repeat)["x"]


def best_times(jobs: dict[str, tuple[Callable, Sequence]], repeat: int) -> dict[str, float]:
    """Time of each job (fn, items) over its items: the sum over items of the best of ``repeat`` calls.

    One warm-up call per job first. Calls are interleaved item by item (item 0 for every job, item 1 for every
    job, ...) and the best time is kept per item, so a burst of load from other processes on a shared machine
    neither skews one job against another nor spoils a whole pass.
    """
    n = {len(items) for _, items in jobs.values()}
    assert len(n) == 1, "all jobs must have the same number of items"
    n_items = n.pop()
    for fn, items in jobs.values():
        fn(items[0])
    best = {name: np.full(n_items, np.inf) for name in jobs}
    clock = time.perf_counter
    for _ in range(max(1, repeat)):
        for i in range(n_items):
            for name, (fn, items) in jobs.items():
                t0 = clock()
                fn(items[i])
                dt = clock() - t0
                if dt < best[name][i]:
                    best[name][i] = dt
    return {name: float(b.sum()) for name, b in best.items()}


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def source_notes(path: Path) -> int:
    """Number of notes in the source score (all tracks), the denominator of every per-note figure."""
    return sum(len(t.notes) for t in symusic.Score(str(path)).tracks)


def bare_parse(path: Path) -> None:
    score = symusic.Score(str(path))
    for track in score.tracks:
        track.notes.numpy()


def miditok_ids(seqs) -> tuple[int, int]:
    """(base tokens, ids) of a MidiTok encoding: one TokSequence or one per track, summed over tracks."""
    if not isinstance(seqs, list):
        seqs = [seqs]
    return sum(len(s.tokens) for s in seqs), sum(len(s.ids) for s in seqs)


def quiet_train(tok, vocab_size: int, files: list[Path]) -> float:
    """Train a MidiTok tokenizer, silencing its warnings and the progress bar tokenizers draws on fd 1/2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    t0 = time.perf_counter()
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok.train(vocab_size=vocab_size, files_paths=files)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
    return time.perf_counter() - t0


def timed_train_mf(
    config: TokenizerConfig, files: list[Path], vocab_size: int
) -> tuple[MidiTokenizer, float]:
    tok = MidiTokenizer(config)
    t0 = time.perf_counter()
    tok.train_bpe(files, vocab_size)
    return tok, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--corpus", default="../shared/corpus/pop909", help="MIDI folder (relative to the repo root)"
    )
    ap.add_argument("--train", type=int, default=100, help="files to train BPE on (the first N)")
    ap.add_argument("--test", type=int, default=60, help="files to measure on (the next N)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument(
        "--extra-vocab", type=int, default=4096, help="a second, larger vocabulary for the token counts"
    )
    ap.add_argument("--no-extra-vocab", action="store_true", help="skip the --extra-vocab rows")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--no-miditok", action="store_true", help="skip every MidiTok row")
    ap.add_argument("--miditok-all", action="store_true", help="also time MidiTok on every file (slow)")
    args = ap.parse_args(argv)

    corpus = Path(args.corpus)
    if not corpus.is_absolute():
        corpus = (REPO / corpus).resolve()
    if not corpus.is_dir():
        print(f"corpus not found: {corpus} (see ../shared/corpus/SOURCES.md)", file=sys.stderr)
        return 2
    all_files = find_files([corpus])
    train_files = all_files[: args.train]
    test_files = all_files[args.train : args.train + args.test]
    if not train_files or not test_files:
        print(f"need at least {args.train + 1} files in {corpus}, found {len(all_files)}", file=sys.stderr)
        return 2
    use_miditok = miditok is not None and not args.no_miditok
    t_start = time.perf_counter()

    print("# midiforge tokenizer benchmark\n")
    print(
        table(
            ["machine", "value"],
            [
                ["CPU", cpu_model()],
                ["cores (os.cpu_count / usable)", f"{os.cpu_count()} / {len(os.sched_getaffinity(0))}"],
                ["python", platform.python_version()],
                ["numpy", np.__version__],
                ["symusic", pkg_version("symusic")],
                ["tokenizers", pkg_version("tokenizers")],
                ["miditok", pkg_version("miditok")],
                ["midiforge commit", git_rev()],
                ["corpus", f"{corpus} ({len(all_files)} files)"],
                [
                    "split",
                    f"BPE trained on files 1-{len(train_files)}, measured on the next {len(test_files)}",
                ],
                [
                    "repeat",
                    f"per file, best of {args.repeat} calls (interleaved across pipelines), summed; 1 warm-up call",
                ],
                ["load average at start (1/5/15 min)", " / ".join(f"{x:.1f}" for x in os.getloadavg())],
            ],
        )
    )
    print()

    notes_of = {p: source_notes(p) for p in all_files}
    n_test = sum(notes_of[p] for p in test_files)
    n_all = sum(notes_of.values())

    # ---- tokenizers -------------------------------------------------------------------------------------
    base = MidiTokenizer()
    mf_bpe, mf_train_s = timed_train_mf(TokenizerConfig(), train_files, args.vocab)
    mf_beat, _ = timed_train_mf(TokenizerConfig(word_split="beat"), train_files, args.vocab)
    # The information REMI(use_programs) keeps: tracks of one program merged, no pedal, no key signature.
    same_cfg = TokenizerConfig(tracks=False, pedals=False, key_signatures=False)
    mf_same, _ = timed_train_mf(same_cfg, train_files, args.vocab)
    extra: dict[str, MidiTokenizer] = {}
    if not args.no_extra_vocab:
        extra["onset"], _ = timed_train_mf(TokenizerConfig(), train_files, args.extra_vocab)
        extra["beat"], _ = timed_train_mf(TokenizerConfig(word_split="beat"), train_files, args.extra_vocab)
    if use_miditok:
        remi = miditok.REMI()
        remi_p = miditok.REMI(miditok.TokenizerConfig(use_programs=True))
        remi_bpe = miditok.REMI()
        remi_p_bpe = miditok.REMI(miditok.TokenizerConfig(use_programs=True))
        mt_train_s = quiet_train(remi_bpe, args.vocab, train_files)
        quiet_train(remi_p_bpe, args.vocab, train_files)
        assert remi_bpe.is_trained and remi_p_bpe.is_trained and len(remi_p_bpe) == args.vocab

    # ---- 1. encoding speed --------------------------------------------------------------------------------
    def enc_mf(p):
        return base.events(read_notes(p))

    events_of = {p: base.events(read_notes(p)) for p in all_files}

    def bpe_only(p):
        return mf_bpe.bpe_encode(*events_of[p])

    bare_key = "bare parse: `symusic.Score(path)` + `track.notes.numpy()`"
    mf_key = "**midiforge** `tok.events(read_notes(path))` (no BPE)"
    remi_key = "MidiTok `REMI()` `encode(path)` (no BPE)"
    remi_p_key = "MidiTok `REMI(use_programs=True)` `encode(path)` (no BPE)"
    rows_spec: list[tuple[str, Callable, bool]] = [
        (bare_key, bare_parse, True),
        ("midiforge `read_notes(path)` only (parse → NoteTable)", read_notes, True),
        (mf_key, enc_mf, True),
        (f"midiforge `tok.encode(path)` with BPE {args.vocab}", mf_bpe.encode, True),
        (f"(BPE {args.vocab} step alone: `bpe_encode` of precomputed events)", bpe_only, True),
    ]
    if use_miditok:
        rows_spec += [
            (remi_key, remi.encode, args.miditok_all),
            (remi_p_key, remi_p.encode, args.miditok_all),
        ]
    times: dict[str, dict[str, float]] = {name: {} for name, _, _ in rows_spec}
    for split, files in (("test", test_files), ("all", all_files)):
        jobs = {name: (fn, files) for name, fn, do_all in rows_spec if split == "test" or do_all}
        for name, t in best_times(jobs, args.repeat).items():
            times[name][split] = t

    rows = []
    for name, _, _ in rows_spec:
        t = times[name]
        row = [name]
        for split, nf, nn in (("test", len(test_files), n_test), ("all", len(all_files), n_all)):
            row += [nf / t[split], nn / t[split]] if split in t else ["–", "–"]
        row += [f"{t['test'] / times[bare_key]['test']:.1f}×", f"{t['test'] / times[mf_key]['test']:.2f}×"]
        rows.append(row)
    n_t, n_a = len(test_files), len(all_files)
    print(f"## 1. Encoding speed (one process, parse included; {n_t} test files / all {n_a})\n")
    print(
        table(
            [
                "pipeline",
                f"files/s ({n_t})",
                f"notes/s ({n_t})",
                f"files/s ({n_a})",
                f"notes/s ({n_a})",
                f"time vs bare parse ({n_t})",
                f"time vs midiforge no-BPE ({n_t})",
            ],
            rows,
        )
    )
    mf_t = times[mf_key]["test"]
    print()

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**NOT met**"

    r = mf_t / times[bare_key]["test"]
    print(f"- midiforge (no BPE) takes {r:.1f}× the time of the bare parse: goal ≤ 5× {verdict(r <= 5)}")
    if use_miditok:
        for name in (remi_key, remi_p_key):
            r = times[name]["test"] / mf_t
            label = name.split(" `encode")[0]
            print(f"- midiforge (no BPE) is {r:.1f}× faster than {label}: goal ≥ 20× {verdict(r >= 20)}")
    print()

    # ---- 2. tokens per note ---------------------------------------------------------------------------------
    def mf_count(tok: MidiTokenizer) -> int:
        return sum(len(tok.encode(p)) for p in test_files)

    mf_base_n = sum(len(base.events(read_notes(p))[0]) for p in test_files)
    count_rows: list[list] = []

    def add(name: str, vocab: int | str, n_tokens: int):
        count_rows.append([name, vocab, n_tokens, n_tokens / n_test])

    if use_miditok:
        remi_base_n = remi_bpe_n = remi_p_base_n = remi_p_bpe_n = 0
        for p in test_files:
            b, i = miditok_ids(remi_bpe.encode(p))
            remi_base_n, remi_bpe_n = remi_base_n + b, remi_bpe_n + i
            b, i = miditok_ids(remi_p_bpe.encode(p))
            remi_p_base_n, remi_p_bpe_n = remi_p_base_n + b, remi_p_bpe_n + i
        add("MidiTok REMI (per-track streams, summed), no BPE", len(remi), remi_base_n)
        add("MidiTok REMI(use_programs=True), one stream, no BPE", len(remi_p), remi_p_base_n)
        add(f"MidiTok REMI + BPE {args.vocab} (split per bar)", len(remi_bpe), remi_bpe_n)
        add(
            f"MidiTok REMI(use_programs=True) + BPE {args.vocab} (split per bar)",
            len(remi_p_bpe),
            remi_p_bpe_n,
        )
    add("midiforge base events, no BPE", len(base), mf_base_n)
    add(f"**midiforge BPE {args.vocab}, onset words**", len(mf_bpe), mf_count(mf_bpe))
    add(f"midiforge BPE {args.vocab}, beat words", len(mf_beat), mf_count(mf_beat))
    add(f"midiforge BPE {args.vocab}, same information as REMI", len(mf_same), mf_count(mf_same))
    for split, tok in extra.items():
        add(f"midiforge BPE {args.extra_vocab}, {split} words", len(tok), mf_count(tok))
    print(
        f"## 2. Tokens per note ({len(test_files)} test files, {n_test:,} source notes; "
        f"BPE trained on {len(train_files)} other files)\n"
    )
    print(table(["tokenization", "vocab", "tokens", "tokens/note"], count_rows))
    print()
    print(
        f"- BPE training time on {len(train_files)} files: midiforge {mf_train_s:.1f} s"
        + (f", MidiTok REMI {mt_train_s:.1f} s" if use_miditok else "")
    )
    print()

    # ---- 3. JSON vs MIDI loading ------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="mf-bench-") as tmp:
        json_files = []
        for p in test_files:
            doc = json_document(read_notes(p), str(p), file_sha256(p))  # what `midiforge prepare` writes
            out = Path(tmp) / (p.stem + ".json")
            out.write_text(json.dumps(doc), encoding="utf-8")
            json_files.append(out)
        same = sum(
            np.array_equal(mf_bpe.encode(m), mf_bpe.encode_notes(read_notes(j)))
            for m, j in zip(test_files, json_files, strict=True)
        )
        mid_bytes = sum(p.stat().st_size for p in test_files)
        json_bytes = sum(p.stat().st_size for p in json_files)
        pairs = [
            ("load only: `read_notes`", read_notes, read_notes),
            ("load + base events (no BPE)", enc_mf, enc_mf),
            (
                f"load + events + BPE {args.vocab} → ids",
                mf_bpe.encode,
                lambda j: mf_bpe.encode_notes(read_notes(j)),
            ),
        ]
        rows = []
        for name, f_mid, f_json in pairs:
            t = best_times({"mid": (f_mid, test_files), "json": (f_json, json_files)}, args.repeat)
            t_mid, t_json = t["mid"], t["json"]
            rows.append(
                [
                    name,
                    len(test_files) / t_mid,
                    len(test_files) / t_json,
                    f"{t_mid / t_json:.2f}×" + (" (JSON faster)" if t_json < t_mid else " (MIDI faster)"),
                ]
            )
    print(f"## 3. Prepared JSON vs MIDI ({len(test_files)} test files, midiforge)\n")
    print(table(["pipeline", "MIDI files/s", "JSON files/s", "JSON speed-up"], rows))
    print()
    print(
        f"- sizes: MIDI {mid_bytes / 1e6:.2f} MB, JSON {json_bytes / 1e6:.2f} MB "
        f"({json_bytes / mid_bytes:.1f}×); identical ids from both: {same}/{len(test_files)}"
    )
    print()

    # ---- 4. decoding speed --------------------------------------------------------------------------------------
    ids_bpe = [mf_bpe.encode(p) for p in test_files]
    ids_base = [base.encode(p) for p in test_files]
    dec_rows = []
    for name, tok, ids in (
        ("midiforge base ids → Score", base, ids_base),
        (f"midiforge BPE {args.vocab} ids → Score", mf_bpe, ids_bpe),
    ):
        t = best_time(tok.decode, ids, args.repeat)
        dec_rows.append([name, len(ids) / t, n_test / t, sum(map(len, ids)) / t])
    if use_miditok:
        enc = [remi_p_bpe.encode(p) for p in test_files]
        mt_ids = [list(s.ids) for s in enc]

        def mt_decode(ids):
            return remi_p_bpe.decode(miditok.TokSequence(ids=list(ids), are_ids_encoded=True))

        t = best_time(mt_decode, mt_ids, args.repeat)
        dec_rows.append(
            [
                f"MidiTok REMI(use_programs=True) BPE {args.vocab} ids → Score",
                len(mt_ids) / t,
                n_test / t,
                sum(map(len, mt_ids)) / t,
            ]
        )
    print(f"## 4. Decoding speed ({len(test_files)} test files)\n")
    print(table(["decode", "files/s", "notes/s", "tokens/s"], dec_rows))
    print()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"_total benchmark time {time.perf_counter() - t_start:.0f} s; load average at the end {load}_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
