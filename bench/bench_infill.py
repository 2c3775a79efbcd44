"""Infilling measured on held-out chorales (issue 12): prints a markdown table.

* bits per note of the original middle bars: given both sides (the FIM layout of fim.py/infill.py) against
  given only the left side (ordinary continuation), with the same prefix tokens in both;
* harmonisation (soprano given, three voices written by `--harmonize`) against Bach's own on the same melodies:
  key agreement of the lower voices with the melody (controls.estimate_key), share of parallel fifths/octaves
  among voice pairs moving together, share of onsets with a voice crossing.

    .venv/bin/python bench/bench_infill.py CKPT --val demo/midi/val --pieces 6
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from midiforge.checkpoint import load_inference
from midiforge.data import fim
from midiforge.generate import infill
from midiforge.notes.midi import load_score, score_to_notes
from midiforge.tokens.controls import estimate_key


def _nll(model, seq: list[int], lo: int, hi: int) -> float:
    """Sum of -log p (nats) of seq[lo:hi] given what precedes each."""
    x = torch.tensor([seq[:-1]])
    with torch.inference_mode():
        logp = F.log_softmax(model(x).float()[0], -1)  # (T, V)
    tgt = torch.tensor(seq[1:])
    per = -logp[torch.arange(len(tgt)), tgt]
    return float(per[lo - 1 : hi - 1].sum())


def middle_bits(model, tok, score, bars: int) -> tuple[float, float, int]:
    """(nats given left, nats given both, notes) of the middle ``bars`` bars of a piece."""
    piece = infill.Piece.from_score(tok, score)
    n = len(piece.bars) - 1
    a = max(1, n // 2 - bars // 2)
    rs, re_ = int(piece.bars[a]), int(piece.bars[min(a + bars, n)])
    t = piece.table
    pre = fim.subset(t, t.time < rs, t.pedal_time < rs, infill._meta(t, -1, rs))
    upto = fim.subset(t, t.time < re_, t.pedal_time < re_, infill._meta(t, -1, rs))
    pre_ids, upto_ids = list(fim.encode_table(tok, pre)), list(fim.encode_table(tok, upto))
    assert upto_ids[: len(pre_ids)] == pre_ids, "encoding is prefix-stable at onsets"
    middle = upto_ids[len(pre_ids) :]
    origin = fim.shift_total(tok, pre_ids)
    suf = fim.subset(t, t.time >= re_, t.pedal_time >= re_, infill._meta(t, re_, 1 << 62), origin=origin)
    L = model.config.max_seq_len
    suf_ids = list(fim.encode_table(tok, suf))[: int(L * infill.SUFFIX_SHARE)]
    S, M, _, _ = fim.sentinel_ids(tok).tolist()
    keep = L - len(middle) - len(suf_ids) - 4
    head = [tok.bos_id, *pre_ids][-keep:] if keep > 0 else []
    left = [*head, *middle]
    both = [*head, S, *suf_ids, M, *middle]
    if len(both) > L or not middle:
        return math.nan, math.nan, 0
    notes = int((tok.vocab.kind[tok.base_events(middle)] == tok.vocab.k("pitch")).sum())
    return (
        _nll(model, left, len(head), len(left)),
        _nll(model, both, len(both) - len(middle), len(both)),
        notes,
    )


def voices(score) -> list[np.ndarray]:
    """Per track (in order), a pitch per 16th-note step (-1 where silent)."""
    s = score.copy()
    end = max(1, s.end())
    step = s.ticks_per_quarter // 4
    out = []
    for t in s.tracks:
        v = np.full(end // step + 1, -1)
        a = t.notes.numpy()
        for on, d, p in zip(a["time"], a["duration"], a["pitch"], strict=True):
            v[on // step : max(on // step + 1, (on + d) // step)] = p
        out.append(v)
    return out


def voice_leading(score) -> tuple[float, float]:
    """(share of parallel fifths/octaves among pairs moving together, share of steps with a crossing)."""
    vs = voices(score)
    par = moves = 0
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            a, b = vs[i], vs[j]
            n = min(len(a), len(b))
            a, b = a[:n], b[:n]
            both = (a >= 0) & (b >= 0)
            ch = np.flatnonzero(both[1:] & both[:-1] & (a[1:] != a[:-1]) & (b[1:] != b[:-1])) + 1
            iv0 = (a[ch - 1] - b[ch - 1]) % 12
            iv1 = (a[ch] - b[ch]) % 12
            same_dir = np.sign(a[ch] - a[ch - 1]) == np.sign(b[ch] - b[ch - 1])
            par += int((same_dir & (iv0 == iv1) & np.isin(iv1, (0, 7))).sum())
            moves += len(ch)
    n = min(len(v) for v in vs)
    stack = np.stack([v[:n] for v in vs])
    sounding = (stack >= 0).all(0)
    cross = (np.diff(stack[:, sounding], axis=0) > 0).any(0)  # a lower track above the one before it
    return par / max(moves, 1), float(cross.mean()) if sounding.any() else 0.0


def satb(score):
    """The chorale's four voices (tracks named Soprano, Alto, Tenor, Bass with notes), else None."""
    by = {t.name: t for t in score.tracks if t.note_num()}
    if not all(n in by for n in ("Soprano", "Alto", "Tenor", "Bass")):
        return None
    s = score.copy()
    s.tracks = [by[n].copy() for n in ("Soprano", "Alto", "Tenor", "Bass")]
    return s


