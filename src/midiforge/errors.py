"""User-facing errors: the CLI prints them as one line and exits with a distinct code."""


class UsageError(Exception):
    """Bad input from the user (arguments, files, checkpoints). The CLI exits with code 2."""

    exit_code = 2
