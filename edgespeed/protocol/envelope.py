"""The binary envelope every EdgeSpeed payload travels in.

Layout (big-endian; specified in ``firmware_bridge/PROTOCOL.md``)::

    off  size  field
    0    2     magic "ES"
    2    1     version (1)
    3    1     kind (MessageKind)
    4    2     flags (bit 0: body sealed; other bits must be 0)
    6    8     sequence (per sender, monotonic)
    14   8     timestamp (Unix milliseconds)
    22   16    message id
    38   16    correlation id (all zero: none)
    54   1     sender length S (1..63), then S bytes of sender id
    ..   1     recipient length R (0..63), then R bytes (0: none)
    ..   4     body length B, then B bytes of body; nothing may follow

Everything before the body is the *header*; the security layer binds it as
associated data, so routing fields cannot be changed without detection.
Correlation travels here, not in MQTT 5 properties, so MQTT 3.1.1 brokers work.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from dataclasses import dataclass, field

from edgespeed.errors import DecodeError, PayloadTooLargeError, ProtocolError, TopicError
from edgespeed.protocol._body import decode_body, encode_body
from edgespeed.protocol.messages import Message, MessageKind, kind_of, message_class
from edgespeed.protocol.topics import ID_PATTERN

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "Envelope",
    "FLAG_SEALED",
    "MAGIC",
    "VERSION",
    "decode_envelope",
    "decode_header",
    "encode_envelope",
    "new_message_id",
    "open_message",
    "pack_message",
]

MAGIC = b"ES"
VERSION = 1
FLAG_SEALED = 0x0001
_KNOWN_FLAGS = FLAG_SEALED
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
_FIXED = struct.Struct(">2sBBHQQ16s16s")
_BODY_LEN = struct.Struct(">I")
_NO_ID = bytes(16)


def new_message_id() -> bytes:
    """A random 16-byte message id."""
    return os.urandom(16)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded envelope; ``body`` is the encoded (possibly sealed) message."""

    kind: MessageKind
    sender: str
    body: bytes
    recipient: str = ""
    sequence: int = 0
    timestamp_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    message_id: bytes = field(default_factory=new_message_id)
    correlation_id: bytes = _NO_ID
    flags: int = 0

    def __post_init__(self) -> None:
        if ID_PATTERN.fullmatch(self.sender) is None:
            raise TopicError(f"invalid sender id {self.sender!r}", reason="bad_id")
        if self.recipient and ID_PATTERN.fullmatch(self.recipient) is None:
            raise TopicError(f"invalid recipient id {self.recipient!r}", reason="bad_id")
        if len(self.message_id) != 16 or len(self.correlation_id) != 16:
            raise ProtocolError("message and correlation ids are 16 bytes", reason="bad_header")
        if self.flags & ~_KNOWN_FLAGS:
            raise DecodeError(f"unknown flags 0x{self.flags:04x}", reason="bad_flags")
        if not (0 <= self.sequence < 2**64 and 0 <= self.timestamp_ms < 2**64):
            raise ProtocolError("sequence and timestamp are unsigned 64-bit", reason="bad_header")

    @property
    def sealed(self) -> bool:
        """Whether the body is ciphertext."""
        return bool(self.flags & FLAG_SEALED)

    def header(self, body_length: int | None = None) -> bytes:
        """The header bytes (everything before the body), for use as associated data.

        ``body_length`` overrides ``len(body)``: a sealer builds the header of
        the ciphertext it is about to produce.
        """
        sender = self.sender.encode("ascii")
        recipient = self.recipient.encode("ascii")
        return b"".join(
            (
                _FIXED.pack(
                    MAGIC,
                    VERSION,
                    int(self.kind),
                    self.flags,
                    self.sequence,
                    self.timestamp_ms,
                    self.message_id,
                    self.correlation_id,
                ),
                bytes((len(sender),)),
                sender,
                bytes((len(recipient),)),
                recipient,
                _BODY_LEN.pack(len(self.body) if body_length is None else body_length),
            )
        )


def encode_envelope(envelope: Envelope) -> bytes:
    """Encode an envelope to bytes."""
    return envelope.header() + envelope.body


