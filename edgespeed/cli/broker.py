"""``edgespeed broker``: the zero-setup MQTT broker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import typer
from rich.console import Console

from edgespeed.errors import EdgeSpeedError
from edgespeed.transport import BrokerSettings, BrokerTls, EmbeddedBroker

app = typer.Typer(help="Run the zero-setup MQTT broker (Mosquitto when installed, else amqtt).", no_args_is_help=True)
console = Console()


@app.command("run")
def run(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(1883, help="Plain MQTT port (0: a free one)."),
    backend: str = typer.Option("auto", help="auto, mosquitto or amqtt."),
    data_dir: Path | None = typer.Option(None, help="Persist sessions and queued messages here."),
    tls_port: int = typer.Option(8883, help="TLS port, used with --ca/--cert/--key."),
    ca: Path | None = typer.Option(None, help="Fleet CA certificate: clients must present a certificate from it."),
    cert: Path | None = typer.Option(None, help="The broker's certificate."),
    key: Path | None = typer.Option(None, help="The broker's private key."),
    no_plain: bool = typer.Option(False, "--no-plain", help="Serve TLS only."),
) -> None:
    """Start a broker in the foreground until Ctrl-C."""
    tls = None
    if any((ca, cert, key)):
        if not all((ca, cert, key)):
            raise typer.BadParameter("--ca, --cert and --key go together")
        assert ca and cert and key
        tls = BrokerTls(ca, cert, key)
    try:
        settings = BrokerSettings(
            host=host,
            port=None if no_plain else port,
            tls=tls,
            tls_port=tls_port,
            data_dir=data_dir,
            backend=backend,  # type: ignore[arg-type]
        )
        asyncio.run(_serve(settings))
    except EdgeSpeedError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


async def _serve(settings: BrokerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with EmbeddedBroker(settings) as broker:
        console.print(f"[green]broker running[/] ({broker.backend})")
        with contextlib.suppress(EdgeSpeedError):
            console.print(f"  plain: {broker.url}")
        with contextlib.suppress(EdgeSpeedError):
            console.print(f"  TLS:   {broker.tls_url}")
        console.print("Ctrl-C to stop.", style="dim")
        await stop.wait()
        console.print("stopping")
