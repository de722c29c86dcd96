"""What the fleet benchmarks share: results in JSON, the fleet (`edgespeed.testing`) and raw paho peers.

The fleet (a TLS Mosquitto on free ports, identities, agents as processes) is
`edgespeed.testing.fleet` with the benchmarks' settings; the raw paho-mqtt
peers of the baselines are here. Every comparison runs on one broker in one
run: EdgeSpeed (coordinator in this process, device agents as processes)
against raw paho-mqtt (requester or publisher in this process, responders or
subscribers as processes), so both sides have the same topology and the same
TLS cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import ssl
import statistics
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgespeed import testing
from edgespeed.testing import Fleet, FleetProcess, big_onnx, identity_onnx

__all__ = [
    "FLEET",
    "MAX_MESSAGE",
    "RAW_NAMES",
    "Fleet",
    "bench_main",
    "big_onnx",
    "emit",
    "entry",
    "fleet",
    "identity_onnx",
    "median",
    "meets",
    "percentile",
    "raw_client",
    "raw_paho",
    "raw_peer",
]

FLEET = "bench"
MAX_MESSAGE = 80 * 1024 * 1024


def meets(goal: str, value: float) -> bool:
    """Whether ``value`` meets a goal written ``<= 1.5`` or ``>= 0.7`` (extra words after the number are ignored)."""
    match = re.match(r"\s*(<=|>=)\s*([0-9.]+)", goal)
    if match is None:
        raise ValueError(f"goal {goal!r} is not '<= X' or '>= X'")
    op, bound = match.group(1), float(match.group(2))
    return value <= bound if op == "<=" else value >= bound


def entry(
    name: str,
    ours: float,
    baseline: float | None,
    unit: str,
    goal: str,
    *,
    higher_is_better: bool,
    absolute: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """One result in the suite's JSON shape; ``meets`` is computed from ``goal``.

    The goal applies to the ratio ours / baseline, or to ``ours`` itself when ``absolute``.
    """
    ratio = None if absolute or not baseline else ours / baseline
    value = ours if absolute else ratio
    better = "higher is better" if higher_is_better else "lower is better"
    return {
        "name": name,
        "ours": round(ours, 3),
        "baseline": None if baseline is None else round(baseline, 3),
        "unit": unit,
        "ratio": None if ratio is None else round(ratio, 3),
        "ratio_kind": f"absolute, {better}" if absolute else f"ours/baseline, {better}",
        "goal": goal,
        "meets": value is not None and meets(goal, value),
        **extra,
    }


def emit(results: list[dict[str, Any]], json_path: Path | None) -> None:
    """Print each result as a JSON line, and write them all to ``json_path`` if given."""
    for result in results:
        print(json.dumps(result))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1) + "\n")


def bench_main(run: Callable[[bool], Coroutine[Any, Any, list[dict[str, Any]]]], doc: str | None) -> None:
    """The command line of one benchmark module: ``[--quick] [--json PATH]``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    emit(asyncio.run(run(args.quick)), args.json)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


async def raw_peer(f: Fleet, role: str, name: str, *args: str) -> FleetProcess:
    """A raw paho process (`edgespeed.bench._raw`: ``echo`` or ``sink``) of the fleet, once it says it is ready.

    It is stopped with the fleet (or earlier with ``await peer.astop()``).
    """
    argv = [sys.executable, "-m", "edgespeed.bench._raw", role, f.url, str(f.pki.directory), name, *args]
    proc = f.spawn(name, argv)
    await proc.wait_for_output("ready", timeout=30)
    return proc


def raw_paho(f: Fleet, name: str) -> paho.Client:
    """A connected raw paho client of the fleet over mutual TLS, TCP_NODELAY, loop in its own thread."""
    return raw_client(f.url, f.pki.directory, name)


def raw_client(url: str, pki: Path, name: str) -> paho.Client:
    host, port = url.removeprefix("mqtts://").rsplit(":", 1)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    client.tls_set_context(context)
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)

    def nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = nodelay
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("raw paho client did not connect")
    return client


RAW_NAMES = ("raw-a", "raw-b", "raw-c")


@contextlib.asynccontextmanager
async def fleet(devices: int = 2) -> AsyncIterator[Fleet]:
    """A TLS Mosquitto and a PKI with ``coord``, ``dev-1``.. and raw peers ``raw-a``, ``raw-b``, ``raw-c``.

    The broker takes mutual TLS only, without an ACL (the raw peers use their own topics) or
    persistence; agents start with ``f.agents([...])``, each a process (ONNX Runtime, one intra-op
    thread), pinned with ``cpus=`` where given. Everything started is stopped on the way out.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    async with testing.fleet(
        devices,
        fleet_id=FLEET,
        clients=RAW_NAMES,
        in_process=False,
        start=False,
        production=False,
        broker_backend="mosquitto",
        plain=False,
        persistence=False,
        max_packet_size=MAX_MESSAGE + 1024 * 1024,
        test_timings=False,
        agent_settings={"heartbeat_s": 1.0, "threads": 1, "max_message_bytes": MAX_MESSAGE},
        coordinator_settings={"heartbeat_s": 1.0, "max_message_bytes": MAX_MESSAGE},
    ) as f:
        yield f