def decode_envelope(data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_PAYLOAD) -> Envelope:
    """Decode and validate an envelope.

    Raises:
        PayloadTooLargeError: ``data`` is over ``max_size``.
        DecodeError: truncated, bad magic, unknown version, kind or flags, a
            length past the end, or trailing bytes.
        TopicError: sender or recipient is not a valid id.
    """
    envelope, offset = decode_header(data, max_size=max_size)
    return dataclasses.replace(envelope, body=bytes(memoryview(data)[offset:]))


def decode_header(data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_PAYLOAD) -> tuple[Envelope, int]:
    """Validate a whole envelope but copy nothing: returns it with an empty body, and the body's offset.

    Raises:
        The same errors as `decode_envelope`.
    """
    size = len(data)
    if size > max_size:
        raise PayloadTooLargeError(size, max_size, what="envelope")
    view = memoryview(data)
    if size < _FIXED.size + 2 + _BODY_LEN.size:
        raise DecodeError(f"truncated envelope ({size} bytes)", reason="truncated")
    magic, version, kind, flags, sequence, ts, mid, cid = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise DecodeError("bad magic: not an EdgeSpeed envelope", reason="bad_magic")
    if version != VERSION:
        raise DecodeError(f"unsupported envelope version {version}", reason="unknown_version")
    message_class(kind)  # raises on unknown kind
    pos = _FIXED.size
    sender, pos = _read_id(view, pos, "sender")
    recipient, pos = _read_id(view, pos, "recipient")
    if pos + _BODY_LEN.size > size:
        raise DecodeError("truncated envelope: body length missing", reason="truncated")
    (body_len,) = _BODY_LEN.unpack_from(view, pos)
    pos += _BODY_LEN.size
    if pos + body_len > size:
        raise DecodeError(f"body length {body_len} runs past the end", reason="truncated")
    if pos + body_len < size:
        raise DecodeError(f"{size - pos - body_len} trailing bytes after the body", reason="trailing")
    if not sender:
        raise DecodeError("empty sender", reason="bad_header")
    envelope = Envelope(
        kind=MessageKind(kind),
        sender=sender,
        recipient=recipient,
        body=b"",
        sequence=sequence,
        timestamp_ms=ts,
        message_id=mid,
        correlation_id=cid,
        flags=flags,
    )
    return envelope, pos


def _read_id(view: memoryview, pos: int, what: str) -> tuple[str, int]:
    if pos >= len(view):
        raise DecodeError(f"truncated envelope: {what} length missing", reason="truncated")
    n = view[pos]
    pos += 1
    if n > 63:
        raise DecodeError(f"{what} length {n} over 63", reason="bad_header")
    if pos + n > len(view):
        raise DecodeError(f"{what} runs past the end", reason="truncated")
    raw = bytes(view[pos : pos + n])
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TopicError(f"{what} is not ASCII", reason="bad_id") from None
    if n and ID_PATTERN.fullmatch(text) is None:
        raise TopicError(f"invalid {what} id {text!r}", reason="bad_id")
    return text, pos + n


def pack_message(
    message: Message,
    *,
    sender: str,
    recipient: str = "",
    sequence: int = 0,
    correlation_id: bytes = _NO_ID,
    message_id: bytes | None = None,
) -> bytes:
    """Encode a message in an unsealed envelope (the security layer seals bodies)."""
    envelope = Envelope(
        kind=kind_of(message),
        sender=sender,
        recipient=recipient,
        body=encode_body(message),
        sequence=sequence,
        correlation_id=correlation_id,
        message_id=message_id or new_message_id(),
    )
    return encode_envelope(envelope)


def open_message(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_PAYLOAD
) -> tuple[Envelope, Message]:
    """Decode an unsealed envelope and its body.

    Raises:
        ProtocolError: any decoding failure (see `decode_envelope`), or a sealed body.
    """
    envelope = decode_envelope(data, max_size=max_size)
    if envelope.sealed:
        raise DecodeError("body is sealed; open it with the security layer", reason="sealed")
    return envelope, decode_body(message_class(envelope.kind), envelope.body)
