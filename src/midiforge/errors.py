"""The library's error types, and the one place that turns them into a command's exit code.

- :class:`UsageError`: input that cannot be used (arguments, files, checkpoints, requests). It is a ValueError,
  so code that calls the library and catches ValueError catches it too. Exit code 2.
- :class:`RunFailed`: the input was fine but the run could not go on (training diverged, out of memory).
  Exit code 1.

Both derive from :class:`MidiforgeError`, whose message is written to be read as one line by a person.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class MidiforgeError(Exception):
    """An error the user can act on; its message is one line."""


class UsageError(MidiforgeError, ValueError):
    """Bad input from the user (arguments, files, checkpoints, requests)."""


class RunFailed(MidiforgeError):
    """A run that cannot go on for a reason other than its input (diverged, out of memory)."""


# The one mapping from error type to exit code (the first match wins; 130 is Ctrl-C, as shells report it).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = ((UsageError, 2), (RunFailed, 1))


def exit_code(e: BaseException) -> int:
    return next((code for kind, code in EXIT_CODES if isinstance(e, kind)), 1)


def report(prog: str, fn: Callable[..., int], *args) -> int:
    """Run a command; a MidiforgeError becomes one line on stderr and its exit code, Ctrl-C exit code 130.

    Every entry point goes through it (the `midiforge` dispatcher, `python train.py` and the spawned DDP
    workers).
    """
    try:
        return fn(*args)
    except MidiforgeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
