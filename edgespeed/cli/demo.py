"""``edgespeed demo``: run the end-to-end demo."""

from __future__ import annotations

import asyncio

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from edgespeed.cli._common import console, fail
from edgespeed.errors import EdgeSpeedError


def demo(
    tasks: int = typer.Option(200, min=1, help="How many digit images to send through the fleet."),
    broker: str = typer.Option("auto", help="auto (Mosquitto if installed), mosquitto or amqtt."),
    concurrency: int = typer.Option(8, min=1, help="Tasks in flight at once."),
) -> None:
    """A fleet on this machine: broker, coordinator and two agents as processes; a model trained,
    published, and a batch of real digit images classified through it, sealed end to end."""
    from edgespeed.demo import run_demo

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("tasks", total=tasks, visible=False)
        try:
            report = asyncio.run(
                run_demo(
                    tasks=tasks,
                    broker_backend=broker,  # type: ignore[arg-type]
                    concurrency=concurrency,
                    on_step=lambda text: progress.console.print(f"[green]✓[/] {text}"),
                    on_progress=lambda done, total: progress.update(bar, completed=done, total=total, visible=True),
                )
            )
        except EdgeSpeedError as exc:
            raise fail(exc) from None
    spread = ", ".join(f"{d} {n}" for d, n in sorted(report.per_device.items()))
    console.print(
        f"accuracy {report.accuracy:.1%} on {report.tasks} held-out digits; "
        f"latency p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms; "
        f"{report.tasks / report.seconds:.0f} tasks/s; ran on: {spread}"
    )
    console.print(f"({report.broker}{', mutual TLS' if report.tls else ''}; every answer checked against the model)")
    console.print(f"demo: {report.ok}/{report.tasks} tasks ok")
    if report.ok != report.tasks:
        raise typer.Exit(1)
