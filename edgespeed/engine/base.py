"""The `Backend` interface: load a model, run it, describe it, close it.

A backend instance holds one loaded model, like an inference session. `run` is
blocking and meant for a worker thread (`run_async` does that), so inference
never runs on the event loop. Backends are context managers, usable once.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from edgespeed._compat import Self
from edgespeed.errors import BackendError, UnsafeFileError

__all__ = [
    "Backend",
    "DEFAULT_MAX_MODEL_BYTES",
    "ModelSpec",
]

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What a backend needs to know beyond the model file.

    Attributes:
        architecture: for weights-only formats (safetensors), the name of an
            architecture the device knows (`edgespeed.engine.zoo`).
        options: architecture arguments, e.g. the number of classes.
        max_bytes: refuse model files larger than this before loading.
    """

    architecture: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES


class Backend(abc.ABC):
    """One model loaded on one kind of runtime.

    Subclasses set ``name`` (the registry name), ``formats`` (model formats
    they load) and ``extra`` (the pip extra that installs their runtime).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    extra: ClassVar[str]

    _loaded = False
    _closed = False

    @classmethod
    @abc.abstractmethod
    def available(cls) -> bool:
        """Whether this backend's runtime can be imported here (cheap: no heavy import)."""

    @abc.abstractmethod
    def _load(self, source: Path | bytes, spec: ModelSpec) -> None:
        """Load the model from a file, or from bytes (a decrypted model never touches the disk)."""

    @abc.abstractmethod
    def _run(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run the loaded model."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """What runs the model: runtime version, device or providers, threads."""

    def sample_inputs(self) -> list[np.ndarray[Any, Any]] | None:
        """Zeros shaped like the loaded model's inputs (unknown dimensions as 1), to time a warm run; None
        when the runtime does not say."""
        return None

    def load(self, source: Path | str | bytes, spec: ModelSpec | None = None) -> Self:
        """Load a model from a file or from bytes, size-checked first.

        Raises:
            UnsafeFileError: the file is over ``spec.max_bytes``.
            BackendError: the runtime refused the model.
            BackendError: a model is already loaded, or the backend is closed.
        """
        spec = spec or ModelSpec()
        if self._closed or self._loaded:
            raise BackendError(f"{self.name} backend already {'closed' if self._closed else 'loaded'}", reason="misuse")
        model: Path | bytes = source if isinstance(source, bytes) else Path(source)
        size = len(model) if isinstance(model, bytes) else model.stat().st_size
        if size > spec.max_bytes:
            raise UnsafeFileError(f"model of {size} bytes is over the {spec.max_bytes} limit", reason="too_large")
        self._load(model, spec)
        self._loaded = True
        return self

    def run(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run the model on a batch of inputs (blocking).

        Raises:
            BackendError: no model loaded, bad input, or the runtime failed.
        """
        if self._closed or not self._loaded:
            raise BackendError(f"{self.name} backend has no model loaded", reason="model_missing")
        return self._run(inputs)

    async def run_async(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """`run` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.run, inputs)

    def close(self) -> None:
        """Release the model."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
