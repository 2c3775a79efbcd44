"""`midiforge evaluate CKPT -v DATA`: what a model makes, measured.

1. Likelihood of held-out pieces (:mod:`midiforge.measure.scoring`): tokens per note, bits per token, bits per note,
   bits per second, a breakdown by attribute, and a unigram model of the training tokens as a baseline.
2. With ``--samples N``: N generated pieces against the reference pieces of DATA (:mod:`midiforge.measure.stats`), with
   a ceiling (one half of DATA against the other) and a floor (N pieces from an untrained model of the same
   shape, same sampling settings).
3. A copy check (:mod:`midiforge.measure.copycheck`) of the samples, and of the held-out pieces for reference, against
   the training set (``-t``, or the one the checkpoint recorded).

Reads the checkpoint (never writes there; the token cache and the training-set index go to ``--cache-dir``,
by default ``CKPT/cache``, the training run's own token cache). ``-o REPORT.json`` writes the report, and with
``--samples`` also ``REPORT.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from midiforge import checkpoint as ck
from midiforge.device import resolve_device
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.generate.core import argument_problems, generate
from midiforge.measure import copycheck, scoring
from midiforge.measure.beat import STEPS_PER_QUARTER, note_steps
from midiforge.measure.copycheck import DEFAULT_THRESHOLD
from midiforge.measure.scoring import Piece
from midiforge.measure.stats import compare_sets, figure_png, piece_seconds, piece_stats
from midiforge.model import Transformer
from midiforge.notes.midi import MidiReadError, score_to_notes
from midiforge.notes.read import read_notes
from midiforge.options import (
    DATA_HELP,
    add_checkpoint,
    add_device,
    add_sampling,
    add_train_data,
    add_val_data,
    seed_of,
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p)
    add_val_data(p, f"held-out pieces to measure the model on: {DATA_HELP} (default: the checkpoint's own:"
                 " the validation side of its split.json, or the -v it was trained with)")  # fmt: skip
    p.add_argument("-o", "--output", metavar="REPORT.json", help="write the report here (and REPORT.png)")
    p.add_argument(
        "--stride", type=int, metavar="N",
        help="for pieces longer than the model's context: score them in windows that move N tokens at a time"
        " (default: half the context; each token is scored once)",
    )  # fmt: skip
    add_train_data(p, "the training data, for the baseline and the copy check, as given to `midiforge train`"
                   " (default: the checkpoint's own)")  # fmt: skip
    p.add_argument(
        "--cache-dir", metavar="DIR", help="token cache and training-set index (default: CKPT/cache)"
    )
    p.add_argument(
        "--samples", type=int, default=0, metavar="N", help="generate N pieces and compare their statistics"
    )
    p.add_argument(
        "--copy-threshold", type=int, metavar="NOTES",
        help="flag samples sharing a longer run of notes with a training piece (default: the longest run of"
        f" a held-out piece with the training set, at least {DEFAULT_THRESHOLD})",
    )  # fmt: skip
    g = p.add_argument_group("sampling (with --samples; as in `midiforge generate`)")
    add_sampling(g)
    g.add_argument(
        "--grid-mask", choices=("pairs", "positions", "off"), default="pairs",
        help="onset grid mask of the samples and the floor (default pairs; see `midiforge generate --help`)",
    )  # fmt: skip
    add_device(p)


def _data_files(paths: list[Path] | None, ckpt: Path) -> tuple[list[Path], str]:
    """(the held-out files, where they came from): ``-v``, or what the checkpoint recorded."""
    files, origin = copycheck.validation_files(ck.read_config(ckpt), paths, ckpt)
    if not files and paths:
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise UsageError(f"-v: no such file or directory: {', '.join(missing)}")
        raise UsageError(f"-v: no .mid/.midi/.json/.mfshard file in {', '.join(map(str, paths))}")
    if not files:
        raise UsageError(f"{ckpt}: {origin}")
    return files, origin


def read_pieces(files: list[Path], tokenizer) -> tuple[list, list, dict[str, str]]:
    """(scoring.Piece per usable file, its NoteTable, skipped file → reason)."""
    pieces, tables, skipped = [], [], {}
    for f in files:
        try:
            notes = read_notes(f)
            ids = np.asarray(tokenizer.encode_notes(notes), np.int64)
        except MidiReadError as e:
            skipped[str(f)] = str(e)
            continue
        pieces.append(Piece(str(f), ids, len(notes), piece_seconds(notes)))
        tables.append(notes)
    return pieces, tables, skipped


def untrained_model(model, seed: int):
    """The floor: a freshly initialised model of the same shape (it samples tokens nearly uniformly)."""
    import torch

    torch.manual_seed(seed)
    return Transformer(model.config).to(next(model.parameters()).device).eval()


def used_positions(tok, tables) -> tuple[np.ndarray, str]:
    """(12,) bool: where the training set starts notes (the checkpoint's record), else where the reference
    pieces do; and which of the two it is."""
    grid = getattr(tok, "onset_grid", None)
    if grid is not None and grid.steps_per_quarter == STEPS_PER_QUARTER:
        return grid.used(), "the checkpoint's training set"
    used = np.zeros(STEPS_PER_QUARTER, bool)
    for t in tables:
        used[note_steps(t) % STEPS_PER_QUARTER] = True
    return used, "the reference pieces (the checkpoint recorded no onset grid)"


def sample_statistics(gens, tables, floor_gens, used=None) -> dict:
    ref = [piece_stats(t, used) for t in tables]
    sets = {
        "reference": ref,
        "samples": [piece_stats(score_to_notes(g.score), used) for g in gens],
        "floor": [piece_stats(score_to_notes(g.score), used) for g in floor_gens],
        "half_a": ref[0::2],
        "half_b": ref[1::2],
    }
    return compare_sets(sets, "reference", ("half_a", "half_b"))


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = resolve_device(args.device)
    ckpt = Path(args.checkpoint)
    if args.val_dataset:  # a bad -v is said before the model loads
        files, data_origin = _data_files(args.val_dataset, ckpt)
    model, tok = ck.load_inference(ckpt, device)
    if not args.val_dataset:  # the checkpoint's own held-out pieces, once it is known to be one
        files, data_origin = _data_files(None, ckpt)
    context = model.config.max_seq_len
    stride = min(args.stride or max(1, context // 2), context)
    pieces, tables, skipped = read_pieces(files, tok)
    if not pieces:
        first = next(iter(skipped.items()))
        raise UsageError(f"-v: no usable piece ({len(skipped)} files skipped, e.g. {first[0]}: {first[1]})")
    t0 = time.perf_counter()
    index, index_note = _training_index(args, ckpt, tok)
    report: dict = {
        "checkpoint": str(ckpt),
        "data": [str(p) for p in args.val_dataset] if args.val_dataset else data_origin,
        "skipped": skipped,
        "likelihood": scoring.score(
            model, tok, pieces, stride=stride, device=device, unigram=_unigram(index, tok)
        ),
        "training_set": index_note,
    }
    gens = []
    if args.samples:
        seed = report["seed"] = seed_of(args)
        sampling = dict(
            max_new_tokens=args.max_tokens, max_seconds=args.max_seconds, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, num_samples=args.samples, seed=seed, device=device,
            grid=args.grid_mask,
        )  # fmt: skip
        gens = generate(model, tok, None, **sampling)
        floor = generate(untrained_model(model, seed), tok, None, **sampling)
        report["samples"] = [
            {"notes": g.score.note_num(), "seconds": round(g.seconds, 3), "tokens": g.num_new_tokens}
            for g in gens
        ]
        used, origin = used_positions(tok, tables)
        report["grid_positions"] = {"used": np.flatnonzero(used).tolist(), "from": origin}
        report["statistics"] = sample_statistics(gens, tables, floor, used)
    if index is not None:
        report["copy_check"] = _copy_check(index, tok, pieces, gens, args.copy_threshold)
    report["seconds"] = round(time.perf_counter() - t0, 2)

    _print_summary(report, report["likelihood"]["total"])
    if args.output:
        _write_report(Path(args.output), report, f"{ckpt}: {len(gens)} samples vs {len(pieces)} reference pieces")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Every bad setting at once, as one UsageError."""
    problems = []
    if args.samples < 0:
        problems.append(f"--samples must be >= 0 (got {args.samples})")
    if args.copy_threshold is not None and args.copy_threshold < 1:
        problems.append(f"--copy-threshold must be >= 1 (got {args.copy_threshold})")
    if args.stride is not None and args.stride < 1:
        problems.append(f"--stride must be >= 1 (got {args.stride})")
    if args.samples:
        problems += argument_problems(
            max_new_tokens=args.max_tokens, max_seconds=args.max_seconds, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, num_samples=args.samples,
        )  # fmt: skip
    if problems:
        raise UsageError("; ".join(problems))


def _training_index(args: argparse.Namespace, ckpt: Path, tok):
    """(the copy check's index of the training set or None, a line saying where it came from)."""
    train_files, origin = copycheck.training_files(ck.read_config(ckpt), args.train_dataset, ckpt)
    if args.train_dataset and not train_files:
        raise UsageError(origin)
    if not train_files:
        return None, f"skipped: {origin}"
    cache_dir = Path(args.cache_dir) if args.cache_dir else ckpt / "cache"
    t1 = time.perf_counter()
    index, cached = copycheck.training_index(tok, train_files, cache_dir)
    note = (
        f"{'loaded' if cached else 'built'} in {time.perf_counter() - t1:.1f} s from {origin}"
        f" ({len(index.names)} pieces)"
    )
    return index, note


def _unigram(index, tok) -> np.ndarray | None:
    """Log-probabilities (V,) of the training set's token counts (add-one), the likelihood's baseline."""
    if index is None:
        return None
    counts = index.token_counts.astype(np.float64) + 1
    counts[[tok.pad_id, tok.bos_id]] = 0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def _copy_check(index, tok, pieces, gens, copy_threshold: int | None) -> dict:
    """Longest runs shared with the training set: the held-out pieces set the reference, samples are flagged
    above it (or above ``copy_threshold``)."""
    held = copycheck.check(index, tok, [p.ids for p in pieces], threshold=1 << 30)
    reference = max((h["notes"] for h in held), default=0)
    threshold = copy_threshold or max(reference, copycheck.DEFAULT_THRESHOLD)
    out = {
        "ngram_notes": copycheck.NGRAM + 1,
        "threshold_notes": threshold,
        "held_out_longest": reference,
        "held_out": [{"name": p.name, **h} for p, h in zip(pieces, held, strict=True)],
    }
    if gens:
        out["samples"] = copycheck.check(index, tok, [g.ids for g in gens], threshold)
    return out


def _write_report(out: Path, report: dict, title: str) -> None:
    """REPORT.json and, with sample statistics, REPORT.png beside it, each written atomically."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(report, indent=1).encode())
        if "statistics" in report:
            atomic_write_bytes(out.with_suffix(".png"), figure_png(report["statistics"], title))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if "statistics" in report else ""))


def _f(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _print_summary(report: dict, lik: dict) -> None:
    skipped = f" ({len(report['skipped'])} files skipped)" if report["skipped"] else ""
    print(
        f"held-out: {lik['pieces']} pieces, {lik['notes']} notes, {lik['seconds']:.0f} s{skipped};"
        f" context {report['likelihood']['window']}, stride {report['likelihood']['stride']}"
    )
    uni = lik.get("unigram")
    base = f" (unigram baseline: {_f(uni['bits_per_note'])} bits/note)" if uni else ""
    print(
        f"  {_f(lik['tokens_per_note'])} tokens/note, {_f(lik['bits_per_token'], 3)} bits/token,"
        f" {_f(lik['bits_per_note'])} bits/note, {_f(lik['bits_per_second'], 1)} bits/s{base}"
    )
    parts = ", ".join(f"{k} {_f(v)}" for k, v in lik["breakdown_bits_per_note"].items() if v)
    print(f"  bits/note by attribute: {parts}")
    if "statistics" in report:
        print(f"  sample statistics (seed {report['seed']}), overlap with the reference (1 = same distribution):")
        for name, entry in report["statistics"].items():
            ov = entry["overlap"]
            print(
                f"    {name:16s} samples {_f(ov.get('samples'))}  ceiling (half vs half)"
                f" {_f(ov.get('ceiling'))}  floor (untrained model) {_f(ov.get('floor'))}"
            )
        for name in ("on_beat", "off_grid"):  # shares: their means say more than the overlap of their spreads
            m = report["statistics"][name]["mean"]
            print(
                f"    {name:16s} mean share: samples {_f(m.get('samples'))}  reference {_f(m.get('reference'))}"
                f"  halves {_f(m.get('half_a'))} / {_f(m.get('half_b'))}  floor {_f(m.get('floor'))}"
            )
    cc = report.get("copy_check")
    if cc:
        line = f"  copy check: held-out pieces share at most {cc['held_out_longest']} notes with a training piece"
        if "samples" in cc:
            runs = [s["notes"] for s in cc["samples"]]
            flagged = sum(s["flagged"] for s in cc["samples"])
            line += (
                f"; samples at most {max(runs)}, {flagged} of {len(runs)} flagged (> {cc['threshold_notes']})"
            )
        print(line)
    else:
        print(f"  training set: {report['training_set']}")
