"""Stopping a generation from outside, between chunks of tokens: the studio's Cancel button and its
``--max-job-seconds``.

A caller runs the generation inside :func:`stop_when` with a function that returns a reason (a one-line message)
when the work should stop, or None. The token loops (decode, infilling, harmonising) call :func:`check` between
chunks; it raises :class:`Stopped` with that reason. Without :func:`stop_when` (the command line) :func:`check`
costs one context-variable read and never raises.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

from midiforge.errors import MidiforgeError

CHECK_EVERY = 16  # tokens between two checks in the one-token-at-a-time loops (infilling, harmonising)


class Stopped(MidiforgeError):
    """A generation stopped from outside (cancelled, or over a time limit); the message says which."""


_reason: contextvars.ContextVar[Callable[[], str | None] | None]
_reason = contextvars.ContextVar("stop", default=None)


@contextlib.contextmanager
def stop_when(reason: Callable[[], str | None]):
    """Within the block (this thread), :func:`check` raises Stopped(reason()) once reason() returns a message."""
    token = _reason.set(reason)
    try:
        yield
    finally:
        _reason.reset(token)


def check() -> None:
    """Raise :class:`Stopped` when the caller of :func:`stop_when` asks the generation to stop."""
    fn = _reason.get()
    if fn is not None and (why := fn()):
        raise Stopped(why)
