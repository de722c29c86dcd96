"""`MqttTransport`: the `Transport` over a real MQTT broker, on paho-mqtt.

paho's socket is driven from the asyncio loop itself (no network thread, see
`edgespeed.transport.paho_socket`): the loop calls ``loop_read``/``loop_write``
when the socket is ready and ``loop_misc`` once a second. Only the blocking TCP
connect and TLS handshake run in a worker thread.

What this adds to paho, and why:

* Manual acknowledgement: a QoS 1 message is acknowledged when `messages()`
  hands it over, never before; unacknowledged messages are redelivered by the
  broker after a reconnect (the session is resumed).
* A bounded incoming queue: when it is full the socket is no longer read, so
  the broker and TCP hold the rest. With MQTT 5 the receive maximum is set to
  the queue size, so the broker never sends more unacknowledged messages.
* Bounded outgoing publishes awaiting PUBACK; each waits with a timeout.
* The broker's maximum packet size is enforced on the sending side: Mosquitto
  answers an oversized publish with PUBACK 0x95, which paho cannot parse and
  which would kill its read loop. Any exception raised while reading is
  treated as a lost connection, never a dead loop.
* TCP_NODELAY on every socket (small round trips otherwise stall 40+ ms over TLS).
* Reconnect with exponential backoff and full jitter; subscriptions renewed.
* MQTT 5 where the broker speaks it, 3.1.1 otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgespeed._compat import timeout as asyncio_timeout
from edgespeed.errors import (
    ConfigError,
    NotConnectedError,
    PayloadTooLargeError,
    PublishRefusedError,
    TransportClosedError,
    TransportError,
    TransportTimeoutError,
)
from edgespeed.transport.base import Message, Transport, TransportState, validate_filter, validate_topic
from edgespeed.transport.config import MqttConfig
from edgespeed.transport.mqtt_connection import MqttConnection
from edgespeed.transport.paho_socket import make_client

__all__ = ["MqttTransport"]

log = logging.getLogger(__name__)

_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK "Unsupported Protocol Version"
_PUBLISH_OVERHEAD = 16  # fixed header, packet id, property length, with room to spare
# Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT; give up on it this soon.
_V5_PROBE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class _Incoming:
    message: Message
    mid: int
    generation: int


class MqttTransport(MqttConnection, Transport):
    """A `Transport` over an MQTT 3.1.1 or 5 broker, with TLS or mutual TLS.

    Example::

        async with MqttTransport(MqttConfig("mqtt://127.0.0.1:1883", "dev-1")) as t:
            await t.subscribe("es/1/demo/dev/dev-1/in")
            async for message in t.messages():
                ...
    """

    def __init__(self, config: MqttConfig) -> None:
        super().__init__(config)
        self._queue: collections.deque[_Incoming] = collections.deque()
        self._hard_bound = config.queue_size + max(config.queue_size, 64)  # see _hold_reads
        self._has_messages = asyncio.Event()
        self._pending_pub: dict[int, tuple[asyncio.Future[None], str]] = {}
        self._uplink_free = 0.0  # when a paced uplink is free again (config.uplink_bytes_per_s)
        self._pending_sub: dict[int, asyncio.Future[list[Any]]] = {}
        self._inflight = asyncio.Semaphore(config.max_inflight)
        self._subscriptions: dict[str, int] = {}

    def _on_session(self) -> None:
        if self._subscriptions:
            self._send_subscribe(dict(self._subscriptions))

    # -- public properties -------------------------------------------------

    @property
    def max_payload(self) -> int:
        """The largest payload a publish may carry now (ours or the broker's limit)."""
        limit = self.config.max_packet_size
        if self._broker_max_packet is not None:
            limit = min(limit, self._broker_max_packet)
        return limit - _PUBLISH_OVERHEAD

    # -- lifecycle ---------------------------------------------------------

    async def close(self) -> None:
        if self._state is TransportState.CLOSED:
            return
        self._state = TransportState.CLOSED
        self._closing = True
        client = self._client
        if client is not None and self._connected.is_set():
            # A clean DISCONNECT: the broker drops the will. paho writes it at once.
            with contextlib.suppress(Exception):
                client.disconnect()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_socket()
        closed = TransportClosedError("transport closed")
        futures: list[asyncio.Future[Any]] = [f for f, _ in self._pending_pub.values()]
        for fut in [*futures, *self._pending_sub.values()]:
            if not fut.done():
                fut.set_exception(closed)
        if self._connack is not None and not self._connack.done():
            self._connack.cancel()  # nobody waits on it any more
        self._pending_pub.clear()
        self._pending_sub.clear()
        self._connected.clear()
        self._disconnected.set()
        self._has_messages.set()

    async def abort(self) -> None:
        """Vanish as a crashed process would: no DISCONNECT, so the broker
        publishes the will and keeps unacknowledged messages for redelivery."""
        if self._state is TransportState.CLOSED:
            return
        self._closing = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._connected.clear()
        await self.close()

    # -- paho client and its socket ---------------------------------------

    def _new_client(self, protocol: str) -> None:
        self._protocol = protocol
        client = make_client(self.config, protocol)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._driver.hook(client)
        self._client = client

    # -- connecting --------------------------------------------------------

    async def _wait_connected(self, timeout: float) -> None:
        if self._connected.is_set():
            return
        try:
            async with asyncio_timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise NotConnectedError(f"not connected to {self.config.url} within {timeout}s") from None
        self._check_open()

    # -- publishing --------------------------------------------------------

    async def publish(self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False) -> None:
        self._check_open()
        validate_topic(topic)
        if qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {qos!r}")
        size = len(payload) + len(topic.encode())
        if size > self.max_payload:
            raise PayloadTooLargeError(size, self.max_payload, what=f"publish to {topic!r}")
        timeout = self.config.publish_timeout
        deadline = time.monotonic() + timeout
        try:
            async with asyncio_timeout(timeout):
                await self._inflight.acquire()
        except TimeoutError:
            raise TransportTimeoutError(
                f"{self.config.max_inflight} publishes awaited acknowledgement for {timeout}s"
            ) from None
        try:
            if self.config.uplink_bytes_per_s:
                # A simulated slow uplink: each publish occupies it for its size over the rate.
                now = time.monotonic()
                self._uplink_free = max(self._uplink_free, now) + size / self.config.uplink_bytes_per_s
                await asyncio.sleep(self._uplink_free - now)
            await self._wait_connected(max(deadline - time.monotonic(), 0.0))
            assert self._client is not None and self._loop is not None
            info = self._client.publish(topic, payload, qos, retain)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise TransportError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
            if qos == 0:
                return
            fut = self._loop.create_future()
            self._pending_pub[info.mid] = (fut, topic)
            self._read_for_acks()
            try:
                async with asyncio_timeout(max(deadline - time.monotonic(), 0.0)):
                    await fut
            except TimeoutError:
                raise TransportTimeoutError(f"no acknowledgement for publish to {topic!r} in {timeout}s") from None
            finally:
                self._pending_pub.pop(info.mid, None)
        finally:
            self._inflight.release()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        pending = self._pending_pub.pop(mid, None)
        self._hold_reads()  # the last acknowledgement awaited: a full queue stops reads again
        if pending is None or pending[0].done():
            return
        fut, topic = pending
        if reason is not None and reason.is_failure:
            fut.set_exception(PublishRefusedError(topic, int(reason.value), str(reason)))
        else:
            fut.set_result(None)

    # -- subscribing -------------------------------------------------------

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        self._check_open()
        if qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {qos!r}")
        for f in filters:
            validate_filter(f)
        wanted = {f: qos for f in filters}
        self._subscriptions.update(wanted)
        await self._wait_connected(self.config.publish_timeout)
        fut = self._send_subscribe(wanted)
        try:
            async with asyncio_timeout(self.config.publish_timeout):
                codes = await fut
        except TimeoutError:
            raise TransportTimeoutError(f"no SUBACK for {list(filters)}") from None
        refused = [f for f, code in zip(wanted, codes, strict=False) if code.is_failure]
        if refused:
            for f in refused:
                self._subscriptions.pop(f, None)
            raise TransportError(f"broker refused subscription to {refused}")

    def _send_subscribe(self, wanted: dict[str, int]) -> asyncio.Future[list[Any]]:
        assert self._client is not None and self._loop is not None
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        if self._protocol == "5":
            items: list[Any] = [(f, SubscribeOptions(qos=q)) for f, q in wanted.items()]
        else:
            items = list(wanted.items())
        rc, mid = self._client.subscribe(items)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_sub[mid] = fut
            self._read_for_acks()
        else:
            fut.set_exception(NotConnectedError(f"subscribe failed: {paho.error_string(rc)}"))
            fut.exception()  # the reconnect path renews it; mark as retrieved
        return fut

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        fut = self._pending_sub.pop(mid, None)
        self._hold_reads()
        if fut is not None and not fut.done():
            fut.set_result(list(codes))

    async def unsubscribe(self, *filters: str) -> None:
        self._check_open()
        for f in filters:
            self._subscriptions.pop(f, None)
        if not self._connected.is_set():
            return
        assert self._client is not None and self._loop is not None
        rc, mid = self._client.unsubscribe(list(filters))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._pending_sub[mid] = fut
        self._read_for_acks()
        try:
            async with asyncio_timeout(self.config.publish_timeout):
                await fut
        except TimeoutError:
            raise TransportTimeoutError(f"no UNSUBACK for {list(filters)}") from None

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        fut = self._pending_sub.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([])

    # -- receiving ---------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        message = Message(msg.topic, payload, msg.qos, bool(msg.retain))
        self._queue.append(_Incoming(message, msg.mid, self._generation))
        self._has_messages.set()
        self._hold_reads()

    def _read_for_acks(self) -> None:
        """An acknowledgement is awaited: read on (within twice the queue's size) so that it arrives."""
        if len(self._queue) < self._hard_bound:
            self._driver.resume()

    def _hold_reads(self) -> None:
        """Stop reading the socket once the incoming queue is full, so the broker and TCP hold the rest.

        While a publish or subscribe of ours awaits its acknowledgement, reading goes on, within a hard
        bound: an acknowledgement behind unread messages would otherwise never be read, and a program that
        publishes while it handles a message (a coordinator welcoming a burst of devices) would stall until
        its publish timed out. With MQTT 5 the broker sends at most ``queue_size`` unacknowledged messages
        (the receive maximum), so reading on brings in acknowledgements only; an MQTT 3.1.1 broker sends
        up to its own in-flight window (Mosquitto's ``max_inflight_messages``: 64 in the configurations
        EdgeSpeed renders), which the hard bound leaves room for.
        """
        n = len(self._queue)
        if n >= self._hard_bound or (n >= self.config.queue_size and not self._pending_pub and not self._pending_sub):
            self._driver.pause()
            log.debug("incoming queue full (%d); pausing reads", n)

    async def messages(self) -> AsyncIterator[Message]:
        self._check_open()
        while True:
            if self._queue:
                item = self._queue.popleft()
                self._acknowledge(item)
                if len(self._queue) < self.config.queue_size:
                    self._driver.resume()
                yield item.message
                continue
            if self._state is not TransportState.OPEN:
                return
            self._has_messages.clear()
            await self._has_messages.wait()

    def _acknowledge(self, item: _Incoming) -> None:
        # An ack from an earlier connection would name a packet id the broker
        # no longer knows; the broker redelivers that message instead.
        if item.message.qos > 0 and item.generation == self._generation and self._client is not None:
            self._client.ack(item.mid, item.message.qos)
