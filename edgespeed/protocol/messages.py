"""Message types of the wire protocol, as frozen dataclasses.

Each type has a one-byte kind (`MessageKind`) that the envelope carries. The
body codec (`edgespeed.protocol._body`) turns them into msgpack maps and back;
every ``__post_init__`` check below therefore also guards decoding.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from edgespeed.errors import BlobError, DecodeError, ProtocolError
from edgespeed.protocol.topics import validate_id

__all__ = [
    "BLOB_ID_PATTERN",
    "Birth",
    "BlobInfo",
    "CODECS",
    "Chunk",
    "ChunkRequest",
    "CoordinatorState",
    "Death",
    "DeviceCard",
    "DeviceConfig",
    "Error",
    "Heartbeat",
    "Hop",
    "MAX_CRL_BYTES",
    "Message",
    "MessageKind",
    "ModelManifest",
    "ModelStatus",
    "Result",
    "RevocationList",
    "Task",
    "kind_of",
    "message_class",
    "validate_blob_id",
]

BLOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_U32 = 2**32 - 1
_U64 = 2**64 - 1


def validate_blob_id(value: str) -> str:
    """Return ``value`` if it is a safe blob or shard name (no ``/``, no leading dot).

    Raises:
        BlobError: the name could escape a folder or is not a plain file name.
    """
    if not isinstance(value, str) or BLOB_ID_PATTERN.fullmatch(value) is None or ".." in value:
        raise BlobError(f"invalid blob name {value!r}", reason="bad_blob_id")
    return value


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise DecodeError(f"{name}={value} out of range [{low}, {high}]", reason="bad_body")


def _check_digest(name: str, value: bytes) -> None:
    if len(value) != 32:
        raise DecodeError(f"{name} must be a 32-byte SHA-256 digest", reason="bad_body")


class MessageKind(enum.IntEnum):
    """One byte in the envelope saying what the body is. Never renumber."""

    BIRTH = 1
    DEATH = 2
    HEARTBEAT = 3
    COORDINATOR_STATE = 4
    MODEL_MANIFEST = 5
    CHUNK_REQUEST = 6
    CHUNK = 7
    TASK = 8
    RESULT = 9
    ERROR = 10
    MODEL_STATUS = 11
    DEVICE_CONFIG = 12
    REVOCATION_LIST = 13


@dataclass(frozen=True, slots=True)
class DeviceCard:
    """What a device is and can do, as announced in its birth."""

    device_id: str
    arch: str
    os: str
    software_version: str
    cpu_cores: int
    memory_bytes: int
    backends: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id(self.device_id, "device id")
        _check_range("cpu_cores", self.cpu_cores, 0, 1 << 16)
        _check_range("memory_bytes", self.memory_bytes, 0, _U64)


@dataclass(frozen=True, slots=True)
class Birth:
    """A device joined (retained). ``epoch`` identifies this session of the device."""

    card: DeviceCard
    epoch: int

    def __post_init__(self) -> None:
        _check_range("epoch", self.epoch, 0, _U64)


@dataclass(frozen=True, slots=True)
class Death:
    """A device left; sent as its MQTT will too. Stale if ``epoch`` < the last birth's."""

    epoch: int
    reason: str = "lost"

    def __post_init__(self) -> None:
        _check_range("epoch", self.epoch, 0, _U64)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic liveness and load report of a device."""

    epoch: int
    load: float
    queue_depth: int
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_range("epoch", self.epoch, 0, _U64)
        _check_range("queue_depth", self.queue_depth, 0, _U32)
        if not 0.0 <= self.load <= 1e6:  # also refuses NaN
            raise DecodeError(f"load={self.load} out of range", reason="bad_body")


@dataclass(frozen=True, slots=True)
class CoordinatorState:
    """The coordinator's retained presence."""

    online: bool
    epoch: int

    def __post_init__(self) -> None:
        _check_range("epoch", self.epoch, 0, _U64)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A blob (a model shard, any large payload): name, exact size, SHA-256 and chunk size."""

    name: str
    size: int
    sha256: bytes
    chunk_size: int

    def __post_init__(self) -> None:
        validate_blob_id(self.name)
        _check_range("size", self.size, 0, _U64)
        _check_range("chunk_size", self.chunk_size, 1, _U32)
        _check_digest("sha256", self.sha256)


_OUTPUT_DTYPES = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64"}
)


def check_output_spec(spec: dict[str, Any]) -> None:
    """Check one declared output (``name``, ``dtype``, ``shape``).

    Raises:
        DecodeError: a missing or unknown key, an unknown dtype, or a bad shape.
    """
    if set(spec) != {"name", "dtype", "shape"}:
        raise DecodeError(f"a declared output has keys name, dtype and shape, not {sorted(spec)}", reason="bad_body")
    shape = spec["shape"]
    if not isinstance(spec["name"], str) or spec["dtype"] not in _OUTPUT_DTYPES:
        raise DecodeError(f"bad declared output name or dtype: {spec['name']!r} {spec['dtype']!r}", reason="bad_body")
    if not isinstance(shape, tuple | list) or len(shape) > 8:
        raise DecodeError(f"bad declared output shape {shape!r}", reason="bad_body")
    if not all(type(d) is int and -1 <= d < 1 << 32 for d in shape):
        raise DecodeError(f"bad declared output shape {shape!r}", reason="bad_body")


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """A model version: its shards, pre/post-processing steps and variants.

    ``pipeline`` holds preprocessing steps common to every variant.
    ``variants`` lists the ways to run the model, best first, each a map:
    ``shard`` (a shard name), ``format`` (``onnx``, ``tflite``, ``safetensors``),
    and optionally ``architecture`` and ``options`` (for safetensors), ``pre``
    and ``post`` (steps for this variant). A device runs the first variant its
    backends support. ``keys`` holds the shards' content key wrapped for each
    device that may load them (empty: shards are not encrypted). ``signer``
    and ``signature`` are set by `edgespeed.security.signing.sign_manifest`.
    ``outputs`` declares the model's outputs, in order, each a map ``name``,
    ``dtype`` (a numpy name such as ``float32``) and ``shape`` (``-1`` for a
    dimension that follows the batch): a result that does not match is refused.
    """

    model_id: str
    version: int
    format: str
    shards: tuple[BlobInfo, ...]
    pipeline: tuple[dict[str, Any], ...] = ()
    variants: tuple[dict[str, Any], ...] = ()
    keys: dict[str, bytes] = field(default_factory=dict)
    signer: str = ""
    signature: bytes = b""
    outputs: tuple[dict[str, Any], ...] = field(default=(), metadata={"omit_empty": True})

    def __post_init__(self) -> None:
        validate_blob_id(self.model_id)
        _check_range("version", self.version, 0, _U64)
        for spec in self.outputs:
            check_output_spec(spec)
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise DecodeError("duplicate shard names in manifest", reason="bad_body")
        for variant in self.variants:
            if variant.get("shard") not in names or not isinstance(variant.get("format"), str):
                raise DecodeError("each variant needs a format and one of the manifest's shards", reason="bad_body")


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """Receiver-driven request for ``length`` bytes of a blob from ``offset``."""

    blob_id: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        validate_blob_id(self.blob_id)
        _check_range("offset", self.offset, 0, _U64)
        _check_range("length", self.length, 1, _U32)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes of a blob at ``offset`` with their SHA-256."""

    blob_id: str
    offset: int
    data: bytes
    sha256: bytes

    def __post_init__(self) -> None:
        validate_blob_id(self.blob_id)
        _check_range("offset", self.offset, 0, _U64)
        _check_digest("sha256", self.sha256)


