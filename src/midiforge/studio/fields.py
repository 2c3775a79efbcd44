"""The studio's form: generate's own options as form fields, and a request → generate's argv (the job queue that
runs it is jobs.py).

One validator: a request becomes the argv of ``midiforge generate`` and is parsed by the parser that
:func:`midiforge.generate.configure_parser` builds (type errors, unknown options), then run by
:func:`midiforge.generate.command.run` itself, whose UsageError is the one-line message the page shows. So every option
generate gains later (controls, infill, ...) appears in the page and is checked exactly as on the CLI.

Safety: options that name files (the checkpoint, the output, the prompt, -t/--train-dataset, and any later option whose
metavar says PATH/DIR/FILE/... ) are never taken from the client; the server sets its own. Every file goes into
the studio's output folder under names the server makes (random ids), and files are served only by looking
up those ids in memory, never by joining a client string to a path.
"""

from __future__ import annotations

import argparse
import re

from midiforge.errors import UsageError
from midiforge.generate import command as generate_command

# generate options the server owns: file paths, and how the server runs (device, files it renders).
SERVER_ONLY = {"checkpoint", "output", "prompt", "train_dataset", "wav", "pianoroll", "no_kv_cache", "device",
               "help"}  # fmt: skip
# A later option whose metavar names a file is hidden too, so that no client string becomes a path.
PATHLIKE_METAVAR = re.compile(r"PATH|DIR|FILE|CKPT|TRAIN|OUT|\.MID|\.JSON", re.IGNORECASE)
MAX_VALUE_CHARS = 200  # longest value of one option a request may carry
ID = re.compile(r"^[0-9a-f]{12}$")


class _Parser(argparse.ArgumentParser):
    """generate's parser, raising UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def generate_parser(configure=None) -> argparse.ArgumentParser:
    """The parser of ``midiforge generate`` (``configure`` defaults to generate.configure_parser)."""
    if configure is None:
        configure = generate_command.configure_parser
    p = _Parser(prog="midiforge generate", add_help=False)
    configure(p)
    return p


def _kind(action: argparse.Action) -> str | None:
    """The form control for an argparse action, None when the page cannot offer it."""
    if isinstance(
        action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._StoreConstAction
    ):
        return "flag"
    if isinstance(action, argparse._AppendAction):
        return "multi"
    if type(action) is argparse._StoreAction and action.nargs in (None, "?"):
        if action.choices is not None:
            return "choice"
        return {int: "int", float: "float"}.get(action.type, "text")
    return None


def exposed(action: argparse.Action) -> bool:
    """Whether the page offers this option (not positional, not server-owned, not a path, a known kind)."""
    if not action.option_strings or action.dest in SERVER_ONLY or action.help == argparse.SUPPRESS:
        return False
    if PATHLIKE_METAVAR.search(str(action.metavar or "")):
        return False
    return _kind(action) is not None


def _help(parser, action) -> str:
    params = dict(vars(action), prog=parser.prog)
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    try:
        return (action.help or "") % params
    except (KeyError, TypeError, ValueError):
        return action.help or ""


def option_fields(parser: argparse.ArgumentParser) -> list[dict]:
    """One field per exposed option, in the parser's order, with its group's title (the page's fieldsets)."""
    group_of = {}
    for g in parser._action_groups:  # argparse keeps no public list of groups
        for a in g._group_actions:
            title = "generation" if g.title in (None, "options", "optional arguments") else g.title
            # "controls (checkpoints trained ...)" → "controls"
            group_of[id(a)] = re.split(r" \(|;", title)[0]
    fields = []
    for a in parser._actions:
        if not exposed(a):
            continue
        default = a.default if isinstance(a.default, int | float | str | bool) else None
        fields.append({
            "dest": a.dest,
            "flag": max(a.option_strings, key=len),
            "kind": _kind(a),
            "default": default,
            "help": _help(parser, a),
            "metavar": str(a.metavar or ""),
            "choices": [str(c) for c in a.choices] if a.choices is not None else None,
            "alone": a.nargs == "?",  # nargs="?": the flag may also be given without a value (true)
            "group": group_of.get(id(a), "generation"),
        })  # fmt: skip
    return fields


def request_argv(fields: list[dict], options: dict) -> list[str]:
    """The generate arguments of a request's options ({dest: value}); UsageError for anything not offered."""
    if not isinstance(options, dict):
        raise UsageError("options must be an object of option names and values")
    by_dest = {f["dest"]: f for f in fields}
    argv = []
    for dest, value in options.items():
        f = by_dest.get(dest)
        if f is None:
            raise UsageError(f"unknown option {str(dest)[:40]!r}")
        if f.get("alone") and value is True:
            argv.append(f["flag"])  # e.g. --harmonize with its const
            continue
        if f["kind"] == "flag":
            if not isinstance(value, bool):
                raise UsageError(f"{f['flag']}: expected true or false")
            argv += [f["flag"]] if value else []
            continue
        values = value if f["kind"] == "multi" and isinstance(value, list) else [value]
        for v in values:
            if v is None or (isinstance(v, str) and not v.strip()):
                continue  # an empty field: the option's default
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise UsageError(f"{f['flag']}: expected a value, not {type(v).__name__}")
            v = str(v).strip()
            if len(v) > MAX_VALUE_CHARS or any(ord(c) < 32 for c in v):
                raise UsageError(f"{f['flag']}: value too long or with control characters")
            argv.append(f"{f['flag']}={v}")  # '=' so a value starting with '-' stays a value
    return argv
