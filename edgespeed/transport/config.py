"""Configuration of the MQTT transport: broker URL, TLS, timeouts and bounds."""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from edgespeed.errors import ConfigError
from edgespeed.transport.base import Will

__all__ = ["Backoff", "BrokerAddress", "MqttConfig", "TlsConfig", "parse_broker_url"]

_SCHEMES = {
    "mqtt": (1883, False, "tcp"),
    "mqtts": (8883, True, "tcp"),
    "ws": (80, False, "websockets"),
    "wss": (443, True, "websockets"),
}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is, parsed from a URL."""

    host: str
    port: int
    tls: bool
    transport: Literal["tcp", "websockets"]
    path: str = "/mqtt"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://``, ``mqtts://``, ``ws://`` or ``wss://`` URLs.

    Raises:
        ConfigError: unknown scheme, missing host or bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(f"broker URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
    default_port, tls, transport = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {exc}") from exc
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    return BrokerAddress(parts.hostname, port, tls, transport, parts.path or "/mqtt")  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS settings; a client certificate and key make it mutual TLS."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("give both cert_file and key_file for mutual TLS, or neither")
        for p in (self.ca_file, self.cert_file, self.key_file):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"TLS file not found: {p}")

    def context(self) -> ssl.SSLContext:
        """An SSL context: TLS 1.2+, the fleet CA only, hostname checked."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        try:
            ctx.load_verify_locations(cafile=os.fspath(self.ca_file))
            if self.cert_file is not None and self.key_file is not None:
                ctx.load_cert_chain(os.fspath(self.cert_file), os.fspath(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}") from exc
        return ctx


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential from ``initial`` to ``maximum``, with full jitter."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1:
            raise ConfigError("backoff needs 0 < initial <= maximum and factor >= 1")

    def delay(self, attempt: int, rand: float) -> float:
        """Delay before reconnect ``attempt`` (0-based); ``rand`` in [0, 1)."""
        cap = min(self.maximum, self.initial * self.factor ** min(attempt, 32))
        return self.initial / 2 + rand * (cap - self.initial / 2)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """Everything `MqttTransport` needs. Validated on construction.

    Attributes:
        url: ``mqtt://host:port``, ``mqtts://``, ``ws://`` or ``wss://``.
        client_id: the MQTT client id (for a device, its device id).
        tls: TLS settings; required for ``mqtts`` and ``wss``.
        protocol: ``"auto"`` tries MQTT 5 and falls back to 3.1.1.
        keepalive: seconds between pings.
        clean_start: drop the broker-side session on the first connect.
            Reconnects always resume it, so queued QoS 1 messages survive.
        session_expiry: seconds the broker keeps the session after a disconnect.
        queue_size: bound of the incoming queue; reading pauses when it is full.
        max_inflight: bound of QoS 1/2 publishes awaiting acknowledgement.
        max_packet_size: our own limit on outgoing packets (the broker's, if it
            announces a smaller one, wins).
        uplink_bytes_per_s: pace outgoing publishes to this rate, as a slow uplink would (tests and
            benchmarks of split models over slow links); 0 for no limit.
        connect_timeout: seconds allowed for the first connection.
        publish_timeout: seconds a publish may wait for a connection and its ack.
        backoff: reconnect delays.
        will: published by the broker if we vanish.
        username, password: broker credentials, if it wants them.
    """

    url: str
    client_id: str
    tls: TlsConfig | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive: int = 30
    clean_start: bool = True
    session_expiry: int = 3600
    queue_size: int = 1000
    max_inflight: int = 64
    max_packet_size: int = 8 * 1024 * 1024
    uplink_bytes_per_s: float = 0.0
    connect_timeout: float = 10.0
    publish_timeout: float = 30.0
    backoff: Backoff = field(default_factory=Backoff)
    will: Will | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        address = parse_broker_url(self.url)
        if address.tls and self.tls is None:
            raise ConfigError(f"{self.url} uses TLS: give a TlsConfig with the fleet CA")
        if not self.client_id or len(self.client_id) > 128:
            raise ConfigError("client_id must be 1..128 characters")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"protocol must be 'auto', '5' or '3.1.1', got {self.protocol!r}")
        for name in ("keepalive", "queue_size", "max_inflight", "max_packet_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.queue_size > 65535:
            raise ConfigError("queue_size is at most 65535 (MQTT receive maximum)")
        if self.connect_timeout <= 0 or self.publish_timeout <= 0:
            raise ConfigError("timeouts must be positive")

    @property
    def address(self) -> BrokerAddress:
        """The parsed broker URL."""
        return parse_broker_url(self.url)

    def replace(self, **changes: object) -> MqttConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
