import struct

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgespeed.errors import PayloadTooLargeError, ProtocolError, TensorError
from edgespeed.protocol.tensor import DTYPES, Compression, Encoding, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [dt.newbyteorder("=") for dt in DTYPES.values()], ids=str)
@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.name)
def test_lossless_round_trip_of_every_dtype(dtype: np.dtype, compression: Compression) -> None:
    rng = np.random.default_rng(0)
    array = (rng.random((3, 5, 2)) * 100).astype(dtype)
    decoded = decode_tensor(encode_tensor(array, compression=compression))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_raw_decode_is_zero_copy_and_read_only() -> None:
    data = encode_tensor(np.arange(1000, dtype=np.float32))
    decoded = decode_tensor(data)
    assert not decoded.flags.writeable
    assert decoded.base is not None  # a view over the message bytes, not a copy


def test_non_contiguous_and_scalar_arrays() -> None:
    a = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    np.testing.assert_array_equal(decode_tensor(encode_tensor(a)), a)
    s = np.float64(3.5)
    assert decode_tensor(encode_tensor(s)).shape == ()


def test_fp16_and_int8_forms_are_close_and_smaller() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    raw = encode_tensor(x)
    half = encode_tensor(x, encoding=Encoding.FP16)
    q = encode_tensor(x, encoding=Encoding.INT8)
    qc = encode_tensor(x, encoding=Encoding.INT8, axis=1)
    assert len(half) < 0.55 * len(raw) and len(q) < 0.3 * len(raw)
    np.testing.assert_allclose(decode_tensor(half), x, atol=2e-3)
    for data in (q, qc):
        y = decode_tensor(data)
        assert y.dtype == np.float32
        assert np.abs(y - x).max() <= np.abs(x).max() / 127 * 0.51 + 1e-6
    # Per-channel scales do at least as well as one scale on channels of different ranges.
    x[:, 0] *= 100
    err_t = np.abs(decode_tensor(encode_tensor(x, encoding=Encoding.INT8)) - x)[:, 1:].max()
    err_c = np.abs(decode_tensor(encode_tensor(x, encoding=Encoding.INT8, axis=1)) - x)[:, 1:].max()
    assert err_c < err_t / 10


def test_lossy_forms_need_floats() -> None:
    with pytest.raises(TensorError):
        encode_tensor(np.arange(4), encoding=Encoding.INT8)
    with pytest.raises(TensorError):
        encode_tensor(np.array([1.0, np.nan], dtype=np.float32), encoding=Encoding.INT8)


def test_unsupported_inputs() -> None:
    with pytest.raises(TensorError):
        encode_tensor(np.array(["a"]))
    with pytest.raises(TensorError):
        encode_tensor([1, 2, 3])
    with pytest.raises(TensorError):
        encode_tensor(np.zeros((1,) * 9))


def _header(shape: tuple[int, ...], stored_len: int, code: int = 11, enc: int = 0, comp: int = 0) -> bytes:
    head = struct.pack(">2sBBBBBB", b"ET", 1, code, enc, comp, len(shape), 0)
    return head + b"".join(struct.pack(">I", d) for d in shape) + struct.pack(">Q", stored_len)


def test_shape_and_length_must_agree() -> None:
    with pytest.raises(TensorError) as info:
        decode_tensor(_header((2, 3), 20) + bytes(20))
    assert info.value.reason == "length_mismatch"
    with pytest.raises(TensorError):
        decode_tensor(_header((2, 3), 24) + bytes(23))
    with pytest.raises(TensorError):
        decode_tensor(_header((2, 3), 24) + bytes(25))


def test_huge_declared_shape_is_refused_before_allocation() -> None:
    with pytest.raises(PayloadTooLargeError):
        decode_tensor(_header((0xFFFFFFFF,) * 8, 16) + bytes(16))
    with pytest.raises(PayloadTooLargeError):
        decode_tensor(_header((1024, 1024), 4 << 20) + bytes(16), max_bytes=1 << 20)


def test_unknown_dtype_encoding_compression_and_version() -> None:
    for data in (_header((1,), 4, code=99), _header((1,), 4, enc=9), _header((1,), 4, comp=9)):
        with pytest.raises(TensorError):
            decode_tensor(data + bytes(4))
    bad_version = bytearray(encode_tensor(np.zeros(1, np.float32)))
    bad_version[2] = 7
    with pytest.raises(TensorError, match="version"):
        decode_tensor(bytes(bad_version))


def test_zstd_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(512 << 20))  # 512 MiB of zeros, ~16 KiB compressed
    assert len(bomb) < 100_000
    with pytest.raises(TensorError) as info:
        decode_tensor(_header((4,), 16, comp=1) + bomb)
    assert info.value.reason == "bomb"
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(TensorError):
        decode_tensor(_header((4,), 16, comp=1) + no_size)


def test_lz4_bomb_and_corrupt_data_are_refused() -> None:
    bomb = lz4.block.compress(bytes(64 << 20), store_size=False)
    with pytest.raises(TensorError):
        decode_tensor(_header((4,), 16, comp=2) + bomb)
    with pytest.raises(TensorError):
        decode_tensor(_header((4,), 16, comp=2) + b"\xff" * 10)


def test_nonfinite_int8_scales_are_refused() -> None:
    data = bytearray(encode_tensor(np.ones(4, np.float32), encoding=Encoding.INT8))
    at = 8 + 4 + 5  # header, one dimension, axis byte and count
    data[at : at + 4] = struct.pack(">f", float("nan"))
    with pytest.raises(TensorError):
        decode_tensor(bytes(data))


@pytest.mark.fuzz
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.int64, np.uint8, np.float16]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=6),
    ),
    st.sampled_from(list(Compression)),
)
def test_round_trip_property(array: np.ndarray, compression: Compression) -> None:
    decoded = decode_tensor(encode_tensor(array, compression=compression))
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.fuzz
@given(st.binary(max_size=120))
def test_garbage_only_ever_raises_protocol_errors(data: bytes) -> None:
    try:
        decode_tensor(b"ET\x01" + data)
    except ProtocolError:
        pass


def test_torch_tensors_round_trip() -> None:
    torch = pytest.importorskip("torch", reason="torch is an optional extra: pip install 'edgespeed[torch]'")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    back = decode_tensor(encode_tensor(t), as_torch=True)
    assert torch.equal(back, t)
