"""Write the generated half of docs/cli.md: the `--help` of `midiforge` and of every command, from the parsers.

    python scripts/cli_reference.py           # rewrite docs/cli.md below its marker line
    python scripts/cli_reference.py --check   # exit 1 when docs/cli.md is not current (a test runs it)

Everything above the marker line is written by hand and kept as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
MARKER = "<!-- Everything below is written by scripts/cli_reference.py from the parsers: do not edit. -->"
WIDTH = "100"  # argparse wraps help at $COLUMNS - 2


def reference() -> str:
    """The generated text: one section per command, its --help in a text block."""
    os.environ["COLUMNS"] = WIDTH
    sys.path.insert(0, str(ROOT / "src"))
    from midiforge.cli import COMMANDS, build_parser

    parts = ["## Every option", ""]
    for name in [None, *COMMANDS]:
        parser, commands = build_parser(name)
        title = "midiforge" if name is None else f"midiforge {name}"
        text = (parser if name is None else commands[name]).format_help().rstrip()
        parts += [f"### {title}", "", "```text", text, "```", ""]
    return "\n".join(parts)


def current(text: str) -> str:
    """``text`` (docs/cli.md) with its generated half replaced by :func:`reference`."""
    head, found, _ = text.partition(MARKER)
    if not found:
        raise SystemExit(f"{DOC}: the marker line is missing")
    return f"{head}{MARKER}\n\n{reference()}"


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    new = current(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
