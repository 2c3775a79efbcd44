"""Edit inside a piece: ``midiforge generate --infill BARS | --add-track INSTR | --replace-track N|NAME |
--harmonize [VOICES]`` (training side: fim.py).

The output is built by splicing, never by re-reading what the model wrote over the whole piece: the prompt is
read as the tokenizer stores it (its tokens decoded into a step-time table, fim.events_to_table); the notes and
pedals of the edited region (bars, or one track) are replaced by those the model wrote there; the rest, and the
tempo, metre and key maps, are the prompt's own rows; the table is encoded by the tokenizer's events() and
decoded once. So everything outside the region comes back exactly as the tokenizer stores it, whatever the
model does, and sentinels cannot reach the output (they make no rows).

Model inputs: a span is ``[BOS] prefix FIM_SUFFIX suffix' FIM_MIDDLE`` (as in training, fim.py) → middle up to
FIM_END or the span's end. When the context fills up during a span, the complete words written so far join the
prefix and the input is laid out again (a sliding window that keeps the suffix in view), so pieces of any length
work. Tracks (--add-track, --replace-track, --harmonize) are written in the ordinary stream, jointly and in time
with the given ones (joint.py), so they need no infilling sentinels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from midiforge.checkpoint import read_config
from midiforge.data import fim
from midiforge.errors import UsageError
from midiforge.generate import stopping
from midiforge.generate.sampling import next_token
from midiforge.notes.midi import DRUM_PROGRAM, MAX_TRACK_INDEX, NoteTable, load_score, score_to_notes
from midiforge.tokens.controls import parse_instruments, program_name

PREFIX_SHARE, SUFFIX_SHARE = 0.4, 0.25  # of the context, for prefix / suffix


# ------------------------------------------------------------------------------------------- the piece
@dataclass
class Piece:
    """A prompt as the tokenizer stores it: a step-time table, its bar lines and its track names."""

    table: NoteTable
    bars: np.ndarray  # (n_bars + 1,) grid step of every bar line, the last one at or after the end
    names: dict
    end: int = 0  # grid step where the prompt's last note ends: written notes end by then

    @classmethod
    def from_score(cls, tok, score) -> Piece:
        ids = tok.encode(score)
        table, _ = fim.events_to_table(tok, tok.base_events(ids))
        names = score_to_notes(score).track_names  # the tokenizer's own (program, index) numbering
        end = int((table.time + table.duration).max(initial=0))
        return cls(table, bar_lines(table), names, end)

    @property
    def owners(self) -> list[tuple[int, int]]:
        """(program, track index) of every track with notes, in order."""
        keys = np.unique(self.table.program.astype(np.int64) * 16 + self.table.track)
        return [(int(k) // 16, int(k) % 16) for k in keys]

    def track_label(self, o) -> str:
        return self.names.get(o) or f"{program_name(o[0])}" + (f" #{o[1] + 1}" if o[1] else "")

    def score(self, tok):
        return tok.decode(fim.encode_table(tok, self.table), track_names=self.names)


def bar_lines(t: NoteTable) -> np.ndarray:
    """Grid step of each bar line from the time-signature map (4/4 before the first), through the end."""
    spq = t.tpq
    end = int(max((t.time + t.duration).max(initial=0), t.time.max(initial=0) + 1, 1))
    order = np.argsort(t.ts_time, kind="stable")
    changes = [(int(t.ts_time[i]), int(t.ts_numerator[i]), int(t.ts_denominator[i])) for i in order]
    out, pos, n, d = [0], 0, 4, 4
    while pos < end:
        while changes and changes[0][0] <= pos:
            _, n, d = changes.pop(0)
        length = max(1, spq * 4 * n // d)
        nxt = pos + length
        if changes and pos < changes[0][0] < nxt:  # a change off the bar line starts a bar of its own
            nxt = changes[0][0]
        out.append(nxt)
        pos = nxt
    return np.array(out, np.int64)


def parse_bars(specs: list[str], n_bars: int) -> list[tuple[int, int]]:
    """``["9-16", "25-28,30"]`` → merged 1-based inclusive spans; UsageError for bad or out-of-range ones."""
    spans = []
    for spec in specs:
        for part in spec.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise UsageError(f"--infill: {part.strip()!r} is not a bar or bar range such as 9-16")
            a, b = int(m[1]), int(m[2] or m[1])
            if a < 1 or b < a:
                raise UsageError(f"--infill {part.strip()}: bars count from 1, first <= last")
            if b > n_bars:
                raise UsageError(f"--infill {part.strip()}: beyond the end (the prompt has {n_bars} bars)")
            spans.append((a, b))
    spans.sort()
    merged = [spans[0]]
    for a, b in spans[1:]:
        if a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


# ------------------------------------------------------------------------------------------- decoding
class _Sampler:
    """One model-input at a time, KV cache or full recompute; sentinels other than FIM_END never drawn."""

    def __init__(self, model, tok, device, generator, sampling, use_kv_cache, max_new_tokens):
        self.model, self.tok, self.device = model, tok, device
        self.generator, self.sampling, self.kv = generator, sampling, use_kv_cache
        self.max_new_tokens = max_new_tokens
        self.L = model.config.max_seq_len
        s = fim.sentinel_ids(tok)
        self.end_ids = {int(s[fim.FIM_END]), tok.eos_id}
        V = model.config.vocab_size
        self.allowed = torch.ones(V, dtype=torch.bool)  # (V,)
        self.allowed[[tok.pad_id, tok.bos_id, *(int(x) for x in s if x != s[fim.FIM_END])]] = False
        v = tok.vocab
        self.shift = np.where(v.kind == v.k("shift"), v.value, 0)

    def steps(self, t: int) -> int:
        tok = self.tok
        return int(self.shift[tok._flat[tok._offs[t] : tok._offs[t + 1]]].sum())

    @torch.inference_mode()
    def run(self, seq: list[int], until: int) -> tuple[list[int], str]:
        """New tokens after ``seq`` until FIM_END/EOS ("end"), time passes ``until`` steps from the input's
        end ("time"), the context is full ("full") or max_new_tokens ("max"). Stop tokens are not returned."""
        cache = self.model.new_kv_cache(1, max_len=self.L) if self.kv else None
        ids, fed, out, now = list(seq), 0, [], 0
        while True:
            if len(ids) >= self.L:
                return out, "full"
            if len(out) >= self.max_new_tokens:
                return out, "max"
            if len(out) % stopping.CHECK_EVERY == 0:
                stopping.check()
            feed = torch.tensor(
                [ids[fed:] if cache is not None else ids], dtype=torch.long, device=self.device
            )
            t = int(next_token(self.model, feed, cache, allowed=self.allowed, **self.sampling)[0])
            if cache is not None:
                fed = len(ids)
            if t in self.end_ids:
                return out, "end"
            now += self.steps(t)
            if now >= until:
                return out, "time"
            ids.append(t)
            out.append(t)


def _complete_words(tok, out: list[int]) -> list[int]:
    """The tokens before the last word start: whole onsets only (the rest may lack a DURATION)."""
    starts = np.flatnonzero(tok.word_starts(np.asarray(out, np.int64))) if out else []
    return out[: int(starts[-1])] if len(starts) else []


def _rows_after(tok, before: np.ndarray, new: list[int]) -> NoteTable:
    """Rows that ``new`` tokens make when they follow the base events ``before`` (state and time carried)."""
    ev = np.concatenate([before, tok.base_events(new)]) if new else before
    table, src = fim.events_to_table(tok, ev)
    n = len(before)
    return fim.subset(table, src["note"] >= n, src["pedal"] >= n)


def _meta(t: NoteTable, lo: int, hi: int) -> dict:
    return {k: (getattr(t, names[0]) >= lo) & (getattr(t, names[0]) < hi) for k, names in fim._META.items()}


def _clip(rows: NoteTable, end: int) -> NoteTable:
    """Written notes and pedals end by ``end`` (the span's end, or the prompt's: the output keeps its length)."""
    rows = fim.subset(rows, rows.time < end, rows.pedal_time < end)
    rows.duration = np.minimum(rows.duration, end - rows.time)
    rows.pedal_duration = np.minimum(rows.pedal_duration, end - rows.pedal_time)
    return rows


def _in(x, lo, hi):
    return (x >= lo) & (x < hi)


def fill_span(s: _Sampler, piece: Piece, rs: int, re_: int) -> NoteTable:
    """Rewrite notes and pedals starting in grid steps [rs, re_) of ``piece.table`` in place; the rows written.
    They end by ``re_``: what follows the span is kept as it was, so nothing written may sound into it."""
    tok, t = s.tok, piece.table
    piece.table = fim.subset(t, ~_in(t.time, rs, re_), ~_in(t.pedal_time, rs, re_), _meta(t, -1, 1 << 62))
    sent = fim.sentinel_ids(tok)
    written = None
    for _ in range(10_000):  # each round adds complete words or ends; the bound only guards against a bug
        t = piece.table
        # Prefix: everything before the span plus what was written so far; pedals pressed before the span are
        # released by its start in the model's view, so the prefix ends before the span starts.
        pre = fim.subset(t, t.time < re_, t.pedal_time < rs, _meta(t, -1, rs))
        pre.pedal_duration = np.minimum(pre.pedal_duration, np.maximum(rs - pre.pedal_time, 0))
        pre_ids = fim.encode_table(tok, pre)
        pre_ev = tok.base_events(pre_ids)
        origin = fim.shift_total(tok, pre_ids)
        suf = fim.subset(t, t.time >= re_, t.pedal_time >= re_, _meta(t, re_, 1 << 62), origin=origin)
        suf_ids = list(fim.encode_table(tok, suf))
        budget_pre, budget_suf = int(s.L * PREFIX_SHARE), int(s.L * SUFFIX_SHARE)
        head = [tok.bos_id]
        if len(pre_ids) + 1 > budget_pre:  # the prefix's tail, cut at an onset
            ws = np.flatnonzero(tok.word_starts(pre_ids))
            ok = ws[ws >= len(pre_ids) - budget_pre]
            pre_tail = list(pre_ids[int(ok[0]) :]) if len(ok) else []
            head = []
        else:
            pre_tail = list(pre_ids)
        suf_part = suf_ids[:budget_suf] if len(suf_ids) > budget_suf else [*suf_ids, tok.eos_id]
        seq = [*head, *pre_tail, int(sent[fim.FIM_SUFFIX]), *suf_part, int(sent[fim.FIM_MIDDLE])]
        out, why = s.run(seq, re_ - origin)
        if why == "full":
            out = _complete_words(tok, out)
        rows = _rows_after(tok, pre_ev, out)
        ok_n, ok_p = _in(rows.time, rs, re_), _in(rows.pedal_time, rs, re_)
        new = _clip(fim.subset(rows, ok_n, ok_p), re_)
        piece.table = fim.concat(piece.table, new)
        written = new if written is None else fim.concat(written, new)
        if why != "full" or not out:
            return written
    raise AssertionError("unreachable")


def write_tracks(s: _Sampler, piece: Piece, targets: list[tuple[int, int]]) -> NoteTable:
    """Write the ``targets`` tracks (program, index) jointly and in time with every track of ``piece.table``
    (joint.py without voice rules: any pitches, chords): at each onset right after the given notes, and at
    onsets of their own in between, so every written note sees all the music up to its own time. Their rows,
    ending by the piece's end (an onset left unfinished when ``max_new_tokens`` ran out is dropped)."""
    from midiforge.generate.joint import Writer, forced_rows, write

    tok = s.tok
    writer = Writer(tok, forced_rows(tok, piece.table), list(targets), piece.end)
    plain = {k: v for k, v in s.sampling.items() if k != "generator"}
    ids, stop = write(s.model, tok, writer, generator=s.generator, sampling=plain, max_new_tokens=s.max_new_tokens,
                      device=s.device, use_kv_cache=s.kv)  # fmt: skip
    table, _ = fim.events_to_table(tok, tok.base_events(ids))
    key = table.program.astype(np.int64) * 16 + table.track
    rows = fim.subset(table, np.isin(key, [p * 16 + i for p, i in targets]) & (table.time < stop))
    rows = _clip(rows, piece.end)
    piece.table = fim.concat(piece.table, rows)
    return rows


