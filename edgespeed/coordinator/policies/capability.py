"""The capability filter: which devices can run a model at all."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgespeed.coordinator.registry import DeviceInfo
from edgespeed.protocol.formats import backends_for

__all__ = ["Requirements", "capable"]


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a task needs of a device.

    Attributes:
        formats: model formats of the variants on offer; a device needs a backend for one.
        backend: a specific backend, if the task insists.
        accelerator: a prefix the device's accelerators must have, e.g. ``cuda`` or ``npu``.
        min_memory_bytes: physical memory at least.
        model: a model id the device must have loaded (from its heartbeats).
    """

    formats: tuple[str, ...] = ()
    backend: str = ""
    accelerator: str = ""
    min_memory_bytes: int = 0
    model: str = ""


def capable(devices: Iterable[DeviceInfo], need: Requirements) -> list[DeviceInfo]:
    """The devices that meet ``need``, in the order given."""
    out = []
    for device in devices:
        backends = set(device.card.backends)
        if need.formats and not any(backends.intersection(backends_for(f)) for f in need.formats):
            continue
        if need.backend and need.backend not in backends:
            continue
        if need.accelerator and not any(a.startswith(need.accelerator) for a in device.card.accelerators):
            continue
        if device.card.memory_bytes < need.min_memory_bytes:
            continue
        if need.model and need.model not in device.models:
            continue
        out.append(device)
    return out
