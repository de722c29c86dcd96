"""Pinned: only the named devices, in the order given."""

from __future__ import annotations

from collections.abc import Sequence

from edgespeed.coordinator.registry import DeviceInfo
from edgespeed.protocol.topics import validate_id

__all__ = ["Pinned"]


class Pinned:
    """The first of ``devices`` that is among the candidates; None if none of them is."""

    def __init__(self, *devices: str) -> None:
        self.devices = tuple(validate_id(d, "device id") for d in devices)

    def choose(self, candidates: Sequence[DeviceInfo], *, task_id: str) -> DeviceInfo | None:
        by_id = {d.device_id: d for d in candidates}
        return next((by_id[d] for d in self.devices if d in by_id), None)