# ------------------------------------------------------------------------------------------- requests
@dataclass
class Request:
    """What to edit. Exactly one kind: spans (``"9-16"``...), tracks to add, a track to replace, or voices to
    add under a one-track melody."""

    infill: list[str] | None = None
    add_tracks: list[str] | None = None
    replace_track: str | None = None
    harmonize: int | str | None = None
    voice_ranges: str | None = None  # --harmonize: "G3-D5,C3-G4,E2-C4", top voice first (SATB by default)
    free_harmony: bool = False  # --harmonize: no triad/dominant-seventh rule where the melody attacks

    def kinds(self) -> list[str]:
        names = ("--infill", "--add-track", "--replace-track", "--harmonize")
        vals = (self.infill, self.add_tracks, self.replace_track, self.harmonize)
        return [n for n, v in zip(names, vals, strict=True) if v is not None and v != []]

    def plan(self, piece: Piece) -> list[tuple]:
        """[("span", rs, re) | ("tracks", targets, given) | ("voices", n, ranges, chords)] for this piece;
        UsageError for what cannot work."""
        from midiforge.generate.harmonize import parse_ranges, parse_voices, voice_plan

        kinds = self.kinds()
        if len(kinds) != 1:
            raise UsageError(f"give one of --infill, --add-track, --replace-track, --harmonize (got {kinds})")
        if (self.voice_ranges is not None or self.free_harmony) and self.harmonize is None:
            raise UsageError("--voice-ranges and --free-harmony go with --harmonize")
        if self.harmonize is not None:  # before the prompt is looked at: a file name here is the usual slip
            n = parse_voices(self.harmonize)
            ranges = parse_ranges(self.voice_ranges) if self.voice_ranges is not None else None
            if not 1 <= n <= MAX_TRACK_INDEX:
                raise UsageError(f"--harmonize: voices must be 1..{MAX_TRACK_INDEX} (got {n})")
            voice_plan(n, ranges)
        if not len(piece.table):
            raise UsageError("the prompt has no notes to edit")
        owners = piece.owners
        if self.infill:
            bars = piece.bars
            return [
                ("span", int(bars[a - 1]), int(bars[b])) for a, b in parse_bars(self.infill, len(bars) - 1)
            ]
        if self.replace_track is not None:
            target = _find_track(piece, self.replace_track)
            rest = [o for o in owners if o != target]
            if not rest:
                raise UsageError("--replace-track: the prompt has no other track to write it from")
            t = piece.table
            keep = (t.program != target[0]) | (t.track != target[1])
            keep_p = (t.pedal_program != target[0]) | (t.pedal_track != target[1])
            piece.table = fim.subset(t, keep, keep_p, _meta(t, -1, 1 << 62))
            return [("tracks", [target], rest)]
        if self.harmonize is not None:
            if len(owners) != 1:
                labels = ", ".join(piece.track_label(o) for o in owners)
                raise UsageError(
                    f"--harmonize needs a one-track melody; the prompt has {len(owners)} ({labels})"
                )
            if owners[0][0] == DRUM_PROGRAM:
                raise UsageError("--harmonize needs a melody; the prompt's one track is drums")
            return [("voices", n, ranges, not self.free_harmony)]
        targets = []
        for name in self.add_tracks:
            progs = parse_instruments(name)
            if len(progs) != 1:
                raise UsageError(f"--add-track: one instrument each (got {name!r}); repeat the option")
            p = progs[0]
            i = sum(1 for q, _ in owners + targets if q == p)
            if i > MAX_TRACK_INDEX:
                raise UsageError(
                    f"--add-track {name}: at most {MAX_TRACK_INDEX + 1} tracks of one instrument"
                )
            targets.append((p, i))
        return _adds(owners, targets)


