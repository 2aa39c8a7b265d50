"""Bad input (a path, a flag, a file): one clear sentence, exit code 2 in the CLI, no traceback.

Defined at the bottom of the dependency order, in the quant library, so that quant raises it
without importing the application; `qwenlocal.errors` re-exports it."""


class UserError(Exception):
    """Bad input from the user (path, flag, file). The CLI prints the message and exits 2."""

    exit_code = 2
