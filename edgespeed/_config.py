"""Reading configuration dataclasses from TOML, shared by the agent's and the coordinator's configuration."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgespeed.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["build_config", "read_toml"]


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


C = TypeVar("C")


def build_config(cls: type[C], data: dict[str, Any], path: Path) -> C:
    """A configuration dataclass from TOML data: unknown keys refused, every value checked against the
    field's type (naming the key), ``*_dir`` paths made relative to the file's folder, and every invalid
    value a `ConfigError` that names the file.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = data.keys() - fields.keys()
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        problem = _type_problem(hints[key], value)
        if problem:
            raise ConfigError(f"{path}: {key} = {value!r}: {problem}")
    for key in ("pki_dir", "state_dir"):
        if key in data:
            data[key] = (path.parent / data[key]).resolve()
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _type_problem(hint: Any, value: Any) -> str:
    """What is wrong with ``value`` for a field typed ``hint`` (empty if nothing is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "" if value in args else f"must be one of {', '.join(map(repr, args))}"
    if origin in (types.UnionType, typing.Union):
        return "" if any(not _type_problem(a, value) for a in args) else _type_problem(args[0], value)
    if hint is type(None):
        return "" if value is None else "must be empty"
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return "must be a list"
        return next((f"item {v!r} {p}" for v in value if (p := _type_problem(args[0], v))), "")
    if hint is bool:
        return "" if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        return "" if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if hint in (str, Path):
        return "" if isinstance(value, str) else "must be a string (in quotes)"
    return ""
