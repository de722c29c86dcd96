"""The end-to-end demo of what EdgeSpeed runs today.

It starts the zero-setup broker (Mosquitto with mutual TLS when installed,
else amqtt), a coordinator and a device, each on its own connection. The
device announces itself with a retained birth; the coordinator publishes a
linear model's weights as a chunked, verified blob; the device fetches them
and answers a batch of inference tasks; the coordinator checks every result
against the same model computed locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgespeed import __version__
from edgespeed._compat import timeout as timeout_after
from edgespeed.protocol import topics
from edgespeed.protocol.blob import BlobSource
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import Birth, DeviceCard, Error, Result, Task
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.protocol.transfer import BlobServer, fetch_blob
from edgespeed.security import create_ca, issue_certificate
from edgespeed.transport import (
    BrokerSettings,
    BrokerTls,
    EmbeddedBroker,
    MqttConfig,
    MqttTransport,
    TlsConfig,
    find_mosquitto,
)
from edgespeed.transport.base import Transport

__all__ = ["DemoReport", "run_demo"]

FLEET = "demo"
_IN, _OUT = 1024, 8192  # 32 MiB of float32 weights


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo did and measured."""

    broker: str
    tls: bool
    protocol: str
    blob_bytes: int
    blob_seconds: float
    tasks: int
    ok: int
    latencies_ms: tuple[float, ...]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


def _card(device_id: str) -> DeviceCard:
    return DeviceCard(
        device_id=device_id,
        arch=platform.machine() or "unknown",
        os=platform.system().lower(),
        software_version=__version__,
        cpu_cores=os.cpu_count() or 1,
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0,
        backends=("numpy",),
        accelerators=("cpu",),
    )


async def _device(transport: Transport, weights_path: Path, ready: asyncio.Event) -> None:
    """Answer tasks with ``argmax(x @ W)`` scores, the weights being the fetched blob."""
    weights = np.fromfile(weights_path, dtype="<f4").reshape(_IN, _OUT)
    ready.set()
    async for message in transport.messages():
        envelope, task = open_message(message.payload)
        if not isinstance(task, Task):
            continue
        try:
            x = decode_tensor(task.inputs[0])
            reply: Result | Error = Result(task.task_id, task.attempt, (encode_tensor(x @ weights),))
        except Exception as exc:  # report, never die: the coordinator must hear of it
            reply = Error("backend_failure", str(exc), task_id=task.task_id, attempt=task.attempt)
        await transport.publish(
            topics.coordinator_inbox(FLEET, "dev-1"),
            pack_message(reply, sender="dev-1", recipient="coord", correlation_id=envelope.message_id),
        )


async def run_demo(
    *,
    tasks: int = 64,
    workdir: Path | None = None,
    on_step: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoReport:
    """Run the demo and report what happened; raises if the fleet misbehaves."""
    with contextlib.ExitStack() as stack:
        base = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgespeed-demo-")))
        use_tls = find_mosquitto() is not None
        settings = BrokerSettings()
        if use_tls:
            ca = create_ca(base / "pki", fleet=FLEET)
            broker_id = issue_certificate(ca, "broker", role="broker")
            ids = {
                n: issue_certificate(ca, n, role="coordinator" if n == "coord" else "device")
                for n in ("coord", "dev-1")
            }
            settings = BrokerSettings(port=None, tls=BrokerTls(ca.cert_file, broker_id.cert_file, broker_id.key_file))
            on_step("fleet CA and certificates created (mutual TLS)")

        async with EmbeddedBroker(settings) as broker:
            url = broker.tls_url if use_tls else broker.url
            on_step(f"broker up: {broker.backend} at {url}")

            def config(name: str) -> MqttConfig:
                tls = TlsConfig(ca.cert_file, ids[name].cert_file, ids[name].key_file) if use_tls else None
                return MqttConfig(url, name, tls=tls)

            async with MqttTransport(config("coord")) as coord, MqttTransport(config("dev-1")) as dev:
                # Join: a retained birth that the coordinator sees.
                await coord.subscribe(topics.device_filter(FLEET, "birth"))
                await dev.publish(
                    topics.birth(FLEET, "dev-1"),
                    pack_message(Birth(_card("dev-1"), epoch=time.time_ns()), sender="dev-1"),
                    retain=True,
                )
                async with timeout_after(10):
                    async for message in coord.messages():
                        _, birth = open_message(message.payload)
                        if isinstance(birth, Birth):
                            break
                assert isinstance(birth, Birth)
                on_step(f"device joined: {birth.card.device_id} ({birth.card.arch}, {birth.card.cpu_cores} cores)")

                # Model rollout: the weights as a chunked, verified blob.
                rng = np.random.default_rng(7)
                weights = rng.standard_normal((_IN, _OUT)).astype("<f4")
                server = BlobServer(coord, fleet=FLEET, server_id="coord")
                info = server.add(BlobSource("linear.weights", weights.tobytes()))
                serving = asyncio.create_task(server.run(), name="demo.blob-server")
                started = time.perf_counter()
                path = await fetch_blob(
                    dev, info, base / "cache" / info.name, fleet=FLEET, device_id="dev-1", on_progress=on_progress
                )
                blob_seconds = time.perf_counter() - started
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                on_step(f"weights delivered: {info.size / 2**20:.0f} MiB in {blob_seconds:.2f}s, SHA-256 verified")

                # Tasks: the device answers; the coordinator checks each result.
                ready = asyncio.Event()
                device = asyncio.create_task(_device(dev, path, ready), name="demo.device")
                await ready.wait()
                await coord.subscribe(f"{topics.PREFIX}/{FLEET}/coord/in/+")
                ok = 0
                latencies = []
                results = coord.messages()
                for i in range(tasks):
                    x = rng.standard_normal((1, _IN)).astype(np.float32)
                    task = Task(f"t-{i}", 0, "linear", time.time_ns() // 1_000_000 + 10_000, (encode_tensor(x),))
                    sent = time.perf_counter()
                    await coord.publish(
                        topics.device_inbox(FLEET, "dev-1"), pack_message(task, sender="coord", recipient="dev-1")
                    )
                    async with timeout_after(10):
                        while True:
                            _, reply = open_message((await anext(results)).payload)
                            if isinstance(reply, Result | Error) and reply.task_id == task.task_id:
                                break
                    latencies.append((time.perf_counter() - sent) * 1000)
                    if isinstance(reply, Result):
                        y = decode_tensor(reply.outputs[0])
                        ok += bool(np.allclose(y, x @ weights, rtol=1e-4, atol=1e-3))
                device.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await device
                return DemoReport(
                    broker=broker.backend,
                    tls=use_tls,
                    protocol=coord.protocol,
                    blob_bytes=info.size,
                    blob_seconds=blob_seconds,
                    tasks=tasks,
                    ok=ok,
                    latencies_ms=tuple(latencies),
                )
    raise AssertionError("unreachable")
