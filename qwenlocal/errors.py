"""User-facing errors: one clear sentence, exit code 2 in the CLI, never a traceback."""


class UserError(Exception):
    """Bad input from the user (path, flag, file). The CLI prints the message and exits 2."""

    exit_code = 2
