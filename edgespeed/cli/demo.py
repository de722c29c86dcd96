"""``edgespeed demo``: run the end-to-end demo."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from edgespeed.demo import run_demo

console = Console()


def demo(
    tasks: int = typer.Option(64, min=1, help="How many inference tasks to send."),
    broker: str = typer.Option("auto", help="auto (Mosquitto if installed), mosquitto or amqtt."),
) -> None:
    """Broker, coordinator and device: a verified model rollout and a batch of tasks."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("fetching weights", total=None)
        report = asyncio.run(
            run_demo(
                tasks=tasks,
                broker_backend=broker,  # type: ignore[arg-type]
                on_step=lambda text: progress.console.print(f"[green]✓[/] {text}"),
                on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
            )
        )
    console.print(
        f"tasks: {report.ok}/{report.tasks} correct, round trip p50 {report.p50_ms:.2f} ms "
        f"({report.broker}, MQTT {report.protocol}{', mutual TLS' if report.tls else ''})"
    )
    console.print(f"demo: {report.ok}/{report.tasks} tasks ok")
    if report.ok != report.tasks:
        raise typer.Exit(1)
