"""midiforge: train a Transformer on your own MIDI files, then generate, steer, edit and measure its music.

Every subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``. Modules are imported
lazily so that `midiforge prepare` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from midiforge.errors import report
from midiforge.options import Parser

COMMANDS = {
    "prepare": ("midiforge.data.prepare", "turn MIDI files into a compact dataset that loads fast (optional)"),
    "train": ("midiforge.train.command", "train a model on MIDI files, or resume a run"),
    "generate": ("midiforge.generate.command", "write new music with a model: continue, steer or edit a piece"),
    "plot": ("midiforge.train.plot", "redraw a run's training curves"),
    "evaluate": ("midiforge.evaluate", "measure a model: bits per note, sample statistics, copies"),
    "demo-data": ("midiforge.data.demo", "build a corpus to try midiforge on: Bach chorales, or several styles"),
    "studio": ("midiforge.studio.server", "a local web page to generate, look at and listen to music"),
    "merge": ("midiforge.merge", "fold a LoRA checkpoint's adapters into a plain model directory"),
    "export": ("midiforge.export", "write a checkpoint as a Hugging Face LlamaForCausalLM folder"),
}
DESCRIPTION = __doc__.splitlines()[0].removeprefix("midiforge: ")
EPILOG = """\
a first run, on folders of your own MIDI files:
  midiforge train 20 runs/mine -t my-midi/train -v my-midi/val    (the same: python train.py 20 runs/mine ...)
  midiforge generate runs/mine -o piece.mid --wav
`midiforge COMMAND --help` describes each command and its options."""


def build_parser(chosen: str | None = None) -> tuple[Parser, dict[str, Parser]]:
    """The `midiforge` parser and its commands' parsers by name; only ``chosen``'s options are added (its
    module imported): the others list in the help without importing anything."""
    parser = Parser(prog="midiforge", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (module, help_text) in COMMANDS.items():
        commands[name] = p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure_parser(p)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser, _ = build_parser(chosen)

    def parse_and_run() -> int:
        args = parser.parse_args(argv)  # a mistake: UsageError, one line (options.Parser)
        return importlib.import_module(COMMANDS[args.command][0]).run(args)

    return report(f"midiforge {chosen}" if chosen in COMMANDS else "midiforge", parse_and_run)


if __name__ == "__main__":
    sys.exit(main())
