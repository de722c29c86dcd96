"""What the command groups share."""

from __future__ import annotations

import asyncio
import signal

import typer
from rich.console import Console
from rich.markup import escape

from edgespeed.errors import EdgeSpeedError

console = Console()


def fail(exc: EdgeSpeedError) -> typer.Exit:
    """Print an EdgeSpeed error (escaped: messages hold patterns like ``[a-z]``) and exit 1."""
    console.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(1)


def stop_signal() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM, for commands that run until told to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
