"""Objective statistics of pieces, and of sets of pieces compared with a reference set.

Per piece (:func:`piece_stats`, on a :class:`~midiforge.notes.midi.NoteTable`; drums are left out of everything that
needs a pitch): pitch-class histogram, inter-onset intervals, note density, polyphony, pitch range, velocities,
durations, and key consistency (the best Krumhansl-Kessler key profile, its correlation, and the share of notes
in that key's scale).

Per set (:func:`compare_sets`): each statistic pooled over the set's pieces as a normalised histogram, and its
*overlap* with the reference set's histogram, sum(min(p, q)) in [0, 1] (1: the same distribution). Scalars
(density, polyphony, range, key correlation, in-scale share, on-beat and off-grid shares: beat.py) compare the sets' per-piece values by the overlap of
their kernel density estimates. A number means something only between a floor and a ceiling, so the caller compares three
sets with the same reference: the samples, one half of the reference against the other (the ceiling) and a set
that is clearly not music (the floor; ``midiforge evaluate`` samples an untrained model of the same shape).
"""

from __future__ import annotations

import numpy as np

from midiforge.measure.beat import off_grid_share, on_beat_share
from midiforge.notes.midi import NoteTable
from midiforge.tokens.controls import KK_PROFILES, PITCH_CLASSES

# Krumhansl & Kessler (1982) key profiles, tonic first: controls.py's table (one copy of the numbers).
KK_MAJOR, KK_MINOR = KK_PROFILES
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)  # natural minor
PITCH_NAMES = PITCH_CLASSES

# Bin edges of the pooled histograms (quarter notes for IOI and duration, MIDI velocity).
IOI_EDGES = np.array([0, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1, 3 / 2, 2, 3, 4, np.inf])
DURATION_EDGES = IOI_EDGES
VELOCITY_EDGES = np.arange(0, 129, 16)

HISTOGRAMS = {  # name -> (per-piece values key, bin edges or None for the 12 pitch classes, label)
    "pitch_class": ("pitch_class", None, "pitch class"),
    "ioi": ("ioi", IOI_EDGES, "inter-onset interval (quarters)"),
    "duration": ("duration", DURATION_EDGES, "duration (quarters)"),
    "velocity": ("velocity", VELOCITY_EDGES, "velocity"),
}
SCALARS = {
    "note_density": "notes per second",
    "polyphony": "notes sounding (mean while any sounds)",
    "pitch_range": "pitch range (semitones)",
    "key_correlation": "best key-profile correlation",
    "in_scale": "share of notes in the key's scale",
    "on_beat": "share of notes starting on a beat",
    "off_grid": "share of notes starting where the training set never does",
}


def ticks_to_seconds(notes: NoteTable, ticks: np.ndarray) -> np.ndarray:
    """Seconds of tick times under the piece's tempo map (120 quarters/min before the first tempo)."""
    ticks = np.asarray(ticks, np.float64)
    t = np.asarray(notes.tempo_time, np.float64)
    qpm = np.asarray(notes.tempo_qpm, np.float64)
    if len(t) == 0 or t[0] > 0:
        t, qpm = np.concatenate([[0.0], t]), np.concatenate([[120.0], qpm])
    order = np.argsort(t, kind="stable")
    t, qpm = t[order], qpm[order]
    sec_per_tick = 60.0 / (qpm * notes.tpq)
    seg_start = np.concatenate([[0.0], np.cumsum(np.diff(t) * sec_per_tick[:-1])])  # seconds at each change
    i = np.clip(np.searchsorted(t, ticks, side="right") - 1, 0, len(t) - 1)
    return seg_start[i] + (ticks - t[i]) * sec_per_tick[i]


def piece_seconds(notes: NoteTable) -> float:
    """Length of a piece in seconds: the end of its last note."""
    if len(notes) == 0:
        return 0.0
    return float(ticks_to_seconds(notes, [int((notes.time + notes.duration).max())])[0])


def estimate_key(pc_weights: np.ndarray) -> tuple[int, str, float]:
    """(tonic pitch class, "major"|"minor", Pearson correlation) of the best of the 24 key profiles."""
    w = np.asarray(pc_weights, np.float64)
    if not w.any() or np.all(w == w[0]):
        return 0, "major", 0.0
    best = (0, "major", -2.0)
    for mode, profile in (("major", KK_MAJOR), ("minor", KK_MINOR)):
        for tonic in range(12):
            r = float(np.corrcoef(w, np.roll(profile, tonic))[0, 1])
            if r > best[2]:
                best = (tonic, mode, r)
    return best


