"""What every optimisation shares: reading models and data, writing results atomically.

Data comes as an ``.npz`` file (or a mapping): one array per model input, named after the input (a
model with one input may name it anything), batch first; ``labels`` (class ids) and ``reference``
(expected first outputs) are optional. `read_samples` checks names, dtypes and shapes against the
model, so a mistake is an `OptimizeError` naming it, not a failure deep inside ONNX Runtime.

Outputs are written to a temporary file beside the target and renamed into place (`write_model`,
`copy_atomic`): a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.errors import MissingDependencyError, OptimizeError

__all__ = ["Progress", "Samples", "read_samples"]

#: Called as ``progress(what, done, total)`` while calibrating, evaluating or fine-tuning.
Progress = Callable[[str, int, int], None]

PRECISION_KEY = "edgespeed.precision"  # model metadata: what an optimisation made of the weights
LABEL_KEYS = ("labels", "y")
REFERENCE_KEY = "reference"


def onnx_module() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx") from exc
    return onnx


def ort_module() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx") from exc
    return onnxruntime


def load_model(model: Any) -> Any:
    """An ONNX ModelProto from a path, bytes or a ModelProto.

    Raises:
        OptimizeError: no such file, or not an ONNX model (``bad_model``).
    """
    onnx = onnx_module()
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes | bytearray):
            return onnx.load_from_string(bytes(model))
        path = Path(model)
        if not path.is_file():
            raise OptimizeError(f"{path}: no such model file", reason="bad_model")
        return onnx.load(str(path))
    except OptimizeError:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
        raise OptimizeError(f"{model}: not an ONNX model ({exc})", reason="bad_model") from exc


def model_inputs(model: Any) -> list[tuple[str, np.dtype[Any], list[int | None]]]:
    """Each graph input (weights excluded): name, numpy dtype, shape (None for a dynamic dimension)."""
    onnx = onnx_module()
    weights = {i.name for i in model.graph.initializer}
    found = []
    for meta in model.graph.input:
        if meta.name in weights:
            continue
        tensor = meta.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
        found.append((meta.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape))
    return found


def strip_provenance(model: Any) -> Any:
    """Drop exporters' per-node and per-value provenance (``pkg.torch.*`` metadata, doc strings) in place.

    The graph, its names and the model-level metadata stay; a deployed model carries no exporter notes.
    """
    graph = model.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        item.ClearField("metadata_props")
        if hasattr(item, "doc_string"):
            item.ClearField("doc_string")
    return model


def mark_precision(model: Any, precision: str) -> Any:
    """Record in the model's metadata what its weights are (``fp32``, ``fp16``, ``int8``); read at publish."""
    for prop in list(model.metadata_props):
        if prop.key == PRECISION_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = PRECISION_KEY, precision
    return model


def feed_for(model: Any, samples: Samples | None) -> dict[str, np.ndarray[Any, Any]]:
    """One run's inputs: the first row of ``samples``, or zeros shaped like the inputs (batch 1)."""
    if samples is not None:
        return samples.first()
    from edgespeed.optimize.split import sample_inputs

    return {name: array for (name, _, _), array in zip(model_inputs(model), sample_inputs(model), strict=True)}


def default_output(source: Any, suffix: str, output: Path | str | None) -> Path:
    """Where a result goes: ``output``, or ``NAME.SUFFIX.onnx`` beside a source file."""
    if output is not None:
        return Path(output)
    if isinstance(source, str | Path):
        path = Path(source)
        return path.with_name(f"{path.stem}.{suffix}.onnx")
    raise OptimizeError("give an output path for a model passed in memory", reason="unsupported")


def write_model(model: Any, path: Path) -> Path:
    """Save an ONNX model at ``path`` atomically (a temporary file beside it, renamed into place)."""
    with staged(path) as tmp:
        onnx_module().save(model, str(tmp))
    return path


def copy_atomic(source: Path, path: Path) -> Path:
    """Copy a finished file to ``path`` atomically."""
    with staged(path) as tmp:
        shutil.copyfile(source, tmp)
    return path


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Samples:
    """Inputs by name (batch first), and optional labels and reference outputs for the same rows."""

    inputs: dict[str, np.ndarray[Any, Any]]
    labels: np.ndarray[Any, Any] | None = None
    reference: np.ndarray[Any, Any] | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
        for start in range(0, len(self), size):
            yield {name: array[start : start + size] for name, array in self.inputs.items()}

    def first(self) -> dict[str, np.ndarray[Any, Any]]:
        """One row (batch 1), to measure latency and count FLOPs with."""
        return {name: array[:1] for name, array in self.inputs.items()}


def read_samples(data: Any, model: Any, *, what: str = "data") -> Samples:
    """Calibration or evaluation data checked against ``model``'s inputs.

    ``data``: an ``.npz`` path, a mapping of arrays, `Samples`, or one array (a one-input model).

    Raises:
        OptimizeError: unreadable (``bad_data``), empty (``empty_data``), or names, dtypes, ranks,
            fixed dimensions or row counts that do not fit the model (``bad_data``).
    """
    if isinstance(data, Samples):
        arrays: dict[str, Any] = {**data.inputs}
        if data.labels is not None:
            arrays["labels"] = data.labels
        if data.reference is not None:
            arrays[REFERENCE_KEY] = data.reference
    elif isinstance(data, np.ndarray):
        arrays = {"": data}
    elif isinstance(data, Mapping):
        arrays = dict(data)
    else:
        arrays = _read_npz(Path(data), what)
    labels = next((np.asarray(arrays.pop(k)) for k in LABEL_KEYS if k in arrays), None)
    reference = arrays.pop(REFERENCE_KEY, None)
    expected = model_inputs(model)
    if not arrays:
        raise OptimizeError(f"the {what} holds no input arrays", reason="empty_data")
    if len(expected) == 1 and len(arrays) == 1:
        arrays = {expected[0][0]: next(iter(arrays.values()))}
    names = [name for name, _, _ in expected]
    if sorted(arrays) != sorted(names):
        raise OptimizeError(
            f"the {what} names arrays {sorted(arrays)}; the model's inputs are {names}", reason="bad_data"
        )
    inputs = {}
    for name, dtype, shape in expected:
        array = np.asarray(arrays[name])
        if array.dtype != dtype:
            raise OptimizeError(
                f"{what} for input {name!r} is {array.dtype}; the model takes {dtype}", reason="bad_data"
            )
        if array.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, array.shape, strict=True)):
            wanted = "x".join("N" if d is None else str(d) for d in shape)
            raise OptimizeError(
                f"{what} for input {name!r} has shape {array.shape}; the model takes {wanted}", reason="bad_data"
            )
        if array.shape[0] == 0:
            raise OptimizeError(f"the {what} for input {name!r} has no rows", reason="empty_data")
        inputs[name] = np.ascontiguousarray(array)
    rows = {a.shape[0] for a in inputs.values()}
    extras = [a for a in (labels, reference) if a is not None]
    if len(rows) > 1 or any(len(a) != next(iter(rows)) for a in extras):
        raise OptimizeError(f"the {what}'s arrays have different numbers of rows", reason="bad_data")
    return Samples(inputs, labels, None if reference is None else np.asarray(reference))


def _read_npz(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise OptimizeError(f"{what} file {path}: no such file", reason="bad_data")
    if path.stat().st_size == 0:
        raise OptimizeError(f"{what} file {path} is empty", reason="empty_data")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise OptimizeError(f"{what} file {path} is not a readable .npz: {exc}", reason="bad_data") from exc
