"""The inference engine: the `Backend` interface, its registry, and the built-in backends.

Backends are imported lazily by name (`backend_class`), so installing only
``edgespeed[onnx]`` never imports torch.
"""

from edgespeed.engine.base import Backend, ModelSpec
from edgespeed.engine.registry import ENTRY_POINT_GROUP, available_backends, backend_class, backend_names

__all__ = [
    "Backend",
    "ENTRY_POINT_GROUP",
    "ModelSpec",
    "available_backends",
    "backend_class",
    "backend_names",
]
