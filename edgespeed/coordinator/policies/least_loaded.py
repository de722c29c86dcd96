"""Least loaded: the device whose last heartbeat reported the least load."""

from __future__ import annotations

from collections.abc import Sequence

from edgespeed.coordinator.registry import DeviceInfo

__all__ = ["LeastLoaded"]


class LeastLoaded:
    """Picks the lowest ``load``, then the shortest queue, then the id (deterministic ties)."""

    def choose(self, candidates: Sequence[DeviceInfo], *, task_id: str) -> DeviceInfo | None:
        if not candidates:
            return None
        return min(candidates, key=lambda d: (d.load, d.queue_depth, d.device_id))
