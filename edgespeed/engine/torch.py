"""PyTorch backend: a known architecture plus safetensors weights, on CPU or CUDA.

Weights load through safetensors (no pickle, no code); the architecture comes
from `edgespeed.engine.zoo`. ``device="auto"`` picks CUDA when torch sees a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgespeed.engine.base import Backend, ModelSpec
from edgespeed.errors import BackendError, ConfigError, MissingDependencyError, UnsafeFileError

__all__ = ["TorchBackend"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch") from exc
    return torch


class TorchBackend(Backend):
    """Runs zoo architectures with safetensors weights.

    Args:
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: intra-op threads for CPU inference. torch's setting is
            process-wide, so the last backend to set it wins.
    """

    name: ClassVar[str] = "torch"
    formats: ClassVar[tuple[str, ...]] = ("safetensors",)
    extra: ClassVar[str] = "torch"

    def __init__(self, *, device: str = "auto", threads: int | None = None) -> None:
        self._device_name = device
        self._threads = threads
        self._model: Any = None
        self._device: Any = None

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("safetensors") is not None

    def _select_device(self, torch: Any) -> Any:
        if self._device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self._device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA was asked for but torch sees no GPU", reason="no_device")
        return device

    def _load(self, source: Path | bytes, spec: ModelSpec) -> None:
        torch = _torch()
        try:
            from safetensors.torch import load, load_file
        except ImportError as exc:
            raise MissingDependencyError("safetensors", "torch") from exc
        from edgespeed.engine import zoo

        if not spec.architecture:
            raise ConfigError("a safetensors model needs an architecture name (ModelSpec.architecture)")
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        self._device = self._select_device(torch)
        name = source.name if isinstance(source, Path) else "the weights"
        try:
            state = load(source) if isinstance(source, bytes) else load_file(str(source), device="cpu")
        except Exception as exc:  # SafetensorError on a corrupt header
            raise UnsafeFileError(f"refused {name}: {exc}", reason="corrupt") from exc
        model = zoo.build(spec.architecture, **spec.options)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing, unexpected or misshapen weights
            raise BackendError(f"{name} does not fit {spec.architecture!r}: {exc}", reason="bad_model") from exc
        self._model = model.eval().to(self._device)

    def _run(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        torch = _torch()
        try:
            # Decoded inputs are read-only views of the message; torch wants memory it may write.
            tensors = [torch.from_numpy(_writable(x)).to(self._device) for x in inputs]
            with torch.inference_mode():
                out = self._model(*tensors)
        except (RuntimeError, TypeError, ValueError) as exc:  # shape and dtype mismatches
            raise BackendError(f"torch: {exc}", reason="bad_input") from exc
        outputs = out if isinstance(out, list | tuple) else [out]
        return [o.detach().cpu().numpy() for o in outputs]

    def describe(self) -> dict[str, str]:
        torch = _torch()
        info = {"backend": self.name, "runtime": f"torch {torch.__version__}"}
        if self._device is not None:
            info["device"] = str(self._device)
        info["threads"] = str(torch.get_num_threads())
        return info

    def close(self) -> None:
        self._model = None
        super().close()


def _writable(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    x = np.ascontiguousarray(x)
    return x if x.flags.writeable else x.copy()
