"""The one exception tree of EdgeSpeed.

Every error EdgeSpeed raises derives from `EdgeSpeedError`; foreign exceptions
(paho, ssl, msgpack, zstandard, OS errors) are translated where they enter our
code, with the original kept as ``__cause__``::

    EdgeSpeedError
    ├── ConfigError                 invalid configuration or argument
    ├── MissingDependencyError      an optional extra is not installed
    ├── ProtocolError               bytes or names that break the wire format
    │   ├── TopicError              bad id, topic injection, unknown topic
    │   ├── DecodeError             truncated, unknown version/kind, garbage
    │   ├── PayloadTooLargeError    over a configured size limit
    │   ├── TensorError             dtype, shape or length inconsistent
    │   └── BlobError               chunk or whole-blob hash mismatch, bad offset
    ├── TransportError              talking to the broker failed
    │   ├── ConnectError            refused: TLS, credentials, protocol
    │   ├── NotConnectedError       no connection within the allowed time
    │   ├── TransportTimeoutError   an acknowledgement did not come in time
    │   ├── PublishRefusedError     the broker refused a publish
    │   └── TransportClosedError    the transport was closed or never opened
    ├── BrokerError                 the embedded broker failed to start or run
    ├── BackendError                an inference backend refused a model or an input, or failed
    ├── TaskError                   a task ended without a result (``code``: deadline, no_capable_device, ...)
    ├── OptimizeError               a model could not be quantised, pruned or fused (``reason``)
    └── SecurityError               a payload, key or file failed a security check
        ├── UnknownPeerError        no valid fleet certificate for that id
        ├── SealError               cannot open: tampered, wrong key, not sealed, wrong recipient
        │   └── AtRestError         a value kept encrypted on disk does not open under the data key
        ├── ReplayError             a sequence already seen, or a message too old or from the future
        ├── SignatureError          a missing, unknown or bad signature
        ├── RollbackError           a model version not newer than the installed one
        └── UnsafeFileError         a file that could run code or exceed limits when loaded

Errors carry their context as attributes (``reason``, ``topic``, ...) so
callers can act on them without parsing messages.
"""

from __future__ import annotations

__all__ = [
    "AtRestError",
    "BackendError",
    "BlobError",
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "EdgeSpeedError",
    "MissingDependencyError",
    "NotConnectedError",
    "OptimizeError",
    "PayloadTooLargeError",
    "ProtocolError",
    "PublishRefusedError",
    "ReplayError",
    "RollbackError",
    "SealError",
    "SecurityError",
    "SignatureError",
    "TaskError",
    "TensorError",
    "TopicError",
    "TransportClosedError",
    "TransportError",
    "TransportTimeoutError",
    "UnknownPeerError",
    "UnsafeFileError",
]


class EdgeSpeedError(Exception):
    """Root of every error EdgeSpeed raises."""


class ConfigError(EdgeSpeedError, ValueError):
    """A configuration value or argument is invalid."""


class MissingDependencyError(EdgeSpeedError, ImportError):
    """An optional dependency is missing; ``extra`` names what to install."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{package} is not installed; install it with: pip install 'edgespeed[{extra}]'")


class ProtocolError(EdgeSpeedError, ValueError):
    """Input violates the EdgeSpeed wire format. ``reason`` is a short code."""

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        self.reason = reason
        super().__init__(message)


class TopicError(ProtocolError):
    """An id or topic is malformed or could inject MQTT wildcards."""


class DecodeError(ProtocolError):
    """Bytes could not be decoded: truncated, unknown version or kind, garbage."""


class PayloadTooLargeError(ProtocolError):
    """A payload is larger than the configured limit; refused before allocation."""

    def __init__(self, size: int, limit: int, *, what: str = "payload") -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes", reason="too_large")


class TensorError(ProtocolError):
    """A tensor's dtype, shape and byte length do not agree."""


class BlobError(ProtocolError):
    """A chunk or a whole blob failed verification, or an offset is out of range."""


class TransportError(EdgeSpeedError):
    """Talking to the broker failed."""


class ConnectError(TransportError):
    """The broker refused the connection or the TLS handshake failed.

    ``retryable`` is true for failures that may pass (broker unreachable,
    connection dropped), false for final ones (TLS verification, not authorized).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        self.retryable = retryable
        super().__init__(message)


class NotConnectedError(TransportError):
    """No connection to the broker could be had within the allowed time."""


class TransportTimeoutError(TransportError, TimeoutError):
    """An acknowledgement or a message did not arrive in time."""


class PublishRefusedError(TransportError):
    """The broker acknowledged a publish with a failure reason code."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason
        super().__init__(f"broker refused publish to {topic!r}: {reason} (0x{reason_code:02x})")


class TransportClosedError(TransportError):
    """The transport is closed, or was used outside its context."""


class BrokerError(EdgeSpeedError):
    """The embedded broker could not be started or stopped."""


class BackendError(EdgeSpeedError):
    """An inference backend failed. ``reason``: bad_input, model_missing, backend_failure, misuse, unknown."""

    def __init__(self, message: str, *, reason: str = "backend_failure") -> None:
        self.reason = reason
        super().__init__(message)


class TaskError(EdgeSpeedError):
    """A task ended without a result.

    ``code`` says why: ``deadline``, ``no_capable_device``, ``unknown_model``,
    ``attempts_exhausted``, or what the device reported (``bad_input``,
    ``backend_failure``, ``result_too_large``, ...). ``task_id`` names the task.
    """

    def __init__(self, message: str, *, code: str, task_id: str = "") -> None:
        self.code = code
        self.task_id = task_id
        super().__init__(message)


class OptimizeError(EdgeSpeedError, ValueError):
    """A model could not be optimised. ``reason``: ``bad_model`` (unreadable, or nothing the tool can work on),
    ``bad_data`` (calibration or evaluation data of the wrong shape, dtype or names), ``empty_data``,
    ``unsupported`` (an option this model or tool does not support), ``failed`` (the tool itself failed)."""

    def __init__(self, message: str, *, reason: str = "failed") -> None:
        self.reason = reason
        super().__init__(message)


class SecurityError(EdgeSpeedError):
    """A payload, key or file failed a security check. ``reason`` is a short code."""

    def __init__(self, message: str, *, reason: str = "refused") -> None:
        self.reason = reason
        super().__init__(message)


class UnknownPeerError(SecurityError):
    """No valid, unrevoked fleet certificate is known for this id."""


class SealError(SecurityError):
    """A sealed payload could not be opened: tampered, wrong key, unsealed or misaddressed."""


class AtRestError(SealError):
    """A value kept encrypted at rest does not open: another data key, moved from another row, altered,
    or not sealed. ``reason``: ``wrong_key`` or ``not_sealed``."""


class ReplayError(SecurityError):
    """A message was seen before, is older than the allowed age, or comes from the future."""


class SignatureError(SecurityError):
    """A signature is missing, from an unknown or unauthorised signer, or does not verify."""


class RollbackError(SecurityError):
    """A model version is not newer than the one already installed."""


class UnsafeFileError(SecurityError):
    """A file would run code when loaded, or is over the size limit."""
