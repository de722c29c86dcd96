"""An in-process broker and transport with MQTT semantics, for unit tests.

`MemoryBroker` routes by MQTT topic filters, keeps retained messages and
publishes wills. Each `MemoryTransport` has a bounded incoming queue; a
publisher waits (up to its timeout) while a subscriber's queue is full, just
as TCP backpressure would make it wait on a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from edgespeed._compat import timeout as timeout_after
from edgespeed.errors import ConfigError, TransportTimeoutError
from edgespeed.transport.base import (
    Message,
    Transport,
    TransportState,
    Will,
    topic_matches,
    validate_filter,
    validate_topic,
)

__all__ = ["MemoryBroker", "MemoryTransport"]


class MemoryBroker:
    """Routes messages between `MemoryTransport` instances in one process."""

    def __init__(self) -> None:
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, Message] = {}

    def _attach(self, client: MemoryTransport) -> None:
        old = self._clients.get(client.client_id)
        if old is not None and old is not client:
            old._kick()  # MQTT: a second client with the same id takes over
        self._clients[client.client_id] = client

    def _detach(self, client: MemoryTransport) -> None:
        if self._clients.get(client.client_id) is client:
            del self._clients[client.client_id]

    async def _route(self, message: Message, timeout: float) -> None:
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for client in list(self._clients.values()):
            qos = client._match(message.topic)
            if qos is not None:
                delivered = Message(message.topic, message.payload, min(qos, message.qos), False)
                await client._deliver(delivered, timeout)

    def retained(self, topic_filter: str) -> list[Message]:
        """Retained messages matching a filter."""
        return [m for t, m in self._retained.items() if topic_matches(topic_filter, t)]


class MemoryTransport(Transport):
    """A `Transport` connected to a `MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Will | None = None,
        queue_size: int = 1000,
        publish_timeout: float = 10.0,
    ) -> None:
        if queue_size < 1:
            raise ConfigError("queue_size must be at least 1")
        self._broker = broker
        self.client_id = client_id
        self._will = will
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(queue_size)
        self._subscriptions: dict[str, int] = {}
        self._publish_timeout = publish_timeout

    @property
    def connected(self) -> bool:
        return self._state is TransportState.OPEN

    async def _open(self) -> None:
        self._broker._attach(self)

    def _match(self, topic: str) -> int | None:
        qos = [q for f, q in self._subscriptions.items() if topic_matches(f, topic)]
        return max(qos) if qos else None

    async def _deliver(self, message: Message, timeout: float) -> None:
        try:
            async with timeout_after(timeout):
                await self._queue.put(message)
        except TimeoutError:
            raise TransportTimeoutError(
                f"subscriber {self.client_id!r} did not take messages for {timeout}s (queue full)"
            ) from None

    async def publish(self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False) -> None:
        self._check_open()
        validate_topic(topic)
        if qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {qos!r}")
        await self._broker._route(Message(topic, bytes(payload), qos, retain), self._publish_timeout)

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        self._check_open()
        for f in filters:
            validate_filter(f)
        for f in filters:
            self._subscriptions[f] = qos
            for message in self._broker.retained(f):
                await self._deliver(Message(message.topic, message.payload, min(qos, message.qos), True), 10.0)

    async def unsubscribe(self, *filters: str) -> None:
        self._check_open()
        for f in filters:
            self._subscriptions.pop(f, None)

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            if self._state is TransportState.CLOSED and self._queue.empty():
                return
            message = await self._queue.get()
            if message is None:
                return
            yield message

    async def close(self) -> None:
        if self._state is TransportState.OPEN:
            self._broker._detach(self)
        self._finish()

    async def abort(self) -> None:
        """Vanish without a clean close: the broker publishes the will."""
        if self._state is TransportState.OPEN:
            self._broker._detach(self)
            if self._will is not None:
                w = self._will
                await self._broker._route(Message(w.topic, w.payload, w.qos, w.retain), self._publish_timeout)
        self._finish()

    def _kick(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._state is not TransportState.CLOSED:
            self._state = TransportState.CLOSED
            # Wakes a consumer waiting on an empty queue; one draining a full
            # queue sees the closed state when it reaches the end.
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)