def key_name(tonic: int, mode: str) -> str:
    return f"{PITCH_NAMES[tonic]} {mode}"


def polyphony(onset: np.ndarray, offset: np.ndarray) -> float:
    """Mean number of notes sounding, weighted by time, over the time when at least one sounds."""
    if len(onset) == 0:
        return 0.0
    times = np.concatenate([onset, offset]).astype(np.float64)
    delta = np.concatenate([np.ones(len(onset)), -np.ones(len(offset))])
    order = np.lexsort((delta, times))  # at equal times, note-offs (-1) first
    times, count = times[order], np.cumsum(delta[order])
    span = np.diff(times)  # count[i] notes sound from times[i] to times[i+1]
    live = count[:-1] > 0
    total = span[live].sum()
    return float((count[:-1][live] * span[live]).sum() / total) if total > 0 else float(count.max())


def piece_stats(notes: NoteTable, used_positions: np.ndarray | None = None) -> dict:
    """The statistics of one piece (drums excluded but from the beat's two); values are plain floats/lists
    (JSON-ready). ``used_positions``: (12,) bool, the positions of the quarter where the training set starts
    notes (beat.py); ``off_grid`` is 0 without it."""
    pitched = ~notes.is_drum
    pitch = notes.pitch[pitched].astype(np.int64)
    time, dur = notes.time[pitched].astype(np.int64), notes.duration[pitched].astype(np.int64)
    n = len(pitch)
    pc = np.bincount(pitch % 12, minlength=12).astype(np.float64) if n else np.zeros(12)
    onsets = np.unique(time)
    seconds = piece_seconds(notes) if len(notes) else 0.0
    # Key: pitch classes weighted by duration (a long tonic counts more than a passing note).
    pc_dur = np.bincount(pitch % 12, weights=np.maximum(dur, 1), minlength=12) if n else np.zeros(12)
    tonic, mode, r = estimate_key(pc_dur)
    scale = np.array([(tonic + s) % 12 for s in (MAJOR_SCALE if mode == "major" else MINOR_SCALE)])
    return {
        "num_notes": int(n),
        "seconds": seconds,
        "pitch_class": pc.tolist(),
        "ioi": (np.diff(onsets) / notes.tpq).tolist(),
        "duration": (dur / notes.tpq).tolist(),
        "velocity": notes.velocity[pitched].astype(np.int64).tolist(),
        "note_density": n / seconds if seconds > 0 else 0.0,
        "polyphony": polyphony(time, time + np.maximum(dur, 1)),
        "pitch_range": float(pitch.max() - pitch.min()) if n else 0.0,
        "key": key_name(tonic, mode),
        "key_correlation": r,
        "in_scale": float(np.isin(pitch % 12, scale).mean()) if n else 0.0,
        "on_beat": on_beat_share(notes),
        "off_grid": 0.0 if used_positions is None else off_grid_share(notes, used_positions),
    }


def _hist(values, edges) -> np.ndarray:
    h = np.histogram(np.clip(values, edges[0], edges[-2] if np.isinf(edges[-1]) else edges[-1]), edges)[0]
    return h.astype(np.float64)


def _normalise(h: np.ndarray) -> np.ndarray:
    s = h.sum()
    return h / s if s > 0 else h


def overlap(p: np.ndarray, q: np.ndarray) -> float:
    """Overlapping area of two normalised histograms: 1 for the same distribution, 0 for disjoint ones."""
    return float(np.minimum(_normalise(p), _normalise(q)).sum())


