"""What a placement policy is: given capable devices, choose one for a task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from edgespeed.coordinator.registry import DeviceInfo

__all__ = ["Policy"]


class Policy(Protocol):
    """Chooses a device among capable, online candidates (sorted by id); None if it will not."""

    def choose(self, candidates: Sequence[DeviceInfo], *, task_id: str) -> DeviceInfo | None: ...
