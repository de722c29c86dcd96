"""The `Transport` interface: publish, subscribe, iterate messages, close.

A transport is an async context manager, usable once. Implementations:
`MqttTransport` (a real broker) and `MemoryTransport` (in-process, for tests).
Both keep the same promises: every wait has a timeout, the incoming queue is
bounded and applies backpressure instead of dropping, and a QoS 1 message is
acknowledged only once it has been handed to the consumer.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

from edgespeed._compat import Self
from edgespeed.errors import ConfigError, TransportClosedError

__all__ = [
    "Message",
    "Transport",
    "TransportState",
    "Will",
    "topic_matches",
    "validate_filter",
    "validate_topic",
]

_MAX_TOPIC_BYTES = 65535


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from the broker."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Will:
    """What the broker publishes on our behalf if we vanish without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        validate_topic(self.topic)
        _check_qos(self.qos)


class TransportState(enum.Enum):
    """Lifecycle of a transport: each state is entered at most once."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ConfigError(f"qos must be 0, 1 or 2, got {qos!r}")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic to publish to (no wildcards, no NUL).

    Raises:
        ConfigError: empty, too long, or containing ``+``, ``#`` or NUL.
    """
    if not isinstance(topic, str) or not topic:
        raise ConfigError("topic must be a non-empty string")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ConfigError(f"topic {topic!r} must not contain '+', '#' or NUL")
    if len(topic.encode()) > _MAX_TOPIC_BYTES:
        raise ConfigError("topic longer than 65535 bytes")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid subscription filter.

    Raises:
        ConfigError: empty, NUL, or a wildcard that is not a whole level
            (``#`` only as the last level).
    """
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise ConfigError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            raise ConfigError(f"wildcard must fill a whole level in {topic_filter!r}")
        if level == "#" and i != len(levels) - 1:
            raise ConfigError(f"'#' must be the last level in {topic_filter!r}")
    if len(topic_filter.encode()) > _MAX_TOPIC_BYTES:
        raise ConfigError("topic filter longer than 65535 bytes")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` under MQTT rules (``$`` topics excluded from wildcards)."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class Transport(abc.ABC):
    """Publish/subscribe over a broker. Use as ``async with``; usable once."""

    _state: TransportState = TransportState.NEW

    @property
    def state(self) -> TransportState:
        """Where the transport is in its lifecycle."""
        return self._state

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether a broker connection is up right now."""

    @abc.abstractmethod
    async def publish(self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1 and 2, wait until the broker acknowledged it.

        Raises:
            ConfigError: bad topic or qos.
            PayloadTooLargeError: over the broker's or the configured limit.
            NotConnectedError: no connection within the publish timeout.
            TransportTimeoutError: no acknowledgement within the publish timeout.
            PublishRefusedError: the broker acknowledged with a failure code.
            TransportClosedError: the transport is not open.
        """

    @abc.abstractmethod
    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        """Subscribe to topic filters; they are renewed after every reconnect.

        Raises:
            ConfigError: a bad filter.
            TransportError: the broker refused a filter, or no answer in time.
        """

    @abc.abstractmethod
    async def unsubscribe(self, *filters: str) -> None:
        """Stop receiving messages for these filters."""

    @abc.abstractmethod
    def messages(self) -> AsyncIterator[Message]:
        """Iterate over incoming messages until the transport closes.

        Each message is acknowledged to the broker when it is handed over here.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect cleanly (no will is published). Idempotent."""

    async def __aenter__(self) -> Self:
        if self._state is not TransportState.NEW:
            raise TransportClosedError(f"{type(self).__name__} can be opened only once")
        await self._open()
        self._state = TransportState.OPEN
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def _open(self) -> None:
        """Connect; called once by ``__aenter__``."""

    def _check_open(self) -> None:
        if self._state is not TransportState.OPEN:
            raise TransportClosedError(f"{type(self).__name__} is {self._state.value}; use it inside 'async with'")