def kde_overlap(a: np.ndarray, b: np.ndarray, lo: float, hi: float) -> float:
    """Overlapping area of Gaussian kernel density estimates of two samples of a scalar (Yang & Lerch's
    measure). Bandwidth: Silverman's rule, at least 5% of the range ``lo..hi`` that all sets share, so that
    small sets and constant values still give smooth densities."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    floor = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
    bws = [max(1.06 * float(x.std()) * len(x) ** -0.2, floor) for x in (a, b)]
    grid = np.linspace(lo - 3 * max(bws), hi + 3 * max(bws), 512)

    def density(x, bw):
        d = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / bw) ** 2).sum(1)
        return d / d.sum()

    return float(np.minimum(density(a, bws[0]), density(b, bws[1])).sum())


def pooled(stats: list[dict]) -> dict:
    """Each histogram statistic pooled over a set's pieces (normalised), and each scalar's per-piece values."""
    out = {}
    for name, (key, edges, _) in HISTOGRAMS.items():
        if edges is None:
            h = np.sum([s[key] for s in stats], axis=0) if stats else np.zeros(12)
        else:
            vals = np.concatenate([np.asarray(s[key], np.float64) for s in stats]) if stats else np.zeros(0)
            h = _hist(vals, edges)
        out[name] = _normalise(np.asarray(h, np.float64))
    for name in SCALARS:
        out[name] = np.asarray([s[name] for s in stats], np.float64)
    return out


def compare_sets(sets: dict[str, list[dict]], reference: str, ceiling: tuple[str, str]) -> dict:
    """Every statistic of every set, and its overlap with ``sets[reference]``.

    ``sets`` maps a set name to the :func:`piece_stats` of its pieces. The ceiling is the overlap of the two
    sets named in ``ceiling`` (two halves of the reference) with each other, reported as ``overlap["ceiling"]``.
    """
    pools = {name: pooled(stats) for name, stats in sets.items()}
    out: dict = {}
    for name, (_, edges, label) in HISTOGRAMS.items():
        entry = {
            "kind": "histogram",
            "label": label,
            "bins": list(PITCH_NAMES) if edges is None else [float(e) for e in edges],
            "values": {s: p[name].round(6).tolist() for s, p in pools.items()},
        }
        entry["overlap"] = _overlaps(pools, name, reference, ceiling, lambda a, b: overlap(a, b))
        out[name] = entry
    for name, label in SCALARS.items():
        values = [v for p in pools.values() for v in p[name].tolist()]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        entry = {
            "kind": "scalar",
            "label": label,
            "mean": {s: _mean(p[name]) for s, p in pools.items()},
            "std": {s: _std(p[name]) for s, p in pools.items()},
        }
        entry["overlap"] = _overlaps(
            pools, name, reference, ceiling, lambda a, b, lo=lo, hi=hi: kde_overlap(a, b, lo, hi)
        )
        out[name] = entry
    return out


def _overlaps(pools, name, reference, ceiling, fn) -> dict:
    res = {s: round(fn(p[name], pools[reference][name]), 4) for s, p in pools.items() if s != reference}
    a, b = ceiling
    if a in pools and b in pools:
        res["ceiling"] = round(fn(pools[a][name], pools[b][name]), 4)
        res.pop(a, None)
        res.pop(b, None)
    return res


def _mean(a: np.ndarray) -> float | None:
    return round(float(a.mean()), 4) if len(a) else None


def _std(a: np.ndarray) -> float | None:
    return round(float(a.std()), 4) if len(a) else None


def figure_png(comparison: dict, title: str = "") -> bytes:
    """PNG bytes: one panel per statistic, the sets' distributions side by side (Agg, no pyplot)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(comparison)
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(5 * cols, 3.2 * rows), dpi=90)
    FigureCanvasAgg(fig)
    colors = {"reference": "tab:blue", "samples": "tab:orange", "floor": "tab:gray"}
    for i, name in enumerate(names):
        entry = comparison[name]
        ax = fig.add_subplot(rows, cols, i + 1)
        if entry["kind"] == "histogram":
            sets = [s for s in entry["values"] if not s.startswith("half")]
            width = 0.8 / max(1, len(sets))
            for j, s in enumerate(sets):
                v = entry["values"][s]
                x = np.arange(len(v)) + (j - (len(sets) - 1) / 2) * width
                ax.bar(x, v, width=width, label=s, color=colors.get(s))
            bins = entry["bins"]
            if isinstance(bins[0], str):
                ax.set_xticks(range(12), bins, fontsize=7)
            else:
                labels = [f"{b:g}" for b in bins[:-1]]
                ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45)
        else:
            sets = [s for s in entry["mean"] if not s.startswith("half") and entry["mean"][s] is not None]
            ax.bar(
                range(len(sets)),
                [entry["mean"][s] for s in sets],
                yerr=[entry["std"][s] for s in sets],
                color=[colors.get(s, "tab:green") for s in sets],
                capsize=3,
            )
            ax.set_xticks(range(len(sets)), sets, fontsize=8)
        ov = ", ".join(f"{k} {v:.2f}" for k, v in entry["overlap"].items())
        ax.set_title(f"{entry['label']}\noverlap with reference: {ov}", fontsize=8)
        if i == 0 and entry["kind"] == "histogram":
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(hspace=0.75, wspace=0.25, top=0.88 if title else 0.93, bottom=0.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
