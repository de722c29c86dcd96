"""The benchmark suite: every entry of BENCHMARKS.md, run in one go, as JSON and plots.

Each entry compares EdgeSpeed with the bare tool it is built on, in the same
run, as a ratio, and says whether it meets its goal. Entries that share a set
up run together (``rtt``, ``throughput`` and ``tensor`` share a fleet).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgespeed import __version__
from edgespeed.errors import ConfigError

__all__ = ["ENTRIES", "machine", "plot", "run_suite"]


@dataclass(frozen=True, slots=True)
class Group:
    """Entries measured by one run."""

    entries: tuple[str, ...]
    run: Callable[[bool], Awaitable[list[dict[str, Any]]]]


async def _tasks(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import tasks

    return await tasks.run(quick)


async def _rollout(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import rollout

    return await rollout.run(quick)


async def _seal(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import seal

    return await seal.run(3 if quick else 7, 24 if quick else 64)


async def _backend(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import backend

    return [await asyncio.to_thread(backend.run, 4_000 if quick else 20_000)]


async def _agent_rss(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import agent_rss

    return [await agent_rss.run()]


async def _quantize(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import quantize

    return await quantize.run(quick)


async def _split(quick: bool) -> list[dict[str, Any]]:
    from edgespeed.bench import split

    return await split.run(quick)


GROUPS = (
    Group(("rtt", "throughput", "tensor"), _tasks),
    Group(("rollout",), _rollout),
    Group(("seal", "seal-codec"), _seal),
    Group(("backend",), _backend),
    Group(("split",), _split),
    Group(("quantize",), _quantize),
    Group(("agent-rss",), _agent_rss),
)
ENTRIES = tuple(name for group in GROUPS for name in group.entries)


def machine() -> dict[str, Any]:
    """Where the suite ran."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "edgespeed": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


async def run_suite(
    *,
    quick: bool = False,
    only: Sequence[str] = (),
    on_entry: Callable[[dict[str, Any]], None] = lambda _: None,
    on_group: Callable[[tuple[str, ...]], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Run the entries (all, or ``only`` those named); returns their results in suite order.

    Raises:
        ConfigError: an unknown entry name.
    """
    unknown = sorted(set(only) - set(ENTRIES))
    if unknown:
        raise ConfigError(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(ENTRIES)}")
    results = []
    for group in GROUPS:
        wanted = [name for name in group.entries if not only or name in only]
        if not wanted:
            continue
        on_group(group.entries)
        for result in await group.run(quick):
            if result["name"] in wanted:
                results.append(result)
                on_entry(result)
    return results


def plot(results: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """PNG plots next to the JSON: latency distributions of ``rtt``, goodput against payload size of ``tensor``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    by_name = {r["name"]: r for r in results}
    rtt = by_name.get("rtt", {}).get("samples_ms")
    if rtt:
        fig, ax = plt.subplots(figsize=(7, 4))
        top = max(max(rtt["ours"]), max(rtt["baseline"]))
        bins = [top * i / 60 for i in range(61)]
        ax.hist(rtt["baseline"], bins=bins, alpha=0.6, label="raw paho ping-pong")
        ax.hist(rtt["ours"], bins=bins, alpha=0.6, label="EdgeSpeed task (sealed, ledger)")
        ax.set_xlabel("round trip (ms)")
        ax.set_ylabel("count")
        ax.set_title("rtt: 100-byte round trips over mutual TLS")
        ax.legend()
        fig.tight_layout()
        written.append(folder / "rtt-latency.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    sweep = by_name.get("tensor", {}).get("goodput_by_size")
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(sweep["bytes"], sweep["baseline"], "o-", label="raw paho echo")
        ax.plot(sweep["bytes"], sweep["ours"], "o-", label="EdgeSpeed echo task")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor size (bytes)")
        ax.set_ylabel("goodput, both ways (MB/s)")
        ax.set_title("goodput against payload size")
        ax.legend()
        fig.tight_layout()
        written.append(folder / "goodput-by-size.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def write_json(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """The results with the machine they ran on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "results": list(results)}, indent=1) + "\n")
