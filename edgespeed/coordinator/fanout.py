"""Fan-out over `Coordinator.submit`: many inputs (map), one batch across devices (scatter), one input on
several devices combined (ensemble). Each is a thin layer on tasks; every task still ends by its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from edgespeed.coordinator.tasks import Array, Outputs, TaskHandle
from edgespeed.errors import ConfigError, TaskError

__all__ = ["Submits", "ensemble", "gather", "map_inputs", "scatter"]

T = TypeVar("T")


class Submits(Protocol):
    """What fan-out needs of a coordinator."""

    async def submit(
        self,
        model: str,
        inputs: Array | Sequence[Array],
        *,
        deadline: float | None = None,
        device: str | None = None,
        task_id: str | None = None,
    ) -> TaskHandle: ...

    async def infer(
        self, model: str, inputs: Array | Sequence[Array], *, deadline: float | None = None, device: str | None = None
    ) -> Array | Outputs: ...

    def devices_for(self, model: str) -> list[str]: ...


async def gather(aws: Sequence[Awaitable[T]], return_exceptions: bool) -> list[Any]:
    """Await all; on the first error (unless returned) the rest are cancelled before raising."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks, return_exceptions=return_exceptions))
    finally:
        for task in tasks:
            task.cancel()


async def map_inputs(
    coordinator: Submits,
    model: str,
    inputs: Iterable[Array | Sequence[Array]],
    *,
    concurrency: int,
    deadline: float | None,
    return_exceptions: bool,
) -> list[Any]:
    """`Coordinator.map`: `infer` over many inputs, at most ``concurrency`` in flight, results in order."""
    if concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    slots = asyncio.Semaphore(concurrency)

    async def one(x: Array | Sequence[Array]) -> Any:
        async with slots:
            return await coordinator.infer(model, x, deadline=deadline)

    return await gather([one(x) for x in inputs], return_exceptions)


async def scatter(
    coordinator: Submits, model: str, batch: Array, *, parts: int | None, deadline: float | None
) -> Array | tuple[Array, ...]:
    """`Coordinator.scatter`: ``batch`` split along its first axis across devices, outputs merged in order."""
    if parts is None:
        parts = max(1, len(coordinator.devices_for(model)))
    pieces = [p for p in np.array_split(batch, min(parts, len(batch))) if len(p)]
    handles = [await coordinator.submit(model, p, deadline=deadline) for p in pieces]
    results = await gather([h.result() for h in handles], False)
    merged = tuple(np.concatenate([r[i] for r in results]) for i in range(len(results[0])))
    return merged[0] if len(merged) == 1 else merged


async def ensemble(
    coordinator: Submits,
    model: str,
    inputs: Array | Sequence[Array],
    *,
    devices: Sequence[str] | None,
    mode: Literal["mean", "vote"],
    deadline: float | None,
) -> Array:
    """`Coordinator.ensemble`: the same input on several devices, the first outputs combined."""
    if mode not in ("mean", "vote"):
        raise ConfigError(f"unknown ensemble mode {mode!r}: mean or vote")
    members = list(devices) if devices is not None else coordinator.devices_for(model)
    if not members:
        raise TaskError(f"no device runs {model!r} now", code="no_capable_device")
    handles = [await coordinator.submit(model, inputs, deadline=deadline, device=d) for d in members]
    firsts = [r[0] for r in await gather([h.result() for h in handles], False)]
    if mode == "mean":
        mean: Array = np.mean(np.stack(firsts).astype(np.float64), axis=0)
        return mean.astype(firsts[0].dtype)
    votes = np.stack([f.argmax(axis=-1) for f in firsts])  # members x rows
    classes = firsts[0].shape[-1]
    counts = np.apply_along_axis(np.bincount, 0, votes, minlength=classes)  # classes x rows
    return counts.argmax(axis=0)  # type: ignore[no-any-return]
