"""How well a small model trained with controls follows them (issue 11), against the unconditioned rate.

Run from the repository root (about 15-20 minutes on 2 CPU cores; the corpus is reused by later runs)::

    .venv/bin/python bench/bench_controls.py --work /tmp/bench_controls

1. ``midiforge demo-data --styles`` builds a tagged multi-style corpus (``--styles``, ``--per-style`` pieces
   each) under WORK/corpus; every style folder is one ``-t TAG=DIR``.
2. A small model (``--preset``, ``--max-steps``) trains on it with controls on (control dropout 0.5).
3. For each control and each of its most common training values (labels measured by
   :func:`midiforge.tokens.controls.measure` on the training pieces), ``--samples`` pieces are generated with that
   control alone; the same estimator measures each sample. Adherence = share of samples whose measured value
   equals the request, averaged over the requested values. The baseline = the share of ``--uncond`` samples
   generated without any control that happen to have the requested value (same values, same average).
4. Style tags have no estimator of their own: a nearest-centroid classifier over the statistics of
   ``evaluate`` (:func:`midiforge.measure.stats.piece_stats`: pitch classes, durations, inter-onset intervals,
   polyphony, range, ...) is fit on the training pieces; the table gives how often it assigns a tagged sample
   to its requested tag, against chance (1/tags), the unconditioned samples, and the real validation pieces.

Prints markdown: machine, settings, the table. Sampling: temperature 1, top-k --top-k.

``--checkpoint CKPT`` instead measures the requests of issue 18 on a trained checkpoint (the demo's), with
``--samples`` pieces per request and the same number without it (the baseline), sampled as ``midiforge generate``
does by default: ``--instruments piano,violin`` (both have notes, and no other instrument or second track),
``--tempo 90`` and ``--time-sig 3/4`` (every tempo / time signature event of the file is the one asked for) and
``--key "D minor"`` (the Krumhansl-Kessler estimate of the notes, controls.estimate_key, says D minor; at the
default ``--key-strength`` and at each of ``--key-strengths``, 0 being the key signature alone); ``--beat-strength X``
samples every set with that chords-on-the-beat bias instead of generate's default::

    .venv/bin/python bench/bench_controls.py --checkpoint demo/ckpt --samples 20 --seed 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from midiforge import checkpoint as ck  # noqa: E402
from midiforge.data.demo import build_styles_corpus, tag_args  # noqa: E402
from midiforge.generate.core import generate  # noqa: E402
from midiforge.measure.stats import piece_stats  # noqa: E402
from midiforge.notes.midi import find_files, score_to_notes  # noqa: E402
from midiforge.notes.read import read_notes  # noqa: E402
from midiforge.tokens.controls import Controls, measure  # noqa: E402

KINDS = ("instruments", "time_sig", "tempo", "key", "density", "polyphony")
GOALS = {"instruments": "100% (hard)", "time_sig": ">= 90%", "tempo": ">= 90%", "key": ">= 70%",
         "density": "-", "polyphony": "-", "tag": "> chance"}  # fmt: skip


def features(notes) -> np.ndarray:
    """A fixed-length vector of a piece's evaluate statistics (for the tag classifier)."""
    s = piece_stats(notes)
    pc = np.asarray(s["pitch_class"], np.float64)
    pc = pc / max(pc.sum(), 1.0)
    pc = np.roll(pc, -int(np.argmax(pc)))  # transposition-invariant: the commonest pitch class first

    def mstd(a):
        a = np.asarray(a, np.float64)
        return [float(a.mean()), float(a.std())] if len(a) else [0.0, 0.0]

    pitch = notes.pitch[~notes.is_drum].astype(np.float64)
    return np.array([*pc, *mstd(s["ioi"]), *mstd(s["duration"]), *mstd(s["velocity"]), s["polyphony"],
                     s["pitch_range"], s["in_scale"], *mstd(pitch), s["note_density"]])  # fmt: skip


class Centroids:
    """Nearest centroid on z-scored features."""

    def __init__(self, x: np.ndarray, y: list[str]):
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-9
        z = (x - self.mu) / self.sd
        self.tags = sorted(set(y))
        self.c = np.stack([z[[t == u for t in y]].mean(0) for u in self.tags])

    def predict(self, x: np.ndarray) -> list[str]:
        z = (x - self.mu) / self.sd
        d = ((z[:, None, :] - self.c[None]) ** 2).sum(-1)
        return [self.tags[i] for i in d.argmin(1)]