def key_agrees(score) -> bool:
    notes = score_to_notes(score)
    mel = notes.track == notes.track.min()
    k_mel = estimate_key(fim.subset(notes, mel))
    k_low = estimate_key(fim.subset(notes, ~mel))
    return k_mel is not None and k_mel == k_low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--val", required=True, help="held-out chorale MIDI folder")
    ap.add_argument("--pieces", type=int, default=6)
    ap.add_argument("--bars", type=int, default=4, help="length of the middle span (bars)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256, help="per span/chunk")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok = load_inference(args.ckpt)
    files = sorted(Path(args.val).glob("*.mid"))[: args.pieces]
    left = both = notes = 0.0
    gen_vl, bach_vl, gen_key, bach_key = [], [], [], []
    for f in files:
        score = satb(load_score(f))
        if score is None:
            continue
        lf, bt, n = middle_bits(model, tok, score, args.bars)
        if n:
            left, both, notes = left + lf, both + bt, notes + n
        melody = score.copy()
        melody.tracks = melody.tracks[:1]
        req = infill.Request(harmonize=3)
        out = infill.edit(model, tok, melody, req, seed=args.seed, max_new_tokens=args.max_tokens)
        bach = infill.Piece.from_score(tok, score).score(tok)
        gen_vl.append(voice_leading(out))
        bach_vl.append(voice_leading(bach))
        gen_key.append(key_agrees(out))
        bach_key.append(key_agrees(bach))
    ln2 = math.log(2)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, CPU; {args.ckpt}"
    )
    print(f"{len(gen_vl)} held-out chorales, middle span {args.bars} bars\n")
    print("| measure | model | Bach |")
    print("|---|---|---|")
    print(f"| bits/note of the middle, left side only | {left / ln2 / max(notes, 1):.2f} | — |")
    print(f"| bits/note of the middle, both sides (FIM) | {both / ln2 / max(notes, 1):.2f} | — |")
    print(f"| key of lower voices = key of melody | {np.mean(gen_key):.0%} | {np.mean(bach_key):.0%} |")
    g, b = np.array(gen_vl), np.array(bach_vl)
    print(f"| parallel 5ths/8ves per voice-pair move | {g[:, 0].mean():.3f} | {b[:, 0].mean():.3f} |")
    print(f"| 16th steps with a voice crossing | {g[:, 1].mean():.3f} | {b[:, 1].mean():.3f} |")


if __name__ == "__main__":
    main()
