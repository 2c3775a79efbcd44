"""Issue 19's levers for the full stream on POP909, in held-out bits per note at equal compute.

bench_quality.py's training and scoring (same model, steps, tokens per step, vocabulary 2,048, seeds), with more
rows: each lever is the events v4 stream rewritten by a prototype below (not the tokenizer), then BPE learnt on the
training pieces with the same trainer settings as ``MidiTokenizer.train_bpe``; an identity rewrite gives the
``ours`` row's tokens. docs/tokenizer-levers.md has the table and what it says.

    .venv/bin/python bench/bench_levers.py --rows ours nopedal notrack tv trim pdur poff pedq --seeds 0 \\
        --threads 1 --results levers.jsonl

- ``nopedal`` / ``notrack``: ``TokenizerConfig(pedals=False)`` / ``(tracks=False)``: what each costs.
- ``tv``: VELOCITY and TRACK as one compound event VELOCITY×TRACK (128 ids more): the velocity and track of a note
  change together when the track changes.
- ``trim``: the alphabet without the control prefix and infilling ids (which plain pieces never hold): 252 ids
  more for merges at the same vocabulary (a model trained this way could take no controls).
- ``pdur``: a pedal press as PEDAL(1) DURATION(length), as a note is, with no PEDAL(0).
- ``poff``: pedal changes carry their own offset from the latest note onset (PEDAL(on|off, k), 192 ids) instead of
  SHIFTs of their own, so the notes' time shifts are those of a stream without pedal.
- ``plate``: a pedal change at the time of a note onset written after that onset's notes (v4: before them), so
  that the model has seen the new chord when it predicts the pedal.
- ``pedq``: pedal times rounded to a sixteenth (3 grid steps): loses pedal timing, to see what it costs.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (the bench this one extends: its CLI, training and scoring)

from midiforge.notes.read import read_notes  # noqa: E402
from midiforge.tokens.tokenizer import CHAR_BASE, SPECIALS, MidiTokenizer  # noqa: E402
from midiforge.tokens.vocab import TokenizerConfig  # noqa: E402

CONFIGS = {"nopedal": TokenizerConfig(pedals=False), "notrack": TokenizerConfig(tracks=False)}
LEVERS = {
    "nopedal": "ours without PEDAL (tracks, key signature)",
    "notrack": "ours without TRACK (pedal, key signature)",
    "tv": "lever: VELOCITY×TRACK compound events",
    "trim": "lever: no control/infilling ids in the alphabet",
    "pdur": "lever: pedal press as PEDAL(1) DURATION(length)",
    "poff": "lever: pedal changes at an offset from the latest onset",
    "plate": "lever: pedal changes after the notes of their onset",
    "pedq": "lever (lossy): pedal times on a sixteenth grid",
}

TOK = MidiTokenizer()
V = TOK.vocab
K = {n: V.k(n) for n in V.kinds}
MAXS = TOK.config.max_shift
HELD_BY = (K["pitch"], K["pedal"], K["velocity"])  # events written under the current PROGRAM and TRACK


def _relayout(items) -> np.ndarray:
    """Base events of ``(time, event, program, track)`` items in stream order: SHIFTs between times, PROGRAM and
    TRACK where they change before an event held by them (``program`` None: an event of no track)."""
    out, t, prog, track, first = [], 0, 0, 0, True
    for ti, e, p, tr in items:
        d = ti - t
        while d > MAXS:
            out.append(V.start["shift"] + MAXS - 1)
            d -= MAXS
        if d > 0:
            out.append(V.start["shift"] + d - 1)
        t = ti
        if p is not None:
            if p != prog or first:
                out.append(V.start["program"] + p)
                prog, first = p, False
            if tr != track:
                out.append(V.start["track"] + tr)
                track = tr
        out.append(e)
    return np.asarray(out, np.int64)


def _walk(ev: np.ndarray):
    """(index, kind, value, time, program, track) of every event that is not SHIFT, PROGRAM or TRACK."""
    kind, val = V.kind[ev], V.value[ev]
    time = np.cumsum(np.where(kind == K["shift"], val, 0))
    prog = track = 0
    for i in range(len(ev)):
        k = int(kind[i])
        if k == K["program"]:
            prog = int(val[i])
        elif k == K["track"]:
            track = int(val[i])
        elif k != K["shift"]:
            yield i, k, int(val[i]), int(time[i]), prog, track


def tv(ev: np.ndarray) -> np.ndarray:
    """VELOCITY(v) and TRACK(t) → one VELOCITY×TRACK(v, t) event (ids from V.size); a TRACK before a pedal stays."""
    kind, val = V.kind[ev], V.value[ev]
    out, track, vel, i = [], 0, 0, 0
    while i < len(ev):
        k = kind[i]
        if k == K["track"]:
            nxt = kind[i + 1] if i + 1 < len(ev) else -1
            track = int(val[i])
            if nxt == K["velocity"]:
                vel = int(val[i + 1])
                out.append(V.size + vel * 8 + track)
                i += 2
                continue
            out.append(V.size + vel * 8 + track if nxt == K["pitch"] else ev[i])
        elif k == K["velocity"]:
            vel = int(val[i])
            out.append(V.size + vel * 8 + track)
        else:
            out.append(ev[i])
        i += 1
    return np.asarray(out, np.int64)


def pdur(ev: np.ndarray) -> np.ndarray:
    """PEDAL(1) DURATION(press length) and no PEDAL(0); the PROGRAM/TRACK/SHIFT events written again."""
    rows = list(_walk(ev))
    length, down = {}, {}
    for i, k, x, t, p, tr in rows:
        if k == K["pedal"] and x == 1 and (p, tr) not in down:
            down[(p, tr)] = (i, t)
        elif k == K["pedal"] and x == 0 and (p, tr) in down:
            j, t0 = down.pop((p, tr))
            length[j] = t - t0
    items = []
    for i, k, _, t, p, tr in rows:
        if k == K["pedal"] and i not in length:
            continue  # a release, or a press never released
        items.append((t, ev[i], p if k in HELD_BY else None, tr))
        if k == K["pedal"]:
            d = min(length[i], len(V.duration_index) - 1)
            items.append((t, V.start["duration"] + V.duration_index[d], None, None))
    return _relayout(items)


def poff(ev: np.ndarray) -> np.ndarray:
    """A pedal change within 8 quarters after the latest note onset becomes PEDAL(on|off, offset) (ids from
    V.size) written after that onset's notes; the others stay as they are."""
    items, onset = [], None
    for i, k, x, t, p, tr in _walk(ev):
        if k == K["pitch"]:
            onset = t
        if k == K["pedal"] and onset is not None and t - onset < MAXS:
            items.append((onset, 1, V.size + x * MAXS + (t - onset), p, tr))
        else:
            items.append((t, 0, ev[i], p if k in HELD_BY else None, tr))
    items.sort(key=lambda r: (r[0], r[1]))  # stable: after the notes of their onset, in their order
    return _relayout([(t, e, p, tr) for t, _, e, p, tr in items])


