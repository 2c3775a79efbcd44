"""`midiforge demo-data --styles`: music21's other collections as a tagged corpus, one folder per style."""

from __future__ import annotations

import pytest

from midiforge.cli import main
from midiforge.notes.read import read_notes
from midiforge.tokens.controls import measure

pytest.importorskip("music21")

from midiforge.data.demo import STYLES, list_style, tag_args  # noqa: E402


def test_music21_collections_are_there_under_stable_names():
    counts = {s: len(list_style(s)) for s in ("palestrina", "monteverdi", "trecento", "quartets", "folk")}
    assert counts["palestrina"] > 1200 and counts["folk"] > 1000  # ~1,318 Humdrum files, 1,059 ABC tunes
    assert (
        40 <= counts["monteverdi"] <= 60
        and 90 <= counts["trecento"] <= 110
        and 25 <= counts["quartets"] <= 40
    )
    names = [n for n, _ in list_style("quartets")]
    assert "opus18no1-movement1" in names and len(set(names)) == len(names)  # beethoven and haydn, no clash
    assert not any(n.endswith("_old") for n, _ in list_style("monteverdi"))  # superseded encodings skipped


def test_styles_corpus_has_a_folder_per_tag_that_trains_as_tags(tmp_path, capsys):
    out = tmp_path / "styles"
    assert (
        main(["demo-data", str(out), "--styles", "folk,palestrina", "--per-style", "2", "-j", "2", "-q"]) == 0
    )
    said = capsys.readouterr().out
    assert "4 converted, 0 reused, 0 failed" in said
    files = sorted(out.rglob("*.mid"))
    assert len(files) == 4 and {f.parent.name for f in files} == {"folk", "palestrina"}
    assert {f.parent.parent.name for f in files} <= {"train", "val"}
    # Folk tunes are one melody line; Palestrina is vocal polyphony (music21 writes it for voices).
    by_tag = {f.parent.name: measure(read_notes(f)) for f in files}
    assert by_tag["folk"].polyphony == 0 and by_tag["palestrina"].instruments == (53,)
    args = tag_args(out, "train")
    assert all(a.split("=", 1)[0] in STYLES for a in args) and f"-t {args[0]}" in said
    # A second run reuses everything; an unknown style or --limit with --styles is one line and exit 2.
    assert main(["demo-data", str(out), "--styles", "folk,palestrina", "--per-style", "2", "-q"]) == 0
    assert "0 converted, 4 reused" in capsys.readouterr().out
    assert main(["demo-data", str(out), "--styles", "jazz"]) == 2
    err = capsys.readouterr().err
    assert "unknown style jazz" in err and "palestrina" in err and len(err.strip().splitlines()) == 1
    assert main(["demo-data", str(out), "--styles", "all", "--limit", "3"]) == 2
