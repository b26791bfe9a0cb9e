"""The `kernelhub` command: one module per command group; `main` is the entry point."""

from kernelhub.cli.commands import main

__all__ = ["main"]
