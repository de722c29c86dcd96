"""Ascend NPU backend: the torch backend on the ``npu`` device, through torch_npu."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, ClassVar

from edgespeed.engine.torch import TorchBackend
from edgespeed.errors import BackendError, MissingDependencyError

__all__ = ["NpuBackend"]


class NpuBackend(TorchBackend):
    """Zoo architectures with safetensors weights on an Ascend NPU (``npu:N``)."""

    name: ClassVar[str] = "npu"
    extra: ClassVar[str] = "npu"

    def __init__(self, *, device: str = "npu:0", threads: int | None = None) -> None:
        super().__init__(device=device, threads=threads)

    @classmethod
    def available(cls) -> bool:
        return super().available() and importlib.util.find_spec("torch_npu") is not None

    def _select_device(self, torch: Any) -> Any:
        try:
            importlib.import_module("torch_npu")  # registers the "npu" device with torch
        except ImportError as exc:
            raise MissingDependencyError("torch_npu", "npu") from exc
        if not torch.npu.is_available():
            raise BackendError("torch_npu is installed but sees no Ascend NPU", reason="no_device")
        return torch.device(self._device_name)
