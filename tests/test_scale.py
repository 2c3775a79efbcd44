"""Large-corpus data path: BPE on a seeded sample, sharded prepared data, node-local token caches.

Real POP909 songs and the broken edge-case files of the shared corpus; a two-node torchrun job on localhost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import corpus_dir

from midiforge.cli import main as cli_main
from midiforge.data.dataset import MidiDataset
from midiforge.notes import shards
from midiforge.notes.midi import find_files
from midiforge.notes.read import read_notes
from midiforge.tokens.bpe_sample import SampleStats, sample_order
from midiforge.tokens.tokenizer import MidiTokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(MidiTokenizer()) + 300  # the base vocabulary plus some merges


@pytest.fixture(scope="module")
def songs():
    return [str(p) for p in sorted(corpus_dir("pop909").iterdir())[:24]]


def _trained(songs, budget, seed=0, vocab=VOCAB):
    tok, st = MidiTokenizer(), SampleStats()
    tok.train_bpe(songs, vocab, sample_events=budget, seed=seed, stats=st)
    return tok, st


# ------------------------------------------------------------------------------------------- sampled BPE
def test_sampled_bpe_is_deterministic_and_bounded(songs):
    a, sa = _trained(songs, 40_000)
    b, sb = _trained(songs, 40_000)
    assert a.fingerprint == b.fingerprint and sa == sb
    assert 30_000 < sa.events <= 40_000 and sa.truncated and not sa.exhausted
    assert sa.pieces_used < len(songs)
    c, sc = _trained(songs, 40_000, seed=1)
    assert sc.events <= 40_000
    # Another seed draws other pieces (so, here, other merges), and neither draw is "the first files".
    assert c.fingerprint != a.fingerprint
    first = sample_order(len(songs), 0)[: sa.pieces_used]
    assert sorted(first.tolist()) != list(range(sa.pieces_used))


def test_whole_corpus_budget_equals_no_sampling(songs):
    # The sample's order must not matter to BPE: a budget above the corpus gives the same merges as no budget.
    full, st = _trained(songs[:8], None)
    big, sb = _trained(songs[:8], 10**9)
    assert st.exhausted and sb.exhausted and sb.events == st.events
    assert full.fingerprint == big.fingerprint


@pytest.mark.parametrize("budget", [5_000, 60_000])
def test_sample_sizes_give_valid_tokenizers(songs, budget, tmp_path):
    tok, st = _trained(songs, budget)
    assert st.events <= budget and len(tok) > tok.vocab.size  # merges were learned
    tok.save(tmp_path / "t.json")
    tok = MidiTokenizer.load(tmp_path / "t.json")
    base = MidiTokenizer()
    for path in songs[-3:]:  # pieces outside a small sample too
        notes = read_notes(path)
        events, _ = base.events(notes)
        ids = tok.encode_notes(notes)
        assert ids.max() < len(tok) and len(ids) < len(events)
        assert np.array_equal(tok.base_events(ids), events)  # BPE is lossless over the base events


def test_bpe_budget_must_be_positive(songs):
    with pytest.raises(ValueError, match="at least 1"):
        MidiTokenizer().train_bpe(songs[:2], VOCAB, sample_events=0)


# ------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The same files prepared both ways (POP909 songs, edge cases with broken files); shards of 5 pieces."""
    root = tmp_path_factory.mktemp("prep")
    src = [str(p) for p in sorted(corpus_dir("pop909").iterdir())[:9]] + [
        str(corpus_dir("edge", "symusic_tests"))
    ]
    (root / "sources.json").write_text(json.dumps(src))
    assert cli_main(["prepare", "-q", "-j", "2", *src, "-o", str(root / "json")]) == 0
    argv = ["prepare", "-q", "-j", "2", *src, "-o", str(root / "sh"), "--format", "shards"]
    assert cli_main([*argv, "--shard-size", "5"]) == 0
    return root


