"""The wire protocol: topics, envelope, messages, tensors and the chunk format: bytes only, no network.

Chunked transfer over a transport (`BlobServer`, `fetch_blob`) lives in `edgespeed.transfer`.

Specified in ``firmware_bridge/PROTOCOL.md`` for implementations in other languages.
"""

from edgespeed.protocol.blob import BlobAssembler, BlobSource
from edgespeed.protocol.envelope import Envelope, decode_envelope, encode_envelope, open_message, pack_message
from edgespeed.protocol.messages import (
    Birth,
    BlobInfo,
    Chunk,
    ChunkRequest,
    CoordinatorState,
    Death,
    DeviceCard,
    Error,
    Heartbeat,
    MessageKind,
    ModelManifest,
    Result,
    Task,
)
from edgespeed.protocol.tensor import Compression, Encoding, decode_tensor, encode_tensor

__all__ = [
    "Birth",
    "BlobAssembler",
    "BlobInfo",
    "BlobSource",
    "Chunk",
    "ChunkRequest",
    "Compression",
    "CoordinatorState",
    "Death",
    "DeviceCard",
    "Encoding",
    "Envelope",
    "Error",
    "Heartbeat",
    "MessageKind",
    "ModelManifest",
    "Result",
    "Task",
    "decode_envelope",
    "decode_tensor",
    "encode_envelope",
    "encode_tensor",
    "open_message",
    "pack_message",
]
