"""Strict msgpack codec between frozen dataclasses and bytes.

A body is a msgpack map keyed by field names. Decoding is strict: no ext
types, no unknown or missing fields, exact types (``bool`` is not an ``int``),
bounded lengths, no trailing bytes. Semantic checks live in each dataclass's
``__post_init__`` and so run on decode too.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import msgpack

from edgespeed.errors import DecodeError, ProtocolError

T = TypeVar("T")

# Free-form values (pipeline steps, options) nest this deep at most: deeper is hostile, and unbounded
# recursion would end in a RecursionError instead of a DecodeError.
MAX_DEPTH = 32

_Converter = Callable[[Any, str], Any]


def _no_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack ext type {code} is not allowed", reason="bad_body")


def encode_body(message: object) -> bytes:
    """Encode a message dataclass as a msgpack map."""
    return msgpack.packb(_to_plain(message), use_bin_type=True)  # type: ignore[no-any-return]


def decode_body(cls: type[T], data: bytes | bytearray | memoryview) -> T:
    """Decode ``data`` as an instance of the message dataclass ``cls``.

    Raises:
        DecodeError: malformed msgpack, trailing bytes, ext types, unknown,
            missing or mistyped fields, or a value its type refuses.
    """
    try:
        plain = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"malformed body: {exc}", reason="bad_body") from exc
    return _converter(cast(Any, cls))(plain, cls.__name__)  # type: ignore[no-any-return]


def _to_plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (f.metadata.get("omit_empty") and not getattr(value, f.name))
        }
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def _fail(path: str, expected: str, value: object) -> DecodeError:
    return DecodeError(f"{path}: expected {expected}, got {type(value).__name__}", reason="bad_body")


@functools.cache
def _converter(tp: Any) -> _Converter:
    """Build (once per type) a function that checks and converts a plain value."""
    if tp is Any or tp is object:
        return _plain_value
    if tp is bool:
        return _exact(bool, "bool")
    if tp is int:
        return _int
    if tp is float:
        return _float
    if tp is str:
        return _exact(str, "str")
    if tp is bytes:
        return _exact(bytes, "bytes")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_converter(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and type(None) in args and len(args) == 2:
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda v, p: None if v is None else inner(v, p)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _converter(args[0])

        def conv_tuple(v: Any, p: str) -> tuple[Any, ...]:
            if not isinstance(v, list):
                raise _fail(p, "array", v)
            return tuple(item(x, f"{p}[{i}]") for i, x in enumerate(v))

        return conv_tuple
    if origin is dict and args[0] is str:
        val = _converter(args[1])

        def conv_dict(v: Any, p: str) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise _fail(p, "map", v)
            return {k: val(x, f"{p}.{k}") for k, x in v.items()}

        return conv_dict
    raise TypeError(f"unsupported field type {tp!r}")  # a programming error, not input


def _exact(kind: type, name: str) -> _Converter:
    def conv(v: Any, p: str) -> Any:
        if type(v) is not kind:
            raise _fail(p, name, v)
        return v

    return conv


def _int(v: Any, p: str) -> int:
    if type(v) is not int:
        raise _fail(p, "int", v)
    return v


def _float(v: Any, p: str) -> float:
    if type(v) is float or type(v) is int:
        return float(v)
    raise _fail(p, "float", v)


def _plain_value(v: Any, p: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise DecodeError(f"{p}: nested deeper than {MAX_DEPTH} levels", reason="bad_body")
    if isinstance(v, list):
        return tuple(_plain_value(x, p, depth + 1) for x in v)
    if isinstance(v, dict):
        return {k: _plain_value(x, p, depth + 1) for k, x in v.items()}
    return v


def _dataclass_converter(cls: type[Any]) -> _Converter:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _converter(hints[f.name]), _has_default(f)) for f in dataclasses.fields(cls)]
    names = {name for name, _, _ in fields}

    def conv(v: Any, p: str) -> Any:
        if not isinstance(v, dict):
            raise _fail(p, "map", v)
        unknown = v.keys() - names
        if unknown:
            raise DecodeError(f"{p}: unknown fields {sorted(map(str, unknown))}", reason="bad_body")
        kwargs = {}
        for name, field_conv, optional in fields:
            if name in v:
                kwargs[name] = field_conv(v[name], f"{p}.{name}")
            elif not optional:
                raise DecodeError(f"{p}: missing field {name!r}", reason="bad_body")
        try:
            return cls(**kwargs)
        except ProtocolError:
            raise
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"{p}: {exc}", reason="bad_body") from exc

    return conv


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
