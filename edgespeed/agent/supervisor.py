"""Supervision: the agent's background parts run as one group, and none ends unseen.

Every long-running part of a device agent (the dispatcher, the installer, the
outbox flusher, the heartbeat, the workers) is a task of one `Supervisor`. Each
part handles the failures it expects itself: a bad message is dropped, a model
that does not install is reported, a batch that fails is answered with errors.
Anything else ending a part (an exception outside that, or a part returning
while the agent runs, as the dispatcher does when its connection closes under
it) is a fault of the agent.

The policy is fail fast. The fault is logged at CRITICAL with its traceback,
and the agent is taken down: the `Device` records the failure as a
`PartFailedError`, closes itself (briefly draining what it holds, then leaving
with reason ``failed``), and ``Device.run_until_closed()`` raises it; the CLIs
exit with status 1 and the service manager starts a fresh agent
(``Restart=on-failure`` in devices/edgespeed-agent.service). The model cache
and the outbox are on disk, so the new agent picks up where this one stopped.

Restarting the one part in place was the alternative. It is not done because
the parts share state (a batch half run, a download in flight, the models
table), and a part restarted over state its crash left behind would fail again
or, worse, carry on wrongly; a fresh process starts from a state known good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from edgespeed.errors import EdgeSpeedError

__all__ = ["PartFailedError", "Supervisor"]

log = logging.getLogger(__name__)


class PartFailedError(EdgeSpeedError):
    """A part of the device agent ended unexpectedly, and the agent closed itself.

    Attributes:
        part: the part's name (``dispatch``, ``install``, ``outbox``, ``heartbeat``, ``worker0``, ...).
    """

    def __init__(self, part: str, detail: str) -> None:
        super().__init__(f"the agent stopped: its {part} part failed ({detail})")
        self.part = part


class Supervisor:
    """Starts the parts of one agent as tasks and reports the first one that ends while it should run.

    Args:
        name: the agent's name, used to name the tasks (``device[dev-a].install``).
        on_failure: called once, with the first failure; it is called from a task's
            done callback, so it must not block (the `Device` schedules its own close).
    """

    def __init__(self, name: str, on_failure: Callable[[PartFailedError], None]) -> None:
        self.name = name
        self.failure: PartFailedError | None = None
        self._on_failure = on_failure
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._stopping = False

    def start(self, part: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as the part named ``part``; it should run until `stop`."""
        task = asyncio.create_task(work, name=f"{self.name}.{part}")
        self._tasks[task] = part
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return  # stopped on purpose (or the event loop is closing)
        part = self._tasks[task]
        exc = task.exception()
        if exc is None:
            failure = PartFailedError(part, "it ended while the agent was running")
        else:
            failure = PartFailedError(part, f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        log.critical("%s: part %r failed; taking the agent down", self.name, part, exc_info=exc)
        if self.failure is None:
            self.failure = failure
            self._on_failure(failure)

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel every part and wait (up to ``timeout``) until they have ended."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if not self._tasks:
            return
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in done:
            # Retrieved here, so a part that raised while being cancelled is logged, not left to
            # "exception was never retrieved" at garbage collection.
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s raised while stopping", task.get_name(), exc_info=task.exception())
        for task in pending:
            log.error("%s did not stop within %.1f s", task.get_name(), timeout)
