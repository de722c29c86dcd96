"""What an optimisation did, measured.

`OptimizeReport` compares the new model with the original: file size (and the weights' bytes, and the
size zstd makes of it, which is what unstructured pruning saves), node count, FLOPs per sample (counted
from the shapes of every Conv/Gemm/MatMul as ONNX Runtime runs the graph, any op domain included),
latency at batch 1 on this machine with one thread and with all cores, and, given evaluation data,
top-1 accuracy (with labels) and the output error against a reference or the original model.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.errors import OptimizeError
from edgespeed.optimize.data import Progress, Samples, load_model, onnx_module, ort_module

__all__ = ["Facts", "OptimizeReport", "count_flops", "measure", "relocated"]


def session(model: Any, threads: int = 0, *, optimize: bool = True) -> Any:
    """An ONNX Runtime CPU session (``threads`` intra-op threads; 0: all cores)."""
    ort = ort_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1 if threads else 0
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's Fail/InvalidGraph/NotImplemented: a model it cannot load
        raise OptimizeError(f"ONNX Runtime cannot load the model: {exc}", reason="bad_model") from exc


def run_all(
    model: Any, samples: Samples, *, batch: int = 64, progress: Progress | None = None, what: str = "evaluating"
) -> np.ndarray[Any, Any]:
    """The first output of ``model`` on every row of ``samples``, in batches (progress per batch)."""
    sess = session(model)
    total = (len(samples) + batch - 1) // batch
    outputs = []
    for done, feed in enumerate(samples.batches(batch), start=1):
        outputs.append(sess.run(None, feed)[0])
        if progress is not None:
            progress(what, done, total)
    return np.concatenate(outputs)


def latency_ms(model: Any, feed: Mapping[str, Any], threads: int, *, budget_s: float = 0.2) -> float:
    """Median milliseconds of a run at ``feed``'s batch on this machine (warmed up; within about ``budget_s``)."""
    sess = session(model, threads)
    for _ in range(3):
        sess.run(None, dict(feed))
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start = time.perf_counter()
        sess.run(None, dict(feed))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


