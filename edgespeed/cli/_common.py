"""What the command groups share."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from edgespeed.errors import EdgeSpeedError

console = Console()


def fail(exc: EdgeSpeedError) -> typer.Exit:
    """Print an EdgeSpeed error (escaped: messages hold patterns like ``[a-z]``) and exit 1."""
    console.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(1)
