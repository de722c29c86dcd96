"""A stand-in for the coordinator, to test device agents on their own.

`StubCoordinator` speaks the coordinator's side of the protocol and nothing
more: it announces itself online, publishes signed and encrypted model
manifests and serves their chunks, seals tasks for devices, and records what
devices send (births, heartbeats, statuses, results and errors, opened and
checked). It decides nothing: a test drives it and asserts on what it recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from edgespeed._compat import Self
from edgespeed.errors import EdgeSpeedError, ReplayError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import DEFAULT_CHUNK_SIZE, BlobSource
from edgespeed.protocol.envelope import decode_header, open_message, pack_message
from edgespeed.protocol.messages import CoordinatorState, Error, MessageKind, ModelManifest, Result, Task
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, encrypt_blob, sign_manifest
from edgespeed.security.blobcrypt import TAG_SIZE
from edgespeed.testing.broker import broker_url
from edgespeed.testing.pki import FleetPki
from edgespeed.transfer import BlobServer
from edgespeed.transport import EmbeddedBroker, MqttConfig, MqttTransport

__all__ = ["Shard", "StubCoordinator"]

#: One file of a model: its name, its bytes, and its manifest variant (``{"format": "onnx"}``...).
Shard = tuple[str, bytes, dict[str, Any]]


class StubCoordinator:
    """Plays the coordinator ``pki.coordinator`` towards the fleet's devices.

    Use as ``async with StubCoordinator(broker, pki) as stub``. What devices
    send is appended to ``received`` as ``(sender id, message)``; a message that
    fails to open is recorded as the error instead (duplicates are dropped).

    Attributes:
        transport: its main connection (persistent session), for publishing anything else.
        server: the blob server that serves published models' chunks.
        sealer: seals tasks and wraps model keys as the coordinator.
        received: what arrived, in order.
    """

    def __init__(
        self,
        broker: EmbeddedBroker | str,
        pki: FleetPki,
        *,
        connect_timeout: float = 5.0,
        publish_timeout: float = 10.0,
    ) -> None:
        self.pki = pki
        self.fleet = pki.fleet
        self.name = pki.coordinator
        keys = KeyDirectory(pki.ca.cert_file)
        keys.add_directory(pki.directory)
        self.sealer = Sealer(self.name, pki.identity(self.name).seal_key(), keys, replay=ReplayGuard())
        url, tls = broker_url(broker), pki.tls(self.name)
        main = MqttConfig(
            url, self.name, tls=tls, clean_start=False, connect_timeout=connect_timeout, publish_timeout=publish_timeout
        )
        self.transport = MqttTransport(main)
        self._blobs = MqttTransport(dataclasses.replace(main, client_id=f"{self.name}-blobs", clean_start=True))
        self.server = BlobServer(self._blobs, fleet=self.fleet, server_id=self.name)
        self.received: list[tuple[str, Any]] = []
        self.published: set[str] = set()
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        await self.transport.__aenter__()
        try:
            await self._blobs.__aenter__()
            await self.transport.subscribe(
                topics.coordinator_inbox_filter(self.fleet),
                topics.device_filter(self.fleet, "birth"),
                topics.device_filter(self.fleet, "death"),
                topics.device_filter(self.fleet, "hb"),
            )
            online = pack_message(CoordinatorState(True, 1), sender=self.name)
            await self.transport.publish(topics.coordinator_state(self.fleet), online, retain=True)
        except BaseException:
            await self._blobs.close()
            await self.transport.close()
            raise
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self.server.run())]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            for model_id in self.published:  # leave no retained manifest behind
                await self.transport.publish(topics.model_manifest(self.fleet, model_id), b"", retain=True)
        finally:
            await self.transport.close()
            await self._blobs.close()

    async def _read(self) -> None:
        async for message in self.transport.messages():
            name = topics.parse_topic(message.topic)
            try:
                header, _ = decode_header(message.payload)
                if header.kind is MessageKind.CHUNK_REQUEST:
                    continue  # the blob server's business
                if name.kind is topics.TopicKind.COORDINATOR_INBOX:
                    _, body = self.sealer.open(message.payload, topic_sender=name.id)
                else:
                    _, body = open_message(message.payload)
            except ReplayError:
                continue  # a duplicate
            except EdgeSpeedError as exc:
                self.received.append((name.id or "", exc))
                continue
            self.received.append((name.id or "", body))
            self._arrived.set()

    async def wait_for(self, predicate: Callable[[str, Any], bool], timeout: float = 20.0) -> Any:
        """The first message received, earlier or within ``timeout`` seconds, for which
        ``predicate(sender, message)`` holds (a predicate may also look at the whole of ``received``).

        Raises:
            TimeoutError: none came; the last kinds received are named.
        """
        deadline = time.monotonic() + timeout
        while True:
            for sender, body in self.received:
                if predicate(sender, body):
                    return body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [(s, type(b).__name__) for s, b in self.received]
                raise TimeoutError(f"expected message did not arrive; got {kinds[-12:]} ({len(kinds)} in all)")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def publish_model(
        self,
        version: int,
        shards: Sequence[Shard],
        devices: Sequence[str],
        *,
        tamper: bool = False,
        model_id: str = "digits",
    ) -> ModelManifest:
        """Publish a model as the coordinator does: every shard encrypted with one key, the key
        wrapped for ``devices``, the manifest signed and retained; chunks served on request.

        Args:
            tamper: change the manifest after signing (its version becomes ``version + 1``).
        """
        infos, variants = [], []
        key = None
        for name, data, variant in shards:
            ciphertext, key = encrypt_blob(data, blob_id=name, chunk_size=DEFAULT_CHUNK_SIZE, key=key)
            infos.append(self.server.add(BlobSource(name, ciphertext, chunk_size=DEFAULT_CHUNK_SIZE + TAG_SIZE)))
            variants.append({"shard": name, **variant})
        if key is None:
            raise ValueError("a model needs at least one shard")
        manifest = sign_manifest(
            ModelManifest(
                model_id,
                version,
                "mixed",
                tuple(infos),
                variants=tuple(variants),
                keys=self.sealer.wrap_key(key, list(devices), context=f"{model_id}/{version}"),
            ),
            signer=self.name,
            key=self.pki.identity(self.name).sign_key(),
        )
        if tamper:
            manifest = dataclasses.replace(manifest, version=version + 1)
        self.published.add(model_id)
        await self.transport.publish(
            topics.model_manifest(self.fleet, model_id), pack_message(manifest, sender=self.name), retain=True
        )
        return manifest

    async def send(self, device: str, task: Task) -> None:
        """Seal ``task`` for ``device`` and put it in its inbox."""
        await self.transport.publish(topics.device_inbox(self.fleet, device), self.sealer.seal(task, recipient=device))

    def answers(self, device: str) -> dict[str, Result | Error]:
        """The first answer (result or error) from ``device`` to each task, by task id."""
        out: dict[str, Result | Error] = {}
        for sender, body in self.received:
            if sender == device and isinstance(body, Result | Error) and body.task_id not in out:
                out[body.task_id] = body
        return out
