"""The committed test vectors in firmware_bridge/vectors/ match the Python codecs, both ways."""

import json
from pathlib import Path

import numpy as np
import pytest

from edgespeed.errors import ProtocolError
from edgespeed.protocol._body import _to_plain
from edgespeed.protocol.blob import BlobAssembler
from edgespeed.protocol.envelope import decode_envelope, open_message
from edgespeed.protocol.messages import BlobInfo, Chunk
from edgespeed.protocol.tensor import decode_tensor
from edgespeed.protocol.vectors import build_vectors, jsonable
from tests.conftest import ROOT

VECTORS = ROOT / "firmware_bridge" / "vectors"


def load(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((VECTORS / name).read_text())


def test_committed_vectors_are_what_the_generator_writes() -> None:
    for name, content in build_vectors().items():
        assert load(name) == json.loads(json.dumps(content)), f"{name} is stale: run make vectors"


def test_envelope_vectors_decode() -> None:
    vectors = load("envelope.json")
    assert len(vectors["cases"]) == 13  # every kind, and a task carrying a route
    for case in vectors["cases"]:
        envelope, message = open_message(bytes.fromhex(case["hex"]))
        e = case["envelope"]
        assert (int(envelope.kind), envelope.sender, envelope.recipient, envelope.sequence) == (
            e["kind"],
            e["sender"],
            e["recipient"],
            e["sequence"],
        )
        assert envelope.message_id.hex() == e["message_id"] and envelope.correlation_id.hex() == e["correlation_id"]
        assert envelope.body.hex() == e["body"]
        assert jsonable(_to_plain(message)) == case["message"]
    for case in vectors["invalid"]:
        with pytest.raises(ProtocolError) as info:
            decode_envelope(bytes.fromhex(case["hex"]))
        assert info.value.reason == case["reason"], case["name"]


def test_tensor_vectors_decode() -> None:
    vectors = load("tensor.json")
    for case in vectors["cases"]:
        array = decode_tensor(bytes.fromhex(case["hex"]))
        assert list(array.shape) == case["shape"] and str(array.dtype) == case["dtype"]
        np.testing.assert_array_equal(array, np.array(case["decoded"], dtype=case["dtype"]))
        np.testing.assert_allclose(array.astype(float), np.array(case["values"], dtype=float), atol=0.05)
    for case in vectors["invalid"]:
        with pytest.raises(ProtocolError) as info:
            decode_tensor(bytes.fromhex(case["hex"]))
        assert info.value.reason == case["reason"], case["name"]


def test_chunk_vectors_reassemble_the_blob(tmp_path: Path) -> None:
    vectors = load("chunk.json")
    blob = bytes.fromhex(vectors["blob_hex"])
    i = vectors["info"]
    info = BlobInfo(i["name"], i["size"], bytes.fromhex(i["sha256"]["hex"]), i["chunk_size"])
    assembler = BlobAssembler(info, tmp_path / "blob", window=len(vectors["chunks"]))
    requests = assembler.requests(now=0.0)
    for case, request in zip(vectors["chunks"], requests, strict=True):
        _, sent = open_message(bytes.fromhex(case["request_hex"]))
        assert sent == request
        _, chunk = open_message(bytes.fromhex(case["chunk_hex"]))
        assert isinstance(chunk, Chunk) and chunk.sha256.hex() == case["sha256"]
        assert assembler.accept(chunk)
    assert assembler.finish().read_bytes() == blob
