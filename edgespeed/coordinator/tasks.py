"""The task table: one record per live task, settled exactly once.

A task lives here from its submission (or from the first `wait` on it) until it ends. Its record
holds what this process keeps for it in memory: the waiter a caller awaits, the devices that hold
a slot for it, the devices that said "not now", why it still waits, and the route of a split
model's request. The ledger stays the source of truth: a task that another process ends (a peer
coordinator, or `coordinator run` beside a CLI) settles here when the ledger says so (`settle`),
whoever ended it first.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgespeed._compat import timeout as timeout_after
from edgespeed.coordinator.ledger import TaskRecord, TaskState
from edgespeed.errors import TaskError
from edgespeed.protocol.tensor import decode_tensor

__all__ = ["LiveTask", "Outputs", "TaskHandle", "TaskTable", "Waits", "await_outputs"]

Array = np.ndarray[Any, Any]
Outputs = tuple[Array, ...]
Raw = tuple[bytes, ...]


@dataclass
class LiveTask:
    """What this process keeps for one unfinished task."""

    task_id: str
    model_id: str = ""
    waiter: asyncio.Future[Raw] | None = None
    devices: set[str] = field(default_factory=set)  # devices holding a slot for it
    avoid: set[str] = field(default_factory=set)  # devices that said "not now" (queue full, no model yet)
    why: str = ""  # why it still waits, for the error if its deadline passes
    route: tuple[int, tuple[str, ...]] | None = None  # a split model's attempt and its stage devices
    started: float = 0.0  # perf_counter at submission, for a split model's measured latency
    rows: int = 0  # the request's batch (its first input's first dimension): results may have no more


class TaskTable:
    """The live tasks of this process, and how many each device holds."""

    def __init__(self) -> None:
        self._live: dict[str, LiveTask] = {}
        self._held: defaultdict[str, set[str]] = defaultdict(set)  # device -> task ids

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live

    def get(self, task_id: str) -> LiveTask | None:
        return self._live.get(task_id)

    def track(self, task_id: str, model_id: str = "") -> LiveTask:
        """The record of a task, made if it has none yet."""
        live = self._live.get(task_id)
        if live is None:
            live = self._live[task_id] = LiveTask(task_id, model_id)
        elif model_id and not live.model_id:
            live.model_id = model_id
        return live

    def waiter(self, task_id: str) -> asyncio.Future[Raw]:
        """The future that resolves with the task's raw outputs (made if there is none)."""
        live = self.track(task_id)
        if live.waiter is None:
            live.waiter = asyncio.get_running_loop().create_future()
        return live.waiter

    def ids(self) -> list[str]:
        """The live tasks: what the ledger is asked about, in case another process ends them."""
        return list(self._live)

    # -- device slots --------------------------------------------------------

    def hold(self, task_id: str, *devices: str) -> None:
        """``devices`` each hold a slot for the task until it ends or they give it back."""
        live = self.track(task_id)
        for device in devices:
            live.devices.add(device)
            self._held[device].add(task_id)

    def free(self, task_id: str, device: str | None = None) -> None:
        """Give back one device's slot (or every device's) for the task."""
        live = self._live.get(task_id)
        devices = (device,) if device is not None else tuple(live.devices) if live else ()
        for d in devices:
            self._held[d].discard(task_id)
            if live is not None:
                live.devices.discard(d)

    def load(self, device: str) -> int:
        """How many unfinished tasks of this process the device holds."""
        held = self._held.get(device)
        return len(held) if held else 0

    def device_lost(self, device: str) -> list[LiveTask]:
        """Drop every slot of a lost device; returns the split requests that ran through it."""
        for task_id in self._held.pop(device, set()):
            live = self._live.get(task_id)
            if live is not None:
                live.devices.discard(device)
        return [live for live in self._live.values() if live.route is not None and device in live.route[1]]

    # -- outcomes ------------------------------------------------------------

    def finish(self, task_id: str, outputs: Raw) -> LiveTask | None:
        """The task ended with outputs: its waiter gets them and its record is dropped (returned)."""
        live = self._forget(task_id)
        if live is not None and live.waiter is not None and not live.waiter.done():
            live.waiter.set_result(outputs)
        return live

    def fail(self, task_id: str, code: str, message: str) -> LiveTask | None:
        """The task ended with an error: its waiter gets a `TaskError` and its record is dropped."""
        live = self._forget(task_id)
        if live is not None and live.waiter is not None and not live.waiter.done():
            live.waiter.set_exception(TaskError(f"task {task_id}: {message}", code=code, task_id=task_id))
            live.waiter.exception()  # marked seen: a waiter still gets it, a task nobody awaits logs nothing
        return live

    def settle(self, record: TaskRecord) -> bool:
        """Settle a task from what the ledger says, if it has ended there; True if it had."""
        if record.state is TaskState.DONE and record.outputs is not None:
            self.finish(record.task_id, record.outputs)
            return True
        if record.state is TaskState.FAILED:
            self.fail(record.task_id, record.error_code or "failed", record.error_message or "failed")
            return True
        return False

    def close(self) -> None:
        """Every waiter still waiting gets ``closed``: this process stops (the tasks go on in the ledger)."""
        for task_id in list(self._live):
            self.fail(task_id, "closed", "the coordinator closed before the task ended")

    def _forget(self, task_id: str) -> LiveTask | None:
        live = self._live.pop(task_id, None)
        if live is not None:
            for device in live.devices:
                self._held[device].discard(task_id)
        return live


class Waits(Protocol):
    """What a handle needs of its coordinator."""

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Outputs: ...


class TaskHandle:
    """A submitted task; ``await handle.result()`` for its outputs."""

    def __init__(self, coordinator: Waits, task_id: str, model_id: str) -> None:
        self._coordinator = coordinator
        self.task_id = task_id
        self.model_id = model_id

    async def result(self, timeout: float | None = None) -> Outputs:
        """The task's outputs, decoded.

        Raises:
            TaskError: the task ended without a result (``code`` says why).
            TimeoutError: ``timeout`` passed first (the task itself goes on until its deadline).
        """
        return await self._coordinator.wait(self.task_id, timeout=timeout)

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r}, model={self.model_id!r})"


async def await_outputs(future: asyncio.Future[Raw], timeout: float | None) -> Outputs:
    """Wait for a waiter (shielded: a caller's timeout does not cancel the task) and decode its outputs."""
    if timeout is None:
        raw = await asyncio.shield(future)
    else:
        async with timeout_after(timeout):
            raw = await asyncio.shield(future)
    return tuple(decode_tensor(o) for o in raw)
