"""`midiforge generate`: the command line over :func:`midiforge.generate.core.generate` and, for edits inside a
prompt (--infill, --add-track, --replace-track, --harmonize), :func:`midiforge.generate.infill.edit`; output
files (MIDI, and WAV / piano roll on request) written atomically.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import symusic
import torch

from midiforge.checkpoint import load_inference
from midiforge.device import resolve_device
from midiforge.errors import UsageError
from midiforge.fsio import atomic_write_bytes
from midiforge.generate.core import argument_problems, generate
from midiforge.generate.infill import Piece, Request, check_checkpoint, edit
from midiforge.generate.steer import add_arguments as add_steer_arguments
from midiforge.generate.steer import cli_controls, min_problems
from midiforge.measure import copycheck
from midiforge.notes.midi import MidiReadError, load_score
from midiforge.notes.render import render_pianoroll, render_wav
from midiforge.options import add_checkpoint, add_device, add_sampling, seed_of


def configure_parser(p) -> None:
    add_checkpoint(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.mid",
                   help="the MIDI file to write (OUT_1.mid, OUT_2.mid ... with -n above 1)")  # fmt: skip
    p.add_argument("--prompt", metavar="IN.mid", help="a MIDI file to continue (default: start from nothing)")
    p.add_argument(
        "--prompt-bars", type=int, metavar="N", help="continue only the first N bars of the prompt"
    )
    add_sampling(p)
    p.add_argument("--ignore-eos", action="store_true", help="never end a piece early (fill --max-tokens)")
    p.add_argument("-n", "--num-samples", type=int, default=1, metavar="N",
                   help="how many pieces, written together (default: %(default)s)")  # fmt: skip
    p.add_argument("--wav", action="store_true",
                   help="also render OUT.wav (FluidSynth when installed, else a simple built-in synthesizer)")  # fmt: skip
    p.add_argument("--pianoroll", action="store_true", help="also draw OUT.png, a piano roll")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole context at every step (slow; the same music, for checking)")  # fmt: skip
    add_device(p)
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="the weights' precision: auto = bf16 on CUDA, fp32 elsewhere (default: %(default)s)")  # fmt: skip
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="CUDA: compile the token step before capturing it (a few seconds once, then faster tokens;"
                   " auto = on)")  # fmt: skip
    add_steer_arguments(p)  # controls, --min-new-tokens, --min-seconds
    copycheck.add_arguments(p)  # --check-copies, -t/--train-dataset, --copy-threshold
    add_edit_arguments(p)  # --infill, --add-track, --replace-track, --harmonize


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: auto = bf16 on CUDA (the matrix units' format; tokens as fp32 where the margin between
    the likeliest tokens exceeds bf16's rounding), float32 on the CPU and MPS."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (choose from {', '.join(sorted(DTYPES))})")
    return DTYPES[name] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def output_paths(output: str | os.PathLike, n: int) -> list[Path]:
    """OUT.mid for one sample; OUT_1.mid ... OUT_n.mid for several."""
    out = Path(output)
    if out.suffix.lower() not in (".mid", ".midi"):
        out = out.with_name(out.name + ".mid")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, n + 1)]


def write_midi(score: symusic.Score, path: Path) -> None:
    """Write ``score`` atomically (never a partial file); an unwritable place is a UsageError."""
    try:
        atomic_write_bytes(path, score.dumps_midi())
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e


def write_extras(args, score: symusic.Score, path: Path) -> list[str]:
    """``--wav`` / ``--pianoroll`` beside the MIDI file at ``path``: what was written, for the summary line."""
    extras = []
    if args.wav:
        backend = render_wav(score, path.with_suffix(".wav"))
        extras.append(f"{path.with_suffix('.wav')} ({backend})")
    if args.pianoroll:
        render_pianoroll(score, path.with_suffix(".png"), title=path.name)
        extras.append(str(path.with_suffix(".png")))
    return extras


def read_prompt(path) -> symusic.Score:
    """The --prompt file as a Score; an unreadable one is a UsageError naming it."""
    try:
        return load_score(path)
    except MidiReadError as e:
        raise UsageError(f"cannot read prompt {path}: {e}") from e


def make_parent(path: Path) -> None:
    """The folder the outputs go to (created before the model runs, so a bad place fails in one line)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {path.parent}: {e.strerror}") from e


