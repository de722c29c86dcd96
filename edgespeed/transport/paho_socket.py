"""A paho-mqtt client made from an `MqttConfig`, and its socket driven from an asyncio loop (no network thread).

The loop calls paho's ``loop_read`` when the socket is readable and ``loop_write`` when paho has
bytes to write (paho registers and unregisters the writer through its socket hooks). Reading can be
paused, which is how `MqttTransport` applies backpressure: an unread socket makes the broker and TCP
hold the rest. Any exception paho raises while reading or writing (e.g. ``ValueError`` on a PUBACK
with reason 0x95, which it cannot parse) is treated as a lost connection, never a dead loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgespeed.transport.config import MqttConfig

__all__ = ["SocketDriver", "make_client"]

log = logging.getLogger(__name__)


def make_client(cfg: MqttConfig, protocol: str) -> paho.Client:
    """A paho client for ``cfg`` speaking MQTT ``protocol`` (``"5"`` or ``"3.1.1"``), its connection prepared
    (``connect_async``): manual acknowledgement, no automatic reconnect, TLS, credentials and will set."""
    address = cfg.address
    v5 = protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=cfg.client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        transport=address.transport,
        clean_session=None if v5 else cfg.clean_start,
        manual_ack=True,
        reconnect_on_failure=False,
    )
    client.suppress_exceptions = False
    client.connect_timeout = cfg.connect_timeout
    client.max_inflight_messages_set(cfg.max_inflight)
    if address.transport == "websockets":
        client.ws_set_options(path=address.path)
    if cfg.tls is not None:
        client.tls_set_context(cfg.tls.context())
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.will is not None:
        client.will_set(cfg.will.topic, cfg.will.payload, cfg.will.qos, cfg.will.retain)
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = cfg.session_expiry
        properties.ReceiveMaximum = cfg.queue_size
    client.connect_async(
        address.host,
        address.port,
        keepalive=cfg.keepalive,
        # Reconnects resume the session, so unacknowledged messages are redelivered.
        clean_start=(paho.MQTT_CLEAN_START_FIRST_ONLY if cfg.clean_start else False)
        if v5
        else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )
    return client


class SocketDriver:
    """Reads and writes one paho client's socket on ``loop``.

    Args:
        url: the broker, for log lines.
        on_lost: called when the connection is dropped here and paho did not notice.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, on_lost: Callable[[], None]) -> None:
        self._loop = loop
        self._url = url
        self._on_lost = on_lost
        self.client: paho.Client | None = None
        self.sock: Any = None
        self._reading = False
        self.paused = False

    def hook(self, client: paho.Client) -> None:
        """Drive ``client`` from now on (its socket hooks call back here)."""
        self.client = client
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    def pause(self) -> None:
        """Stop reading the socket (the incoming queue is full)."""
        if not self.paused:
            self.paused = True
            self._stop_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._start_reading()

    def _in_loop(self, fn: Any, *args: Any) -> None:
        """Run ``fn`` on the event loop: paho calls socket hooks from the connect thread too."""
        try:
            current = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            current = False
        if current:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_loop(self._attach, sock)

    def _attach(self, sock: Any) -> None:
        self.sock = sock
        self._reading = False
        if not self.paused:
            self._start_reading()

    def _start_reading(self) -> None:
        if self.sock is not None and not self._reading:
            self._loop.add_reader(self.sock, self._on_readable)
            self._reading = True
            # Data may already sit in the socket or in the TLS buffer.
            self._loop.call_soon(self._on_readable)

    def _stop_reading(self) -> None:
        if self.sock is not None and self._reading:
            self._loop.remove_reader(self.sock)
        self._reading = False

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._detach, sock)

    def _detach(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)
        if self.sock is sock:
            self.sock = None
            self._reading = False

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if self.client is not None and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._on_writable)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)

    def _on_readable(self) -> None:
        client, sock = self.client, self.sock
        if client is None or sock is None or not self._reading:
            return
        try:
            client.loop_read()
        except Exception as exc:  # paho raises e.g. ValueError on PUBACK 0x95
            log.warning(
                "MQTT read from %s failed (%s: %s); dropping the connection", self._url, type(exc).__name__, exc
            )
            self.drop()
            return
        # TLS keeps decrypted bytes that the selector cannot see.
        pending = getattr(self.sock, "pending", None)
        if self._reading and pending is not None and pending() > 0:
            self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            client.loop_write()
        except Exception as exc:
            log.warning("MQTT write to %s failed (%s); dropping the connection", self._url, exc)
            self.drop()

    def keepalive(self) -> None:
        """paho's periodic work (pings, retries); a failure drops the connection."""
        client = self.client
        if client is not None and self.sock is not None:
            try:
                client.loop_misc()
            except Exception as exc:
                log.warning("MQTT keepalive failed: %s", exc)
                self.drop()

    def drop(self) -> None:
        """Treat the connection as lost: paho sees EOF on its next read and cleans up."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        client = self.client
        if client is not None:
            with contextlib.suppress(Exception):
                client.loop_read()
        if self.sock is sock and sock is not None:
            # paho did not notice; close it ourselves and report the loss.
            self.close()
            self._on_lost()

    def close(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self._detach(sock)
        with contextlib.suppress(OSError):
            sock.close()
        # paho has no public way to forget a socket closed under it; without
        # this, its next reconnect() would close that fd number a second time.
        if self.client is not None and self.client._sock is sock:
            self.client._sock = None
