"""Round robin: each candidate in turn."""

from __future__ import annotations

from collections.abc import Sequence

from edgespeed.coordinator.registry import DeviceInfo

__all__ = ["RoundRobin"]


class RoundRobin:
    """Cycles through the candidates by id, remembering where it stopped even as devices come and go."""

    def __init__(self) -> None:
        self._last = ""

    def choose(self, candidates: Sequence[DeviceInfo], *, task_id: str) -> DeviceInfo | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda d: d.device_id)
        chosen = next((d for d in ordered if d.device_id > self._last), ordered[0])
        self._last = chosen.device_id
        return chosen
