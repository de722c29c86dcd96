"""``edgespeed optimize``: quantise, prune and fuse models, each with a measured report.

Each command writes the new model and prints what it did: size, nodes, FLOPs, latency on this machine
(one thread and all cores) and, with ``--eval DATA.npz``, accuracy and output error against the
original. Data files are ``.npz`` with one array per model input (batch first), and optionally
``labels`` and ``reference``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgespeed.cli._common import console, fail
from edgespeed.errors import ConfigError, EdgeSpeedError, MissingDependencyError, OptimizeError

if TYPE_CHECKING:
    from edgespeed.optimize import OptimizeReport

app = typer.Typer(help="Make models small and fast: quantise, prune, fuse (each measured).", no_args_is_help=True)

OUTPUT = typer.Option(None, "--output", "-o", help="Where to write the new model (default: beside the source).")
EVAL = typer.Option(
    None, "--eval", help=".npz to compare both models on: inputs, and labels (accuracy) or reference (output error)."
)
JSON = typer.Option(None, "--json", help="Also write the report here, as JSON.")
LATENCY = typer.Option(True, "--latency/--no-latency", help="Measure latency on this machine (batch 1).")


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback drawing one bar per stage (calibrating, evaluating, fine-tuning)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bars: dict[str, TaskID] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in bars:
                bars[what] = progress.add_task(what, total=total)
            progress.update(bars[what], completed=done, total=total)

        yield update


def show(report: OptimizeReport, json_path: Path | None, title: str) -> None:
    """Print a report as a table (and write it as JSON)."""
    table = Table("", "original", "new", "change", title=title)
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    if report.kept_fp32:
        console.print(f"kept in float32: {escape(', '.join(report.kept_fp32))}")
    console.print(f"written to {escape(report.output)}")
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")


@app.command("quantize")
def quantize_command(
    model: Path = typer.Argument(..., help="The .onnx model."),
    int8: bool = typer.Option(False, "--int8", help="INT8: static with --calibration, dynamic without."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 weights and compute; inputs and outputs stay float32."),
    calibration: Path | None = typer.Option(None, "--calibration", help=".npz of inputs to calibrate INT8 on."),
    per_channel: bool = typer.Option(False, "--per-channel", help="INT8 weights scaled per output channel."),
    fmt: str = typer.Option("qdq", "--format", help="INT8 graph form: qdq (portable) or qoperator."),
    keep_fp32: str = typer.Option("", "--keep-fp32", help="Nodes (fp16: or op types) to keep in float32, NAME,NAME."),
    split_at: str = typer.Option(
        "", "--split-at", help="Cut at these tensors first (NODE,NODE) and quantise each shard to INT8."
    ),
    evaluation: Path | None = EVAL,
    output: Path | None = OUTPUT,
    latency: bool = LATENCY,
    json_path: Path | None = JSON,
) -> None:
    """Quantise a model to INT8 or FP16, and report what it did."""
    from edgespeed.optimize import quantize, quantize_shards, split_onnx

    try:
        if int8 == fp16:
            raise OptimizeError("choose one of --int8 and --fp16", reason="unsupported")
        if fmt not in ("qdq", "qoperator"):
            raise OptimizeError(f"--format is qdq or qoperator, not {fmt!r}", reason="unsupported")
        keep = [k for k in keep_fp32.split(",") if k]
        with progress_bar() as progress:
            if split_at:
                if not int8 or calibration is None:
                    raise OptimizeError("--split-at quantises shards to INT8: give --int8 and --calibration")
                folder = output or model.with_name(f"{model.stem}.stages")
                shards = split_onnx(model, [c for c in split_at.split(",") if c])
                reports = quantize_shards(
                    shards,
                    calibration,
                    folder,
                    per_channel=per_channel,
                    fmt=fmt,  # type: ignore[arg-type]
                    latency=latency,
                    progress=progress,
                )
            else:
                reports = [
                    quantize(
                        model,
                        precision="int8" if int8 else "fp16",
                        output=output,
                        calibration=calibration,
                        per_channel=per_channel,
                        fmt=fmt,  # type: ignore[arg-type]
                        evaluation=evaluation,
                        keep_fp32=keep,
                        latency=latency,
                        progress=progress,
                    )
                ]
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    for k, report in enumerate(reports, start=1):
        title = f"{model.name}: {report.kind}" + (f", stage {k}" if split_at else "")
        show(
            report,
            json_path.with_name(f"{json_path.stem}.{k}{json_path.suffix}") if json_path and split_at else json_path,
            title,
        )


@app.command("prune")
def prune_command(
    model: Path = typer.Argument(..., help="The model: .onnx (unstructured), or .safetensors with --architecture."),
    architecture: str = typer.Option("", "--architecture", help="The torch architecture of .safetensors weights."),
    amount: float = typer.Option(0.5, "--amount", help="Fraction of weights (or of channels, --structured) to remove."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole channels (faster; torch models)."),
    finetune: Path | None = typer.Option(None, "--finetune", help=".npz to fine-tune on: inputs and labels."),
    epochs: int = typer.Option(5, "--epochs", help="Fine-tune epochs."),
    lr: float = typer.Option(3e-3, "--lr", help="Fine-tune learning rate (Adam)."),
    evaluation: Path | None = EVAL,
    output: Path | None = OUTPUT,
    latency: bool = LATENCY,
    json_path: Path | None = JSON,
) -> None:
    """Prune a model (unstructured for size, structured for speed), optionally fine-tune, and report."""
    from edgespeed.optimize import prune

    try:
        source: Any = model
        if model.suffix == ".safetensors":
            if not architecture:
                raise OptimizeError(f"{model}: safetensors weights need --architecture (e.g. digits-cnn)")
            source = load_torch(model, architecture)
            output = output or model.with_name(f"{model.stem}.pruned.onnx")
        with progress_bar() as progress:
            report = prune(
                source,
                amount=amount,
                structured=structured,
                output=output,
                finetune=finetune,
                epochs=epochs,
                lr=lr,
                evaluation=evaluation,
                latency=latency,
                progress=progress,
            )
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    show(report, json_path, f"{model.name}: pruned {amount:.0%}" + (" of channels" if structured else ""))


def load_torch(weights: Path, architecture: str) -> Any:
    """A torch module of a known architecture (`edgespeed.engine.zoo`) with its safetensors weights.

    Raises:
        OptimizeError: weights that do not fit the architecture, or an unknown architecture.
    """
    try:
        from safetensors.torch import load_file

        from edgespeed.engine.zoo import build
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch") from exc
    try:
        module = build(architecture)
        module.load_state_dict(load_file(str(weights)))
    except (ConfigError, RuntimeError, OSError) as exc:
        raise OptimizeError(f"{weights}: cannot load as {architecture!r}: {exc}", reason="bad_model") from exc
    return module.eval()


@app.command("fuse")
def fuse_command(
    model: Path = typer.Argument(..., help="The .onnx model."),
    level: str = typer.Option(
        "extended", "--level", help="ONNX Runtime's offline optimisation: basic (standard ops), extended, none."
    ),
    slim: bool = typer.Option(True, "--slim/--no-slim", help="Simplify with onnxslim first (when installed)."),
    evaluation: Path | None = EVAL,
    output: Path | None = OUTPUT,
    latency: bool = LATENCY,
    json_path: Path | None = JSON,
) -> None:
    """Simplify and fuse a model's graph, saved as a new model, and report."""
    from edgespeed.optimize import fuse

    try:
        with progress_bar() as progress:
            report = fuse(
                model,
                output=output,
                level=level,  # type: ignore[arg-type]
                slim=slim,
                evaluation=evaluation,
                latency=latency,
                progress=progress,
            )
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    show(report, json_path, f"{model.name}: fused ({level})")
