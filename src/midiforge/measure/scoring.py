"""Likelihood of whole pieces under a model: sliding windows, bits per token/note/second, a breakdown by what
the tokens encode, and a unigram baseline.

A piece is ``[BOS] + ids + [EOS]``, tokens ``t[0..N]``; the model predicts ``t[1..N]`` (N predictions: every
content token and EOS). A piece longer than the model's context ``W`` is scored in windows: window k feeds
``t[c_k .. b_k - 1]`` and scores only the predictions of ``t[a_k + 1 .. b_k]``, where ``a_k = b_{k-1}``, so the
scored ranges partition ``1..N`` and every token is scored exactly once. Each window after the first starts its
context ``W - stride`` tokens before the first token it scores (moved back to a note onset, where training
windows start too), so every token is scored with at least about ``W - stride`` tokens of context. With
``stride = W`` the windows are exactly those of :class:`~midiforge.data.dataset.MidiDataset` (cut at onsets, no
overlap), which is how the validation loss of training is measured: then bits per note here equal
``val_loss * tokens / notes / ln 2``.

**Breakdown by attribute (holds with BPE).** A BPE token stands for one or more base events. Its bits are
split equally among the base events it contains, and each base event's share goes to its kind: ``time``
(SHIFT), ``pitch``, ``duration``, ``velocity``, ``program``, ``tempo``, ``meter`` (TIMESIG); EOS goes to
``end``. A token SHIFT+PITCH+DUR of 6 bits gives 2 bits each to time, pitch and duration. The parts sum to the
total, and without BPE (one event per token) this is the exact per-attribute negative log-likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Base event kinds (tokenizer.vocab.kinds) → the names the report uses; any other kind (key signature, pedal,
# control prefixes) is "other".
KIND_NAMES = {
    "shift": "time",
    "pitch": "pitch",
    "duration": "duration",
    "velocity": "velocity",
    "program": "program",
    "track": "program",  # which track of a program: part of the instrument
    "tempo": "tempo",
    "timesig": "meter",
}
CATEGORIES = ("time", "pitch", "duration", "velocity", "program", "tempo", "meter", "other", "end")
LN2 = math.log(2)
BATCH_TOKENS = 16384  # tokens per forward pass when scoring (windows of several pieces are batched)


@dataclass
class Piece:
    """One held-out piece: its content ids (no BOS/EOS), its notes and its length in seconds."""

    name: str
    ids: np.ndarray
    notes: int
    seconds: float


def count_notes(tokenizer, ids) -> int:
    """Notes a token sequence encodes: its PITCH base events (what the model predicts, one per note)."""
    events = tokenizer.base_events(np.asarray(ids, np.int64))
    return int((tokenizer.vocab.kind[events] == tokenizer.vocab.k("pitch")).sum())


def windows(word_starts: np.ndarray, num_ids: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(c, a, b) per window of a piece of ``num_ids`` content ids (so N = num_ids + 1 predictions): feed
    ``t[c:b]``, score the predictions of ``t[a+1 .. b]``. ``word_starts[i]``: content id i starts an onset.

    Ends ``b`` are cut at the last onset within ``window`` of ``c`` (a hard cut when there is none), as
    :func:`midiforge.data.dataset.window_starts` cuts them; with ``stride == window`` the contexts ``c`` are its starts.
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride {stride}, window {window}")
    safe = np.flatnonzero(np.asarray(word_starts, bool)) + 1  # positions in [BOS]+ids+[EOS] coordinates
    n = num_ids + 1  # index of EOS = number of predictions
    out, c, a = [], 0, 0
    while True:
        if n - c <= window:
            out.append((c, a, n))
            return out
        j = int(np.searchsorted(safe, c + window, side="right")) - 1
        b = int(safe[j]) if j >= 0 and safe[j] > c and safe[j] > a else c + window
        out.append((c, a, b))
        # The next context: W - stride tokens before the next scored token, moved back to an onset.
        want = b - (window - stride)
        j = int(np.searchsorted(safe, want, side="right")) - 1
        nc = int(safe[j]) if j >= 0 and safe[j] > c and b - int(safe[j]) < window else max(want, c + 1)
        c, a = nc, b


def category_weights(tokenizer) -> np.ndarray:
    """(V, len(CATEGORIES)) float64: the share of each token's bits that goes to each category."""
    v = tokenizer.vocab
    names = [KIND_NAMES.get(k, "other") for k in v.kinds]
    col = np.array([CATEGORIES.index(n) for n in names])
    weights = np.zeros((len(tokenizer), len(CATEGORIES)))
    for i in range(len(tokenizer)):
        events = tokenizer._flat[tokenizer._offs[i] : tokenizer._offs[i + 1]]
        if len(events):
            np.add.at(weights[i], col[v.kind[events]], 1.0 / len(events))
    weights[tokenizer.eos_id, CATEGORIES.index("end")] = 1.0
    return weights


