"""``edgespeed device``: run the device agent; show what this device is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.table import Table

from edgespeed.agent import AgentConfig, Device
from edgespeed.cli._common import console, fail, stop_signal
from edgespeed.errors import EdgeSpeedError
from edgespeed.hardware import device_card

app = typer.Typer(help="Run the device agent, or show the card this device announces.", no_args_is_help=True)


@app.command("run")
def run(config: Path = typer.Option(..., "--config", "-c", help="The agent's TOML configuration.")) -> None:
    """Join the fleet and serve models and tasks until Ctrl-C or SIGTERM."""
    try:
        asyncio.run(_serve(AgentConfig.from_toml(config)))
    except EdgeSpeedError as exc:
        raise fail(exc) from None


async def _serve(config: AgentConfig) -> None:
    stop = stop_signal()
    async with Device(config) as device:
        console.print(f"[green]{config.device_id}[/] joined fleet {config.fleet} at {config.broker}")
        console.print(f"  backends: {', '.join(device.card.backends) or 'none'}; state in {config.state_dir}")
        await device.run_until_closed(stop)  # raises PartFailedError if the agent failed and closed itself
        console.print("draining and leaving")


@app.command("card")
def card(device_id: str = typer.Argument("this-device", help="The id to show on the card.")) -> None:
    """Detect this machine's hardware and runtimes, as the agent announces them."""
    try:
        info = device_card(device_id, probe_accelerators=True)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    table = Table("field", "value", show_header=False)
    table.add_row("device", info.device_id)
    table.add_row("arch / os", f"{info.arch} / {info.os}")
    table.add_row("cpu cores", str(info.cpu_cores))
    table.add_row("memory", f"{info.memory_bytes / 2**30:.1f} GiB")
    table.add_row("backends", ", ".join(info.backends) or "none installed")
    table.add_row("accelerators", "\n".join(info.accelerators))
    for key, value in info.extra.items():
        table.add_row(key, value)
    console.print(table)
