"""The end-to-end demo of what EdgeSpeed runs today.

It creates a fleet CA and identities, starts the zero-setup broker (Mosquitto
with mutual TLS when installed, else amqtt), and connects a coordinator and a
device, each on its own connection. The device announces itself with a
retained birth. The coordinator encrypts a linear model's weights once under a
content key, wraps that key for the device in a signed manifest, and serves
the ciphertext as a chunked blob; the device verifies the manifest, fetches and
verifies the blob, and decrypts it. Tasks and results then travel sealed end
to end, and the coordinator checks every result against the same model
computed locally.
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
from typing import Any, Literal

import numpy as np

from edgespeed import __version__
from edgespeed._compat import timeout as timeout_after
from edgespeed.errors import ReplayError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import DEFAULT_CHUNK_SIZE, BlobSource
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import Birth, DeviceCard, Error, ModelManifest, Result, Task
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.protocol.transfer import BlobServer, fetch_blob
from edgespeed.security import (
    Identity,
    KeyDirectory,
    ReplayGuard,
    Sealer,
    create_ca,
    decrypt_blob,
    encrypt_blob,
    issue_certificate,
    sign_manifest,
    verify_manifest,
)
from edgespeed.security.blobcrypt import TAG_SIZE
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
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return DeviceCard(
        device_id=device_id,
        arch=platform.machine() or "unknown",
        os=platform.system().lower(),
        software_version=__version__,
        cpu_cores=os.cpu_count() or 1,
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * pages if pages else 0,
        backends=("numpy",),
        accelerators=("cpu",),
    )


async def _first(transport: Transport, kind: type[Any], seconds: float = 10.0) -> Any:
    """The first unsealed message of ``kind`` to arrive."""
    async with timeout_after(seconds):
        async for message in transport.messages():
            _, body = open_message(message.payload)
            if isinstance(body, kind):
                return body
    raise RuntimeError("transport closed")


async def _device(transport: Transport, sealer: Sealer, weights: np.ndarray[Any, Any], ready: asyncio.Event) -> None:
    """Answer sealed tasks with ``x @ W``, sealed back to the coordinator."""
    ready.set()
    async for message in transport.messages():
        try:
            envelope, task = sealer.open(message.payload)
        except ReplayError:
            continue  # a duplicate from at-least-once delivery
        if not isinstance(task, Task):
            continue
        try:
            x = decode_tensor(task.inputs[0])
            reply: Result | Error = Result(task.task_id, task.attempt, (encode_tensor(x @ weights),))
        except Exception as exc:  # report, never die: the coordinator must hear of it
            reply = Error("backend_failure", str(exc), task_id=task.task_id, attempt=task.attempt)
        await transport.publish(
            topics.coordinator_inbox(FLEET, "dev-1"),
            sealer.seal(reply, recipient="coord", correlation_id=envelope.message_id),
        )


async def run_demo(
    *,
    tasks: int = 64,
    broker_backend: Literal["auto", "mosquitto", "amqtt"] = "auto",
    workdir: Path | None = None,
    on_step: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoReport:
    """Run the demo and report what happened; raises if the fleet misbehaves."""
    with contextlib.ExitStack() as stack:
        base = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgespeed-demo-")))
        ca = create_ca(base / "pki", fleet=FLEET)
        broker_id = issue_certificate(ca, "broker", role="broker")
        ids: dict[str, Identity] = {
            "coord": issue_certificate(ca, "coord", role="coordinator"),
            "dev-1": issue_certificate(ca, "dev-1", role="device"),
        }
        directory = KeyDirectory(ca.cert_file)
        directory.add_directory(ca.directory)
        sealers = {
            n: Sealer(n, i.seal_key(), directory, replay=ReplayGuard(base / f"{n}.replay")) for n, i in ids.items()
        }
        on_step("fleet CA, certificates and payload keys created")

        use_tls = broker_backend != "amqtt" and find_mosquitto() is not None
        settings = BrokerSettings(backend=broker_backend)
        if use_tls:
            tls = BrokerTls(ca.cert_file, broker_id.cert_file, broker_id.key_file)
            settings = BrokerSettings(port=None, tls=tls, backend=broker_backend)
        async with EmbeddedBroker(settings) as broker:
            url = broker.tls_url if use_tls else broker.url
            on_step(f"broker up: {broker.backend} at {url}" + (" (mutual TLS)" if use_tls else ""))

            def config(name: str) -> MqttConfig:
                tls = TlsConfig(ca.cert_file, ids[name].cert_file, ids[name].key_file) if use_tls else None
                # amqtt speaks 3.1.1 only; saying so skips the MQTT 5 probe.
                return MqttConfig(url, name, tls=tls, protocol="3.1.1" if broker.backend == "amqtt" else "auto")

            async with MqttTransport(config("coord")) as coord, MqttTransport(config("dev-1")) as dev:
                # Join: a retained birth that the coordinator sees.
                await coord.subscribe(topics.device_filter(FLEET, "birth"))
                birth = Birth(_card("dev-1"), epoch=time.time_ns())
                await dev.publish(topics.birth(FLEET, "dev-1"), pack_message(birth, sender="dev-1"), retain=True)
                card = (await _first(coord, Birth)).card
                on_step(f"device joined: {card.device_id} ({card.arch}, {card.cpu_cores} cores)")

                # Rollout: the weights encrypted once, the key wrapped for the device, the manifest signed.
                rng = np.random.default_rng(7)
                weights = rng.standard_normal((_IN, _OUT)).astype("<f4")
                ciphertext, content_key = encrypt_blob(
                    weights.tobytes(), blob_id="linear.weights", chunk_size=DEFAULT_CHUNK_SIZE
                )
                source = BlobSource("linear.weights", ciphertext, chunk_size=DEFAULT_CHUNK_SIZE + TAG_SIZE)
                manifest = sign_manifest(
                    ModelManifest(
                        "linear",
                        1,
                        "raw-f32",
                        (source.info,),
                        keys=sealers["coord"].wrap_key(content_key, ["dev-1"], context="linear/1"),
                    ),
                    signer="coord",
                    key=ids["coord"].sign_key(),
                )
                await dev.subscribe(topics.broadcast(FLEET, "models"))
                await coord.publish(
                    topics.broadcast(FLEET, "models"), pack_message(manifest, sender="coord"), retain=True
                )
                received: ModelManifest = await _first(dev, ModelManifest)
                verify_manifest(received, directory, installed_version=0)
                on_step(f"manifest of {received.model_id} v{received.version} verified, signed by {received.signer}")

                server = BlobServer(coord, fleet=FLEET, server_id="coord")
                server.add(source)
                serving = asyncio.create_task(server.run(), name="demo.blob-server")
                info = received.shards[0]
                started = time.perf_counter()
                path = await fetch_blob(
                    dev, info, base / "cache" / info.name, fleet=FLEET, device_id="dev-1", on_progress=on_progress
                )
                blob_seconds = time.perf_counter() - started
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                key = sealers["dev-1"].unwrap_key("coord", received.keys["dev-1"], context="linear/1")
                plain = decrypt_blob(path, key, blob_id=info.name, chunk_size=DEFAULT_CHUNK_SIZE)
                device_weights = np.frombuffer(plain, dtype="<f4").reshape(_IN, _OUT)
                on_step(
                    f"weights delivered: {info.size / 2**20:.0f} MiB in {blob_seconds:.2f}s, "
                    "SHA-256 verified, decrypted on the device (cached encrypted)"
                )

                # Tasks, sealed both ways; the coordinator checks each result.
                ready = asyncio.Event()
                device = asyncio.create_task(_device(dev, sealers["dev-1"], device_weights, ready), name="demo.device")
                await ready.wait()
                await coord.subscribe(topics.coordinator_inbox(FLEET, "dev-1"))
                ok = 0
                latencies = []
                results = coord.messages()
                for i in range(tasks):
                    x = rng.standard_normal((1, _IN)).astype(np.float32)
                    task = Task(f"t-{i}", 0, "linear", time.time_ns() // 1_000_000 + 10_000, (encode_tensor(x),))
                    sent = time.perf_counter()
                    await coord.publish(
                        topics.device_inbox(FLEET, "dev-1"), sealers["coord"].seal(task, recipient="dev-1")
                    )
                    async with timeout_after(10):
                        while True:
                            message = await anext(results)
                            try:
                                _, reply = sealers["coord"].open(message.payload, topic_sender="dev-1")
                            except ReplayError:
                                continue  # a duplicate from at-least-once delivery: the first copy counted
                            if isinstance(reply, Result | Error) and reply.task_id == task.task_id:
                                break
                    latencies.append((time.perf_counter() - sent) * 1000)
                    if isinstance(reply, Result):
                        ok += bool(np.allclose(decode_tensor(reply.outputs[0]), x @ weights, rtol=1e-4, atol=1e-3))
                device.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await device
                on_step(f"{tasks} tasks sealed end to end (AES-256-GCM) and answered")
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
