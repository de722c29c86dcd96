"""A synchronous facade over `Coordinator`, for scripts and notebooks.

The coordinator runs on an event loop in a background thread; every method
blocks until its result is ready, bounded by ``timeout``::

    with SyncCoordinator(CoordinatorConfig.from_toml(Path("coordinator.toml"))) as c:
        labels = c.infer("digits", images, deadline=2.0)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.service import Array, Coordinator, Outputs, RolloutReport

__all__ = ["SyncCoordinator"]

T = TypeVar("T")


class SyncCoordinator:
    """`Coordinator` with blocking methods.

    Args:
        config: the coordinator's configuration.
        timeout: seconds any one call may block (tasks also end at their own deadline).
        kwargs: passed to `Coordinator`.
    """

    def __init__(self, config: CoordinatorConfig, *, timeout: float = 600.0, **kwargs: Any) -> None:
        self._coordinator = Coordinator(config, **kwargs)
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgespeed-coordinator", daemon=True)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("the coordinator did not answer in time") from None

    def __enter__(self) -> SyncCoordinator:
        self._thread.start()
        try:
            self._call(self._coordinator.__aenter__())
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        try:
            self._call(self._coordinator.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def coordinator(self) -> Coordinator:
        """The asynchronous coordinator underneath (use its methods from this object's loop only)."""
        return self._coordinator

    def infer(self, model: str, inputs: Array | Sequence[Array], **kwargs: Any) -> Array | Outputs:
        """`Coordinator.infer`."""
        return self._call(self._coordinator.infer(model, inputs, **kwargs))

    def submit(self, model: str, inputs: Array | Sequence[Array], **kwargs: Any) -> str:
        """`Coordinator.submit`; returns the task id (`wait` for its outputs)."""
        return self._call(self._coordinator.submit(model, inputs, **kwargs)).task_id

    def wait(self, task_id: str, *, timeout: float | None = None) -> Outputs:
        """`Coordinator.wait`."""
        return self._call(self._coordinator.wait(task_id, timeout=timeout))

    def map(self, model: str, inputs: Sequence[Array | Sequence[Array]], **kwargs: Any) -> list[Any]:
        """`Coordinator.map`."""
        return self._call(self._coordinator.map(model, inputs, **kwargs))

    def scatter(self, model: str, batch: Array, **kwargs: Any) -> Array | Outputs:
        """`Coordinator.scatter`."""
        return self._call(self._coordinator.scatter(model, batch, **kwargs))

    def ensemble(self, model: str, inputs: Array | Sequence[Array], **kwargs: Any) -> Array:
        """`Coordinator.ensemble`."""
        return self._call(self._coordinator.ensemble(model, inputs, **kwargs))

    def publish_model(self, paths: Sequence[Path | str], **kwargs: Any) -> RolloutReport:
        """`Coordinator.publish_model`."""
        return self._call(self._coordinator.publish_model(paths, **kwargs))

    def counts(self) -> dict[str, int]:
        """`Coordinator.counts`."""
        return self._call(self._coordinator.counts())

    def devices_for(self, model: str) -> list[str]:
        """`Coordinator.devices_for`."""
        return self._call(_value(self._coordinator.devices_for, model))


async def _value(fn: Any, *args: Any) -> Any:
    return fn(*args)
