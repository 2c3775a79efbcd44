"""One command-line vocabulary: the same words mean the same thing in every command, usage lines tell the truth,
mistakes are one line with exit code 2, and docs/cli.md is the parsers' own text."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from midiforge.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def actions(command: str) -> dict[str, argparse.Action]:
    """The command's options by dest (positionals too)."""
    _, parsers = build_parser(command)
    return {a.dest: a for a in parsers[command]._actions}


def test_the_checkpoint_is_ckpt_and_the_shared_options_are_declared_once():
    with_ckpt = {"train": "ckpt_path", "generate": "checkpoint", "evaluate": "checkpoint", "plot": "checkpoint",
                 "studio": "checkpoints"}  # fmt: skip
    for command, dest in with_ckpt.items():
        assert actions(command)[dest].metavar == "CKPT", command
    # The data: -t is the training set and -v held-out data wherever they appear.
    for command in ("train", "generate", "evaluate"):
        t = actions(command)["train_dataset"]
        assert t.option_strings == ["-t", "--train-dataset"] and t.metavar == "TRAIN", command
    for command in ("train", "evaluate"):
        assert actions(command)["val_dataset"].option_strings == ["-v", "--val-dataset"], command
    # evaluate's -v defaults to the checkpoint's own held-out pieces (test_split covers it).
    assert actions("train")["train_dataset"].required and not actions("evaluate")["val_dataset"].required
    # The device: auto everywhere.
    for command in ("train", "generate", "evaluate", "studio"):
        assert actions(command)["device"].default == "auto", command
    # Sampling: the same options with the same defaults and help in generate and evaluate.
    names = ("max_tokens", "max_seconds", "temperature", "top_k", "top_p", "seed")
    gen, ev = actions("generate"), actions("evaluate")
    for name in names:
        a, b = gen[name], ev[name]
        assert (a.option_strings, a.default, a.type, a.help) == (b.option_strings, b.default, b.type, b.help), name
    assert gen["seed"].default is None  # a fresh seed each time, printed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["prepare", "-o", "out"], "SRC"),
        (["prepare", "src"], "-o/--out"),
        (["prepare", "src", "-o", "out", "--format", "xml"], "invalid choice: 'xml'"),
        (["demo-data"], "OUT"),
        (["train", "1", "ckpt"], "-t/--train-dataset"),
        (["evaluate", "ckpt", "--stride", "many"], "--stride"),
        (["generate", "ckpt"], "-o/--output"),
        (["generate", "ckpt", "-o", "x.mid", "--top-k", "many"], "--top-k"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_a_missing_or_wrong_argument_is_one_line_and_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    prog = "midiforge" if argv[0] not in COMMANDS else f"midiforge {argv[0]}"
    assert out == "" and err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and words in err, err
    assert f"(see {prog} --help)" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_usage_lines_show_required_arguments_as_required():
    _, parsers = build_parser("prepare")
    usage = parsers["prepare"].format_usage()
    assert " -o OUT " in usage and "[-o OUT]" not in usage and "SRC [SRC ...]" in usage
    _, parsers = build_parser("demo-data")
    assert parsers["demo-data"].format_usage().rstrip().endswith(" OUT")


def test_help_describes_the_tool_not_the_code():
    parser, parsers = build_parser()
    text = parser.format_help()
    assert "dispatcher" not in text and "module" not in text and "Transformer on your own MIDI files" in text
    for command in COMMANDS:
        _, parsers = build_parser(command)
        helps = parsers[command].format_help()
        assert ".py" not in helps.replace("train.py", ""), command  # no source files named
        assert "seed's" not in helps and "measured on" not in helps.lower(), command


def test_help_exits_0_on_stdout():
    done = subprocess.run([sys.executable, "-m", "midiforge", "generate", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith("usage: midiforge generate")


def test_docs_cli_md_is_the_parsers_help():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
