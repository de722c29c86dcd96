"""Reading configuration dataclasses from TOML, shared by the agent's and the coordinator's configuration."""

from __future__ import annotations

import dataclasses
import sys
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
    """A configuration dataclass from TOML data: unknown keys refused, ``*_dir`` paths made relative
    to the file's folder, and every invalid value a `ConfigError` that names the file.
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = data.keys() - known
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    for key in ("pki_dir", "state_dir"):
        if key in data:
            data[key] = (path.parent / data[key]).resolve()
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