def _adds(owners, targets) -> list[tuple]:
    """Every new track written together, given the prompt's tracks."""
    return [("tracks", targets, list(owners))]


def _find_track(piece: Piece, spec: str) -> tuple[int, int]:
    owners = piece.owners
    labels = ", ".join(f"{k + 1} = {piece.track_label(o)}" for k, o in enumerate(owners))
    if spec.strip().isdigit():
        k = int(spec)
        if not 1 <= k <= len(owners):
            raise UsageError(f"--replace-track {spec}: no such track (the prompt has {labels})")
        return owners[k - 1]
    hits = [o for o in owners if piece.track_label(o).lower() == spec.strip().lower()]
    if len(hits) != 1:
        raise UsageError(f"--replace-track {spec!r}: no such track (the prompt has {labels})")
    return hits[0]


def check_checkpoint(ckpt_dir, tok) -> None:
    """UsageError unless the checkpoint was trained with infilling examples."""
    if not fim.supports_infill(tok):
        raise UsageError(
            f"{ckpt_dir}: trained without infilling (its tokenizer has no infilling sentinels); train a new"
            " checkpoint (infilling is on by default, --infill-rate)"
        )
    cfg = read_config(ckpt_dir) or {}  # the committed save's, as load_inference read it (a run may be saving)
    rate = (cfg.get("train") or {}).get("infill_rate") or 0
    if not rate > 0:
        raise UsageError(
            f"{ckpt_dir}: trained without infilling (--infill-rate 0 or older code); train with --infill-rate > 0"
        )


