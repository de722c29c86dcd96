"""Cutting a model into shards that run one after another on different devices.

An ONNX graph can be cut after any node where exactly one tensor (not a
weight) crosses from the nodes before to the nodes after: that tensor is the
activation a stage forwards. `boundaries` finds those cuts, `split_onnx` cuts
at chosen ones (each shard a valid ONNX model: the first takes the graph's
inputs, the last gives its outputs), `profile_onnx` measures each segment
between consecutive boundaries, and `split_torch` cuts a torch module with
torch.fx and exports each part to ONNX.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.errors import ConfigError, MissingDependencyError
from edgespeed.optimize.data import onnx_module, ort_module

__all__ = [
    "Boundary",
    "Segment",
    "boundaries",
    "onnx_outputs",
    "profile_onnx",
    "sample_inputs",
    "split_onnx",
    "split_torch",
]


@dataclass(frozen=True, slots=True)
class Boundary:
    """A place to cut: after node ``index``, where only ``tensor`` crosses."""

    index: int
    tensor: str
    node: str


@dataclass(frozen=True, slots=True)
class Segment:
    """The nodes between two boundaries, as measured: seconds per run and the bytes of its output."""

    start: str  # the tensor it reads ("" for the model's inputs)
    end: str  # the tensor it writes ("" for the model's outputs)
    seconds: float
    out_bytes: int


def _load(model: Any) -> Any:
    onnx = onnx_module()
    if isinstance(model, str | Path):
        model = onnx.load(str(model))
    elif isinstance(model, bytes | bytearray):
        model = onnx.load_from_string(bytes(model))
    return onnx.shape_inference.infer_shapes(model)


def boundaries(model: Any) -> list[Boundary]:
    """Every single-tensor cut of the graph, in order."""
    graph = _load(model).graph
    weights = {i.name for i in graph.initializer}
    produced = {i.name for i in graph.input} - weights
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    # For each tensor, the last node that reads it.
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    cuts = []
    for index, node in enumerate(nodes[:-1]):
        produced.update(node.output)
        crossing = [t for t in produced if last_use.get(t, -1) > index or (t in outputs)]
        if len(crossing) == 1 and crossing[0] not in outputs and crossing[0] in node.output:
            cuts.append(Boundary(index, crossing[0], node.name or node.op_type))
    return cuts


def split_onnx(model: Any, cuts: Sequence[str]) -> list[Any]:
    """Shards of ``model`` cut at the tensors ``cuts`` (in graph order): ``len(cuts) + 1`` ONNX models.

    Raises:
        ConfigError: a name that is not a single-tensor cut of this graph, or cuts out of order.
    """
    onnx = onnx_module()
    full = _load(model)
    known = [b.tensor for b in boundaries(full)]
    for name in cuts:
        if name not in known:
            raise ConfigError(f"cannot cut at {name!r}: the single-tensor cuts are {', '.join(known) or 'none'}")
    if [known.index(c) for c in cuts] != sorted(known.index(c) for c in cuts) or len(set(cuts)) != len(cuts):
        raise ConfigError("cuts must be distinct and in graph order")
    weights = {i.name for i in full.graph.initializer}
    inputs = [i.name for i in full.graph.input if i.name not in weights]
    outputs = [o.name for o in full.graph.output]
    ends = [*([c] for c in cuts), outputs]
    starts = [inputs, *([c] for c in cuts)]
    extractor = onnx.utils.Extractor(full)
    shards = []
    for ins, outs in zip(starts, ends, strict=True):
        shard = extractor.extract_model(list(ins), list(outs))
        del shard.opset_import[:]
        shard.opset_import.extend(full.opset_import)
        shard.ir_version = full.ir_version
        onnx.checker.check_model(shard)
        shards.append(shard)
    return shards


def profile_onnx(model: Any, sample: Sequence[np.ndarray[Any, Any]], *, runs: int = 20) -> list[Segment]:
    """Measure each segment between consecutive boundaries with ONNX Runtime on this machine (one thread).

    Returns one `Segment` per piece (boundaries + 1), with its median run time and output size.
    """
    ort = ort_module()
    full = _load(model)
    cuts = [b.tensor for b in boundaries(full)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    segments = []
    inputs = list(sample)
    for i, shard in enumerate(split_onnx(full, cuts)):
        session = ort.InferenceSession(shard.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {meta.name: x for meta, x in zip(session.get_inputs(), inputs, strict=True)}
        session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            outputs = session.run(None, feed)
            times.append(time.perf_counter() - start)
        segments.append(
            Segment(
                cuts[i - 1] if i else "",
                cuts[i] if i < len(cuts) else "",
                statistics.median(times),
                sum(int(o.nbytes) for o in outputs),
            )
        )
        inputs = list(outputs)
    return segments


def sample_inputs(model: Any) -> list[np.ndarray[Any, Any]]:
    """Zeros shaped like an ONNX model's inputs (a dynamic dimension, such as the batch, taken as 1)."""
    onnx = onnx_module()
    if isinstance(model, str | Path):
        model = onnx.load(str(model), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    sample = []
    for meta in model.graph.input:
        if meta.name in weights:
            continue
        tensor = meta.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]
        sample.append(np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    return sample


def onnx_outputs(model: Any) -> tuple[dict[str, Any], ...]:
    """An ONNX model's outputs as a manifest declares them: name, numpy dtype name, shape (-1: dynamic)."""
    onnx = onnx_module()
    if isinstance(model, str | Path):
        model = onnx.load(str(model), load_external_data=False)
    out = []
    for meta in model.graph.output:
        tensor = meta.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        out.append({"name": meta.name, "dtype": dtype, "shape": shape})
    return tuple(out)


def split_torch(module: Any, example: Any, parts: int) -> list[bytes]:
    """Cut a torch module into ``parts`` consecutive pieces with torch.fx; each exported to ONNX (dynamic batch).

    The cut points divide the traced call nodes evenly; each piece takes exactly one tensor.

    Raises:
        ConfigError: the graph has fewer single-tensor cuts than needed.
    """
    try:
        import torch
        from torch.fx import symbolic_trace
        from torch.fx.passes.split_module import split_module
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch") from exc
    traced = symbolic_trace(module)
    calls = [n for n in traced.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    if parts < 1 or parts > len(calls):
        raise ConfigError(f"cannot cut {len(calls)} operations into {parts} parts")
    order = {n.name: i for i, n in enumerate(calls)}
    bounds = [len(calls) * k // parts for k in range(1, parts)]

    def partition(node: Any) -> int:
        return sum(order[node.name] >= b for b in bounds)

    split = split_module(traced, module, partition)
    pieces = [getattr(split, f"submod_{k}") for k in range(parts)]
    shards = []
    x = example
    for piece in pieces:
        piece.eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            y = piece(x)
            if not isinstance(y, torch.Tensor):
                raise ConfigError("a torch piece must take and return one tensor")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export: Any = torch.onnx.export  # writes to a file object too
            export(
                piece,
                (x,),
                buffer,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                dynamo=False,
            )
        shards.append(buffer.getvalue())
        x = y
    return shards
