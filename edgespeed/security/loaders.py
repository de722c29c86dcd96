"""Loading weights without executing anything the file says.

No pickle: safetensors, NumPy ``.npy``/``.npz`` with ``allow_pickle=False``,
and PyTorch checkpoints only through ``torch.load(weights_only=True)``. Files
are size-checked before they are read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.errors import MissingDependencyError, UnsafeFileError

__all__ = ["DEFAULT_MAX_WEIGHTS", "load_weights"]

DEFAULT_MAX_WEIGHTS = 4 * 1024**3


def load_weights(path: Path, *, max_bytes: int = DEFAULT_MAX_WEIGHTS) -> dict[str, Any]:
    """Load a state dict of arrays (numpy, or torch tensors for ``.pt``) safely.

    Raises:
        UnsafeFileError: over ``max_bytes``, an unknown suffix, or content
            that needs pickle (refused, never run).
        MissingDependencyError: safetensors or torch is not installed.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UnsafeFileError(f"{path.name} is {size} bytes, over the {max_bytes} limit", reason="too_large")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        raise UnsafeFileError(f"refused {path.name}: {exc}", reason="pickle") from exc
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as exc:
            raise MissingDependencyError("safetensors", "torch") from exc
        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # SafetensorError and friends: a corrupt header
            raise UnsafeFileError(f"refused {path.name}: {exc}", reason="corrupt") from exc
    if suffix in (".pt", ".pth"):
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError("torch", "torch") from exc
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError for anything beyond plain tensors
            raise UnsafeFileError(f"refused {path.name}: {exc}", reason="pickle") from exc
        if not isinstance(loaded, dict):
            raise UnsafeFileError(f"{path.name} is not a state dict", reason="not_state_dict")
        return dict(loaded)
    raise UnsafeFileError(f"unknown weights format {suffix!r}", reason="unknown_format")
