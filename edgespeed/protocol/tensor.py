"""Tensor codec: numpy arrays (and torch tensors) to bytes and back.

Layout (header big-endian, element data little-endian; see PROTOCOL.md)::

    off  size   field
    0    2      magic "ET"
    2    1      version (1)
    3    1      dtype code of the decoded tensor (`DTYPES`)
    4    1      encoding: 0 raw, 1 fp16, 2 int8 with scales
    5    1      compression: 0 none, 1 zstd, 2 lz4 (block)
    6    1      ndim (0..8)
    7    1      reserved (0)
    8    4*n    shape, u32 each
    ..          int8 only: axis (u8, 255 = per tensor), count (u32), count * f32 scales
    ..   8      stored length L: bytes of the stored element data, before compression
    ..          the stored data: exactly L bytes, or a compressed form that inflates to L

Decoding checks that shape, dtype and L agree before allocating anything,
inflates at most L bytes, and returns a read-only zero-copy view where the data
is raw and uncompressed.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from edgespeed.errors import MissingDependencyError, PayloadTooLargeError, TensorError

__all__ = [
    "Compression",
    "DEFAULT_MAX_TENSOR_BYTES",
    "DTYPES",
    "Encoding",
    "decode_tensor",
    "encode_tensor",
    "encode_with_codec",
    "nonconformity",
    "tensor_header",
]

DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024
MAX_NDIM = 8
_MAGIC = b"ET"
_VERSION = 1
_HEAD = struct.Struct(">2sBBBBBB")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("?"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<u4"),
    7: np.dtype("<i4"),
    8: np.dtype("<u8"),
    9: np.dtype("<i8"),
    10: np.dtype("<f2"),
    11: np.dtype("<f4"),
    12: np.dtype("<f8"),
}
_CODES = {dt.newbyteorder("=") if dt.byteorder != "|" else dt: code for code, dt in DTYPES.items()}
_FLOAT_CODES = {10, 11, 12}


class Encoding(enum.IntEnum):
    """How element data is stored."""

    RAW = 0
    FP16 = 1
    INT8 = 2


class Compression(enum.IntEnum):
    """Optional byte-level compression of the stored data."""

    NONE = 0
    ZSTD = 1
    LZ4 = 2


def _as_numpy(tensor: Any) -> np.ndarray[Any, Any]:
    if isinstance(tensor, np.ndarray):
        return tensor
    module = type(tensor).__module__
    if module.startswith("torch"):
        return tensor.detach().cpu().numpy()  # type: ignore[no-any-return]
    if isinstance(tensor, np.generic):
        return np.asarray(tensor)
    raise TensorError(f"cannot encode {type(tensor).__name__}; pass a numpy array or torch tensor", reason="bad_type")


def encode_tensor(
    tensor: Any,
    *,
    encoding: Encoding = Encoding.RAW,
    compression: Compression = Compression.NONE,
    axis: int | None = None,
    level: int = 3,
) -> bytes:
    """Encode a numpy array or torch tensor.

    Args:
        tensor: the array; any numpy dtype in `DTYPES`.
        encoding: `Encoding.FP16` and `Encoding.INT8` are lossy and need a float array.
        compression: zstd or lz4 over the stored bytes.
        axis: for INT8, the channel axis of per-channel scales (None: one scale).
        level: compression level.

    Raises:
        TensorError: unsupported dtype, too many dimensions, or a lossy
            encoding asked of a non-float array.
        MissingDependencyError: the compressor is not installed.
    """
    array = _as_numpy(tensor)
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder not in "|=" else array.dtype
    code = _CODES.get(native)
    if code is None:
        raise TensorError(f"unsupported dtype {array.dtype}", reason="bad_dtype")
    if array.ndim > MAX_NDIM:
        raise TensorError(f"{array.ndim} dimensions, at most {MAX_NDIM}", reason="bad_shape")
    if any(d > 0xFFFFFFFF for d in array.shape):
        raise TensorError("a dimension exceeds 2**32-1", reason="bad_shape")
    extra = b""
    if encoding == Encoding.RAW:
        stored = np.ascontiguousarray(array, dtype=DTYPES[code])
    elif code not in _FLOAT_CODES:
        raise TensorError(f"{encoding.name} encoding needs a float tensor, got {array.dtype}", reason="bad_dtype")
    elif encoding == Encoding.FP16:
        stored = np.ascontiguousarray(array, dtype="<f2")
    else:
        stored, extra = _quantize(array, axis)
    raw = memoryview(cast(Any, stored)).cast("B")  # stored is C-contiguous: no copy
    payload = _compress(raw, compression, level)
    head = _HEAD.pack(_MAGIC, _VERSION, code, int(encoding), int(compression), array.ndim, 0)
    shape = b"".join(_U32.pack(d) for d in array.shape)
    return b"".join((head, shape, extra, _U64.pack(len(raw)), payload))


def _quantize(array: np.ndarray[Any, Any], axis: int | None) -> tuple[np.ndarray[Any, Any], bytes]:
    x = np.asarray(array, dtype=np.float32)
    if not np.isfinite(x).all():
        raise TensorError("INT8 encoding needs finite values", reason="bad_value")
    if axis is None:
        amax = np.abs(x).max(initial=0.0)
        scales = np.array([amax / 127.0 if amax > 0 else 1.0], dtype=np.float32)
        q = np.rint(x / scales[0])
        axis_byte = 255
    else:
        if not 0 <= axis < x.ndim:
            raise TensorError(f"axis {axis} out of range for {x.ndim} dimensions", reason="bad_shape")
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        amax = np.abs(x).max(axis=reduce, initial=0.0)
        scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * x.ndim
        shape[axis] = -1
        q = np.rint(x / scales.reshape(shape))
        axis_byte = axis
    stored = np.clip(q, -127, 127).astype("i1")
    extra = bytes((axis_byte,)) + _U32.pack(len(scales)) + scales.astype(">f4").tobytes()
    return stored, extra


def _compress(raw: bytes | memoryview, compression: Compression, level: int) -> bytes | memoryview:
    if compression == Compression.NONE:
        return raw
    if compression == Compression.ZSTD:
        zstd = _zstd()
        return zstd.ZstdCompressor(level=level, write_content_size=True).compress(raw)  # type: ignore[no-any-return]
    if compression == Compression.LZ4:
        return _lz4().compress(raw, store_size=False)  # type: ignore[no-any-return]
    raise TensorError(f"unknown compression {compression}", reason="bad_compression")


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise MissingDependencyError("zstandard", "zstd") from exc
    return zstandard


def _lz4() -> Any:
    try:
        import lz4.block
    except ImportError as exc:
        raise MissingDependencyError("lz4", "lz4") from exc
    return lz4.block


def tensor_header(data: bytes | bytearray | memoryview) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """The dtype and shape an encoded tensor declares, read from its header alone (nothing is inflated).

    Raises:
        TensorError: truncated, bad magic or version, unknown dtype, or too many dimensions.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(view) < _HEAD.size:
        raise TensorError(f"truncated tensor ({len(view)} bytes)", reason="truncated")
    magic, version, code, _, _, ndim, _ = _HEAD.unpack_from(view, 0)
    if magic != _MAGIC or version != _VERSION:
        raise TensorError("not an EdgeSpeed v1 tensor", reason="bad_magic")
    if code not in DTYPES:
        raise TensorError(f"unknown dtype code {code}", reason="bad_dtype")
    if ndim > MAX_NDIM or _HEAD.size + 4 * ndim > len(view):
        raise TensorError(f"bad or truncated shape ({ndim} dimensions)", reason="bad_shape")
    shape = tuple(_U32.unpack_from(view, _HEAD.size + 4 * i)[0] for i in range(ndim))
    return DTYPES[code].newbyteorder("=") if DTYPES[code].byteorder != "|" else DTYPES[code], shape