def plate(ev: np.ndarray) -> np.ndarray:
    """Pedal changes at a note onset's time moved after that onset's notes; the others stay where they are."""
    rows = list(_walk(ev))
    onsets = {t for _, k, _, t, _, _ in rows if k == K["pitch"]}
    items = [(t, int(k == K["pedal"] and t in onsets), ev[i], p if k in HELD_BY else None, tr)
             for i, k, _, t, p, tr in rows]  # fmt: skip
    items.sort(key=lambda r: (r[0], r[1]))  # stable
    return _relayout([(t, e, p, tr) for t, _, e, p, tr in items])


def pedq(notes):
    """The piece with its pedal presses and releases rounded to a sixteenth."""
    q = notes.tpq / 4
    on = np.rint(notes.pedal_time / q) * q
    off = np.rint((notes.pedal_time + notes.pedal_duration) / q) * q
    return dataclasses.replace(notes, pedal_time=on.astype(np.int64), pedal_duration=(off - on).astype(np.int64))


def lever_tokens(row: str, train, test, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rewrite = {"tv": tv, "pdur": pdur, "poff": poff, "plate": plate}.get(row, lambda e: e)
    extra = {"tv": 128, "poff": 2 * MAXS}.get(row, 0)
    drop = [k for k in V.kinds if k.startswith("ctl") or k == "fim"] if row == "trim" else []
    prepare = pedq if row == "pedq" else (lambda n: n)
    events = [rewrite(TOK.events(prepare(read_notes(f)))[0]) for f in list(train) + list(test)]
    dropped = np.zeros(V.size + extra, bool)
    for name in drop:
        dropped[V.start[name] : V.start[name] + V.sizes[name]] = True
    alphabet = [chr(CHAR_BASE + i) for i in np.flatnonzero(~dropped)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)  # fmt: skip
    texts = [MidiTokenizer._to_text(e, TOK.word_starts_of_events(e)) for e in events]  # the tokenizer's words
    bpe.train_from_iterator(texts[: len(train)], trainer)
    ids = [np.asarray(bpe.encode(t).ids, np.int64) for t in texts]
    return bpe.get_vocab_size(), ids[: len(train)], ids[len(train) :]


_tokenize = bq.tokenize


def tokenize(row: str, train, test, vocab: int):
    if row in CONFIGS:
        return bq.ours(train, test, vocab, CONFIGS[row])
    if row in LEVERS:
        return lever_tokens(row, train, test, vocab)
    return _tokenize(row, train, test, vocab)


if __name__ == "__main__":
    bq.ROWS.update(LEVERS)
    bq.tokenize = tokenize
    bq.main()
