"""Entry point of the ``edgespeed`` command."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

from edgespeed import __version__
from edgespeed.cli import bench, broker, certs, coordinator, demo, device, optimize

app = typer.Typer(
    name="edgespeed",
    help="EdgeSpeed: one secure compute fabric for ML across edge devices, over MQTT.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(broker.app, name="broker")
app.add_typer(certs.app, name="certs")
app.add_typer(device.app, name="device")
app.add_typer(coordinator.coordinator_app, name="coordinator")
app.add_typer(coordinator.model_app, name="model")
app.add_typer(coordinator.task_app, name="task")
app.add_typer(optimize.app, name="optimize")
app.command("status")(coordinator.status)
app.command("demo")(demo.demo)
app.command("bench")(bench.bench)

console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"edgespeed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    if not verbose:
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("transitions").setLevel(logging.CRITICAL)


def main() -> None:
    """Run the CLI."""
    app()