def run(args) -> int:
    if (request := edit_request(args)) is not None:  # an edit inside the prompt
        return run_edit(args, request)
    problems = argument_problems(
        max_new_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        prompt_bars=args.prompt_bars,
    )
    if args.prompt_bars is not None and args.prompt is None:
        problems.append("--prompt-bars needs --prompt")
    problems += min_problems(args.min_new_tokens, args.min_seconds, args.max_tokens)
    if problems:
        raise UsageError("; ".join(problems))
    device = resolve_device(args.device)
    copy_files = copycheck.cli_training_files(args)  # None without --check-copies
    prompt = read_prompt(args.prompt) if args.prompt is not None else None
    paths = output_paths(args.output, args.num_samples)
    make_parent(paths[0])

    model, tokenizer = load_inference(args.checkpoint, device, inference_dtype(args.dtype, device))
    seed = seed_of(args)
    t0 = time.perf_counter()
    results = generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=seed,
        ignore_eos=args.ignore_eos,
        use_kv_cache=not args.no_kv_cache,
        prompt_bars=args.prompt_bars,
        device=device,
        controls=cli_controls(args),
        min_new_tokens=args.min_new_tokens,
        min_seconds=args.min_seconds,
        grid=args.grid_mask,
        beat_strength=args.beat_strength,
        compile={"auto": None, "on": True, "off": False}[args.compile],
    )
    elapsed = time.perf_counter() - t0
    num_tokens = sum(r.num_new_tokens for r in results)
    for r, path in zip(results, paths, strict=True):
        write_midi(r.score, path)
        extras = write_extras(args, r.score, path)
        print(
            f"{path}: {r.score.note_num()} notes, {r.seconds:.1f} s, {r.num_new_tokens} new tokens "
            f"(stopped: {r.stop_reason}), {r.num_skipped} skipped-invalid events"
            + (f"; {', '.join(extras)}" if extras else "")
        )
    rate = num_tokens / max(elapsed, 1e-9)
    print(f"generated {num_tokens} tokens in {elapsed:.1f} s ({rate:.0f} tok/s), seed {seed}")
    if copy_files is not None:
        copycheck.print_check(args, tokenizer, copy_files, [r.ids for r in results], [str(p) for p in paths])
    return 0


def add_edit_arguments(p) -> None:
    g = p.add_argument_group(
        "editing inside the --prompt (--infill: checkpoints trained with infilling, the default)"
    )
    g.add_argument(
        "--infill",
        action="append",
        metavar="BARS",
        help="rewrite these bars (e.g. 9-16, or 9-16,25-28; may repeat), keeping the rest",
    )
    g.add_argument(
        "--add-track",
        action="append",
        metavar="INSTRUMENT",
        help="write a new track (a GM name or program number; may repeat) to go with the prompt, in time with it"
        " (any checkpoint)",
    )
    g.add_argument("--replace-track", metavar="N|NAME",
                   help="rewrite one track (its number from 1, or its name), in time with the others (any checkpoint)")  # fmt: skip
    g.add_argument("--harmonize", nargs="?", const="3", metavar="VOICES",
                   help="write VOICES (default 3: alto, tenor, bass) voices under the one-track melody given in"
                        " --prompt, jointly and in time with it (any checkpoint)")  # fmt: skip
    g.add_argument("--voice-ranges", metavar="LO-HI,...",
                   help="--harmonize: each voice's range, top voice first, MIDI numbers or names (default SATB:"
                        " G3-D5,C3-G4,E2-C4)")  # fmt: skip
    g.add_argument("--free-harmony", action="store_true",
                   help="--harmonize: let the model choose every sonority (default: where the melody attacks,"
                        " the voices sound a triad or dominant seventh with it)")  # fmt: skip


def edit_request(args) -> Request | None:
    r = Request(args.infill, args.add_track, args.replace_track, args.harmonize, args.voice_ranges,
                args.free_harmony)  # fmt: skip
    if (args.voice_ranges is not None or args.free_harmony) and args.harmonize is None:
        raise UsageError("--voice-ranges and --free-harmony go with --harmonize")
    return r if r.kinds() else None


def run_edit(args, request: Request) -> int:
    """``midiforge generate`` with an edit request: one output per sample, seeds seed, seed+1, ..."""
    problems = argument_problems(max_new_tokens=args.max_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples)  # fmt: skip
    if args.prompt is None:
        problems.append(f"{request.kinds()[0]} needs --prompt (the piece to edit)")
    others = [f for f, v in (("--prompt-bars", args.prompt_bars), ("--max-seconds", args.max_seconds),
                             ("--min-new-tokens", args.min_new_tokens), ("--min-seconds", args.min_seconds),
                             ("--check-copies", getattr(args, "check_copies", None)),
                             ("controls", cli_controls(args))) if v]  # fmt: skip
    if others:
        problems.append(f"{request.kinds()[0]} does not combine with {', '.join(others)} yet")
    if problems:
        raise UsageError("; ".join(problems))
    device = resolve_device(args.device)
    prompt = read_prompt(args.prompt)
    paths = output_paths(args.output, args.num_samples)
    model, tok = load_inference(args.checkpoint, device, inference_dtype(args.dtype, device))
    if request.infill:  # track edits write the ordinary stream (joint.py): any checkpoint will do
        check_checkpoint(args.checkpoint, tok)
    request.plan(Piece.from_score(tok, prompt))  # every bad request fails before any output is written
    make_parent(paths[0])
    seed = seed_of(args)
    t0 = time.perf_counter()
    for k, path in enumerate(paths):
        score = edit(model, tok, prompt, request, seed=seed + k, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, max_new_tokens=args.max_tokens, use_kv_cache=not args.no_kv_cache,
                     device=device)  # fmt: skip
        write_midi(score, path)
        extras = write_extras(args, score, path)
        print(f"{path}: {score.note_num()} notes, {len(score.tracks)} tracks ({' '.join(request.kinds())}, seed "
              f"{seed + k})" + (f"; {', '.join(extras)}" if extras else ""))  # fmt: skip
    print(f"edited {len(paths)} piece(s) in {time.perf_counter() - t0:.1f} s")
    return 0
