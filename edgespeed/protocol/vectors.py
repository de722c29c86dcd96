"""Test vectors of the wire formats, as JSON with hex, for other implementations.

``python -m edgespeed.protocol.vectors DIR`` writes ``envelope.json``,
``revocation.json`` (kind 13), ``tensor.json`` and ``chunk.json``. Every value is fixed (ids, times, data),
so the files change only when the wire format does; the test suite checks the
committed files against this generator and against the decoders.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.protocol._body import _to_plain, encode_body
from edgespeed.protocol.envelope import Envelope, encode_envelope
from edgespeed.protocol.messages import (
    Birth,
    BlobInfo,
    Chunk,
    ChunkRequest,
    CoordinatorState,
    Death,
    DeviceCard,
    DeviceConfig,
    Error,
    Heartbeat,
    Hop,
    ModelManifest,
    ModelStatus,
    Result,
    RevocationList,
    Task,
    kind_of,
)
from edgespeed.protocol.tensor import Compression, Encoding, encode_tensor

__all__ = ["build_vectors", "jsonable", "write_vectors"]

_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
_MID = bytes(range(16))
_CID = bytes(range(16, 32))


def jsonable(value: Any) -> Any:
    """Plain JSON form of a body value: bytes become ``{"hex": ...}``."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _messages() -> list[tuple[str, Any]]:
    card = DeviceCard(
        "dev-1", "aarch64", "linux", "0.1.0", 4, 4 << 30, ("onnx", "tflite"), ("npu",), {"board": "rk3588"}
    )
    tensor = encode_tensor(np.arange(4, dtype=np.float32).reshape(1, 4))
    return [
        ("birth", Birth(card, epoch=1)),
        ("death", Death(epoch=1, reason="lost")),
        ("heartbeat", Heartbeat(epoch=1, load=0.5, queue_depth=2, models=("digits",))),
        ("coordinator_state", CoordinatorState(online=True, epoch=3)),
        (
            "model_manifest",
            ModelManifest(
                "digits",
                2,
                "onnx",
                (BlobInfo("digits.onnx", 3, hashlib.sha256(b"abc").digest(), 1024),),
                pipeline=({"op": "scale", "factor": 0.0625},),
                variants=({"shard": "digits.onnx", "format": "onnx"},),
            ),
        ),
        ("chunk_request", ChunkRequest("digits.onnx", 0, 1024)),
        ("chunk", Chunk("digits.onnx", 0, b"abc", hashlib.sha256(b"abc").digest())),
        ("task", Task("t-1", 0, "digits", _TS + 2000, (tensor,), reply_to="coord")),
        (
            "task_split",
            Task(
                "t-2",
                1,
                "digits-s1",
                _TS + 2000,
                (tensor,),
                reply_to="coord",
                route=(Hop("dev-2", "digits-s2", "int8"), Hop("dev-3", "digits-s3")),
            ),
        ),
        ("result", Result("t-1", 0, (tensor,))),
        ("error", Error("bad_input", "expected shape (1, 64)", task_id="t-1", attempt=0)),
        ("model_status", ModelStatus("digits", 2, "ready", backend="onnx")),
        ("device_config", DeviceConfig(4, {"heartbeat_s": 5.0, "max_batch": 8}, targets=("dev-1",))),
    ]


def _revocation_vectors() -> dict[str, Any]:
    """Kind 13, in a file of its own (``revocation.json``, the same layout as ``envelope.json``).

    The bytes stand for a DER CRL: a real one is signed by the fleet CA, and a receiver verifies
    it against its ``ca.crt`` before it trusts a serial in it.
    """
    message = RevocationList(bytes.fromhex("3082") + b"stands-for-a-der-crl")
    return {"format": "edgespeed-envelope", "version": 1, "cases": [_envelope_case("revocation_list", message)]}


def _envelope_case(name: str, message: Any) -> dict[str, Any]:
    env = Envelope(
        kind=kind_of(message),
        sender="coord",
        recipient="dev-1",
        body=encode_body(message),
        sequence=7,
        timestamp_ms=_TS,
        message_id=_MID,
        correlation_id=_CID,
    )
    return {
        "name": name,
        "hex": encode_envelope(env).hex(),
        "envelope": {
            "kind": int(env.kind),
            "sender": env.sender,
            "recipient": env.recipient,
            "sequence": env.sequence,
            "timestamp_ms": env.timestamp_ms,
            "message_id": env.message_id.hex(),
            "correlation_id": env.correlation_id.hex(),
            "flags": env.flags,
            "body": env.body.hex(),
        },
        "message": jsonable(_to_plain(message)),
    }


def _envelope_vectors() -> dict[str, Any]:
    cases = [_envelope_case(name, message) for name, message in _messages()]
    good = bytes.fromhex(cases[1]["hex"])
    invalid = [
        {"name": "truncated", "hex": good[:40].hex(), "reason": "truncated"},
        {"name": "bad_magic", "hex": (b"XS" + good[2:]).hex(), "reason": "bad_magic"},
        {"name": "unknown_version", "hex": (good[:2] + b"\x09" + good[3:]).hex(), "reason": "unknown_version"},
        {"name": "unknown_kind", "hex": (good[:3] + b"\xee" + good[4:]).hex(), "reason": "unknown_kind"},
        {"name": "unknown_flags", "hex": (good[:4] + b"\x80\x00" + good[6:]).hex(), "reason": "bad_flags"},
        {"name": "trailing_garbage", "hex": (good + b"\x00").hex(), "reason": "trailing"},
        {"name": "body_past_end", "hex": good[:-1].hex(), "reason": "truncated"},
    ]
    return {"format": "edgespeed-envelope", "version": 1, "cases": cases, "invalid": invalid}


