"""``edgespeed coordinator``, ``model``, ``task`` and ``status``: the coordinator side of the fleet.

`coordinator run` is the long-running service. The other commands are short
clients beside it: they use the same configuration (identity, ledger, model
store) under a client id of their own, so they work with or without a running
coordinator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgespeed.cli._common import console, fail, stop_signal
from edgespeed.errors import ConfigError, EdgeSpeedError, TaskError

if TYPE_CHECKING:  # the coordinator is imported when a command runs: `device run` never loads it
    from edgespeed.coordinator import CoordinatorConfig, RolloutReport

coordinator_app = typer.Typer(help="Run the fleet's coordinator.", no_args_is_help=True)
model_app = typer.Typer(help="Publish models to the fleet.", no_args_is_help=True)
task_app = typer.Typer(help="Run tasks on the fleet.", no_args_is_help=True)

CONFIG = typer.Option(..., "--config", "-c", help="The coordinator's TOML configuration.")


def _config(path: Path, *, presence: bool = False) -> CoordinatorConfig:
    from edgespeed.coordinator import CoordinatorConfig

    config = CoordinatorConfig.from_toml(path)
    return config if presence else dataclasses.replace(config, presence=False)


@coordinator_app.command("run")
def run(config: Path = CONFIG) -> None:
    """Keep the registry, place and re-dispatch tasks, serve published models, until Ctrl-C or SIGTERM."""
    try:
        asyncio.run(_serve(_config(config, presence=True)))
    except EdgeSpeedError as exc:
        raise fail(exc) from None


async def _serve(config: CoordinatorConfig) -> None:
    from edgespeed.coordinator import Coordinator

    stop = stop_signal()
    async with Coordinator(config) as c:
        served = ", ".join(f"{m.model_id} v{m.version}" for m in c.store.latest()) or "none yet"
        console.print(f"[green]{config.coordinator_id}[/] coordinating fleet {config.fleet} at {config.broker}")
        console.print(f"  ledger: {config.ledger or config.state_dir / 'ledger.db'}; models served: {served}")
        await stop.wait()
        console.print("leaving; unfinished tasks stay in the ledger")


@model_app.command("publish")
def publish(
    paths: list[Path] = typer.Argument(..., help="Model files, one per variant: .onnx, .tflite, .safetensors."),
    name: str = typer.Option(..., "--name", "-n", help="The model id, e.g. digits."),
    version: int | None = typer.Option(None, "--version", help="Default: one more than the newest published."),
    targets: str = typer.Option(
        "all", "--targets", "-t", help="Devices: ids, id patterns (gw-*), backend=X, accelerator=X, arch=X, os=X."
    ),
    architecture: str = typer.Option("", "--architecture", help="The torch architecture of .safetensors weights."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the targets to report."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until every target reported."),
    split: str = typer.Option(
        "", "--split", help="Run as a pipeline across devices: auto (the planner decides), N stages, or NODE,NODE."
    ),
    codec: str = typer.Option("", "--codec", help="Activations between stages: fp16, int8, int8c, +zstd, +lz4."),
    optimize: str = typer.Option(
        "", "--optimize", help="Also publish variants made from the .onnx model: int8, fp16 (e.g. int8,fp16)."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help=".npz of inputs to calibrate the int8 variant on (dynamic int8 without)."
    ),
    config: Path = CONFIG,
) -> None:
    """Encrypt, sign and publish a model; serve its chunks until the targets report ready."""
    try:
        with tempfile.TemporaryDirectory(prefix="edgespeed-variants-") as folder:
            if optimize:
                paths = _with_variants(paths, optimize, calibration, split, Path(folder))
            report = asyncio.run(
                _publish(_config(config), paths, name, version, targets, architecture, timeout, wait, split, codec)
            )
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    table = Table("device", "state", "detail", title=f"{report.model_id} v{report.version}")
    for device in report.targets:
        if device in report.ready:
            table.add_row(device, "[green]ready[/]", report.ready[device])
        elif device in report.failed:
            table.add_row(device, "[red]failed[/]", escape(report.failed[device]))
        else:
            table.add_row(device, "[yellow]no answer[/]", "")
    if report.targets:
        console.print(table)
    else:
        console.print(f"no device matched {targets!r} yet; devices that join get it from a running coordinator")
    if wait and not report.ok:
        raise typer.Exit(1)


def _with_variants(paths: list[Path], optimize: str, calibration: Path | None, split: str, folder: Path) -> list[Path]:
    """The files to publish: the .onnx model, the variants ``--optimize`` makes of it, the other files."""
    from edgespeed.cli.optimize import progress_bar
    from edgespeed.optimize import make_variants

    if split:
        raise ConfigError("--optimize makes variants of a whole model; with --split, quantise the shards first")
    sources = [p for p in paths if p.suffix == ".onnx"]
    if len(sources) != 1:
        raise ConfigError("--optimize makes its variants from one .onnx file: give exactly one")
    with progress_bar() as progress:
        variants = make_variants(sources[0], optimize.split(","), folder, calibration=calibration, progress=progress)
    for _, precision, made in variants[1:]:
        if made is not None:
            console.print(f"{precision} variant: {made.size_ratio:.2f}x the size of {sources[0].name}")
    return [*(path for path, _, _ in variants), *(p for p in paths if p != sources[0])]


async def _publish(
    config: CoordinatorConfig,
    paths: list[Path],
    name: str,
    version: int | None,
    targets: str,
    architecture: str,
    timeout: float,
    wait: bool,
    split: str = "",
    codec: str = "",
) -> RolloutReport:
    from edgespeed.coordinator import Coordinator
    from edgespeed.coordinator.service import default_client_id

    async with Coordinator(config, client_id=default_client_id(config, "publish")) as c:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[chunks]} chunks served"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            bar = progress.add_task(f"publishing {name}", total=None, chunks=0)

            def update(report: RolloutReport, chunks: int) -> None:
                done = len(report.ready) + len(report.failed)
                progress.update(bar, completed=done, total=len(report.targets), chunks=chunks)

            report = await c.publish_model(
                paths,
                name=name,
                version=version,
                targets=targets,
                architecture=architecture,
                wait=wait,
                timeout=timeout,
                on_progress=update,
                split=split,
                codec=codec,
            )
        if split and name in c.splits():
            stages = c.splits()[name]
            console.print(
                f"{name}: {len(stages.shards)} stages, cut at {', '.join(stages.cuts) or 'nothing'}; "
                f"planned on {' -> '.join(stages.preferred)}, predicted {stages.predicted_s * 1000:.2f} ms"
            )
        return report


@task_app.command("submit")
def submit(
    model: str = typer.Option(..., "--model", "-m", help="The model id."),
    input_file: Path = typer.Option(..., "--input", "-i", help="A .npy array (batch first)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the first output here (.npy)."),
    deadline: float = typer.Option(30.0, "--deadline", help="Seconds the task may take."),
    device: str | None = typer.Option(None, "--device", help="Run only on this device."),
    config: Path = CONFIG,
) -> None:
    """Run one task on the fleet and print (or save) its outputs."""
    try:
        array = np.load(input_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise fail(ConfigError(f"cannot read {input_file} as a .npy array: {exc}")) from None
    try:
        started = time.perf_counter()
        outputs = asyncio.run(_submit(_config(config), model, array, deadline, device))
    except TaskError as exc:
        console.print(f"[red]task failed ({exc.code}):[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    elapsed = (time.perf_counter() - started) * 1000
    for i, out in enumerate(outputs):
        console.print(f"output {i}: shape {tuple(out.shape)}, dtype {out.dtype}")
        if out.ndim == 2 and out.shape[1] > 1 and np.issubdtype(out.dtype, np.floating):
            console.print(f"  argmax per row: {out.argmax(axis=1).tolist()[:32]}")
        elif out.size <= 32:
            console.print(f"  {out.tolist()}")
    console.print(f"done in {elapsed:.0f} ms (connecting included)")
    if output is not None:
        np.save(output, outputs[0])
        console.print(f"first output written to {output}")


async def _submit(
    config: CoordinatorConfig, model: str, array: np.ndarray, deadline: float, device: str | None
) -> tuple[np.ndarray, ...]:
    from edgespeed.coordinator import Coordinator
    from edgespeed.coordinator.service import default_client_id

    async with Coordinator(config, client_id=default_client_id(config, "cli")) as c:
        handle = await c.submit(model, array, deadline=deadline, device=device)
        return await handle.result()


def status(
    config: Path = CONFIG,
    listen: float = typer.Option(1.0, "--listen", help="Seconds to listen for devices' heartbeats."),
) -> None:
    """Show the fleet: devices, models, and tasks by state."""
    try:
        asyncio.run(_status(_config(config), listen))
    except EdgeSpeedError as exc:
        raise fail(exc) from None


def _variant_name(variant: dict[str, object]) -> str:
    """``onnx``, or ``onnx int8`` for a variant that says its precision."""
    return f"{variant['format']} {variant['precision']}" if variant.get("precision") else str(variant["format"])


async def _status(config: CoordinatorConfig, listen: float) -> None:
    from edgespeed.coordinator import Coordinator
    from edgespeed.coordinator.ledger import ledger_caller
    from edgespeed.coordinator.service import default_client_id

    async with Coordinator(config, client_id=default_client_id(config, "status")) as c:
        await asyncio.sleep(listen)  # retained births arrive at once; heartbeats answer the discovery
        now = time.monotonic()
        devices = Table("device", "status", "backends", "accelerators", "load", "models", "last seen", title="devices")
        for d in c.registry.devices():
            colour = {"online": "green", "suspect": "yellow", "lost": "red"}[d.status.value]
            devices.add_row(
                d.device_id,
                f"[{colour}]{d.status.value}[/]",
                ", ".join(d.card.backends),
                escape(", ".join(d.card.accelerators)),
                f"{d.load:.2f} ({d.queue_depth} queued)",
                ", ".join(d.models) or "-",
                f"{now - d.last_seen:.1f} s ago",
            )
        console.print(devices if c.registry.devices() else "no device has joined this fleet")
        models = Table("model", "version", "variants", "ready on (runs)", title="models")
        for model_id, manifest in c.models().items():
            formats = ", ".join(sorted({_variant_name(v) for v in manifest.variants})) or manifest.format
            runs = await ledger_caller(c.ledger)(c.ledger.rollouts, model_id, manifest.version)
            ready = [f"{d} ({runs[d][1]})" if d in runs else d for d in c.devices_for(model_id)]
            models.add_row(model_id, str(manifest.version), formats, ", ".join(ready) or "-")
        if c.models():
            console.print(models)
        if c.splits():
            splits = Table("model", "stages", "cut at", "codec", "planned on", "predicted vs measured", title="split")
            for name, split in c.splits().items():
                where = [f"{shard}: {', '.join(c.devices_for(shard)) or '-'}" for shard in split.shards]
                report = split.report()
                measured = f"{report.get('measured_p50_ms', '-')} ms" if report["requests"] else "no requests yet"
                splits.add_row(
                    name,
                    "\n".join(where),
                    ", ".join(split.cuts),
                    split.codec or "-",
                    " -> ".join(split.preferred),
                    f"{report['predicted_ms']} ms / {measured}",
                )
            console.print(splits)
        counts = await c.counts()
        console.print("tasks: " + ", ".join(f"{state} {n}" for state, n in counts.items()))
        _revocation_status(config)


def _revocation_status(config: CoordinatorConfig) -> None:
    """The revocation list: yellow under 7 days before its nextUpdate, red past it (brokers refuse everyone)."""
    from edgespeed.cli.certs import print_crl_health
    from edgespeed.security.pki import load_crl

    try:
        print_crl_health(load_crl(config.pki_dir / "crl.pem", config.pki_dir / "ca.crt"), where="crl.pem: ")
    except EdgeSpeedError as exc:
        console.print(f"[red]revocation list: {escape(str(exc))}[/]")
