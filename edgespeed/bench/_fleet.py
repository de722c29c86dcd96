"""What the fleet benchmarks share: a TLS Mosquitto on free ports, identities, agents and raw paho peers.

Every comparison runs on one broker in one run: EdgeSpeed (coordinator in this
process, device agents as processes) against raw paho-mqtt (requester or
publisher in this process, responders or subscribers as processes), so both
sides have the same topology and the same TLS cost.
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
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgespeed.coordinator import CoordinatorConfig
from edgespeed.security import create_ca, issue_certificate
from edgespeed.transport import BrokerSettings, BrokerTls, EmbeddedBroker

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


def identity_onnx(path: Path) -> Path:
    """An ONNX model that returns its input: the echo backend of `rtt`, `throughput` and `tensor`."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "echo",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", "m"])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def big_onnx(path: Path, mib: int) -> Path:
    """A real ONNX model of ``mib`` MiB: one MatMul with random (incompressible) float32 weights."""
    from onnx import TensorProto, helper, numpy_helper, save

    side = int((mib * 2**20 / 4) ** 0.5)
    weights = np.random.default_rng(0).standard_normal((side, side), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", side])],
        [numpy_helper.from_array(weights, "w")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@dataclass
class Fleet:
    """A broker, a fleet PKI and a working folder."""

    base: Path
    broker: EmbeddedBroker

    @property
    def pki(self) -> Path:
        return self.base / "pki"

    def coordinator(self, **kw: Any) -> CoordinatorConfig:
        kw = {"heartbeat_s": 1.0, "max_message_bytes": MAX_MESSAGE, **kw}
        return CoordinatorConfig(
            fleet=FLEET, broker=self.broker.tls_url, pki_dir=self.pki, state_dir=self.base / "coord", **kw
        )

    @contextlib.contextmanager
    def agents(
        self, names: list[str], *, cpus: dict[str, int] | None = None, **settings: Any
    ) -> Iterator[list[subprocess.Popen[bytes]]]:
        """Device agents as processes (ONNX Runtime, one intra-op thread), pinned to ``cpus`` where given."""
        procs = []
        try:
            for name in names:
                values = {
                    "device_id": name,
                    "fleet": FLEET,
                    "broker": self.broker.tls_url,
                    "pki_dir": str(self.pki),
                    "state_dir": str(self.base / name),
                    "heartbeat_s": 1.0,
                    "backends": ["onnx"],
                    "threads": 1,
                    "max_message_bytes": MAX_MESSAGE,
                    **settings,
                }
                config = self.base / f"{name}.toml"
                config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
                cpu = (cpus or {}).get(name)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "edgespeed.agent", "--config", str(config)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        preexec_fn=None if cpu is None else (lambda cpu=cpu: os.sched_setaffinity(0, {cpu})),
                    )
                )
            yield procs
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def peer(self, role: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        """A raw paho process (`edgespeed.bench._raw`: ``echo`` or ``sink``), ready once it says so."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgespeed.bench._raw", role, self.broker.tls_url, str(self.pki), name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"ready"):
            proc.kill()
            raise RuntimeError(f"raw peer {name} did not start")
        return proc

    def paho(self, name: str) -> paho.Client:
        """A connected raw paho client over mutual TLS, TCP_NODELAY, loop in its own thread."""
        return raw_client(self.broker.tls_url, self.pki, name)


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
    """A TLS Mosquitto and a PKI with ``coord``, ``dev-1``.. and raw peers ``raw-a``, ``raw-b``, ``raw-c``."""
    with tempfile.TemporaryDirectory(prefix="edgespeed-bench-") as tmp:
        base = Path(tmp)
        ca = create_ca(base / "pki", fleet=FLEET)
        broker_id = issue_certificate(ca, "broker", role="broker")
        issue_certificate(ca, "coord", role="coordinator")
        for i in range(devices):
            issue_certificate(ca, f"dev-{i + 1}", role="device")
        for name in RAW_NAMES:
            issue_certificate(ca, name, role="device")
        settings = BrokerSettings(
            backend="mosquitto",
            port=None,
            tls=BrokerTls(ca.cert_file, broker_id.cert_file, broker_id.key_file),
            max_packet_size=MAX_MESSAGE + 1024 * 1024,
        )
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        async with EmbeddedBroker(settings) as broker:
            yield Fleet(base, broker)
