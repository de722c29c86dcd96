"""The scheduler: placement, dispatch, leases, re-dispatch, device loss, and what devices answer.

Every task is in the ledger before it is placed. A round takes the due tasks (pending, or dispatched
with their lease run out), gives each a device that runs its model now (a split model's request one
device per stage), claims it in the ledger (atomic, so peers sharing the ledger never both send it)
and sends it sealed. Every tick it also ends the tasks past their deadline, notices silent devices,
and asks the ledger about the tasks someone awaits here, so a task another process ended settles here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from edgespeed._compat import timeout as timeout_after
from edgespeed.coordinator.answers import batch_rows
from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger, TaskRecord, TaskState
from edgespeed.coordinator.policies import Policy, Requirements, capable
from edgespeed.coordinator.registry import DeviceStatus, Registry
from edgespeed.coordinator.rollout import Rollouts
from edgespeed.coordinator.splits import SplitModel
from edgespeed.coordinator.tasks import LiveTask, TaskTable
from edgespeed.errors import PayloadTooLargeError, TransportError
from edgespeed.protocol.messages import Hop, Task

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

TICK_S = 0.1
POLL_S = 0.25  # how often the ledger is asked about tasks awaited here (a peer may end them)
REFRESH_S = 1.0  # how often an unknown model makes us look for split models another process published

Send = Callable[[str, Task], Awaitable[None]]
Db = Callable[..., Any]


class Scheduler:
    """Places and dispatches the tasks of the ledger.

    Args:
        send: seals and publishes a task to a device (raises `TransportError` or `PayloadTooLargeError`).
        connected: whether the transport is up (no round is attempted while it is down).
        db: runs a ledger call (inline for SQLite, in a thread for a server).
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
        policy: Policy,
        send: Send,
        connected: Callable[[], bool],
        stats: Counter[str],
    ) -> None:
        self.config = config
        self.registry = registry
        self.tasks = tasks
        self.rollouts = rollouts
        self._ledger = ledger
        self._db = db
        self._policy = policy
        self._send_task = send
        self._connected = connected
        self._stats = stats
        self._lease_ms = int(config.lease_s * 1000)
        self._wake = asyncio.Event()
        self._backlog = True  # until the first round has looked at the ledger
        self._last_round = 0.0
        self._last_poll = 0.0
        self._last_refresh = 0.0
        self._started = time.monotonic()
        self.closed = False

    def wake(self) -> None:
        """Something changed (a device, a model, an answer): place what waits now, not at the next tick."""
        self._wake.set()

    # -- admitting -----------------------------------------------------------

    async def admit(
        self, task_id: str, model: str, inputs: tuple[bytes, ...], deadline_ms: int, pin: str | None
    ) -> bool:
        """Record a new task; when nothing else waits for a device, place and send it at once.

        Returns False if the ledger knew the task already (submitting an id twice does not run it twice).
        """
        live = self.tasks.track(task_id, model)
        live.rows = batch_rows(inputs)
        split = self.rollouts.splits.get(model)
        if split is not None:
            live.started = time.perf_counter()
        device_id = None
        if not self._backlog and split is None:
            # Nothing is waiting for a device: place this one now, recorded and claimed in one transaction.
            record = TaskRecord(
                task_id, model, (), deadline_ms, TaskState.PENDING, 0, None, 0, None, None, None, 0, pin
            )
            device_id = self._choose(record, live)[0]
        if device_id is None:
            added: bool = await self._db(self._ledger.add, task_id, model, inputs, deadline_ms, pin=pin)
            if added:
                self._stats["submitted"] += 1
                self._backlog = True
                self._wake.set()
            return added
        added = await self._db(
            self._ledger.add_claimed, task_id, model, inputs, deadline_ms, device_id, lease_ms=self._lease_ms, pin=pin
        )
        if added:
            self._stats["submitted"] += 1
            self.tasks.hold(task_id, device_id)
            await self._send(device_id, Task(task_id, 1, model, deadline_ms, inputs))
        return added

    # -- the loop --------------------------------------------------------------

    async def run(self) -> None:
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            if self.closed:
                return
            try:
                await self._tick()
                if time.monotonic() - self._last_poll > POLL_S:
                    self._last_poll = time.monotonic()
                    await self.poll()
            except Exception:  # the scheduler must outlive any one failure; the ledger keeps the work
                log.exception("scheduling failed; retrying")
                await asyncio.sleep(TICK_S)

    async def poll(self) -> None:
        """Settle the live tasks that the ledger says have ended (by a peer, or before a restart)."""
        live = self.tasks.ids()
        if live:
            for record in await self._db(self._ledger.ended, live):
                self.tasks.settle(record)

    async def _tick(self) -> None:
        now = time.monotonic()
        periodic = now - self._last_round >= TICK_S
        if periodic:
            # Deadlines, silent devices and run-out leases are checked every tick; between ticks a
            # wake-up only places what waits for a device.
            self._last_round = now
            for device, status in self.registry.sweep():
                log.info("device %s is %s", device, status.value)
                if status is DeviceStatus.LOST:
                    await self.device_lost(device)
            for task_id in await self._db(self._ledger.expire):
                live = self.tasks.get(task_id)
                why = f" ({live.why})" if live is not None and live.why else ""
                self.tasks.fail(task_id, "deadline", "no result by the deadline" + why)
        if not self._connected() or not (periodic or self._backlog):
            return
        sends: list[Awaitable[None]] = []
        backlog = False
        for record in await self._db(self._ledger.due, limit=512):
            send = await self._place(record)
            if send is not None:
                sends.append(send)
            else:
                backlog = True
        self._backlog = backlog
        if sends:
            await asyncio.gather(*sends)

    # -- placing ---------------------------------------------------------------

    async def _place(self, record: TaskRecord) -> Awaitable[None] | None:
        task_id = record.task_id
        live = self.tasks.track(task_id, record.model_id)
        live.rows = live.rows or batch_rows(record.inputs)
        if record.attempt >= self.config.max_attempts:
            await self.abort(task_id, "attempts_exhausted", f"{record.attempt} attempts failed {live.why}".strip())
            return None
        split = self.rollouts.splits.get(record.model_id)
        if split is None and self.rollouts.entry(record.model_id) is None:
            split = await self._find_split(record.model_id)
        if split is not None:
            return await self._place_split(record, split, live)
        device, verdict = self._choose(record, live)
        if device is None:
            if verdict is not None:
                await self.abort(task_id, *verdict)
            return None
        attempt = await self._db(self._ledger.claim, task_id, device, lease_ms=self._lease_ms)
        if attempt is None:
            return None  # a peer coordinator took it
        if record.state is TaskState.DISPATCHED:
            self._stats["redispatched"] += 1  # its lease ran out on a device that never answered
        self.tasks.hold(task_id, device)
        return self._send(device, Task(task_id, attempt, record.model_id, record.deadline_ms, record.inputs))

    async def _find_split(self, model: str) -> SplitModel | None:
        """A model we do not know may be a split model another process just published: look (rate-limited)."""
        if time.monotonic() - self._last_refresh >= REFRESH_S:
            self._last_refresh = time.monotonic()
            if await self.rollouts.refresh_splits():
                log.info("learnt split models published by another process: %s", ", ".join(self.rollouts.splits))
        return self.rollouts.splits.get(model)

    async def _place_split(self, record: TaskRecord, split: SplitModel, live: LiveTask) -> Awaitable[None] | None:
        """Give each stage a device that runs its shard; the last one answers, so the attempt is its."""
        devices: list[str] = []
        for k, shard in enumerate(split.shards):
            stage = dataclasses.replace(record, model_id=shard)
            preferred = split.preferred[k] if k < len(split.preferred) else ""
            info = self.registry.get(preferred)
            if (
                info is not None
                and info.status is DeviceStatus.ONLINE
                and self.rollouts.runs(info, shard)
                and self.tasks.load(preferred) < self.config.max_inflight
                and preferred not in live.avoid
                and (record.pin is None or preferred == record.pin)
            ):
                devices.append(preferred)
                continue
            device, verdict = self._choose(stage, live)  # the planned device is gone or busy: re-place this stage
            if device is None:
                if verdict is not None:
                    await self.abort(record.task_id, verdict[0], f"stage {k + 1} ({shard}): {verdict[1]}")
                return None
            devices.append(device)
        attempt = await self._db(self._ledger.claim, record.task_id, devices[-1], lease_ms=self._lease_ms)
        if attempt is None:
            return None
        self.tasks.hold(record.task_id, *devices)
        live.route = (attempt, tuple(devices))
        route = tuple(Hop(d, m, split.codec) for d, m in zip(devices[1:], split.shards[1:], strict=True))
        task = Task(
            record.task_id,
            attempt,
            split.shards[0],
            record.deadline_ms,
            record.inputs,
            reply_to=self.config.coordinator_id,
            route=route,
        )
        return self._send(devices[0], task)

    def _choose(self, record: TaskRecord, live: LiveTask) -> tuple[str | None, tuple[str, str] | None]:
        """A device for the task; or None and, when no device ever could, the error to end it with."""
        model, pinned = record.model_id, record.pin
        ready = self.rollouts.placeable(model)
        if pinned is not None:
            ready = [d for d in ready if d.device_id == pinned]
        cap = self.config.max_inflight
        free = [d for d in ready if d.device_id not in live.avoid and self.tasks.load(d.device_id) < cap]
        if free:
            # Our own count of outstanding tasks is fresher than the last heartbeat's load.
            views = [dataclasses.replace(d, load=self.tasks.load(d.device_id) + d.load) for d in free]
            chosen = self._policy.choose(views, task_id=record.task_id)
            return (chosen.device_id if chosen else None), None
        if ready:
            if live.avoid and all(d.device_id in live.avoid for d in ready):
                live.avoid.clear()  # every device said "not now": try them again next tick
            return None, None
        return None, self._hopeless(record, live)

    def _hopeless(self, record: TaskRecord, live: LiveTask) -> tuple[str, str] | None:
        """Why no device could ever run the task; None while one may yet (``live.why`` says which)."""
        model, pinned = record.model_id, record.pin
        alive = self.registry.devices(DeviceStatus.ONLINE, DeviceStatus.SUSPECT)
        entry = self.rollouts.entry(model)
        if entry is None:
            if time.monotonic() - self._started < max(2.0, 1.5 * self.config.heartbeat_s) or any(
                model in d.models for d in alive
            ):
                live.why = f"waiting to learn of model {model!r}"
                return None
            return "unknown_model", f"no model {model!r} is published in fleet {self.config.fleet!r}"
        if pinned is not None:
            alive = [d for d in alive if d.device_id == pinned]
        version = entry.manifest.version
        hopeful, reasons = [], []
        for device in alive:
            state, detail = entry.status.get(device.device_id, ("", ""))
            if not capable([device], Requirements(formats=entry.formats)):
                reasons.append(f"{device.device_id} has no backend for {'/'.join(entry.formats)}")
            elif state == f"failed@{version}":
                reasons.append(f"{device.device_id}: {detail}")
            else:
                hopeful.append(device.device_id)
        if hopeful:
            live.why = f"waiting for {model} on {', '.join(hopeful)}"
            return None
        if not alive:
            live.why = "no device online" + (f" named {pinned}" if pinned else "")
            return None
        return "no_capable_device", f"no device can run {model} v{version}: " + "; ".join(reasons)

    async def _send(self, device: str, task: Task) -> None:
        try:
            await self._send_task(device, task)
            self._stats["dispatched"] += 1
        except PayloadTooLargeError as exc:
            self.tasks.free(task.task_id, device)
            await self.abort(task.task_id, "input_too_large", f"the task does not fit in one message: {exc}")
        except TransportError as exc:
            log.info("task %s not sent to %s (%s); it stays due", task.task_id, device, exc)
            self.tasks.free(task.task_id)
            await self._db(self._ledger.release, task.task_id, task.attempt)

    async def abort(self, task_id: str, code: str, message: str) -> None:
        """End a task with an error no device reported (the ledger first: a peer may have ended it)."""
        if await self._db(self._ledger.abort, task_id, code, message):
            self.tasks.fail(task_id, code, message)

    # -- device loss -------------------------------------------------------------

    async def device_lost(self, device: str) -> None:
        """What a lost device held goes elsewhere; split models that planned on it are planned again."""
        for split in self.rollouts.splits.values():
            if device in split.preferred:
                left = [
                    d.device_id
                    for d in self.registry.online()
                    if d.device_id != device and all(self.rollouts.runs(d, shard) for shard in split.shards)
                ]
                replanned = split.replan(left)
                if replanned is not None:
                    log.info("%s re-planned without %s: %s", split.name, device, replanned.describe())
                    self._stats["replanned"] += 1
        for live in self.tasks.device_lost(device):
            assert live.route is not None
            attempt = live.route[0]
            live.route = None  # a stage of its pipeline is gone: the whole request is placed again
            self.tasks.free(live.task_id)
            if await self._db(self._ledger.release, live.task_id, attempt):
                self._stats["redispatched"] += 1
        self.rollouts.device_lost(device)
        released = await self._db(self._ledger.release_device, device)
        if released:
            log.info("%d tasks of %s go to other devices", len(released), device)
            self._stats["redispatched"] += len(released)
        self._wake.set()
