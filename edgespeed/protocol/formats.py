"""The one table of model formats: the file suffix each is published from, and the backends that run it.

A manifest names each variant's format; a coordinator picks formats from file suffixes, places a model
only on devices with a backend for one of its formats, and a device picks the variant and backend it
runs from this table.
"""

from __future__ import annotations

__all__ = ["BACKEND_ORDER", "FORMAT_BACKENDS", "SUFFIX_FORMATS", "backends_for", "format_of"]

# Backends that run each format, in the order a device prefers them.
FORMAT_BACKENDS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx",),
    "tflite": ("tflite",),
    "safetensors": ("npu", "torch"),
}
SUFFIX_FORMATS: dict[str, str] = {".onnx": "onnx", ".tflite": "tflite", ".safetensors": "safetensors"}
# A device with no configured preference tries its backends in this order.
BACKEND_ORDER: tuple[str, ...] = ("onnx", "tflite", "npu", "torch")


def backends_for(model_format: str) -> tuple[str, ...]:
    """The backends that run ``model_format`` (none for an unknown format)."""
    return FORMAT_BACKENDS.get(model_format, ())


def format_of(suffix: str) -> str | None:
    """The format a model file with this suffix is published as, or None for an unknown suffix."""
    return SUFFIX_FORMATS.get(suffix)
