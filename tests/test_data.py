"""MidiDataset on real files: skipping, windows, token cache, JSON inputs, augmentation, DataLoader use."""

import functools
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from conftest import corpus_dir

from midiforge.data.dataset import MidiDataset, window_starts
from midiforge.data.sampler import IGNORE_INDEX, MidiDatasetSampler, collate
from midiforge.notes.midi import JSON_SCHEMA
from midiforge.notes.read import read_notes
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.tokens.vocab import TokenizerConfig


def write_midi(path, num_notes=300, seed=0, drums=False):
    """A piece with a melody, chords every other beat and optionally a drum track."""
    rng = np.random.default_rng(seed)
    score = symusic.Score(480)
    piano = symusic.Track(name="piano", program=0, is_drum=False)
    for i in range(num_notes):
        piano.notes.append(symusic.Note(i * 240, 240, int(rng.integers(55, 80)), int(rng.integers(40, 120))))
        if i % 4 == 0:
            piano.notes.append(symusic.Note(i * 240, 960, int(rng.integers(45, 55)), 70))
    score.tracks.append(piano)
    if drums:
        kit = symusic.Track(name="drums", program=0, is_drum=True)
        for i in range(num_notes // 2):
            kit.notes.append(symusic.Note(i * 480, 120, 36 if i % 2 == 0 else 38, 100))
        score.tracks.append(kit)
    score.dump_midi(str(path))
    return Path(path)


@pytest.fixture(scope="module")
def tok():
    return MidiTokenizer()


def full_sequence(tok, path, transpose=0):
    ids = tok.encode_notes(read_notes(path), transpose=transpose).tolist()
    return [tok.bos_id, *ids, tok.eos_id]


def piece_windows(ds, piece):
    return [ds[i] for i in np.flatnonzero(ds._win_piece == piece)]


def test_bad_files_are_skipped_with_reasons(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    good = [write_midi(data / f"good{i}.mid", num_notes=100, seed=i) for i in range(2)]
    (data / "empty.mid").write_bytes(b"")
    (data / "random.midi").write_bytes(np.random.default_rng(0).bytes(2000))
    raw = good[0].read_bytes()
    (data / "truncated.mid").write_bytes(raw[: len(raw) // 2])
    (data / "garbage.json").write_text("{not json")
    (data / "other.json").write_text(json.dumps({"schema": "something/else"}))
    (data / "notes.txt").write_text("ignored: not a MIDI suffix")
    corrupted = []
    for f in corpus_dir("edge", "symusic_tests", "MIDIs_corrupted").iterdir():  # real broken files
        shutil.copy(f, data / f.name)
        corrupted.append(data / f.name)
    assert corrupted

    ds = MidiDataset([data], tok, 4, 512, cache_dir=tmp_path / "cache", augment=False)
    bad = ["empty.mid", "random.midi", "truncated.mid", "garbage.json", "other.json"]
    assert {Path(f).name for f in ds.skipped} >= set(bad)
    assert "empty" in ds.skipped[str(data / "empty.mid")]
    assert "schema" in ds.skipped[str(data / "other.json")]
    assert all(reason for reason in ds.skipped.values())
    # every file is accounted for: a piece or a skip
    assert sorted(ds.files + list(ds.skipped)) == sorted(str(p) for p in data.iterdir() if p.suffix != ".txt")
    assert {str(g) for g in good} <= set(ds.files)
    assert ds.num_skipped == len(ds.skipped) >= len(bad)

    # the cache remembers unreadable files: the second build reads none of them again
    again = MidiDataset([data], tok, 4, 512, cache_dir=tmp_path / "cache", augment=False)
    assert again.num_encoded == 0
    assert again.skipped == ds.skipped and again.files == ds.files


def test_window_starts_rules():
    # cut at the last word start at or before the limit; +1 because of BOS
    ws = np.zeros(20, bool)
    ws[[0, 3, 7, 12, 18]] = True
    starts = window_starts(ws, num_ids=20, max_length=10)
    assert starts.tolist() == [0, 8, 13]  # 8 = ids[7] (≤ 10), 13 = ids[12] (≤ 18); 21 - 13 ≤ 10
    # no word start in range: hard cut at the limit
    assert window_starts(np.zeros(20, bool), 20, 6).tolist() == [0, 6, 12, 18]
    # short piece: one window
    assert window_starts(ws, 5, 10).tolist() == [0]


def test_long_piece_windows_reconstruct_piece(tmp_path, tok):
    path = write_midi(tmp_path / "long.mid", num_notes=400)
    full = full_sequence(tok, path)
    max_len = 100
    ds = MidiDataset([path], tok, 4, max_len, cache_dir=tmp_path / "cache", augment=False)
    assert ds.num_pieces == 1 and len(ds) > 3
    windows = piece_windows(ds, 0)
    assert len(windows) == len(ds)
    rebuilt = [t for x, _ in windows for t in x.tolist()] + [windows[-1][1][-1].item()]
    assert rebuilt == full
    for k, (x, y) in enumerate(windows):
        assert x.dtype == y.dtype == torch.long
        assert len(x) == len(y) == ds.lengths[k] <= max_len
        assert x[1:].tolist() == y[:-1].tolist()
        assert (x[0].item() == tok.bos_id) == (k == 0)
        assert tok.bos_id not in x[1:].tolist()
        assert (tok.eos_id in y.tolist()) == (k == len(windows) - 1)
        if k > 0:  # every later window starts at an onset (this piece has plenty of them)
            assert tok.word_starts(x[:1].numpy())[0]
    # windows are cut as late as allowed: most use nearly the full length
    assert np.median(ds.lengths[:-1]) > 0.8 * max_len


def test_min_length_drops_short_pieces(tmp_path, tok):
    short = write_midi(tmp_path / "short.mid", num_notes=3)
    long = write_midi(tmp_path / "long.mid", num_notes=200)
    n_short = len(full_sequence(tok, short)) - 1
    ds = MidiDataset([tmp_path], tok, n_short + 1, 4096, cache_dir=tmp_path / "cache", augment=False)
    assert ds.files == [str(long)]
    assert "too short" in ds.skipped[str(short)]
    ds = MidiDataset([tmp_path], tok, n_short, 4096, cache_dir=tmp_path / "cache", augment=False)
    assert ds.files == [str(long), str(short)] and ds.num_skipped == 0
    assert sorted(ds.lengths.tolist())[0] == n_short


def test_cache_avoids_reencoding_and_gives_identical_samples(tmp_path, tok, monkeypatch):
    for i in range(3):
        write_midi(tmp_path / f"p{i}.mid", num_notes=150, seed=i, drums=i == 1)
    calls = []
    real = MidiTokenizer.encode_notes

    def counting(self, notes, transpose=0):
        calls.append(transpose)
        return real(self, notes, transpose)

    monkeypatch.setattr(MidiTokenizer, "encode_notes", counting)
    kwargs = dict(cache_dir=tmp_path / "cache", transpose_range=2, seed=1)
    first = MidiDataset([tmp_path], tok, 4, 64, **kwargs)
    assert sorted(calls) == sorted([-2, -1, 0, 1, 2] * 3)
    assert first.num_encoded == 3
    calls.clear()
    second = MidiDataset([tmp_path], tok, 4, 64, **kwargs)
    assert calls == [] and second.num_encoded == 0
    assert isinstance(second.cache.ids(0), np.memmap)
    for epoch in (0, 1):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        assert len(first) == len(second)
        for i in range(len(first)):
            assert all(torch.equal(a, b) for a, b in zip(first[i], second[i], strict=True))
    # augment=False needs only t=0, which the cache already has
    MidiDataset([tmp_path], tok, 4, 64, cache_dir=tmp_path / "cache", augment=False)
    assert calls == []
    # another tokenizer configuration has another fingerprint: encoded again, in its own cache
    other = MidiTokenizer(TokenizerConfig(velocity_bins=8))
    MidiDataset([tmp_path], other, 4, 64, cache_dir=tmp_path / "cache", augment=False)
    assert calls == [0, 0, 0]
    # a new file is encoded alone; the others still come from the cache
    calls.clear()
    write_midi(tmp_path / "p3.mid", num_notes=50, seed=3)
    third = MidiDataset([tmp_path], tok, 4, 64, **kwargs)
    assert third.num_encoded == 1 and len(calls) == 5 and third.num_pieces == 4


def test_json_input_gives_same_ids_as_midi(tmp_path, tok):
    (tmp_path / "mid").mkdir()
    mid = write_midi(tmp_path / "mid" / "a.mid", num_notes=120, drums=True)
    doc = {"schema": JSON_SCHEMA, "source": "a.mid", **read_notes(mid).to_json_dict()}
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "a.json").write_text(json.dumps(doc))
    kw = dict(cache_dir=tmp_path / "cache", transpose_range=1)
    a = MidiDataset([tmp_path / "mid"], tok, 4, 80, **kw)
    b = MidiDataset([tmp_path / "json" / "a.json"], tok, 4, 80, **kw)
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert len(a) == len(b) > 1
        assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(len(a)))


def decoded_notes(tok, ds, piece=0):
    """(pitched, drum) sorted pitch lists of a piece in the dataset's current epoch."""
    x, y = ds[int(np.flatnonzero(ds._win_piece == piece)[0])]
    assert len(piece_windows(ds, piece)) == 1
    score = tok.decode(torch.cat([x, y[-1:]]).numpy())
    pitched = sorted(n.pitch for t in score.tracks if not t.is_drum for n in t.notes)
    drums = sorted(n.pitch for t in score.tracks if t.is_drum for n in t.notes)
    return pitched, drums


def test_augmentation_transposes_pitched_notes_only(tmp_path, tok):
    write_midi(tmp_path / "a.mid", num_notes=60, drums=True)
    write_midi(tmp_path / "b.mid", num_notes=40, seed=1)
    kw = dict(cache_dir=tmp_path / "cache", transpose_range=3, seed=7)
    ds = MidiDataset([tmp_path], tok, 4, 4096, **kw)
    plain = MidiDataset([tmp_path], tok, 4, 4096, cache_dir=tmp_path / "cache", augment=False)
    assert plain.transposes.tolist() == [0]
    base_pitched, base_drums = decoded_notes(tok, plain)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        t = int(ds.transpositions[0])
        seen.add(t)
        assert -3 <= t <= 3
        pitched, drums = decoded_notes(tok, ds)
        assert pitched == [p + t for p in base_pitched]
        assert drums == base_drums
        plain.set_epoch(epoch)
        assert plain.transpositions.tolist() == [0, 0]
    assert len(seen) > 2  # the transposition really changes between epochs
    # deterministic for a seed, different for another seed
    twin = MidiDataset([tmp_path], tok, 4, 4096, **kw)
    other = MidiDataset([tmp_path], tok, 4, 4096, **{**kw, "seed": 8})
    picks = {s: [] for s in ("ds", "twin", "other")}
    for epoch in range(8):
        for name, d in (("ds", ds), ("twin", twin), ("other", other)):
            d.set_epoch(epoch)
            picks[name].append(d.transpositions.tolist())
    assert picks["ds"] == picks["twin"] != picks["other"]


def test_dataloader_with_sampler_and_pickled_dataset(tmp_path, tok):
    for i in range(4):
        write_midi(tmp_path / f"p{i}.mid", num_notes=100 + 40 * i, seed=i)
    ds = MidiDataset([tmp_path], tok, 4, 128, cache_dir=tmp_path / "cache")
    blob = pickle.dumps(ds)
    assert len(blob) < 200_000  # the memory-mapped ids are not copied into the pickle
    clone = pickle.loads(blob)
    assert all(torch.equal(ds[i][0], clone[i][0]) for i in range(len(ds)))

    sampler = MidiDatasetSampler(ds, 4 * 128**2, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_id=tok.pad_id)
    )
    for epoch in range(2):
        sampler.set_epoch(epoch)
        total = padded = 0
        for inputs, labels in loader:
            assert inputs.shape == labels.shape
            total += labels.numel()
            padded += int((labels == IGNORE_INDEX).sum())
            assert int((inputs == tok.pad_id).sum()) == int((labels == IGNORE_INDEX).sum())
        assert total - padded == int(ds.lengths.sum())
        assert padded / total == pytest.approx(sampler.padding_fraction())


@pytest.mark.slow  # starting the worker processes imports torch in them (seconds)
def test_parallel_build_matches_sequential(tmp_path, tok, monkeypatch):
    monkeypatch.setattr("midiforge.data.dataset._MIN_FILES_FOR_POOL", 2)
    files = sorted(corpus_dir("pop909").glob("*.mid"))[:6]
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd garbage")
    paths = [*files, bad]
    seq = MidiDataset(paths, tok, 32, 1024, cache_dir=tmp_path / "c1", augment=False, num_workers=1)
    par = MidiDataset(paths, tok, 32, 1024, cache_dir=tmp_path / "c2", augment=False, num_workers=2)
    assert list(par.skipped) == [str(bad)] and seq.skipped == par.skipped
    assert seq.files == par.files and np.array_equal(seq.lengths, par.lengths)
    for i in range(0, len(seq), 7):
        assert torch.equal(seq[i][0], par[i][0])


def test_damaged_cache_is_ignored_and_rebuilt(tmp_path, tok):
    write_midi(tmp_path / "a.mid", num_notes=80)
    cache = tmp_path / "cache"
    first = MidiDataset([tmp_path / "a.mid"], tok, 4, 64, cache_dir=cache, augment=False)
    assert first.cache.dtype == np.uint16  # small vocabulary: 2 bytes per token on disk
    (index,) = cache.rglob("*.index.npz")
    index.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable token cache index"):
        again = MidiDataset([tmp_path / "a.mid"], tok, 4, 64, cache_dir=cache, augment=False)
    assert again.num_encoded == 1
    assert all(torch.equal(first[i][0], again[i][0]) for i in range(len(first)))
    assert not list(cache.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_tokenizer_error_skips_file_without_caching_the_failure(tmp_path, tok, monkeypatch):
    write_midi(tmp_path / "a.mid", num_notes=50)
    write_midi(tmp_path / "b.mid", num_notes=70, seed=1)
    real = MidiTokenizer.encode_notes

    def flaky(self, notes, transpose=0):
        if len(notes) > 80:  # only b.mid (70 melody + 18 chord notes)
            raise RuntimeError("boom")
        return real(self, notes, transpose)

    monkeypatch.setattr(MidiTokenizer, "encode_notes", flaky)
    kw = dict(cache_dir=tmp_path / "cache", augment=False)
    ds = MidiDataset([tmp_path], tok, 4, 64, **kw)
    assert ds.files == [str(tmp_path / "a.mid")]
    assert ds.skipped == {str(tmp_path / "b.mid"): "tokenizer failed: RuntimeError: boom"}
    monkeypatch.setattr(MidiTokenizer, "encode_notes", real)
    again = MidiDataset([tmp_path], tok, 4, 64, **kw)
    assert again.num_encoded == 1 and again.num_pieces == 2 and again.num_skipped == 0


def test_encode_missing_false_reads_the_cache_only(tmp_path, tok):
    """What DDP ranks > 0 do: never encode; a file rank 0 did not cache is skipped, not encoded."""
    for i in range(2):
        write_midi(tmp_path / f"p{i}.mid", num_notes=80, seed=i)
    kwargs = dict(cache_dir=tmp_path / "cache", transpose_range=1)
    built = MidiDataset([tmp_path], tok, 4, 64, **kwargs)
    write_midi(tmp_path / "late.mid", num_notes=80, seed=7)  # appeared after the cache was built
    reader = MidiDataset([tmp_path], tok, 4, 64, encode_missing=False, **kwargs)
    assert reader.num_encoded == 0 and reader.num_pieces == built.num_pieces == 2
    assert list(reader.skipped) == [str(tmp_path / "late.mid")]
    assert "not in the token cache" in reader.skipped[str(tmp_path / "late.mid")]
    assert len(reader) == len(built)


def test_scans_unmap_the_cache_without_changing_windows(tmp_path, tok, monkeypatch):
    """set_epoch unmaps the packs after scanning every piece (RSS of a 10k-file corpus: issue 14); unmapping
    between any two pieces must leave the windows, prefixes and samples exactly as one long mapping gives."""
    import midiforge.data.dataset as data
    from midiforge.data.prefix import ControlPrefix

    files = [write_midi(tmp_path / f"p{i}.mid", num_notes=150 + 60 * i, seed=i) for i in range(4)]

    def build():
        cp = ControlPrefix(tok, dropout=0.5, seed=1)
        ds = MidiDataset(files, tok, 4, 96, cache_dir=tmp_path / "cache", augment=True, seed=2, controls=cp)
        assert ds.cache._mmaps == {}  # nothing stays mapped after the scans
        ds.set_epoch(1)
        assert ds.cache._mmaps == {}
        return ds, [(x.tolist(), y.tolist()) for x, y in (ds[i] for i in range(len(ds)))]

    ref, ref_items = build()
    monkeypatch.setattr(data, "_RELEASE_EVERY", 1)  # unmap before every piece
    ds, items = build()
    assert len(ref) > 4 and any(len(p) for p in ref._prefix.values())  # long pieces cut, prefixes made
    assert ds.lengths.tolist() == ref.lengths.tolist() and items == ref_items


def test_workers_get_the_tokenizer_once_and_encode_as_one_process():
    """map_isolated's ``shared`` arguments reach each worker once, not with every batch: a list popped by the
    tasks keeps shrinking within a worker (resent per batch, every task would pop the same last item). The
    parallel token encoding that uses it gives the ids of a serial one."""
    import operator

    from midiforge.data import dataset as data
    from midiforge.data.workers import map_isolated

    popped = [
        v
        for _, ok, v in map_isolated(
            operator.call, [(list.pop,)] * 24, 2, batch_size=1, shared=(list(range(100)),)
        )
        if ok
    ]
    assert len(popped) == 24 and max(popped.count(v) for v in popped) <= 2 and len(set(popped)) >= 12
    files = [str(p) for p in sorted(corpus_dir("pop909").iterdir())[:20]]
    tok = MidiTokenizer()
    tok.train_bpe(files[:3], len(MidiTokenizer()) + 40)
    tasks = [(f, (0, 2)) for f in files]
    serial = {i: ids for i, ids, _, _ in data._encode_all(tasks, tok, 1)}
    parallel = {i: ids for i, ids, _, _ in data._encode_all(tasks, tok, 2)}
    assert serial.keys() == parallel.keys() == set(range(len(files)))
    for i in serial:
        assert [a.tolist() for a in parallel[i]] == [a.tolist() for a in serial[i]]
