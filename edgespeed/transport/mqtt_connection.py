"""The connection half of `MqttTransport`: connecting, MQTT 5 or 3.1.1, reconnecting, keepalives.

`MqttConnection` owns the paho client's life: the first connection (retrying refused ones until the
connect timeout; TLS failures are final), the probe for MQTT 5 with a fall back to 3.1.1, the
connection state, reconnects with exponential backoff and full jitter, and paho's periodic work. The
transport built on it (`edgespeed.transport.mqtt`) adds publishing, subscribing and receiving.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from typing import Any

import paho.mqtt.client as paho

from edgespeed._compat import timeout as asyncio_timeout
from edgespeed.errors import ConnectError
from edgespeed.transport.config import MqttConfig
from edgespeed.transport.paho_socket import SocketDriver

__all__ = ["FallBackTo311", "MqttConnection"]

log = logging.getLogger(__name__)

_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK "Unsupported Protocol Version"
# Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT; give up on it this soon.
_V5_PROBE_TIMEOUT = 2.0


class FallBackTo311(Exception):
    """The broker does not speak MQTT 5 (internal signal)."""


class MqttConnection:
    """A paho client's connection, driven from the running event loop (see `SocketDriver`)."""

    config: MqttConfig

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._protocol = "5"
        self._driver_: SocketDriver | None = None
        self._generation = 0  # connections made: an acknowledgement is only valid in its own
        self._broker_max_packet: int | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._connack: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.reconnects = 0

    def _new_client(self, protocol: str) -> None:
        """Make the paho client for ``protocol`` with the callbacks of the transport (which defines it)."""
        raise NotImplementedError

    def _on_session(self) -> None:
        """A connection was made: renew what the session needs (the transport's subscriptions)."""

    @property
    def _driver(self) -> SocketDriver:
        assert self._driver_ is not None, "the transport is not open"
        return self._driver_

    @property
    def _sock(self) -> Any:
        return self._driver_.sock if self._driver_ is not None else None

    def _close_socket(self) -> None:
        if self._driver_ is not None:
            self._driver_.close()

    def _drop_connection(self) -> None:
        self._driver.drop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        """The MQTT version in use: ``"5"`` or ``"3.1.1"``."""
        return self._protocol

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._driver_ = SocketDriver(
            self._loop,
            self.config.url,
            lambda: self._mark_disconnected(ConnectError("connection dropped", retryable=True)),
        )
        protocols = ["5", "3.1.1"] if self.config.protocol == "auto" else [self.config.protocol]
        deadline = time.monotonic() + self.config.connect_timeout
        for i, protocol in enumerate(protocols):
            self._new_client(protocol)
            try:
                await self._first_connect(deadline)
                break
            except FallBackTo311:
                if i == len(protocols) - 1:
                    raise ConnectError(f"{self.config.url} refused MQTT {protocol}") from None
                log.info("%s does not speak MQTT 5; using 3.1.1", self.config.url)
            except BaseException:
                self._close_socket()
                raise
        name = f"mqtt[{self.config.client_id}]"
        self._tasks = [
            asyncio.create_task(self._supervise(), name=f"{name}.reconnect"),
            asyncio.create_task(self._misc_loop(), name=f"{name}.keepalive"),
        ]

    async def _first_connect(self, deadline: float) -> None:
        """Connect, retrying refused connections until ``deadline``; TLS failures are final."""
        attempt = 0
        while True:
            try:
                await self._connect_once(deadline - time.monotonic())
                return
            except ConnectError as exc:
                if not exc.retryable:
                    raise
                delay = self.config.backoff.delay(attempt, random.random())
                if time.monotonic() + delay >= deadline:
                    raise ConnectError(
                        f"could not connect to {self.config.url} within {self.config.connect_timeout}s: {exc}"
                    ) from exc
                attempt += 1
                await asyncio.sleep(delay)

    async def _connect_once(self, timeout: float) -> None:
        assert self._loop is not None and self._client is not None
        timeout = max(timeout, 0.05)
        probing = self._protocol == "5" and self.config.protocol == "auto" and self._generation == 0
        self._close_socket()
        self._connack = self._loop.create_future()
        started = time.monotonic()
        try:
            async with asyncio_timeout(timeout):
                await self._loop.run_in_executor(None, self._client.reconnect)
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {self.config.url} failed: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"cannot reach {self.config.url}: {exc or 'timed out'}", retryable=True) from exc
        remaining = max(timeout - (time.monotonic() - started), 0.05)
        try:
            async with asyncio_timeout(min(remaining, _V5_PROBE_TIMEOUT) if probing else remaining):
                await asyncio.shield(self._connack)
        except TimeoutError:
            self._close_socket()
            if probing:
                raise FallBackTo311() from None
            raise ConnectError(f"{self.config.url} sent no CONNACK within {timeout:.1f}s", retryable=True) from None

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        fut = self._connack
        if reason.is_failure:
            value = getattr(reason, "value", 0)
            if self._protocol == "5" and value == _UNSUPPORTED_PROTOCOL:
                exc: BaseException = FallBackTo311()
            else:
                exc = ConnectError(f"{self.config.url} refused the connection: {reason}")
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        self._generation += 1
        self._broker_max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        self._disconnected.clear()
        self._connected.set()
        self._on_session()
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._mark_disconnected(ConnectError(f"connection closed by {self.config.url}: {reason}", retryable=True))

    def _mark_disconnected(self, exc: ConnectError) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        fut = self._connack
        if fut is not None and not fut.done():
            if self._protocol == "5" and self.config.protocol == "auto" and self._generation == 0:
                # A 3.1.1-only broker may just close the socket on an MQTT 5 CONNECT.
                fut.set_exception(FallBackTo311())
            elif self._generation == 0:
                # The first connection got through TCP and TLS and was then closed:
                # a refusal (client certificate, limits), not a passing fault.
                hint = " (is the client certificate from the broker's CA and valid?)" if self.config.tls else ""
                fut.set_exception(ConnectError(f"{exc}{hint}", retryable=False))
            else:
                fut.set_exception(exc)
        if was_connected and not self._closing:
            log.warning("lost connection to %s", self.config.url)

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closing:
            await self._disconnected.wait()
            if self._closing:
                return
            await asyncio.sleep(self.config.backoff.delay(attempt, random.random()))
            try:
                await self._connect_once(self.config.connect_timeout)
            except (ConnectError, FallBackTo311) as exc:
                attempt += 1
                log.info("reconnect %d to %s failed: %s", attempt, self.config.url, exc)
            else:
                attempt = 0
                self.reconnects += 1
                log.info("reconnected to %s", self.config.url)

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._driver.keepalive()
