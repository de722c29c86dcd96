"""Finding backends by name: the built-ins, and plugins in the ``edgespeed.backends`` entry-point group.

Built-ins are imported only when asked for, so a gateway that runs ONNX models
never imports torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from edgespeed.engine.base import Backend
from edgespeed.errors import BackendError, ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_backends",
    "backend_class",
    "backend_names",
]

ENTRY_POINT_GROUP = "edgespeed.backends"
_BUILTIN = {
    "onnx": "edgespeed.engine.onnx:OnnxBackend",
    "torch": "edgespeed.engine.torch:TorchBackend",
    "npu": "edgespeed.engine.npu:NpuBackend",
    "tflite": "edgespeed.engine.tflite:TfliteBackend",
}


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every backend name known here, built-in or plugin, available or not."""
    return sorted({*_BUILTIN, *_plugins()})


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name``.

    Raises:
        ConfigError: no backend has that name.
        BackendError: a plugin that does not load or is not a `Backend`.
    """
    target = _BUILTIN.get(name) or _plugins().get(name)
    if target is None:
        raise ConfigError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"backend {name!r} ({target}) does not load: {exc}", reason="unknown") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"backend {name!r} ({target}) is not an edgespeed Backend", reason="unknown")
    return cls


def available_backends() -> list[str]:
    """Names of the backends whose runtime is installed and usable here."""
    names = []
    for name in backend_names():
        try:
            if backend_class(name).available():
                names.append(name)
        except (BackendError, ConfigError):
            continue
    return names
