"""Small real ONNX models, built with ``onnx.helper`` (the ``onnx`` extra), to publish to a harness fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.errors import MissingDependencyError

__all__ = ["affine_onnx", "big_onnx", "identity_onnx"]

_OPSET, _IR_VERSION = 17, 8


def _onnx() -> None:
    """Raise a clear error without the ``onnx`` package."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx") from exc


def _save(graph: Any, path: Path) -> Path:
    from onnx import helper, save

    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION), str(path))
    return Path(path)


def identity_onnx(path: Path) -> Path:
    """A model that returns its input: ``x`` (n, m) uint8 to ``y``; an echo backend."""
    _onnx()
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "echo",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", "m"])],
    )
    return _save(graph, path)


def affine_onnx(path: Path, *, scale: float = 2.0, bias: float = 1.0) -> Path:
    """A tiny model that computes: ``y = x * scale + bias``, ``x`` (n, m) float32."""
    _onnx()
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["scaled"]), helper.make_node("Add", ["scaled", "bias"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m"])],
        [
            numpy_helper.from_array(np.array(scale, np.float32), "scale"),
            numpy_helper.from_array(np.array(bias, np.float32), "bias"),
        ],
    )
    return _save(graph, path)


def big_onnx(path: Path, mib: int) -> Path:
    """A real ONNX model of ``mib`` MiB: one MatMul with random (incompressible) float32 weights."""
    _onnx()
    from onnx import TensorProto, helper, numpy_helper

    side = int((mib * 2**20 / 4) ** 0.5)
    weights = np.random.default_rng(0).standard_normal((side, side), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", side])],
        [numpy_helper.from_array(weights, "w")],
    )
    return _save(graph, path)
