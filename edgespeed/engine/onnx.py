"""ONNX Runtime backend, with an execution-provider preference list and CPU fallback."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgespeed.engine.base import Backend, ModelSpec
from edgespeed.errors import BackendError, MissingDependencyError, UnsafeFileError

__all__ = [
    "OnnxBackend",
    "PROVIDER_PREFERENCE",
]

# Fastest first; whatever the installed onnxruntime build lacks is skipped.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CANNExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx") from exc
    return onnxruntime


def check_external_data(source: Path | bytes) -> None:
    """Refuse a model whose external-data files lie outside its folder (from bytes: any external data).

    Raises:
        UnsafeFileError: an absolute location, or one escaping the folder.
        MissingDependencyError: the ``onnx`` package is missing.
    """
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx") from exc
    name = source.name if isinstance(source, Path) else "model"
    try:
        if isinstance(source, bytes):
            model = onnx.load_from_string(source)
        else:
            model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: not an ONNX model
        raise BackendError(f"{name} is not an ONNX model: {exc}", reason="bad_model") from exc
    base = source.parent.resolve() if isinstance(source, Path) else None
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if (
            base is None
            or not location
            or os.path.isabs(location)
            or not (base / location).resolve().is_relative_to(base)
        ):
            raise UnsafeFileError(
                f"{name}: external data {location!r} lies outside the model folder", reason="external_data"
            )


_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


class OnnxBackend(Backend):
    """Runs ``.onnx`` models on the best execution provider present.

    Args:
        providers: preference order; defaults to `PROVIDER_PREFERENCE`.
        threads: intra-op threads (None: the runtime's default).
    """

    name: ClassVar[str] = "onnx"
    formats: ClassVar[tuple[str, ...]] = ("onnx",)
    extra: ClassVar[str] = "onnx"

    def __init__(self, *, providers: Sequence[str] = PROVIDER_PREFERENCE, threads: int | None = None) -> None:
        self._wanted = tuple(providers)
        self._threads = threads
        self._session: Any = None
        self._input_names: list[str] = []

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def providers(cls) -> list[str]:
        """Execution providers this onnxruntime build offers."""
        return list(_ort().get_available_providers())

    def _load(self, source: Path | bytes, spec: ModelSpec) -> None:
        ort = _ort()
        check_external_data(source)
        present = set(ort.get_available_providers())
        chosen = [p for p in self._wanted if p in present] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        try:
            model = source if isinstance(source, bytes) else str(source)
            self._session = ort.InferenceSession(model, sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime refused the model: {exc}", reason="bad_model") from exc
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._session_run = self._session.run

    def _run(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        names = self._input_names
        if len(inputs) != len(names):
            raise BackendError(f"model takes {len(names)} inputs, got {len(inputs)}", reason="bad_input")
        # The hot path of every inference: no zip, no copy of the output list.
        feed = {names[0]: inputs[0]} if len(names) == 1 else dict(zip(names, inputs, strict=True))
        try:
            return self._session_run(None, feed)  # type: ignore[no-any-return]
        except Exception as exc:  # InvalidArgument for shapes and dtypes, RuntimeException otherwise
            invalid = "INVALID_ARGUMENT" in str(exc) or "Invalid" in type(exc).__name__
            reason = "bad_input" if invalid else "backend_failure"
            raise BackendError(f"onnxruntime: {exc}", reason=reason) from exc

    def sample_inputs(self) -> list[np.ndarray[Any, Any]] | None:
        if self._session is None:
            return None
        out = []
        for meta in self._session.get_inputs():
            dtype = _ONNX_TYPES.get(meta.type)
            if dtype is None:
                return None
            out.append(np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in meta.shape], dtype=dtype))
        return out

    def describe(self) -> dict[str, str]:
        info = {"backend": self.name, "runtime": f"onnxruntime {_ort().__version__}"}
        if self._session is not None:
            info["providers"] = ",".join(self._session.get_providers())
        if self._threads is not None:
            info["threads"] = str(self._threads)
        return info

    def close(self) -> None:
        self._session = None
        super().close()
