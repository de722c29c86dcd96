"""Variants of one model at several precisions, and telling a file's precision.

A manifest's variants may carry a ``precision`` (``fp32``, ``fp16``, ``int8``); each device runs the
variant its preference ranks first (``AgentConfig.precisions``, or its hardware's default: see
`edgespeed.hardware.detect.preferred_precisions`). `make_variants` makes them from one ONNX model, as
``model publish --optimize int8,fp16`` does; `precision_of` reads what a file is, as publishing does.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgespeed.errors import MissingDependencyError, OptimizeError
from edgespeed.optimize.data import PRECISION_KEY, Progress
from edgespeed.optimize.report import OptimizeReport

__all__ = ["PRECISIONS", "make_variants", "precision_of"]

PRECISIONS = ("fp32", "fp16", "int8")

_INT8_OPS = {
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
}
_SAFETENSORS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "I8": "int8", "U8": "int8"}


def precision_of(path: Path | str) -> str:
    """``fp32``, ``fp16`` or ``int8`` for an ONNX or safetensors file; "" when it cannot tell.

    An ONNX model says it in its metadata (``edgespeed.precision``, written by `edgespeed.optimize`);
    otherwise quantised ops mean int8, float16 weights fp16, and anything else fp32.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_precision(path)
    if path.suffix != ".onnx":
        return ""
    try:
        import onnx
    except ImportError:
        return ""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not readable as ONNX: publishing's own checks report it
        return ""
    for prop in model.metadata_props:
        if prop.key == PRECISION_KEY and prop.value in PRECISIONS:
            return str(prop.value)
    if any(n.op_type in _INT8_OPS for n in model.graph.node):
        return "int8"
    types = {t.data_type for t in model.graph.initializer}
    if onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types:
        return "fp16"
    return "fp32"


def _safetensors_precision(path: Path) -> str:
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                return ""
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return ""
    dtypes = {str(v.get("dtype")) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    found = {_SAFETENSORS[d] for d in dtypes if d in _SAFETENSORS}
    for precision in ("int8", "fp16", "fp32"):
        if precision in found:
            return precision
    return ""


def make_variants(
    model: Path | str,
    precisions: Sequence[str],
    folder: Path | str,
    *,
    calibration: Any = None,
    per_channel: bool = False,
    latency: bool = False,
    progress: Progress | None = None,
) -> list[tuple[Path, str, OptimizeReport | None]]:
    """The model itself (its own precision, first: what a device without a preference runs) and one
    variant per precision asked for: ``int8`` (static with ``calibration``, dynamic without), ``fp16``.

    Returns (file, precision, report; None for the original) per variant, written to ``folder``.

    Raises:
        OptimizeError: an unknown precision, or what `edgespeed.optimize.quantize` raises.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    from edgespeed.optimize.quantization import quantize

    source = Path(model)
    if source.suffix != ".onnx":
        raise OptimizeError(f"{source}: variants are made from an .onnx model", reason="unsupported")
    wanted = list(dict.fromkeys(p.strip().lower() for p in precisions if p.strip()))
    unknown = [p for p in wanted if p not in PRECISIONS]
    if unknown:
        raise OptimizeError(
            f"unknown precision {', '.join(unknown)}; use {', '.join(PRECISIONS)}", reason="unsupported"
        )
    own = precision_of(source)
    if not own:
        raise MissingDependencyError("onnx", "onnx")
    folder = Path(folder)
    variants: list[tuple[Path, str, OptimizeReport | None]] = [(source, own, None)]
    for precision in wanted:
        if precision == own:
            continue
        if precision == "fp32":
            raise OptimizeError(f"{source} is {own}: an fp32 variant cannot be made from it", reason="unsupported")
        report = quantize(
            source,
            precision="int8" if precision == "int8" else "fp16",
            output=folder / f"{source.stem}.{precision}.onnx",
            calibration=calibration if precision == "int8" else None,
            per_channel=per_channel,
            latency=latency,
            progress=progress,
        )
        variants.append((Path(report.output), precision, report))
    return variants
