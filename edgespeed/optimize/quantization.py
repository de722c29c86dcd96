"""INT8 and FP16 quantisation of ONNX models, with ONNX Runtime's own tools.

* INT8, static (with calibration data): ONNX Runtime's ``quant_pre_process`` (shape inference and the
  basic graph optimisations it recommends before quantising), then ``quantize_static`` with a
  `CalibrationDataReader` over the data (MinMax calibration), activations uint8 and weights int8
  (U8S8, ONNX Runtime's first choice on CPUs), per tensor or ``per_channel``, as QDQ pairs (``qdq``:
  portable, what ONNX Runtime fuses into its integer kernels) or as QLinear operators (``qoperator``).
  The graph's outputs stay float (the pair that would round them to 256 levels is removed).
  A Conv, Gemm or MatMul whose reduction (input channels x kernel) is below ``min_reduction`` stays in
  float32: the first convolution of a one-channel image model is slower in int8 than in float (the
  integer kernels pay off from a reduction of about 16) and holds a few hundred weights.
* INT8, dynamic (no calibration data): ``quantize_dynamic``: weights int8, activations quantised per
  run. It suits MatMul-heavy models (transformers); a CNN wants calibration data.
* FP16: ``convert_float_to_float16`` (ONNX Runtime's copy of onnxconverter-common's), inputs and
  outputs kept float32 (the model's interface and the outputs its manifest declares do not change),
  and the ops that are numerically sensitive in half precision (reductions, Exp/Log/Pow, layer
  normalisation, and those ONNX Runtime has no fp16 kernel for) kept in float32 with casts around.

`quantize_shards` quantises the shards of a split model, each calibrated on the activations that reach
it: the calibration inputs run through the shards before it, as quantised.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgespeed.errors import MissingDependencyError, OptimizeError
from edgespeed.optimize.data import (
    Progress,
    Samples,
    copy_atomic,
    default_output,
    feed_for,
    load_model,
    mark_precision,
    onnx_module,
    read_samples,
    strip_provenance,
    write_model,
)
from edgespeed.optimize.report import OptimizeReport, compare, relocated, run_all, session

__all__ = ["FP16_KEEP_FP32", "quantize", "quantize_shards"]

Precision = Literal["int8", "fp16"]
Format = Literal["qdq", "qoperator"]

#: Ops kept in float32 by the fp16 conversion, beyond those ONNX Runtime has no fp16 kernel for.
FP16_KEEP_FP32 = (
    "Exp",
    "Log",
    "Pow",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceMean",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "LayerNormalization",
)

_QUANTISED_OPS = {
    "DequantizeLinear",
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
}
_REDUCING = {"Conv": 1, "Gemm": 1, "MatMul": 1}


def quantize(
    model: Any,
    *,
    precision: Precision = "int8",
    output: Path | str | None = None,
    calibration: Any = None,
    per_channel: bool = False,
    fmt: Format = "qdq",
    evaluation: Any = None,
    keep_fp32: Sequence[str] = (),
    min_reduction: int = 16,
    latency: bool = True,
    progress: Progress | None = None,
    batch: int = 32,
) -> OptimizeReport:
    """Quantise an ONNX model to int8 (static with ``calibration``, dynamic without) or fp16.

    Args:
        model: an ``.onnx`` path, its bytes or an ``onnx.ModelProto``.
        output: where to write the new model (default: ``NAME.int8.onnx`` or ``NAME.fp16.onnx`` beside it).
        calibration: inputs to calibrate on (an ``.npz`` path or arrays by input name; see `read_samples`).
        per_channel: int8 weights with a scale per output channel rather than per tensor.
        fmt: ``qdq`` (QuantizeLinear/DequantizeLinear pairs) or ``qoperator`` (QLinearConv, ...).
        evaluation: data to compare both models on: top-1 accuracy with ``labels``, the output error
            against ``reference`` (or, without it, against the original model's outputs).
        keep_fp32: node names (or, for fp16, op types too) to leave in float32.
        min_reduction: int8 leaves in float32 a Conv/Gemm/MatMul reducing over fewer elements (0: none).
        latency: measure both models' latency on this machine (batch 1; one thread and all cores).
        progress: called as ``progress(what, done, total)`` while calibrating and evaluating.
        batch: rows per calibration and evaluation run.

    Raises:
        OptimizeError: a model ONNX Runtime cannot load or finds nothing to quantise in (``bad_model``),
            data of the wrong names, dtype or shape (``bad_data``), empty data (``empty_data``), an
            unknown option (``unsupported``). Nothing is written then.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    if precision not in ("int8", "fp16"):
        raise OptimizeError(f"precision is int8 or fp16, not {precision!r}", reason="unsupported")
    if fmt not in ("qdq", "qoperator"):
        raise OptimizeError(f"format is qdq or qoperator, not {fmt!r}", reason="unsupported")
    target = default_output(model, precision, output)
    proto = load_model(model)
    session(proto)  # a model ONNX Runtime cannot even load is refused before any work
    samples = read_samples(calibration, proto, what="calibration data") if calibration is not None else None
    checked = read_samples(evaluation, proto, what="evaluation data") if evaluation is not None else None
    feed = feed_for(proto, samples if samples is not None else checked)
    with tempfile.TemporaryDirectory(prefix="edgespeed-quantize-") as tmp:
        original = Path(tmp) / "original.onnx"
        write_model(proto, original)
        if precision == "fp16":
            new, kept = _fp16(proto, keep_fp32)
            settings: dict[str, Any] = {"keep_io_types": True}
        else:
            new, kept, settings = _int8(
                original, Path(tmp), samples, per_channel, fmt, keep_fp32, min_reduction, progress, batch
            )
        strip_provenance(new)
        mark_precision(new, precision)
        staged = write_model(new, Path(tmp) / "new.onnx")
        session(staged)  # the result loads, or nothing is written
        report = compare(
            precision,
            original,
            staged,
            evaluation=checked,
            feed=feed,
            latency=latency,
            progress=progress,
            kept_fp32=kept,
            settings=settings,
        )
        copy_atomic(staged, target)
    return relocated(report, model, target)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over `Samples`, reporting progress per batch."""

    def __init__(self, samples: Samples, batch: int, progress: Progress | None) -> None:
        self._batches: Iterator[dict[str, np.ndarray[Any, Any]]] = samples.batches(batch)
        self._total = (len(samples) + batch - 1) // batch
        self._done = 0
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        feed = next(self._batches, None)
        if feed is not None:
            self._done += 1
            if self._progress is not None:
                self._progress("calibrating", self._done, self._total)
        return feed

    def rewind(self) -> None:  # part of the protocol; one pass is all MinMax needs
        pass


def _small_reductions(model: Any, min_reduction: int) -> list[str]:
    """Conv/Gemm/MatMul nodes whose weight (an initializer) reduces over fewer than ``min_reduction`` values."""
    if min_reduction <= 0:
        return []
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    small = []
    for node in model.graph.node:
        if node.op_type not in _REDUCING or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        dims = shapes[node.input[1]]
        if node.op_type == "Conv":
            reduction = int(np.prod(dims[1:]))
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            reduction = int(dims[-1])
        else:
            reduction = int(dims[0]) if len(dims) >= 1 else 0
        if reduction < min_reduction and node.name:
            small.append(node.name)
    return small


def _int8(
    original: Path,
    tmp: Path,
    samples: Samples | None,
    per_channel: bool,
    fmt: Format,
    keep_fp32: Sequence[str],
    min_reduction: int,
    progress: Progress | None,
    batch: int,
) -> tuple[Any, tuple[str, ...], dict[str, Any]]:
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_dynamic,
            quantize_static,
        )
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx") from exc
    prepared = tmp / "prepared.onnx"
    try:
        quant_pre_process(str(original), str(prepared))
    except Exception:  # symbolic shape inference gives up on some graphs: quantise without the preparation
        prepared = original
    source = load_model(prepared)
    kept = list(dict.fromkeys([*keep_fp32, *_small_reductions(source, min_reduction)]))
    out = tmp / "quantized.onnx"
    settings: dict[str, Any] = {"per_channel": per_channel}
    for _ in range(3):
        try:
            with np.errstate(all="ignore"):  # ORT's own arithmetic on degenerate ranges: checked below
                if samples is not None:
                    settings.update(mode="static", format=fmt, calibration_rows=len(samples), calibrate_method="minmax")
                    quantize_static(
                        str(prepared),
                        str(out),
                        _Reader(samples, batch, progress),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        per_channel=per_channel,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(kept),
                        calibrate_method=CalibrationMethod.MinMax,
                    )
                else:
                    settings.update(mode="dynamic")
                    quantize_dynamic(
                        str(prepared),
                        str(out),
                        per_channel=per_channel,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(kept),
                    )
        except Exception as exc:  # the quantiser's own failures (unsupported graphs, opsets, types)
            raise OptimizeError(f"ONNX Runtime cannot quantise this model: {exc}", reason="bad_model") from exc
        if not out.is_file():
            raise OptimizeError("ONNX Runtime's quantiser wrote no model", reason="bad_model")
        quantized = load_model(out)
        degenerate = _degenerate_ranges(quantized)
        if not degenerate:
            break
        # A tensor whose calibrated range is infinite or empty (an attention mask of -inf, a constant)
        # cannot be quantised: the nodes around it stay float, and the quantiser runs again.
        touching = [n.name for n in source.graph.node if n.name and set(degenerate) & {*n.input, *n.output}]
        kept += [n for n in touching if n not in kept]
    else:
        raise OptimizeError(
            f"calibration gives tensors {', '.join(sorted(degenerate)[:5])} no finite range", reason="bad_data"
        )
    if not {n.op_type for n in quantized.graph.node} & _QUANTISED_OPS:
        ops = sorted({n.op_type for n in source.graph.node})
        raise OptimizeError(
            f"ONNX Runtime found nothing to quantise in this model (its ops: {', '.join(ops)}; "
            "int8 applies to float Conv, Gemm, MatMul and the like)",
            reason="bad_model",
        )
    if samples is not None and fmt == "qdq":
        _float_outputs(quantized)
    return quantized, tuple(kept), settings


def _degenerate_ranges(model: Any) -> list[str]:
    """Tensors a QuantizeLinear quantises with a scale that is zero or not finite (a broken range)."""
    onnx = onnx_module()
    scales = {t.name: t for t in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 1 and node.input[1] in scales:
            scale = onnx.numpy_helper.to_array(scales[node.input[1]])
            if not np.all(np.isfinite(scale)) or np.any(scale == 0):
                bad.append(node.input[0])
    return bad


def _float_outputs(model: Any) -> None:
    """Remove the QuantizeLinear/DequantizeLinear pair before each graph output, in place.

    The pair only rounds the results to 256 levels (the digits CNN's logits: an error of 0.96 with it,
    0.23 without); without it ONNX Runtime's integer kernel writes float outputs directly.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        dq = producer.get(out.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        if sum(q.output[0] in n.input for n in graph.node) != 1:
            continue
        source = q.input[0]
        graph.node.remove(dq)
        graph.node.remove(q)
        for node in graph.node:
            node.output[:] = [out.name if o == source else o for o in node.output]
            node.input[:] = [out.name if i == source else i for i in node.input]
    used = {i for n in graph.node for i in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _fp16(model: Any, keep_fp32: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx") from exc
    onnx = onnx_module()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    floats = [t for t in copy.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    if not floats and not any(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in (*copy.graph.input, *copy.graph.value_info)
    ):
        raise OptimizeError("this model has no float32 tensors to convert to fp16", reason="bad_model")
    ops = {n.op_type for n in copy.graph.node}
    op_block = sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32, *(k for k in keep_fp32 if k in ops)})
    nodes = [k for k in keep_fp32 if k not in ops]
    try:
        converted = convert_float_to_float16(copy, keep_io_types=True, op_block_list=op_block, node_block_list=nodes)
    except Exception as exc:  # the converter's failures (shape inference, unsupported graphs)
        raise OptimizeError(f"cannot convert this model to fp16: {exc}", reason="bad_model") from exc
    kept = tuple(n.name or n.op_type for n in copy.graph.node if n.op_type in op_block or n.name in nodes)
    return converted, kept


def quantize_shards(
    shards: Sequence[Any],
    calibration: Any,
    folder: Path | str,
    *,
    per_channel: bool = False,
    fmt: Format = "qdq",
    min_reduction: int = 16,
    latency: bool = False,
    progress: Progress | None = None,
) -> list[OptimizeReport]:
    """Quantise a split model's shards to int8, each calibrated on the activations that reach it.

    Shard 1 is calibrated on ``calibration``; shard k on what shard k-1, as quantised, gives for those
    inputs (what it will receive). Each report compares a shard with its float original on the same
    inputs. Shards are written as ``stage{k}.int8.onnx`` in ``folder``.

    Raises:
        OptimizeError: as `quantize`; a shard that takes more than one input.
    """
    if not shards:
        raise OptimizeError("no shards to quantise", reason="bad_model")
    folder = Path(folder)
    reports = []
    data: Any = calibration
    for k, shard in enumerate(shards, start=1):
        proto = load_model(shard)
        samples = read_samples(data, proto, what=f"calibration data of stage {k}")
        report = quantize(
            proto,
            precision="int8",
            output=folder / f"stage{k}.int8.onnx",
            calibration=samples,
            per_channel=per_channel,
            fmt=fmt,
            evaluation=Samples(samples.inputs),
            min_reduction=min_reduction,
            latency=latency,
            progress=progress,
        )
        reports.append(report)
        if k < len(shards):
            activations = run_all(Path(report.output), samples, progress=progress, what=f"stage {k} activations")
            data = {"": activations}
    return reports