def value_of(c: Controls, kind: str):
    return getattr(c, kind)


def request(kind: str, value) -> dict:
    """The generate() spelling of one control value."""
    if kind == "instruments":
        return {"instruments": list(value)}
    if kind == "time_sig":
        return {"time_sig": f"{value[0]}/{value[1]}"}
    if kind == "tempo":
        from midiforge.tokens.controls import TEMPO_EDGES

        lo = TEMPO_EDGES[value - 1] if value > 0 else 40.0
        hi = TEMPO_EDGES[value] if value < len(TEMPO_EDGES) else lo + 30
        return {"tempo": (lo + hi) / 2}
    if kind == "key":
        from midiforge.tokens.controls import key_name

        return {"key": key_name(value)}
    from midiforge.tokens.controls import LEVELS

    return {kind: LEVELS[value]}


def describe(kind: str, value) -> str:
    return str(Controls(**{kind: value}).describe()[kind])


def sample(model, tok, controls, n, args, seed) -> list:
    gens = generate(model, tok, max_new_tokens=args.tokens, min_new_tokens=args.min_tokens, num_samples=n,
                    seed=seed, top_k=args.top_k, controls=controls)  # fmt: skip
    return [score_to_notes(g.score) for g in gens]


def link_extra(corpus: Path, spec: str, limit: int | None) -> None:
    """Symlink the MIDI files of DIR under corpus/{train,val}/TAG (every 5th by name to val); idempotent."""
    tag, _, folder = spec.partition("=")
    files = find_files([Path(folder)])[:limit]
    if not tag or not files:
        raise SystemExit(f"--extra {spec}: want TAG=DIR with MIDI files in DIR")
    for i, f in enumerate(files):
        dst = corpus / ("val" if i % 5 == 4 else "train") / tag / Path(f).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(Path(f).resolve())


REQUESTS = (  # (label, generate() controls, goal)
    ("--instruments piano,violin", {"instruments": "piano,violin"}, ">= 90%"),
    ("--tempo 90", {"tempo": 90}, "100%"),
    ("--time-sig 3/4", {"time_sig": "3/4"}, "100%"),
    ('--key "D minor"', {"key": "D minor"}, ">= 70%"),
)


def obeyed(controls: dict, score) -> bool:
    """Whether a generated score is what was asked for (see the module docstring)."""
    from midiforge.tokens.controls import estimate_key, parse_key

    if "instruments" in controls:
        tracks = [(128 if t.is_drum else t.program) for t in score.tracks if len(t.notes)]
        return sorted(tracks) == [0, 40]
    if "tempo" in controls:
        return len(score.tempos) > 0 and all(abs(t.qpm - controls["tempo"]) < 0.01 for t in score.tempos)
    if "time_sig" in controls:
        n, d = (int(x) for x in controls["time_sig"].split("/"))
        ts = score.time_signatures
        return len(ts) > 0 and all((t.numerator, t.denominator) == (n, d) for t in ts)
    notes = score_to_notes(score)
    return len(notes) > 0 and estimate_key(notes) == parse_key(controls["key"])


