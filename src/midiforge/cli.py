"""`midiforge` command line: a thin dispatcher over the modules that own each job.

Every subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``. Modules are imported
lazily so that `midiforge prepare` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from midiforge.errors import report

COMMANDS = {
    "prepare": ("midiforge.data.prepare", "extract MIDI files into compact JSON datasets"),
    "train": ("midiforge.train.command", "train a Transformer on MIDI/JSON datasets (resumes automatically)"),
    "generate": ("midiforge.generate.command", "generate music from a checkpoint"),
    "plot": ("midiforge.train.plot", "redraw ckpt/training.png from ckpt/metrics.json"),
    "evaluate": (
        "midiforge.evaluate",
        "measure a model: bits per note/second, sample statistics, copy check",
    ),
    "demo-data": (
        "midiforge.data.demo",
        "build the embedded corpus: Bach chorales, or tagged styles (--styles)",
    ),
    "studio": ("midiforge.studio.server", "a local web page to generate, look at and listen to music"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="midiforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the chosen command (help lists them all without importing).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure_parser(p)
    args = parser.parse_args(argv)
    return report(f"midiforge {args.command}", importlib.import_module(COMMANDS[args.command][0]).run, args)


if __name__ == "__main__":
    sys.exit(main())