def _tensor_vectors() -> dict[str, Any]:
    specs: list[tuple[str, np.ndarray[Any, Any], Encoding, Compression, int | None]] = [
        ("f32_raw", np.array([[0.0, 1.5], [-2.0, 3.25]], dtype=np.float32), Encoding.RAW, Compression.NONE, None),
        ("i64_raw", np.array([1, -2, 3], dtype=np.int64), Encoding.RAW, Compression.NONE, None),
        ("u8_scalar", np.array(200, dtype=np.uint8), Encoding.RAW, Compression.NONE, None),
        ("bool_raw", np.array([True, False, True]), Encoding.RAW, Compression.NONE, None),
        ("f32_as_fp16", np.array([0.5, -1.0, 2.0], dtype=np.float32), Encoding.FP16, Compression.NONE, None),
        ("f32_int8_tensor", np.array([-1.0, 0.0, 0.5, 1.0], dtype=np.float32), Encoding.INT8, Compression.NONE, None),
        (
            "f32_int8_channel",
            np.array([[1.0, -10.0], [0.5, 5.0]], dtype=np.float32),
            Encoding.INT8,
            Compression.NONE,
            1,
        ),
        ("f32_zstd", np.zeros((4, 4), dtype=np.float32), Encoding.RAW, Compression.ZSTD, None),
        ("f32_lz4", np.zeros((4, 4), dtype=np.float32), Encoding.RAW, Compression.LZ4, None),
    ]
    from edgespeed.protocol.tensor import decode_tensor

    cases = []
    for name, array, encoding, compression, axis in specs:
        data = encode_tensor(array, encoding=encoding, compression=compression, axis=axis)
        cases.append(
            {
                "name": name,
                "hex": data.hex(),
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "encoding": encoding.name.lower(),
                "compression": compression.name.lower(),
                "values": array.tolist(),
                "decoded": decode_tensor(data).tolist(),
            }
        )
    head = b"ET\x01\x0b\x00\x00\x01\x00" + (3).to_bytes(4, "big")
    invalid = [
        {
            "name": "length_mismatch",
            "hex": (head + (8).to_bytes(8, "big") + bytes(8)).hex(),
            "reason": "length_mismatch",
        },
        {
            "name": "unknown_dtype",
            "hex": (b"ET\x01\x63\x00\x00\x01\x00" + (1).to_bytes(4, "big") + (4).to_bytes(8, "big") + bytes(4)).hex(),
            "reason": "bad_dtype",
        },
        {"name": "truncated_data", "hex": (head + (12).to_bytes(8, "big") + bytes(11)).hex(), "reason": "truncated"},
        {"name": "trailing_data", "hex": (head + (12).to_bytes(8, "big") + bytes(13)).hex(), "reason": "trailing"},
    ]
    return {"format": "edgespeed-tensor", "version": 1, "cases": cases, "invalid": invalid}


def _chunk_vectors() -> dict[str, Any]:
    blob = bytes(range(256)) * 10  # 2560 bytes
    chunk_size = 1024
    chunks = []
    for offset in range(0, len(blob), chunk_size):
        data = blob[offset : offset + chunk_size]
        request = ChunkRequest("blob.bin", offset, len(data))
        chunk = Chunk("blob.bin", offset, data, hashlib.sha256(data).digest())
        req_env = Envelope(
            kind=kind_of(request),
            sender="dev-1",
            recipient="coord",
            body=encode_body(request),
            sequence=offset // chunk_size,
            timestamp_ms=_TS,
            message_id=_MID,
        )
        chunk_env = Envelope(
            kind=kind_of(chunk),
            sender="coord",
            recipient="dev-1",
            body=encode_body(chunk),
            sequence=offset // chunk_size,
            timestamp_ms=_TS,
            message_id=_CID,
            correlation_id=_MID,
        )
        chunks.append(
            {
                "offset": offset,
                "length": len(data),
                "sha256": chunk.sha256.hex(),
                "request_hex": encode_envelope(req_env).hex(),
                "chunk_hex": encode_envelope(chunk_env).hex(),
            }
        )
    info = BlobInfo("blob.bin", len(blob), hashlib.sha256(blob).digest(), chunk_size)
    return {
        "format": "edgespeed-chunk",
        "version": 1,
        "blob_hex": blob.hex(),
        "info": jsonable(_to_plain(info)),
        "chunks": chunks,
    }


def build_vectors() -> dict[str, dict[str, Any]]:
    """All vector files, by file name."""
    return {
        "envelope.json": _envelope_vectors(),
        "revocation.json": _revocation_vectors(),
        "tensor.json": _tensor_vectors(),
        "chunk.json": _chunk_vectors(),
    }


def write_vectors(directory: Path) -> list[Path]:
    """Write the vector files into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in build_vectors().items():
        path = directory / name
        path.write_text(json.dumps(content, indent=1, sort_keys=False) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_vectors(Path(sys.argv[1] if len(sys.argv) > 1 else "firmware_bridge/vectors")):
        print(written)