CODECS = ("", "fp16", "int8", "int8c", "fp16+zstd", "fp16+lz4", "int8+zstd", "int8+lz4", "int8c+zstd", "int8c+lz4")


@dataclass(frozen=True, slots=True)
class Hop:
    """A later stage of a split model: the device that runs it, its shard, and how to encode its input."""

    device: str
    model_id: str
    codec: str = ""

    def __post_init__(self) -> None:
        validate_id(self.device, "hop device")
        validate_blob_id(self.model_id)
        if self.codec not in CODECS:
            raise DecodeError(f"unknown activation codec {self.codec!r}", reason="bad_body")


@dataclass(frozen=True, slots=True)
class Task:
    """Run ``model_id`` on ``inputs`` (encoded tensors) before ``deadline_ms`` (Unix ms).

    ``reply_to`` names who gets the result or error (default: the sender). A
    ``route`` lists the stages after this one: the device forwards its outputs
    as the inputs of a new task for ``route[0]``, with the rest of the route and
    the same ``reply_to``; the last stage answers.
    """

    task_id: str
    attempt: int
    model_id: str
    deadline_ms: int
    inputs: tuple[bytes, ...]
    reply_to: str = ""
    route: tuple[Hop, ...] = field(default=(), metadata={"omit_empty": True})

    def __post_init__(self) -> None:
        validate_blob_id(self.task_id)
        validate_blob_id(self.model_id)
        _check_range("attempt", self.attempt, 0, _U32)
        _check_range("deadline_ms", self.deadline_ms, 0, _U64)
        if self.reply_to:
            validate_id(self.reply_to, "reply_to")
        if len(self.route) > 16:
            raise DecodeError("a route has at most 16 stages", reason="bad_body")


