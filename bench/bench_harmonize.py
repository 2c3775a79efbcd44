"""Harmonisation measured on held-out four-voice chorales: prints a markdown table, Bach / model / random chords.

For each piece of a folder whose only tracks with notes are Soprano, Alto, Tenor and Bass (sorted by name, the
first --pieces, skipping --exclude: the demo's own piece), the soprano alone goes to `generate --harmonize` (the
model writes three voices; --free-harmony adds a row without the chord rule);
the same soprano under a random diatonic triad per soprano note, voiced in SATB ranges, is the floor;
--replace-bass adds a row where Bach's soprano, alto and tenor are given and `--replace-track Bass` writes the bass. The three
are measured by the project's judge, ../shared/tools/voice_leading.py (an 8th-note grid, voices ordered by mean
pitch), and the counts are summed over the pieces before the shares are taken.

    .venv/bin/python bench/bench_harmonize.py CKPT --val demo/midi/val --pieces 10 --out demo/bench_harmonize
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np
import symusic
import torch

VOICES = ("Soprano", "Alto", "Tenor", "Bass")
TOOLS = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "voice_leading.py"


def load_judge(path: Path):
    if not path.exists():
        sys.exit(f"the judge {path} is missing (the project's shared tools; --judge PATH)")
    spec = importlib.util.spec_from_file_location("voice_leading", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def satb_pieces(folder: Path, n: int, exclude: set[str]) -> list[tuple[Path, symusic.Score]]:
    """The first ``n`` pieces (by name) whose tracks with notes are exactly Soprano, Alto, Tenor, Bass."""
    out = []
    for f in sorted(folder.glob("*.mid")):
        if f.stem in exclude:
            continue
        s = symusic.Score(str(f))
        names = [t.name for t in s.tracks if t.note_num()]
        if sorted(names) != sorted(VOICES):
            continue
        by = {t.name: t for t in s.tracks if t.note_num()}
        s.tracks = [by[v].copy() for v in VOICES]
        out.append((f, s))
        if len(out) == n:
            break
    return out


def melody_of(score: symusic.Score) -> symusic.Score:
    m = score.copy()
    m.tracks = m.tracks[:1]
    return m


def random_chords(melody: symusic.Score, key_pcs: set[int], ranges: dict, rng) -> symusic.Score:
    """The floor: under every soprano note a random diatonic triad containing it (any major/minor triad when
    the note is outside the key), alto/tenor/bass each a random chord tone in its range, below the voice above."""
    triads = []
    for r in range(12):
        for third in (3, 4):
            ch = {r, (r + third) % 12, (r + 7) % 12}
            triads.append((ch, ch <= key_pcs))
    out = melody.copy()
    tracks = [symusic.Track(v, 0, False) for v in VOICES[1:]]
    for n in melody.tracks[0].notes:
        pc = n.pitch % 12
        cands = [ch for ch, dia in triads if pc in ch and dia] or [ch for ch, _ in triads if pc in ch]
        chord = cands[rng.integers(len(cands))]
        above = n.pitch
        for tr, v in zip(tracks, VOICES[1:], strict=True):
            lo, hi = ranges[v]
            opts = [p for p in range(lo, min(hi, above) + 1) if p % 12 in chord]
            p = int(opts[rng.integers(len(opts))]) if opts else min(hi, above)
            tr.notes.append(symusic.Note(n.time, n.duration, p, n.velocity))
            above = p
    out.tracks = [out.tracks[0], *tracks]
    return out


def harmonize(model, tok, melody, seed: int, top_p: float, max_tokens: int, free: bool = False):
    from midiforge.generate import infill

    request = infill.Request(harmonize="3", free_harmony=free)
    return infill.edit(model, tok, melody, request, seed=seed, top_p=top_p, max_new_tokens=max_tokens)


def replace_bass(model, tok, score, seed: int, top_p: float, max_tokens: int):
    """Bach's soprano, alto and tenor given, the bass rewritten by ``--replace-track Bass``."""
    from midiforge.generate import infill

    request = infill.Request(replace_track="Bass")
    return infill.edit(model, tok, score, request, seed=seed, top_p=top_p, max_new_tokens=max_tokens)


