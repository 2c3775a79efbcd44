"""Controls and style tags in training: -t NAME=DIR, --tags-csv, --controls/--control-dropout, the tag names in
tokenizer.json, validation without dropout, generate --tag on the trained checkpoint, old checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import symusic
from conftest import make_score

from midiforge import checkpoint as ck
from midiforge.cli import main
from midiforge.data import tagging
from midiforge.errors import UsageError
from midiforge.train import command as tr
from midiforge.train import distributed as dist
from midiforge.train import setup as train_setup
from midiforge.train.config import parse_args

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ckpt_v1"
TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "-b",
    "16384",
    "--vocab-size",
    "1000",
]


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> Path:
    """Three folders of pieces that differ in instruments: strings/ (violin, cello), keys/ (piano, bass), and
    a folder whose name contains '=' (organ)."""
    root = tmp_path_factory.mktemp("styles")
    for folder, programs, seed in (("strings", (40, 42), 0), ("keys", (0, 33), 10), ("odd=name", (19,), 20)):
        (root / folder).mkdir()
        for i in range(2):
            s = make_score(seed=seed + i, num_notes=50, programs=programs, drums=False)
            s.dump_midi(str(root / folder / f"{folder[:3]}{i}.mid"))
    return root


def _setup(argv):
    return train_setup.resolve(parse_args(argv))


def test_name_equals_dir_tags_and_existing_paths_with_equals_stay_paths(styles, tmp_path):
    errors: list[str] = []
    spec = tagging.split_specs(
        [f"str={styles / 'strings'}", styles / "odd=name", f"{styles}/odd=name", f"x={tmp_path / 'nope'}"],
        "-t",
        errors,
    )
    assert spec.roots == [("str", styles / "strings")]
    assert spec.paths == [styles / "strings", styles / "odd=name", styles / "odd=name"]
    assert errors == [f"-t x={tmp_path / 'nope'}: no such file or directory: {tmp_path / 'nope'}"]
    # Not a tag name (a slash, or nothing before '='): a path, reported missing by the caller as before.
    spec = tagging.split_specs(["a/b=c", "=c"], "-t", errors)
    assert spec.roots == [] and [str(p) for p in spec.paths] == ["a/b=c", "=c"]


def test_setup_maps_every_piece_to_its_tag_and_csv_wins(styles, tmp_path):
    csv = tmp_path / "tags.csv"
    csv.write_text(f"path,tag\n{styles / 'keys' / 'key0.mid'},special\n{styles / 'odd=name'},organ\n")
    s = _setup(["1", str(tmp_path / "ck"), "-t", f"strings={styles / 'strings'}", "-t", f"keys={styles / 'keys'}",
                "-t", str(styles / "odd=name"), "--tags-csv", str(csv), *TINY])  # fmt: skip
    assert len(s.train_files) == 6
    assert s.tag_names == ["strings", "keys", "special", "organ"]
    got = {Path(k).name: v for k, v in s.tags.items()}
    assert got == {"str0.mid": "strings", "str1.mid": "strings", "key0.mid": "special", "key1.mid": "keys",
                   "odd0.mid": "organ", "odd1.mid": "organ"}  # fmt: skip
    assert s.cfg.controls == "on" and s.cfg.control_dropout == tagging.DEFAULT_CONTROL_DROPOUT
    csv.write_text("only-one-column\n")
    with pytest.raises(UsageError, match="is not 'path,tag'"):
        _setup(["1", str(tmp_path / "ck"), "-t", str(styles / "keys"), "--tags-csv", str(csv), *TINY])


def test_tagged_run_then_generate_with_tag_and_soft_controls(styles, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    argv = ["1", str(ckpt), "-t", f"strings={styles / 'strings'}", "-t", f"keys={styles / 'keys'}",
            "-v", f"keys={styles / 'keys' / 'key1.mid'}", *TINY, "--max-steps", "2"]  # fmt: skip
    assert tr.main(argv) == 0
    tok_doc = json.loads((ckpt / "tokenizer.json").read_text())
    assert tok_doc["tags"] == ["strings", "keys"]
    cfg = json.loads((ckpt / "config.json").read_text())["train"]
    assert cfg["controls"] == "on" and cfg["control_dropout"] == 0.5
    assert "controls" in ck.load(ckpt).state["data"]  # a change of tags/dropout restarts the epoch on resume

    # The datasets of that run: every training piece's first window starts BOS + its controls, tag included
    # unless dropped; validation keeps every control (no dropout).
    setup = _setup(argv)
    tok = ck.load_tokenizer(ckpt)
    train_ds, val_ds = train_setup.build_datasets(setup, tok, dist.from_env())
    assert train_ds.controls.dropout == 0.5 and val_ds.controls.dropout == 0.0
    x, y = val_ds[0]
    names = tok.token_names(x[:9].tolist())
    assert names[:2] == ["<bos>", "CTL_TAG_1"] and "CTL_PROGRAM_0" in names and "CTL_PROGRAM_33" in names
    assert (
        sum(n.startswith("CTL_") for n in names) == 8
    )  # tag, 2 programs, tempo, time sig, key, density, poly
    tagged = [
        train_ds.controls.controls(f, train_ds.piece_ids(p), 0).tag for p, f in enumerate(train_ds.files)
    ]
    assert tagged == ["keys", "keys", "strings", "strings"]

    # generate: --tag and the soft controls on the trained checkpoint; a tag it never saw lists the valid ones.
    out = tmp_path / "g.mid"
    capsys.readouterr()
    code = main(["generate", str(ckpt), "-o", str(out), "--tag", "strings", "--key", "D minor", "--tempo", "90",
                 "--time-sig", "3/4", "--density", "low", "--polyphony", "medium", "--instruments", "violin,cello",
                 "--max-tokens", "48", "--min-new-tokens", "48", "-n", "2", "--seed", "1"])  # fmt: skip
    assert code == 0
    for i in (1, 2):
        score = symusic.Score(str(tmp_path / f"g_{i}.mid"))
        assert {t.program for t in score.tracks if t.notes} <= {40, 42}
    capsys.readouterr()
    assert main(["generate", str(ckpt), "-o", str(out), "--tag", "jazz", "--max-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'jazz'" in err and err.endswith("its tags: strings, keys")

    # Resuming with a new tag: it takes the next slot, the old slots stay.
    assert tr.main([*argv[:-2], "-t", f"organ={styles / 'odd=name'}", "--max-steps", "3"]) == 0
    assert json.loads((ckpt / "tokenizer.json").read_text())["tags"] == ["strings", "keys", "organ"]
    assert "new style tags organ" in capsys.readouterr().err


def test_controls_off_trains_without_prefix_and_bad_dropout_exits_2(styles, tmp_path, capsys):
    ckpt = tmp_path / "off"
    argv = ["1", str(ckpt), "-t", str(styles / "keys"), *TINY, "--max-steps", "1", "--controls", "off"]
    assert tr.main(argv) == 0
    assert json.loads((ckpt / "config.json").read_text())["train"]["controls"] == "off"
    assert "controls" not in ck.load(ckpt).state["data"]
    train_ds, _ = train_setup.build_datasets(_setup(argv), ck.load_tokenizer(ckpt), dist.from_env())
    assert train_ds.controls is None
    capsys.readouterr()
    assert tr.main(["1", str(tmp_path / "x"), "-t", f"k={styles / 'keys'}", "--controls", "off", *TINY]) == 2
    assert "need controls, but --controls off" in capsys.readouterr().err
    assert (
        tr.main(["1", str(tmp_path / "x"), "-t", str(styles / "keys"), "--control-dropout", "1.5", *TINY])
        == 2
    )
    assert "--control-dropout must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_checkpoint_from_before_controls_resolves_without_them(tmp_path):
    """tests/fixtures/ckpt_v1 (legacy tokenizer, no 'controls' in config.json): no prefix, tags refused."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    (tmp_path / "train").mkdir()
    make_score(seed=0, num_notes=60).dump_midi(str(tmp_path / "train" / "p0.mid"))
    base = ["2", str(ckpt), "-b", "4096", "--seed", "1"]
    s = _setup([*base, "-t", str(tmp_path / "train")])
    assert s.cfg.controls == "off" and s.tags == {}
    with pytest.raises(
        UsageError, match=r"style tags \(pop\) need controls, but the checkpoint trains without"
    ):
        _setup([*base, "-t", f"pop={tmp_path / 'train'}"])
    with pytest.raises(UsageError, match=r"predates control events"):
        _setup([*base, "-t", str(tmp_path / "train"), "--controls", "on"])
