"""`python -m qwenlocal`: the same as the `qwenlocal` command."""

from .cli import main

main()
