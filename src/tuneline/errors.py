"""Error types. Exit 2 for bad input or params, 1 for anything else (see DESIGN.md)."""


class TunelineError(Exception):
    """A failure the CLI reports as one clear message and exit code 1."""

    exit_code = 1


class InputError(TunelineError):
    """Bad input: a file, line, field or param with a value that is not allowed (exit 2)."""

    exit_code = 2
