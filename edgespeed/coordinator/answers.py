"""What devices answer: results and errors, checked and recorded, settling their tasks.

A result counts only if it conforms to the model's declared outputs (read from tensor headers; nothing is
inflated) and the ledger accepts it (the first result, in time, of an attempt given to that device). A
device that answers with anything else gets no more work. A retryable error ("not now, not here") puts
the task back for another device; any other error ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger
from edgespeed.coordinator.registry import Registry
from edgespeed.coordinator.rollout import Rollouts
from edgespeed.coordinator.tasks import LiveTask, TaskTable
from edgespeed.errors import TensorError
from edgespeed.protocol.messages import Error, Result
from edgespeed.protocol.tensor import nonconformity, tensor_header

__all__ = ["RETRYABLE", "Answers", "batch_rows"]

log = logging.getLogger(__name__)

# Device errors that say "not now, not here": the task goes to another device.
RETRYABLE = frozenset({"queue_full", "shutting_down", "model_missing"})

Db = Callable[..., Any]


class Answers:
    """Takes the results and errors devices send.

    Args:
        wake: tells the scheduler something changed (a slot is free, a task is due again).
        inline_db: ``db`` runs calls inline (a result is then recorded with no await in between).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        registry: Registry,
        tasks: TaskTable,
        rollouts: Rollouts,
        ledger: Ledger,
        db: Db,
        stats: Counter[str],
        wake: Callable[[], None],
        inline_db: bool = False,
    ) -> None:
        self.config = config
        self.registry = registry
        self.tasks = tasks
        self.rollouts = rollouts
        self._ledger = ledger
        self._db = db
        self._stats = stats
        self._wake = wake
        self._inline_db = inline_db

    async def on_result(self, device: str, result: Result) -> None:
        live = self.tasks.get(result.task_id)
        if not await self._conforms(device, result, live):
            return
        if live is not None:
            self.tasks.free(result.task_id, device)
            if live.route is not None:
                self.tasks.free(result.task_id)  # every stage of its pipeline
                live.route = None
        if self._inline_db:  # no await between the commit and the accounting: nothing to interrupt
            accepted = self._ledger.complete(result.task_id, result.attempt, device, result.outputs)
        else:
            job = asyncio.ensure_future(
                self._db(self._ledger.complete, result.task_id, result.attempt, device, result.outputs)
            )
            try:
                accepted = await asyncio.shield(job)
            except asyncio.CancelledError:
                # Closing while the ledger commits: account for what it committed, then stop.
                self._account(result, await job)
                raise
        self._account(result, accepted)
        if not accepted and live is not None and live.waiter is not None:
            # A peer coordinator recorded it first: its outcome is in the ledger already.
            record = await self._db(self._ledger.get, result.task_id)
            if record is not None:
                self.tasks.settle(record)
        self._wake()

    async def _conforms(self, device: str, result: Result, live: LiveTask | None) -> bool:
        """Check a result against the model's declared outputs (headers only: nothing is inflated).

        A device that answers with something else (fabricated, oversized, a decompression bomb) gets no
        more work, and the task goes to another device.
        """
        if live is not None and live.model_id:
            model, rows = live.model_id, live.rows
        else:  # a task of a peer or from before a restart: the ledger knows its model and inputs
            record = await self._db(self._ledger.get, result.task_id)
            if record is None:
                return True  # never ours: the ledger refuses it anyway
            model, rows = record.model_id, batch_rows(record.inputs)
        declared = self.rollouts.outputs(model)
        if not declared:
            return True
        problem = nonconformity(result.outputs, declared, rows=max(rows, 1), max_bytes=self.config.max_result_bytes)
        if problem is None:
            return True
        self._stats["nonconforming"] += 1
        self.registry.quarantine(device, problem)
        log.warning("%s answered %s (%s) with %s: it gets no more work", device, result.task_id, model, problem)
        self.tasks.free(result.task_id)
        if live is not None:
            live.route = None
            live.avoid.add(device)
            live.why = f"{device} answered with {problem}"
        await self._db(self._ledger.release, result.task_id, result.attempt, device)
        self._wake()
        return False

    def _account(self, result: Result, accepted: bool) -> None:
        if not accepted:
            self._stats["duplicates"] += 1  # a late or repeated answer: the first one won
            return
        self._stats["completed"] += 1
        live = self.tasks.finish(result.task_id, result.outputs)
        if live is not None and live.started and live.model_id in self.rollouts.splits:
            self.rollouts.splits[live.model_id].record(time.perf_counter() - live.started)

    async def on_error(self, device: str, error: Error) -> None:
        if not error.task_id:
            log.warning("%s reported %s: %s", device, error.code, error.message)
            return
        live = self.tasks.get(error.task_id)
        if live is not None and live.route is not None and device in live.route[1]:
            self.tasks.free(error.task_id)  # the whole pipeline
            device = live.route[1][-1]  # the attempt is recorded as the last stage's
            live.route = None
        else:
            self.tasks.free(error.task_id, device)
        if error.code in RETRYABLE:
            if live is not None:
                live.avoid.add(device)
                live.why = f"{device}: {error.code}"
            if await self._db(self._ledger.release, error.task_id, error.attempt, device):
                self._stats["retried"] += 1
        elif await self._db(self._ledger.fail, error.task_id, error.attempt, device, error.code, error.message):
            self.tasks.fail(error.task_id, error.code, f"{device}: {error.message}")
        self._wake()


def batch_rows(inputs: Sequence[bytes]) -> int:
    """A request's batch: its first input's first dimension (0 if it cannot say)."""
    try:
        shape = tensor_header(inputs[0])[1] if inputs else ()
    except TensorError:
        return 0
    return shape[0] if shape else 1
