import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgespeed.errors import DecodeError, PayloadTooLargeError, ProtocolError, TopicError
from edgespeed.protocol._body import decode_body, encode_body
from edgespeed.protocol.envelope import (
    FLAG_SEALED,
    Envelope,
    decode_envelope,
    encode_envelope,
    open_message,
    pack_message,
)
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
    ModelStatus,
    Result,
    Task,
)

CARD = DeviceCard("dev-1", "x86_64", "linux", "0.1.0", 2, 24 << 30, ("onnx",), ("cpu",), {"site": "lab"})
SAMPLES = [
    Birth(CARD, epoch=7),
    Death(epoch=7, reason="lost"),
    Heartbeat(epoch=7, load=0.25, queue_depth=3, models=("digits",)),
    CoordinatorState(online=True, epoch=2),
    ModelManifest(
        "digits",
        3,
        "onnx",
        (BlobInfo("digits.onnx", 1234, bytes(32), 65536),),
        pipeline=({"op": "scale", "factor": 0.0625},),
        variants=({"shard": "digits.onnx", "format": "onnx"},),
    ),
    ChunkRequest("digits.onnx", 65536, 65536),
    Chunk("digits.onnx", 0, b"\x01\x02", bytes(32)),
    Task("t-1", 0, "digits", 1_800_000_000_000, (b"tensor",), reply_to="coord"),
    Result("t-1", 0, (b"out",)),
    Error("deadline", "deadline passed", task_id="t-1", attempt=1),
    ModelStatus("digits", 3, "failed", reason="rollback"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: object) -> None:
    data = pack_message(message, sender="coord", recipient="dev-1", sequence=42)  # type: ignore[arg-type]
    envelope, decoded = open_message(data)
    assert decoded == message
    assert (envelope.sender, envelope.recipient, envelope.sequence) == ("coord", "dev-1", 42)


def _envelope(**kw: object) -> Envelope:
    base: dict[str, object] = dict(kind=MessageKind.DEATH, sender="dev-1", body=encode_body(Death(1)))
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_header_is_everything_before_the_body() -> None:
    env = _envelope(recipient="coord", correlation_id=b"c" * 16)
    data = encode_envelope(env)
    assert data == env.header() + env.body
    assert decode_envelope(data) == env


def test_every_truncation_is_a_decode_error() -> None:
    data = encode_envelope(_envelope())
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_envelope(data[:n])


def test_trailing_garbage_is_refused() -> None:
    with pytest.raises(DecodeError, match="trailing"):
        decode_envelope(encode_envelope(_envelope()) + b"\x00")


def test_body_length_past_the_end_is_refused() -> None:
    data = bytearray(encode_envelope(_envelope()))
    body_len_at = len(data) - len(_envelope().body) - 4
    struct.pack_into(">I", data, body_len_at, 0xFFFFFFFF)
    with pytest.raises(DecodeError, match="past the end"):
        decode_envelope(bytes(data))


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [(0, 0x00, "bad_magic"), (2, 2, "unknown_version"), (3, 200, "unknown_kind"), (4, 0x80, "bad_flags")],
)
def test_bad_fixed_fields(offset: int, value: int, reason: str) -> None:
    data = bytearray(encode_envelope(_envelope()))
    data[offset] = value
    with pytest.raises(DecodeError) as info:
        decode_envelope(bytes(data))
    assert info.value.reason == reason


def test_sender_with_wildcard_is_refused() -> None:
    data = bytearray(encode_envelope(_envelope(sender="dev-a")))
    data[55 + 3] = ord("+")
    with pytest.raises(TopicError):
        decode_envelope(bytes(data))


def test_over_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(PayloadTooLargeError):
        decode_envelope(b"\x00" * 1001, max_size=1000)


def test_sealed_body_is_not_opened_as_plaintext() -> None:
    data = encode_envelope(_envelope(flags=FLAG_SEALED))
    assert decode_envelope(data).sealed
    with pytest.raises(DecodeError, match="sealed"):
        open_message(data)


@pytest.mark.parametrize(
    "body",
    [
        {"epoch": 1, "reason": "x", "extra": 1},  # unknown field
        {"reason": "x"},  # missing field
        {"epoch": "1"},  # wrong type
        {"epoch": True},  # bool is not an int
        {"epoch": -1},  # out of range
        {"epoch": 1.5},  # a float is not an int
        [1, "x"],  # not a map
    ],
)
def test_body_is_strict(body: object) -> None:
    with pytest.raises(DecodeError):
        decode_body(Death, msgpack.packb(body))


def test_ext_types_and_trailing_bytes_in_body_are_refused() -> None:
    with pytest.raises(DecodeError):
        decode_body(Death, msgpack.packb({"epoch": msgpack.ExtType(1, b"x")}))
    with pytest.raises(DecodeError):
        decode_body(Death, msgpack.packb({"epoch": 1}) + b"\x00")


def test_semantic_checks_run_on_decode() -> None:
    bad_chunk = {"blob_id": "../etc/passwd", "offset": 0, "data": b"", "sha256": bytes(32)}
    with pytest.raises(ProtocolError):
        decode_body(Chunk, msgpack.packb(bad_chunk))
    nan_load = {"epoch": 1, "load": float("nan"), "queue_depth": 0}
    with pytest.raises(DecodeError):
        decode_body(Heartbeat, msgpack.packb(nan_load))


ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)


@pytest.mark.fuzz
@given(
    sender=ids,
    recipient=st.one_of(st.just(""), ids),
    sequence=st.integers(0, 2**64 - 1),
    ts=st.integers(0, 2**64 - 1),
    body=st.binary(max_size=300),
    flags=st.sampled_from([0, FLAG_SEALED]),
    kind=st.sampled_from(list(MessageKind)),
)
def test_envelope_round_trip_property(
    sender: str, recipient: str, sequence: int, ts: int, body: bytes, flags: int, kind: MessageKind
) -> None:
    env = Envelope(
        kind=kind, sender=sender, recipient=recipient, body=body, sequence=sequence, timestamp_ms=ts, flags=flags
    )
    assert decode_envelope(encode_envelope(env)) == env


@pytest.mark.fuzz
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_protocol_errors(data: bytes) -> None:
    try:
        open_message(data)
    except ProtocolError:
        pass


@pytest.mark.fuzz
@given(st.data())
def test_bit_flips_never_crash_the_decoder(data: st.DataObject) -> None:
    message = data.draw(st.sampled_from(SAMPLES))
    raw = bytearray(pack_message(message, sender="coord"))  # type: ignore[arg-type]
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        open_message(bytes(raw))
    except ProtocolError:
        pass


def test_deeply_nested_values_are_a_decode_error_not_a_recursion_error() -> None:
    """Before: ~600 levels of nesting in a manifest's pipeline raised RecursionError (untyped)."""
    from edgespeed.protocol.messages import BlobInfo, ModelManifest

    deep: object = 1
    for _ in range(600):
        deep = [deep]
    manifest = ModelManifest("m", 1, "onnx", (BlobInfo("m.onnx", 1, bytes(32), 1),))
    body = msgpack.unpackb(encode_body(manifest))
    body["pipeline"] = [{"op": "scale", "factor": deep}]
    with pytest.raises(DecodeError, match="nested deeper"):
        decode_body(ModelManifest, msgpack.packb(body))
    shallow = [[[1.0]]]
    body["pipeline"] = [{"op": "scale", "factor": shallow}]
    assert decode_body(ModelManifest, msgpack.packb(body)).pipeline[0]["factor"] == (((1.0,),),)