@torch.inference_mode()
def edit(model, tok, prompt, request: Request, *, seed: int | None = None, temperature: float = 1.0,
         top_k: int | None = None, top_p: float | None = None, max_new_tokens: int = 1024,
         use_kv_cache: bool = True, device="cpu"):  # fmt: skip
    """The edited piece as a symusic.Score (see the module docstring); ``prompt``: a Score or MIDI path/bytes."""
    score = prompt if hasattr(prompt, "tracks") else load_score(prompt)
    piece = Piece.from_score(tok, score)
    steps = request.plan(piece)
    if steps[0][0] == "span" and not fim.supports_infill(tok):  # track edits write the ordinary stream
        raise UsageError("this tokenizer has no infilling sentinels (trained without infilling)")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    s = _Sampler(model, tok, device, generator, sampling, use_kv_cache, max_new_tokens)
    was_training = model.training
    model.eval()
    written, spans, replaced = [], [], None
    try:
        for step in steps:
            if step[0] == "span":
                written.append(fill_span(s, piece, step[1], step[2]))
                spans.append(step[1:])
            elif step[0] == "tracks":
                replaced = step[1][0] if request.replace_track is not None else None
                written.append(write_tracks(s, piece, step[1]))
            else:
                from midiforge.generate.harmonize import add_tracks, voices_of

                plain = {k: v for k, v in sampling.items() if k != "generator"}
                rows, targets, names = voices_of(tok, model, piece, step[1], step[2], step[3], plain, generator,
                                                 max_new_tokens, device, use_kv_cache)  # fmt: skip
                return add_tracks(score, rows, targets, names, tok.config.steps_per_quarter)
    finally:
        model.train(was_training)
    from midiforge.generate.splice import splice

    rows = [w for w in written if w is not None]
    table = rows[0] if rows else fim.subset(piece.table)
    for r in rows[1:]:
        table = fim.concat(table, r)
    names = {step[1]: piece.track_label(step[1]) for step in steps if step[0] == "track"}
    return splice(tok, score, table, spans=spans, replaced=replaced, names=names)