@dataclass(frozen=True, slots=True)
class Result:
    """Outputs (encoded tensors) of one attempt of a task."""

    task_id: str
    attempt: int
    outputs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        validate_blob_id(self.task_id)
        _check_range("attempt", self.attempt, 0, _U32)


@dataclass(frozen=True, slots=True)
class Error:
    """A typed failure: ``code`` is a stable reason code, ``message`` human text."""

    code: str
    message: str
    task_id: str = ""
    attempt: int = 0

    def __post_init__(self) -> None:
        if not self.code or len(self.code) > 64:
            raise DecodeError("error code must be 1..64 characters", reason="bad_body")
        if self.task_id:
            validate_blob_id(self.task_id)
        _check_range("attempt", self.attempt, 0, _U32)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A device's report on a model version: ``ready`` (with the backend it runs on) or ``failed``."""

    model_id: str
    version: int
    state: str
    reason: str = ""
    backend: str = ""
    run_ms: float = field(default=0.0, metadata={"omit_empty": True})  # a warm run on the device, if measured

    def __post_init__(self) -> None:
        validate_blob_id(self.model_id)
        _check_range("version", self.version, 0, _U64)
        if not (isinstance(self.run_ms, int | float) and 0 <= self.run_ms < 1e9):
            raise DecodeError("run_ms must be a duration in milliseconds", reason="bad_body")
        if self.state not in ("ready", "failed"):
            raise DecodeError(f"model state must be ready or failed, not {self.state!r}", reason="bad_body")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Remote configuration for devices (retained on ``bcast/config``, signed by a coordinator).

    ``settings`` may hold ``heartbeat_s``, ``max_batch``, ``max_wait_ms`` and
    ``log_level``; ``targets`` names the devices it is for (empty: all).
    A device applies only versions newer than the last it applied.
    """

    version: int
    settings: dict[str, Any]
    targets: tuple[str, ...] = ()
    signer: str = ""
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_range("version", self.version, 0, _U64)
        for target in self.targets:
            validate_id(target, "target")


MAX_CRL_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The fleet CA's certificate revocation list (X.509 CRL, DER), retained on ``bcast/crl``.

    Signed by the fleet CA, so it authenticates itself: a receiver verifies it against its
    ``ca.crt`` (`edgespeed.security.pki.parse_crl`) and refuses every certificate it lists.
    """

    crl: bytes

    def __post_init__(self) -> None:
        if not 0 < len(self.crl) <= MAX_CRL_BYTES:
            raise DecodeError(f"a revocation list holds 1..{MAX_CRL_BYTES} bytes", reason="bad_body")


Message = (
    Birth
    | Death
    | Heartbeat
    | CoordinatorState
    | ModelManifest
    | ChunkRequest
    | Chunk
    | Task
    | Result
    | Error
    | ModelStatus
    | DeviceConfig
    | RevocationList
)

_CLASSES: dict[MessageKind, type[Any]] = {
    MessageKind.BIRTH: Birth,
    MessageKind.DEATH: Death,
    MessageKind.HEARTBEAT: Heartbeat,
    MessageKind.COORDINATOR_STATE: CoordinatorState,
    MessageKind.MODEL_MANIFEST: ModelManifest,
    MessageKind.CHUNK_REQUEST: ChunkRequest,
    MessageKind.CHUNK: Chunk,
    MessageKind.TASK: Task,
    MessageKind.RESULT: Result,
    MessageKind.ERROR: Error,
    MessageKind.MODEL_STATUS: ModelStatus,
    MessageKind.DEVICE_CONFIG: DeviceConfig,
    MessageKind.REVOCATION_LIST: RevocationList,
}
_KINDS = {cls: kind for kind, cls in _CLASSES.items()}


def message_class(kind: int) -> type[Any]:
    """The dataclass for a kind byte.

    Raises:
        DecodeError: unknown kind.
    """
    try:
        return _CLASSES[MessageKind(kind)]
    except ValueError:
        raise DecodeError(f"unknown message kind {kind}", reason="unknown_kind") from None


def kind_of(message: object) -> MessageKind:
    """The kind byte of a message instance.

    Raises:
        ProtocolError: not a protocol message type.
    """
    try:
        return _KINDS[type(message)]
    except KeyError:
        raise ProtocolError(f"{type(message).__name__} is not a protocol message") from None