def summarise(counts: list[dict]) -> dict[str, str]:
    """The table's cells from raw counts summed over pieces."""
    tot = lambda k: sum(c[k] for c in counts)  # noqa: E731
    rng_ = {v: [sum(c["in_range"][v][i] for c in counts) for i in (0, 1)] for v in "ATB"}
    pct = lambda a, b, nd=1: f"{100 * a / max(b, 1):.{nd}f}"  # noqa: E731
    return {
        "voice crossing, % of grid steps": pct(tot("cross"), tot("steps2")),
        "sonority ⊆ a triad or dominant seventh, % of steps": pct(tot("chord_ok"), tot("steps2")),
        "alto / tenor / bass notes in SATB range, %": " / ".join(pct(*rng_[v]) for v in "ATB"),
        "grid steps with more than one note inside one voice, %": pct(tot("multi"), tot("voice_grid")),
        "a lower voice silent while the soprano sounds, %": pct(tot("low_silent_while_sop"), tot("sop_grid")),
        "soprano onsets where alto, tenor and bass all attack, %": pct(tot("homorhythm"), tot("sop_notes")),
        "parallel fifths + octaves per 100 voice-pair moves": pct(
            tot("par5") + tot("par8"), tot("pair_moves"), 2
        ),
        "lower voices' notes in the melody's key, %": pct(tot("in_key"), tot("low_notes")),
        "tracks in pitch order, named Alto/Tenor/Bass": f"{sum(c['named_ok'] for c in counts)}/{len(counts)}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--val", required=True, help="folder of four-voice MIDI files (Soprano/Alto/Tenor/Bass)")
    ap.add_argument("--pieces", type=int, default=10)
    ap.add_argument("--exclude", default="bwv112.5", help="comma-separated file stems to leave out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", help="also write every piece's versions here")
    ap.add_argument("--free-harmony", action="store_true", help="add a row: the model without the chord rule")
    ap.add_argument("--replace-bass", action="store_true",
                    help="add a row: Bach's soprano, alto and tenor given, the bass by --replace-track Bass")  # fmt: skip
    ap.add_argument("--judge", default=str(TOOLS), help="voice_leading.py, the project's judge")
    args = ap.parse_args()
    vl = load_judge(Path(args.judge))
    from midiforge.checkpoint import load_inference

    model, tok = load_inference(args.ckpt)
    pieces = satb_pieces(Path(args.val), args.pieces, set(filter(None, args.exclude.split(","))))
    out_dir = Path(args.out) if args.out else Path(__import__("tempfile").mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["Bach", "model", *(["model, --free-harmony"] if args.free_harmony else []),
             *(["model, --replace-track Bass"] if args.replace_bass else []), "random-chord floor"]  # fmt: skip
    rows: dict[str, list] = {n: [] for n in names}
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for f, score in pieces:
        mel = melody_of(score)
        mel_path = out_dir / f"{f.stem}.melody.mid"
        mel.dump_midi(str(mel_path))
        _, key = vl.key_of_melody(mel_path)
        made = {"Bach": score, "model": harmonize(model, tok, mel, args.seed, args.top_p, args.max_tokens)}
        if args.free_harmony:
            made["model, --free-harmony"] = harmonize(
                model, tok, mel, args.seed, args.top_p, args.max_tokens, True
            )
        if args.replace_bass:
            made["model, --replace-track Bass"] = replace_bass(model, tok, score, args.seed, args.top_p,
                                                               args.max_tokens)  # fmt: skip
        made["random-chord floor"] = random_chords(mel, key, {v: vl.SATB[v[0]] for v in VOICES}, rng)
        for name, s in made.items():
            p = out_dir / f"{f.stem}.{name.replace(', --', '-').split()[0].lower()}.mid"
            if name == "model, --replace-track Bass":
                p = out_dir / f"{f.stem}.replace-bass.mid"
            s.dump_midi(str(p))
            c = vl.analyse(p, 0.5, key=key)
            c["named_ok"] = bool(c["order_ok"] and c["names"][1:] == list(VOICES[1:]))
            rows[name].append(c)
    secs = time.perf_counter() - t0
    cells = {k: summarise(v) for k, v in rows.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU; checkpoint {args.ckpt}")  # fmt: skip
    print(f"{len(pieces)} pieces of {args.val}: {', '.join(f.stem for f, _ in pieces)}; seed {args.seed}, "
          f"top-p {args.top_p}; {secs:.0f} s\n")  # fmt: skip
    print("| measure | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for m in cells["Bach"]:
        print(f"| {m} | " + " | ".join(cells[r][m] for r in rows) + " |")


if __name__ == "__main__":
    main()