def nonconformity(
    outputs: Sequence[bytes | bytearray | memoryview],
    declared: Sequence[Mapping[str, Any]],
    *,
    rows: int,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> str | None:
    """Why encoded ``outputs`` do not match a model's ``declared`` outputs (see `ModelManifest.outputs`),
    or None if they do. Only headers are read: nothing is inflated.

    A declared dimension of -1 follows the input: as the first dimension it may be at most ``rows``
    (the request's batch); each output may declare at most ``max_bytes``.
    """
    if len(outputs) != len(declared):
        return f"{len(outputs)} outputs where the model declares {len(declared)}"
    for i, (data, spec) in enumerate(zip(outputs, declared, strict=True)):
        try:
            dtype, shape = tensor_header(data)
        except TensorError as exc:
            return f"output {i}: {exc}"
        want = tuple(spec["shape"])
        if dtype != np.dtype(spec["dtype"]) or len(shape) != len(want):
            return f"output {i} is {dtype.name}{list(shape)}, the model declares {spec['dtype']}{list(want)}"
        for axis, (got, expected) in enumerate(zip(shape, want, strict=True)):
            if (expected >= 0 and got != expected) or (expected < 0 and axis == 0 and got > rows):
                return f"output {i} has shape {list(shape)}, the model declares {list(want)} for {rows} rows"
        if math.prod(shape) * dtype.itemsize > max_bytes:
            return f"output {i} declares {math.prod(shape) * dtype.itemsize} bytes, over {max_bytes}"
    return None


def decode_tensor(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    as_torch: bool = False,
) -> Any:
    """Decode a tensor; a numpy array by default, a torch tensor with ``as_torch``.

    Raises:
        TensorError: truncated, bad magic or version, unknown dtype, encoding or
            compression, shape and length disagreeing, trailing bytes, or a
            compressed payload that does not inflate to exactly its declared size.
        PayloadTooLargeError: the declared size is over ``max_bytes``
            (checked before any allocation).
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    size = len(view)
    if size < _HEAD.size + _U64.size:
        raise TensorError(f"truncated tensor ({size} bytes)", reason="truncated")
    magic, version, code, enc, comp, ndim, reserved = _HEAD.unpack_from(view, 0)
    if magic != _MAGIC:
        raise TensorError("bad magic: not an EdgeSpeed tensor", reason="bad_magic")
    if version != _VERSION:
        raise TensorError(f"unsupported tensor version {version}", reason="unknown_version")
    if code not in DTYPES:
        raise TensorError(f"unknown dtype code {code}", reason="bad_dtype")
    try:
        encoding, compression = Encoding(enc), Compression(comp)
    except ValueError:
        raise TensorError(f"unknown encoding {enc} or compression {comp}", reason="bad_encoding") from None
    if ndim > MAX_NDIM or reserved:
        raise TensorError(f"bad ndim {ndim} or reserved byte", reason="bad_shape")
    pos = _HEAD.size
    if pos + 4 * ndim > size:
        raise TensorError("truncated shape", reason="truncated")
    shape = tuple(_U32.unpack_from(view, pos + 4 * i)[0] for i in range(ndim))
    pos += 4 * ndim
    count = math.prod(shape)
    dtype = DTYPES[code]
    if encoding != Encoding.RAW and code not in _FLOAT_CODES:
        raise TensorError(f"{encoding.name} encoding of a non-float dtype", reason="bad_encoding")
    scales = None
    axis = None
    if encoding == Encoding.INT8:
        scales, axis, pos = _read_scales(view, pos, shape)
    stored_dtype = {Encoding.RAW: dtype, Encoding.FP16: np.dtype("<f2"), Encoding.INT8: np.dtype("i1")}[encoding]
    if count * dtype.itemsize > max_bytes or count * stored_dtype.itemsize > max_bytes:
        raise PayloadTooLargeError(count * dtype.itemsize, max_bytes, what="tensor")
    if pos + _U64.size > size:
        raise TensorError("truncated: stored length missing", reason="truncated")
    (stored_len,) = _U64.unpack_from(view, pos)
    pos += _U64.size
    if stored_len != count * stored_dtype.itemsize:
        raise TensorError(
            f"shape {shape} of {stored_dtype} needs {count * stored_dtype.itemsize} bytes, header says {stored_len}",
            reason="length_mismatch",
        )
    payload = view[pos:]
    raw = _decompress(payload, compression, stored_len)
    flat = np.frombuffer(raw, dtype=stored_dtype, count=count)
    if encoding == Encoding.RAW:
        array = flat.reshape(shape)
    elif encoding == Encoding.FP16:
        array = flat.reshape(shape).astype(dtype.newbyteorder("="))
    else:
        assert scales is not None
        q = flat.reshape(shape).astype(np.float32)
        if axis is None:
            deq = q * scales[0]
        else:
            bshape = [1] * len(shape)
            bshape[axis] = -1
            deq = q * scales.reshape(bshape)
        array = deq.astype(dtype.newbyteorder("="), copy=False)
    if as_torch:
        return _to_torch(array)
    return array


def _read_scales(view: memoryview, pos: int, shape: tuple[int, ...]) -> tuple[np.ndarray[Any, Any], int | None, int]:
    if pos + 5 > len(view):
        raise TensorError("truncated int8 parameters", reason="truncated")
    axis_byte = view[pos]
    (n,) = _U32.unpack_from(view, pos + 1)
    pos += 5
    if axis_byte == 255:
        axis, expected = None, 1
    elif axis_byte < len(shape):
        axis, expected = axis_byte, shape[axis_byte]
    else:
        raise TensorError(f"int8 axis {axis_byte} out of range", reason="bad_shape")
    if n != expected:
        raise TensorError(f"{n} int8 scales, expected {expected}", reason="length_mismatch")
    if pos + 4 * n > len(view):
        raise TensorError("truncated int8 scales", reason="truncated")
    scales = np.frombuffer(view, dtype=">f4", count=n, offset=pos).astype(np.float32)
    if not np.isfinite(scales).all():
        raise TensorError("int8 scales must be finite", reason="bad_value")
    return scales, axis, pos + 4 * n


def _decompress(payload: memoryview, compression: Compression, stored_len: int) -> bytes | memoryview:
    if compression == Compression.NONE:
        if len(payload) != stored_len:
            kind = "trailing" if len(payload) > stored_len else "truncated"
            raise TensorError(f"{len(payload)} data bytes, header says {stored_len}", reason=kind)
        return payload
    try:
        if compression == Compression.ZSTD:
            zstd = _zstd()
            # A frame that declares its size is inflated to that size whatever
            # max_output_size says, so the declared size is checked first.
            declared = zstd.frame_content_size(bytes(payload[:18]))
            if declared not in (-1, stored_len):
                reason = "bomb" if declared > stored_len else "length_mismatch"
                raise TensorError(f"zstd frame declares {declared} bytes, header says {stored_len}", reason=reason)
            raw = cast(
                bytes,
                zstd.ZstdDecompressor().decompress(payload, max_output_size=stored_len, allow_extra_data=False),
            )
        else:
            raw = cast(bytes, _lz4().decompress(bytes(payload), uncompressed_size=stored_len))
    except TensorError:
        raise
    except Exception as exc:
        raise TensorError(f"corrupt {compression.name.lower()} data: {exc}", reason="bad_compression") from exc
    if len(raw) != stored_len:
        reason = "bomb" if len(raw) > stored_len else "length_mismatch"
        raise TensorError(f"inflated to {len(raw)} bytes, header says {stored_len}", reason=reason)
    return raw


def _to_torch(array: np.ndarray[Any, Any]) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch") from exc
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def encode_with_codec(tensor: Any, codec: str) -> bytes:
    """Encode with a named activation codec: ``""`` (as is), ``fp16``, ``int8`` (one scale),
    ``int8c`` (a scale per channel, axis 1), optionally followed by ``+zstd`` or ``+lz4``.

    Integer tensors travel as they are whatever the codec: only floats are lossy-encoded.

    Raises:
        TensorError: an unknown codec.
    """
    name, _, packer = codec.partition("+")
    encodings = {"": Encoding.RAW, "fp16": Encoding.FP16, "int8": Encoding.INT8, "int8c": Encoding.INT8}
    compressions = {"": Compression.NONE, "zstd": Compression.ZSTD, "lz4": Compression.LZ4}
    if name not in encodings or packer not in compressions:
        raise TensorError(f"unknown activation codec {codec!r}", reason="bad_codec")
    array = _as_numpy(tensor)
    encoding = encodings[name] if array.dtype.kind == "f" else Encoding.RAW
    axis = 1 if name == "int8c" and array.ndim > 1 and encoding is Encoding.INT8 else None
    return encode_tensor(array, encoding=encoding, compression=compressions[packer], axis=axis)
