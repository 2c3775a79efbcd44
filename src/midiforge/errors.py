"""User-facing errors: the CLI prints them as one line and exits with a distinct code."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user (arguments, files, checkpoints). The CLI exits with code 2."""

    exit_code = 2


def report(prog: str, fn: Callable[..., int], *args) -> int:
    """Run a command; a UsageError becomes one line on stderr and its exit code, Ctrl-C exit code 130.

    The one place that turns errors into exit codes (the `midiforge` dispatcher, `python train.py` and the
    spawned DDP workers all go through it).
    """
    try:
        return fn(*args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
