"""TFLite/LiteRT backend: ai-edge-litert, falling back to tflite-runtime."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgespeed.engine.base import Backend, ModelSpec
from edgespeed.errors import BackendError, MissingDependencyError

__all__ = ["TfliteBackend"]

_RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def _interpreter_module() -> Any:
    for name in _RUNTIMES:
        if importlib.util.find_spec(name.partition(".")[0]) is not None:
            return importlib.import_module(name)
    raise MissingDependencyError("ai-edge-litert", "tflite")


class TfliteBackend(Backend):
    """Runs ``.tflite`` models; inputs of another batch size resize the interpreter.

    Args:
        threads: interpreter threads (None: the runtime's default).
    """

    name: ClassVar[str] = "tflite"
    formats: ClassVar[tuple[str, ...]] = ("tflite",)
    extra: ClassVar[str] = "tflite"

    def __init__(self, *, threads: int | None = None) -> None:
        self._threads = threads
        self._interpreter: Any = None
        self._runtime = ""
        # An interpreter holds its tensors in place: one call at a time.
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> bool:
        return any(importlib.util.find_spec(name.partition(".")[0]) is not None for name in _RUNTIMES)

    def _load(self, source: Path | bytes, spec: ModelSpec) -> None:
        module = _interpreter_module()
        self._runtime = module.__name__.partition(".")[0]
        where = {"model_content": source} if isinstance(source, bytes) else {"model_path": str(source)}
        try:
            self._interpreter = module.Interpreter(**where, num_threads=self._threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"LiteRT refused the model: {exc}", reason="bad_model") from exc

    def _run(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        interpreter = self._interpreter
        with self._lock:
            details = interpreter.get_input_details()
            if len(inputs) != len(details):
                raise BackendError(f"model takes {len(details)} inputs, got {len(inputs)}", reason="bad_input")
            try:
                resized = False
                for detail, x in zip(details, inputs, strict=True):
                    if tuple(detail["shape"]) != x.shape:
                        interpreter.resize_tensor_input(detail["index"], list(x.shape))
                        resized = True
                if resized:
                    interpreter.allocate_tensors()
                for detail, x in zip(interpreter.get_input_details(), inputs, strict=True):
                    interpreter.set_tensor(detail["index"], np.ascontiguousarray(x, dtype=detail["dtype"]))
                interpreter.invoke()
                return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]
            except (ValueError, RuntimeError) as exc:
                raise BackendError(f"LiteRT: {exc}", reason="bad_input") from exc

    def describe(self) -> dict[str, str]:
        info = {"backend": self.name, "runtime": self._runtime or "ai_edge_litert"}
        if self._threads is not None:
            info["threads"] = str(self._threads)
        return info

    def close(self) -> None:
        self._interpreter = None
        super().close()
