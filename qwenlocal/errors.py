"""User-facing errors: one clear sentence, exit code 2 in the CLI, never a traceback.

The class lives in quant.errors (quant imports nothing from qwenlocal); this is its home for the
application."""

from quant.errors import UserError

__all__ = ["UserError"]
