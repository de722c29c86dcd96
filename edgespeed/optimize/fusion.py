"""Graph simplification and fusion, saved as a new model.

Two tools, one after the other:

* onnxslim (``pip install 'edgespeed[optimize]'``): constant folding, dead-code and identity removal,
  shape-computation folding, Conv+BatchNorm, MatMul+Add into Gemm and similar pattern fusions, all
  into standard ONNX that any runtime loads. Skipped (and said so in the report) when not installed.
* ONNX Runtime's offline graph optimisation (``SessionOptions.optimized_model_filepath``): what ONNX
  Runtime would do at every load, done once and saved. ``basic`` keeps standard ONNX ops;
  ``extended`` (the default) adds its fusions into contrib ops (Conv+activation into FusedConv,
  Gemm+activation into FusedGemm, attention and layer-norm fusions), which only ONNX Runtime runs.
  The ``all`` level is left out on purpose: its layout changes are specific to the machine that ran it.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Literal

from edgespeed.errors import OptimizeError
from edgespeed.optimize.data import (
    Progress,
    copy_atomic,
    default_output,
    feed_for,
    load_model,
    onnx_module,
    ort_module,
    read_samples,
    strip_provenance,
    write_model,
)
from edgespeed.optimize.report import OptimizeReport, compare, relocated, session

__all__ = ["fuse"]

Level = Literal["none", "basic", "extended"]


def fuse(
    model: Any,
    *,
    output: Path | str | None = None,
    level: Level = "extended",
    slim: bool = True,
    evaluation: Any = None,
    latency: bool = True,
    progress: Progress | None = None,
) -> OptimizeReport:
    """Simplify (onnxslim) and fuse (ONNX Runtime, offline) an ONNX model; the report counts the nodes.

    Args:
        model: an ``.onnx`` path, its bytes or an ``onnx.ModelProto``.
        output: where to write the new model (default: ``NAME.fused.onnx`` beside it).
        level: ONNX Runtime's offline optimisation: ``basic`` (standard ONNX ops), ``extended``
            (ONNX Runtime's fused contrib ops too) or ``none``.
        slim: run onnxslim first (when installed).
        evaluation: data to compare both models on (see `edgespeed.optimize.quantize`).

    Raises:
        OptimizeError: a model that does not load or that a tool fails on; an unknown level.
    """
    if level not in ("none", "basic", "extended"):
        raise OptimizeError(f"level is none, basic or extended, not {level!r}", reason="unsupported")
    target = default_output(model, "fused", output)
    proto = load_model(model)
    session(proto)
    checked = read_samples(evaluation, proto, what="evaluation data") if evaluation is not None else None
    settings: dict[str, Any] = {"level": level}
    new = proto
    if slim:
        new, settings["onnxslim"] = _slim(proto)
    with tempfile.TemporaryDirectory(prefix="edgespeed-fuse-") as tmp:
        original = write_model(proto, Path(tmp) / "original.onnx")
        staged = Path(tmp) / "new.onnx"
        if level == "none":
            write_model(new, staged)
        else:
            _ort_offline(new, staged, level)
        result = strip_provenance(_tidy_opsets(load_model(staged)))
        write_model(result, staged)
        session(staged)
        report = compare(
            "fuse",
            original,
            staged,
            evaluation=checked,
            feed=feed_for(proto, checked),
            latency=latency,
            progress=progress,
            settings=settings,
        )
        copy_atomic(staged, target)
    return relocated(report, model, target)


def _slim(model: Any) -> tuple[Any, str]:
    if importlib.util.find_spec("onnxslim") is None:
        return model, "not installed (pip install 'edgespeed[optimize]')"
    import onnxslim

    copy = onnx_module().ModelProto()
    copy.CopyFrom(model)
    try:
        slimmed = onnxslim.slim(copy)
    except Exception as exc:  # onnxslim's own failures on a graph it does not understand
        raise OptimizeError(f"onnxslim cannot simplify this model: {exc}", reason="bad_model") from exc
    if slimmed is None:
        raise OptimizeError("onnxslim returned no model", reason="bad_model")
    return slimmed, "applied"


def _ort_offline(model: Any, path: Path, level: Level) -> None:
    ort = ort_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if level == "basic"
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's load failures
        raise OptimizeError(f"ONNX Runtime cannot optimise this model: {exc}", reason="bad_model") from exc
    if not path.is_file():
        raise OptimizeError("ONNX Runtime wrote no optimised model", reason="failed")


def _tidy_opsets(model: Any) -> Any:
    """Keep the opset imports the graph uses (ONNX Runtime lists every domain it knows)."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