def requests_table(args) -> int:
    """The issue-18 requests on a trained checkpoint: adherence against the same samples without the request."""
    model, tok = ck.load_inference(args.checkpoint)
    t0 = time.perf_counter()
    # --beat-strength: the same requests with another chords-on-the-beat bias (None: generate's default)
    beat = {} if args.beat_strength is None else {"beat_strength": args.beat_strength}
    plain = [g.score for g in generate(model, tok, num_samples=args.samples, seed=args.seed, **beat)]
    rows = []
    keyed = [(f'--key "D minor" --key-strength {x:g}', {"key": "D minor", "key_strength": x}, ">= 70%")
             for x in args.key_strengths]  # fmt: skip
    for label, controls, goal in (*REQUESTS, *keyed):
        gens = generate(model, tok, num_samples=args.samples, seed=args.seed, controls=controls, **beat)
        hit = np.mean([obeyed(controls, g.score) for g in gens])
        base = np.mean([obeyed(controls, s) for s in plain])
        rows.append(f"| `{label}` | {hit:.0%} | {base:.0%} | {goal} |")
    print(f"# bench_controls --checkpoint ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__};"
          f" load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(f"checkpoint {args.checkpoint}: {args.samples} samples per request, --seed {args.seed}, generate's"
          f" defaults (1024 new tokens, temperature 1), --beat-strength"
          f" {'default' if args.beat_strength is None else f'{args.beat_strength:g}'};"
          f" {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print("| request | obeyed | without the request (baseline) | goal |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="measure issue 18's requests on this checkpoint instead")
    ap.add_argument("--key-strengths", type=lambda t: [float(x) for x in t.split(",") if x], default=[0.0, 2.0, 4.0],
                    help="--checkpoint: also the key request at these --key-strength values (the plain row: the"
                         " default)")  # fmt: skip
    ap.add_argument("--beat-strength", type=float, default=None,
                    help="--checkpoint: every set sampled at this --beat-strength (default: generate's)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_controls"))
    ap.add_argument("--styles", default="bach,palestrina,monteverdi,trecento,folk")
    ap.add_argument("--per-style", type=int, default=40)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=1500)
    ap.add_argument("--batch-budget", type=int, default=8 * 384**2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--values", type=int, default=3, help="most common training values requested per control")
    ap.add_argument("--samples", type=int, default=8, help="samples per requested value")
    ap.add_argument("--uncond", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--min-tokens", type=int, default=192)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", action="append", default=[], metavar="TAG=DIR",
                    help="add a folder of MIDI files as one more style (e.g. pop=../shared/corpus/pop909: real"
                         " tempos, which music21's files lack); every 5th file by name goes to validation")  # fmt: skip
    ap.add_argument("--extra-max", type=int, default=None, help="at most this many files of each --extra")
    args = ap.parse_args()
    torch.set_num_threads(
        int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    )  # OMP_NUM_THREADS=1 on a shared machine
    if args.checkpoint is not None:
        return requests_table(args)
    t_all = time.perf_counter()

    corpus = args.work / "corpus"
    t0 = time.perf_counter()
    s = build_styles_corpus(corpus, args.styles.split(","), args.per_style, progress=False)
    for spec in args.extra:
        link_extra(corpus, spec, args.extra_max)
    t_corpus = time.perf_counter() - t0
    print(f"corpus: {s.line()}", file=sys.stderr)

    ckpt = args.work / f"ckpt-{args.preset}-{args.max_steps}"
    from midiforge.train import command as tr

    t0 = time.perf_counter()
    targs = [str(args.epochs), str(ckpt)]
    extra_tags = [spec.partition("=")[0] for spec in args.extra]
    for split, flag in (("train", "-t"), ("val", "-v")):
        for a in tag_args(corpus, split) + [f"{t}={corpus / split / t}" for t in extra_tags]:
            targs += [flag, a]
    targs += ["--preset", args.preset, "--vocab-size", str(args.vocab), "-b", str(args.batch_budget),
              "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--save-every-minutes", "1000"]  # fmt: skip
    if tr.main(targs) != 0:
        return 1
    t_train = time.perf_counter() - t0
    metrics = ck.load(ckpt).metrics
    model, tok = ck.load_inference(ckpt)
    model.eval()

    # Training labels: the estimator on each training piece as it is (transposition 0).
    train_files = {tag: find_files([corpus / "train" / tag]) for tag in tok.tags}
    labels, feats, ys = [], [], []
    for tag, files in train_files.items():
        for f in files:
            n = read_notes(f)
            labels.append(measure(n, use_key_signature=False))
            feats.append(features(n))
            ys.append(tag)
    clf = Centroids(np.stack(feats), ys)
    val_x, val_y = [], []
    for tag in tok.tags:
        for f in find_files([corpus / "val" / tag]) if (corpus / "val" / tag).is_dir() else []:
            val_x.append(features(read_notes(f)))
            val_y.append(tag)

    t0 = time.perf_counter()
    uncond = sample(model, tok, None, args.uncond, args, args.seed)
    un_measured = [measure(n, use_key_signature=False) for n in uncond]
    rows = []
    seed = args.seed + 1
    for kind in KINDS:
        common = Counter(value_of(c, kind) for c in labels).most_common(args.values)
        values = [v for v, _ in common]
        if kind == "instruments":  # also a set the corpus never has: the hard constraint does not need data
            values.append((40, 42))
        hits, base, detail = [], [], []
        for v in values:
            got = [
                value_of(measure(n, use_key_signature=False), kind)
                for n in sample(model, tok, request(kind, v), args.samples, args, seed)
            ]
            seed += 1
            if kind == "instruments":  # the constraint: every note's program is in the set
                ok = [g is not None and set(g) <= set(v) for g in got]
            else:
                ok = [g == v for g in got]
            b = [value_of(c, kind) for c in un_measured]
            b = [(g is not None and set(g) <= set(v)) if kind == "instruments" else g == v for g in b]
            hits.append(np.mean(ok))
            base.append(np.mean(b))
            detail.append(f"{describe(kind, v)} {np.mean(ok):.0%}/{np.mean(b):.0%}")
        rows.append((kind, np.mean(hits), np.mean(base), "; ".join(detail)))
    # Tags: classifier accuracy on tagged samples vs chance, unconditioned samples and real validation pieces.
    tag_hits, tag_base, detail = [], [], []
    un_pred = clf.predict(np.stack([features(n) for n in uncond]))
    for tag in tok.tags:
        notes = sample(model, tok, {"tag": tag}, args.samples, args, seed)
        seed += 1
        pred = clf.predict(np.stack([features(n) for n in notes]))
        tag_hits.append(np.mean([p == tag for p in pred]))
        tag_base.append(np.mean([p == tag for p in un_pred]))
        detail.append(f"{tag} {tag_hits[-1]:.0%}/{tag_base[-1]:.0%}")
    val_acc = (
        np.mean([p == y for p, y in zip(clf.predict(np.stack(val_x)), val_y, strict=True)]) if val_x else None
    )
    rows.append(("tag", np.mean(tag_hits), np.mean(tag_base), "; ".join(detail)))
    t_gen = time.perf_counter() - t0

    print(f"# bench_controls ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python"
          f" {platform.python_version()}, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    counts = ", ".join(f"{t} {len(f)}" for t, f in train_files.items())
    e = metrics["epochs"][-1] if metrics["epochs"] else {}
    print(
        f"corpus: demo-data --styles {args.styles} --per-style {args.per_style}"
        f"{''.join(' + --extra ' + e for e in args.extra)}: training pieces {counts};"
        f" {len(val_y)} validation pieces\n"
    )
    print(
        f"model: --preset {args.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters,"
        f" vocabulary {len(tok)}, {ck.load(ckpt).state['train_state']['step']} steps"
        f" (--max-steps {args.max_steps}), last training loss {metrics['steps'][-1][1]:.2f}, last validation loss"
        f" {e.get('val_loss')}\n"
    )
    print(
        f"sampling: {args.samples} samples per requested value ({args.values} most common training values"
        f" per control), {args.uncond} unconditioned; {args.min_tokens}..{args.tokens} new tokens, top-k"
        f" {args.top_k}\n"
    )
    print(
        "| control | adherence | unconditioned (baseline) | goal | per requested value (adherence/baseline) |"
    )
    print("|---|---|---|---|---|")
    for kind, a, b, d in rows:
        print(f"| {kind} | {a:.0%} | {b:.0%} | {GOALS[kind]} | {d} |")
    chance = 1 / max(len(tok.tags), 1)
    print(f"\ntag: nearest-centroid classifier on evaluate statistics, fit on the training pieces; chance"
          f" {chance:.0%}; on the real validation pieces it is right {val_acc:.0%} of the time (ceiling)."
          if val_acc is not None else "")  # fmt: skip
    tempos = Counter(describe("tempo", c.tempo) for c in labels)
    print(
        f"\ntraining labels: tempo bins {dict(tempos)}; time signatures"
        f" {dict(Counter(describe('time_sig', c.time_sig) for c in labels).most_common(6))}\n"
    )
    print(
        f"time: corpus {t_corpus:.0f} s, training {t_train:.0f} s, sampling {t_gen:.0f} s,"
        f" total {time.perf_counter() - t_all:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
