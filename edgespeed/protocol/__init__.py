"""The wire protocol: topics, envelope, messages, tensors and chunked blob transfer.

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
from edgespeed.protocol.transfer import BlobServer, fetch_blob

__all__ = [
    "Birth",
    "BlobAssembler",
    "BlobInfo",
    "BlobServer",
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
    "fetch_blob",
    "open_message",
    "pack_message",
]
