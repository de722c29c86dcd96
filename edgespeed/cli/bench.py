"""``edgespeed bench``: the benchmark suite, side by side with the bare tools."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer
from rich.table import Table

from edgespeed.cli._common import console, fail
from edgespeed.errors import EdgeSpeedError


def bench(
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds: the whole suite in under two minutes."),
    only: list[str] = typer.Option([], "--only", help="Run only this entry (repeatable), e.g. --only rtt."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here; plots go beside it."),
) -> None:
    """Run the benchmark suite: every entry against its bare baseline, in one run, as ratios.

    Entries: rtt, throughput, tensor, rollout, seal, seal-codec, backend, split, agent-rss. The suite
    starts its own Mosquitto (mutual TLS) on free ports, its agents and raw paho peers as processes,
    and removes them afterwards.
    """
    from edgespeed.bench.suite import plot, run_suite, write_json

    started = time.perf_counter()
    table = Table("entry", "ours", "baseline", "ratio", "goal", "meets")
    try:
        with console.status("benchmarking") as status:
            results = asyncio.run(
                run_suite(
                    quick=quick,
                    only=only,
                    on_group=lambda names: status.update(f"benchmarking {', '.join(names)}"),
                    on_entry=lambda r: console.print(f"  {r['name']}: {_describe(r)}"),
                )
            )
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    for r in results:
        mark = "[green]yes[/]" if r["meets"] else ("[yellow]skipped[/]" if r.get("skipped") else "[red]no[/]")
        table.add_row(
            r["name"],
            _value(r["ours"], r["unit"]),
            _value(r["baseline"], r["unit"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
            r["goal"],
            mark,
        )
    console.print(table)
    console.print(f"{len(results)} entries in {time.perf_counter() - started:.0f} s")
    if json_path is not None:
        write_json(json_path, results)
        plots = plot(results, json_path.parent)
        console.print(f"results in {json_path}" + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else ""))


def _value(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:g} {unit}"


def _describe(r: dict[str, object]) -> str:
    if r.get("skipped"):
        return f"skipped ({r['skipped']})"
    verdict = "met" if r["meets"] else "missed"
    return f"{r['ours']} vs {r['baseline']} {r['unit']}, ratio {r['ratio']} (goal {r['goal']}: {verdict})"