def _by_source(root):
    js = {json.loads(Path(p).read_text())["sha256"]: str(p) for p in find_files([root / "json"], (".json",))}
    refs = shards.expand_pieces(shards.shard_files(root / "sh"))
    out = {}
    for r in refs:
        path, i = r.rsplit("#", 1)
        out[shards.shard_header(path)["source_sha256"][int(i)]] = r
    return js, out


def test_shards_hold_what_json_holds(prepared):
    js, sh = _by_source(prepared)
    assert len(js) > 20 and sh.keys() == js.keys()  # the same usable files, duplicates once
    skipped = lambda d: sorted(json.loads(x)["path"] for x in (prepared / d / "errors.jsonl").open())  # noqa: E731
    assert skipped("json") == skipped("sh") and any("corrupted" in p for p in skipped("sh"))
    files = shards.shard_files(prepared / "sh")
    assert len(files) == -(-len(sh) // 5)
    tok = MidiTokenizer()
    tok.train_bpe(list(js.values()), VOCAB)
    for sha, ref in sh.items():
        a, b = read_notes(ref), read_notes(js[sha])
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if f.name == "sheet":
                assert x["config"] == y["config"]
                assert np.array_equal(x["events"], y["events"]) and np.array_equal(
                    x["word_starts"], y["word_starts"]
                )
            elif f.name == "tempo_qpm":  # JSON rounds tempos to 6 decimals; shards keep them exactly
                np.testing.assert_allclose(x, y, rtol=1e-6)
            elif isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and np.array_equal(x, y), f.name
            else:
                assert x == y, f.name
        assert tok.encode(ref) == tok.encode(js[sha])  # identical token ids


def test_shards_are_smaller_than_midi(prepared):
    midi = sum(p.stat().st_size for p in find_files(json.loads((prepared / "sources.json").read_text())))
    assert sum(p.stat().st_size for p in shards.shard_files(prepared / "sh")) < midi


def test_dataset_reads_shards_and_reports_a_corrupt_one(prepared, tmp_path):
    copy = tmp_path / "sh"
    copy.mkdir()
    files = shards.shard_files(prepared / "sh")
    for p in files:
        (copy / p.name).write_bytes(p.read_bytes())
    tok = MidiTokenizer()
    good = MidiDataset([copy], tok, 8, 512, cache_dir=tmp_path / "c0", augment=False, num_workers=1)
    n = good.num_pieces
    assert n > 20 and not good.skipped
    # Damage one byte inside piece 2 of the first shard, and the header of the second shard.
    first = copy / files[0].name
    h = shards.shard_header(first)
    data = bytearray(first.read_bytes())
    data[h["base"] + h["offset"][2] + 3] ^= 0xFF
    first.write_bytes(bytes(data))
    second = copy / files[1].name
    data = bytearray(second.read_bytes())
    data[60] ^= 0xFF
    second.write_bytes(bytes(data))
    with pytest.raises(shards.CorruptShardError, match="checksum"):
        read_notes(f"{first}#2")
    ds = MidiDataset([copy], tok, 8, 512, cache_dir=tmp_path / "c1", augment=False, num_workers=1)
    reasons = {k: v for k, v in ds.skipped.items()}
    assert f"{first}#2" in reasons and "checksum" in reasons[f"{first}#2"]
    assert any(k.startswith(str(second)) and "header fails its checksum" in v for k, v in reasons.items())
    assert ds.num_pieces == n - 1 - len(shards.shard_header(files[1])["sha256"])
    # Not cached as a bad file: once the shard is whole again, the piece is back.
    for p in files:
        (copy / p.name).write_bytes(p.read_bytes())
    again = MidiDataset([copy], tok, 8, 512, cache_dir=tmp_path / "c1", augment=False, num_workers=1)
    assert again.num_pieces == n


def test_zlib_shards_of_the_first_layout_still_read(prepared, tmp_path):
    """Shards written before the codec field (zlib blobs, no "codec" in the header) read as they did."""
    import hashlib
    import struct
    import zlib

    lz4_shard = shards.shard_files(prepared / "sh")[0]
    h = shards.shard_header(lz4_shard)
    assert h["codec"] == "lz4"
    raw = lz4_shard.read_bytes()
    blobs = [
        zlib.compress(shards._decompress(raw[h["base"] + o : h["base"] + o + n], "lz4"))
        for o, n in zip(h["offset"], h["length"], strict=True)
    ]
    header = {
        "schema": shards.SCHEMA,
        "source": h["source"],
        "source_sha256": h["source_sha256"],
        "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
        "offset": np.cumsum([0] + [len(b) for b in blobs[:-1]]).tolist(),
        "length": [len(b) for b in blobs],
    }
    hb = json.dumps(header).encode()
    old = tmp_path / "shard-00000.mfshard"
    old.write_bytes(
        shards.MAGIC + struct.pack("<Q", len(hb)) + hashlib.sha256(hb).digest() + hb + b"".join(blobs)
    )
    for i in range(len(blobs)):
        a, b = read_notes(f"{old}#{i}"), read_notes(f"{lz4_shard}#{i}")
        assert np.array_equal(a.pitch, b.pitch) and np.array_equal(a.time, b.time) and len(a) > 0
        assert np.array_equal(a.sheet["events"], b.sheet["events"])


def test_damaged_lz4_blob_is_a_corrupt_shard_not_a_crash(prepared):
    path = shards.shard_files(prepared / "sh")[0]
    h = shards.shard_header(path)
    blob = path.read_bytes()[h["base"] : h["base"] + h["length"][0]]
    assert len(shards.decode_piece(blob)) > 0
    huge = (2**31 - 1).to_bytes(4, "little") + blob[
        4:
    ]  # a size prefix no piece has: refused before allocating
    with pytest.raises(shards.CorruptShardError, match="LZ4 size"):
        shards.decode_piece(huge)
    with pytest.raises(shards.CorruptShardError, match="undecodable"):
        shards.decode_piece(blob[:4] + bytes(len(blob) - 4))


@pytest.mark.parametrize(
    "extra,msg",
    [(["--format", "xml"], "invalid choice: 'xml'"), (["--shard-size", "0"], "at least 1")],
)
def test_prepare_format_errors_are_one_line(extra, msg, tmp_path, capsys):
    src = corpus_dir("pop909", "001.mid")
    fmt = [] if "--format" in extra else ["--format", "shards"]
    assert cli_main(["prepare", "-q", str(src), "-o", str(tmp_path / "o"), *fmt, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


# ------------------------------------------------------------------------------------------- two nodes
@pytest.mark.slow
def test_two_nodes_each_build_their_own_cache(prepared, tmp_path):
    """torchrun --nnodes 2 on localhost, 2 processes per node, one node-local cache folder per node."""
    from midiforge.train.distributed import free_port

    port = str(free_port())
    ckpt = tmp_path / "ckpt"
    tiny = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "-b", "16384"]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
        cmd += ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port]
        cmd += [str(ROOT / "train.py"), "1", str(ckpt), "-t", str(prepared / "sh"), *tiny, "--device", "cpu"]
        cmd += ["--vocab-size", str(VOCAB), "--max-steps", "2", "--no-augment"]
        cmd += ["--cache-scope", "node", "--cache-dir", str(tmp_path / f"node{node}-cache")]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    from midiforge import checkpoint as ck

    got = ck.load(ckpt)
    assert got.state["train_state"]["step"] == 2 and got.config["run"]["world_size"] == 4, outs[0][-2000:]
    # Each node's cache holds every piece, written once (by that node's local rank 0 alone).
    tok = MidiTokenizer.load(ckpt / "tokenizer.json")
    packs = []
    for node in range(2):
        cache = tmp_path / f"node{node}-cache"
        idx = sorted(cache.rglob("pack-*.index.npz"))
        assert idx, f"node {node} built no cache"
        packs.append([p.name for p in idx])
        ds = MidiDataset([prepared / "sh"], tok, 8, 512, cache_dir=cache, augment=False, encode_missing=False)
        assert ds.num_pieces > 20 and not ds.skipped
    assert packs[0] == packs[1]  # the same encoding on both nodes