_CONV = {"Conv": 1, "ConvInteger": 1, "FusedConv": 1, "NhwcConv": 1, "QLinearConv": 3, "ConvTranspose": 1}
_MATMUL = {"Gemm", "FusedGemm", "MatMul", "MatMulInteger", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulNBits"}


def count_flops(model: Any, feed: Mapping[str, Any]) -> int:
    """Floating or integer operations of one run at ``feed`` (2 per multiply-accumulate of Conv/Gemm/MatMul).

    Shapes come from running the graph as stored (ONNX Runtime, no graph optimisation) with every
    intermediate tensor exposed, so contrib ops (FusedConv, QGemm, ...) are counted like the rest.
    """
    onnx = onnx_module()
    probe = onnx.ModelProto()
    probe.CopyFrom(load_model(model))
    exposed = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in exposed:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                exposed.add(name)
    sess = session(probe, 1, optimize=False)
    shapes: dict[str, tuple[int, ...]] = {k: tuple(np.shape(v)) for k, v in feed.items()}
    shapes.update({i.name: tuple(i.dims) for i in probe.graph.initializer})
    outputs = sess.run(None, dict(feed))
    shapes.update({meta.name: tuple(np.shape(v)) for meta, v in zip(sess.get_outputs(), outputs, strict=True)})
    macs = 0
    for node in probe.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type in _CONV:
            weight = shapes.get(node.input[_CONV[node.op_type]])
            if weight is not None:
                macs += int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type in _MATMUL:
            a = shapes.get(node.input[0])
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            if a:
                macs += int(np.prod(out)) * int(a[0] if trans_a else a[-1])
    return 2 * macs


@dataclass(frozen=True, slots=True)
class Facts:
    """One model, measured on this machine."""

    path: str
    size_bytes: int
    weight_bytes: int  # the initializers' bytes
    compressed_bytes: int  # the file through zstd (level 3): what sparse (pruned) weights save on the wire
    nodes: int
    flops: int  # per sample (batch 1)
    latency_ms_1: float  # batch 1, one thread (0: not measured)
    latency_ms_all: float  # batch 1, all cores (0: not measured)
    accuracy: float | None = None  # top-1, on the evaluation data's labels


def measure(
    path: Path,
    feed: Mapping[str, Any],
    *,
    latency: bool = True,
    outputs: np.ndarray[Any, Any] | None = None,
    labels: np.ndarray[Any, Any] | None = None,
) -> Facts:
    """Size, nodes, FLOPs and latency of the model at ``path``; accuracy of ``outputs`` against ``labels``."""
    import zstandard

    model = load_model(path)
    data = path.read_bytes()
    accuracy = None
    if outputs is not None and labels is not None:
        accuracy = float((outputs.reshape(len(outputs), -1).argmax(axis=1) == labels.reshape(-1)).mean())
    return Facts(
        str(path),
        len(data),
        sum(_tensor_bytes(t) for t in model.graph.initializer),
        len(zstandard.ZstdCompressor(level=3).compress(data)),
        len(model.graph.node),
        count_flops(model, feed),
        round(latency_ms(model, feed, 1), 4) if latency else 0.0,
        round(latency_ms(model, feed, 0), 4) if latency else 0.0,
        accuracy,
    )


def _tensor_bytes(tensor: Any) -> int:
    onnx = onnx_module()
    return int(onnx.numpy_helper.to_array(tensor).nbytes)


@dataclass(frozen=True, slots=True)
class OptimizeReport:
    """What an optimisation (``kind``: int8, fp16, prune, fuse) did to a model; ``output`` is the new model."""

    kind: str
    output: str
    original: Facts
    optimized: Facts
    error_max: float | None = None  # largest absolute difference of the first output
    error_mean: float | None = None
    error_against: str = ""  # "reference" (the data's), "original" (the original model's outputs), or ""
    kept_fp32: tuple[str, ...] = ()  # nodes left in float32 (quantisation)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.optimized.size_bytes / self.original.size_bytes

    @property
    def speedup_1(self) -> float | None:
        """Original latency / new latency at batch 1, one thread (None: not measured)."""
        return _ratio(self.original.latency_ms_1, self.optimized.latency_ms_1)

    @property
    def speedup_all(self) -> float | None:
        return _ratio(self.original.latency_ms_all, self.optimized.latency_ms_all)

    @property
    def accuracy_drop(self) -> float | None:
        """Points of top-1 accuracy lost (negative: gained); None without labels."""
        if self.original.accuracy is None or self.optimized.accuracy is None:
            return None
        return round((self.original.accuracy - self.optimized.accuracy) * 100, 2)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(size_ratio=round(self.size_ratio, 4), speedup_1=self.speedup_1, speedup_all=self.speedup_all)
        out["accuracy_drop"] = self.accuracy_drop
        return out

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(what, original, optimised, change) rows, for a table."""
        a, b = self.original, self.optimized
        rows = [
            ("size", _kib(a.size_bytes), _kib(b.size_bytes), f"{self.size_ratio:.3f}x"),
            ("weights", _kib(a.weight_bytes), _kib(b.weight_bytes), _times(b.weight_bytes, a.weight_bytes)),
            (
                "zstd size",
                _kib(a.compressed_bytes),
                _kib(b.compressed_bytes),
                _times(b.compressed_bytes, a.compressed_bytes),
            ),
            ("nodes", str(a.nodes), str(b.nodes), f"{b.nodes - a.nodes:+d}"),
            ("FLOPs/sample", f"{a.flops:,}", f"{b.flops:,}", _times(b.flops, a.flops)),
        ]
        if a.latency_ms_1:
            rows.append(("latency, 1 thread", _ms(a.latency_ms_1), _ms(b.latency_ms_1), _speed(self.speedup_1)))
            rows.append(("latency, all cores", _ms(a.latency_ms_all), _ms(b.latency_ms_all), _speed(self.speedup_all)))
        if a.accuracy is not None and b.accuracy is not None:
            change = round((b.accuracy - a.accuracy) * 100, 2) + 0.0  # + 0.0: never "-0.00"
            rows.append(("top-1 accuracy", f"{a.accuracy:.2%}", f"{b.accuracy:.2%}", f"{change:+.2f} points"))
        if self.error_max is not None:
            rows.append(
                (
                    f"output error vs {self.error_against}",
                    "",
                    f"max {self.error_max:.3g}",
                    f"mean {self.error_mean:.3g}",
                )
            )
        return rows


def _ratio(before: float, after: float) -> float | None:
    return round(before / after, 3) if before and after else None


def relocated(report: OptimizeReport, source: Any, target: Path) -> OptimizeReport:
    """The report with the real places of both models (they were measured as temporary copies)."""
    where = source if isinstance(source, str) and source.startswith("(") else None
    if where is None:
        where = str(source) if isinstance(source, str | Path) else "(in memory)"
    return dataclasses.replace(
        report,
        output=str(target),
        original=dataclasses.replace(report.original, path=where),
        optimized=dataclasses.replace(report.optimized, path=str(target)),
    )


def _speed(ratio: float | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _times(after: float, before: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _ms(value: float) -> str:
    return f"{value:.3f} ms"


def compare(
    kind: str,
    original: Path,
    optimized: Path,
    *,
    evaluation: Samples | None,
    feed: Mapping[str, Any],
    latency: bool,
    progress: Progress | None,
    kept_fp32: tuple[str, ...] = (),
    settings: Mapping[str, Any] | None = None,
) -> OptimizeReport:
    """Measure both models, evaluate both on ``evaluation`` (progress per batch), and report."""
    before = after = None
    error_max = error_mean = None
    against = ""
    labels = None
    if evaluation is not None:
        labels = evaluation.labels
        before = run_all(original, evaluation, progress=progress, what="evaluating the original")
        after = run_all(optimized, evaluation, progress=progress, what="evaluating the new model")
        expected = evaluation.reference if evaluation.reference is not None else before
        against = "reference" if evaluation.reference is not None else "original"
        if expected.shape == after.shape:
            diff = np.abs(after.astype(np.float64) - expected.astype(np.float64))
            error_max, error_mean = float(diff.max()), float(diff.mean())
    return OptimizeReport(
        kind,
        str(optimized),
        measure(original, feed, latency=latency, outputs=before, labels=labels),
        measure(optimized, feed, latency=latency, outputs=after, labels=labels),
        error_max,
        error_mean,
        against,
        kept_fp32,
        dict(settings or {}),
    )