@torch.no_grad()
def token_nll(
    model, pieces: list[np.ndarray], plans: list[list[tuple[int, int, int]]], device
) -> list[np.ndarray]:
    """Negative log-likelihood (nats, float64) of every prediction of every piece: pieces[i] holds the full
    token sequence t[0..N] and the result i its N values, each from exactly one window of ``plans[i]``."""
    out = [np.full(len(t) - 1, np.nan) for t in pieces]
    jobs = sorted(((b - c, i, c, a, b) for i, plan in enumerate(plans) for c, a, b in plan), reverse=True)
    model.eval()
    k = 0
    while k < len(jobs):
        longest = jobs[k][0]
        batch = jobs[k : k + max(1, BATCH_TOKENS // longest)]
        k += len(batch)
        x = torch.zeros(len(batch), longest, dtype=torch.long)  # (B, T) right-padded: causal, so harmless
        y = torch.full((len(batch), longest), -100, dtype=torch.long)
        for r, (n, i, c, _, b) in enumerate(batch):
            t = torch.from_numpy(np.asarray(pieces[i][c : b + 1], np.int64))
            x[r, :n], y[r, :n] = t[:-1], t[1:]
        logits = model(x.to(device)).float()  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
        nll = nll.double().cpu().numpy()  # (B, T)
        for r, (_, i, c, a, b) in enumerate(batch):
            out[i][a:b] = nll[r, a - c : b - c]
    assert not any(np.isnan(o).any() for o in out), "a prediction was not scored"
    return out


def unigram_logprobs(tokenizer, sequences) -> np.ndarray:
    """log p(token) (V,) of a unigram model with add-one smoothing, counted over content ids + EOS of each
    training sequence; PAD and BOS are never predicted and get no mass."""
    counts = np.ones(len(tokenizer), np.float64)
    counts[[tokenizer.pad_id, tokenizer.bos_id]] = 0
    for ids in sequences:
        counts += np.bincount(np.asarray(ids, np.int64), minlength=len(tokenizer))
        counts[tokenizer.eos_id] += 1
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def summarise(
    nats: float, tokens: int, notes: int, seconds: float, categories: np.ndarray | None = None
) -> dict:
    bits = nats / LN2
    out = {
        "tokens": int(tokens),
        "notes": int(notes),
        "seconds": round(float(seconds), 3),
        "bits": round(bits, 3),
        "tokens_per_note": tokens / notes if notes else None,
        "bits_per_token": bits / tokens if tokens else None,
        "bits_per_note": bits / notes if notes else None,
        "bits_per_second": bits / seconds if seconds > 0 else None,
    }
    if categories is not None:
        cat_bits = categories / LN2
        out["breakdown_bits_per_note"] = {
            name: (float(cat_bits[j]) / notes if notes else None) for j, name in enumerate(CATEGORIES)
        }
        out["breakdown_share"] = {
            name: (float(cat_bits[j]) / bits if bits else None) for j, name in enumerate(CATEGORIES)
        }
    return out


def score(
    model, tokenizer, pieces: list[Piece], *, stride: int | None = None, device="cpu", unigram=None
) -> dict:
    """Per-piece and total likelihood figures of ``pieces`` (see the module docstring), plus the unigram
    baseline on the same predictions when ``unigram`` (log-probabilities from :func:`unigram_logprobs`)."""
    window = model.config.max_seq_len
    stride = window if stride is None else stride
    seqs, plans = [], []
    for p in pieces:
        ids = np.asarray(p.ids, np.int64)
        seqs.append(np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]))
        plans.append(windows(tokenizer.word_starts(ids), len(ids), window, stride))
    nlls = token_nll(model, seqs, plans, device)
    weights = category_weights(tokenizer)
    rows, tot_cat = [], np.zeros(len(CATEGORIES))
    tot = dict(nats=0.0, uni=0.0, tokens=0, notes=0, seconds=0.0)
    for p, seq, nll, plan in zip(pieces, seqs, nlls, plans, strict=True):
        targets = seq[1:]
        cat = nll @ weights[targets]  # (C,) nats per category
        row = {
            "name": p.name,
            "windows": len(plan),
            **summarise(nll.sum(), len(nll), p.notes, p.seconds, cat),
        }
        if unigram is not None:
            u = -unigram[targets].sum()
            row["unigram_bits_per_note"] = u / LN2 / p.notes if p.notes else None
            tot["uni"] += u
        rows.append(row)
        tot_cat += cat
        tot["nats"] += float(nll.sum())
        tot["tokens"] += len(nll)
        tot["notes"] += p.notes
        tot["seconds"] += p.seconds
    total = summarise(tot["nats"], tot["tokens"], tot["notes"], tot["seconds"], tot_cat)
    total["pieces"] = len(pieces)
    if unigram is not None:
        bits = tot["uni"] / LN2
        total["unigram"] = {
            "bits_per_token": bits / tot["tokens"] if tot["tokens"] else None,
            "bits_per_note": bits / tot["notes"] if tot["notes"] else None,
            "bits_per_second": bits / tot["seconds"] if tot["seconds"] > 0 else None,
        }
    return {"window": window, "stride": stride, "total": total, "pieces": rows}
