"""Running tasks: the bounded task queue, the micro-batching workers, split-model stages.

`Runner` owns the queue of tasks taken (bounded by ``queue_size``: the
dispatcher refuses what does not fit) and the workers that run them. A worker
takes compatible tasks (same model, inputs of the same dtype and trailing
shape) in micro-batches of up to ``max_batch``, waiting at most ``max_wait_ms``
for more; both are read from the live settings, so a remote configuration
changes them. A stage of a split model runs its tasks one by one and forwards
its outputs, sealed, to the device of the next stage. Every task taken gets an
answer: its result, or an error saying why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgespeed._compat import timeout as timeout_after
from edgespeed.agent.cache import ModelCache
from edgespeed.agent.config import AgentConfig
from edgespeed.agent.delivery import Delivery
from edgespeed.agent.installer import LoadedModel
from edgespeed.errors import BackendError, EdgeSpeedError
from edgespeed.protocol.messages import Result, Task
from edgespeed.protocol.tensor import DEFAULT_MAX_TENSOR_BYTES, decode_tensor, encode_tensor, encode_with_codec

__all__ = ["Job", "Runner"]

log = logging.getLogger(__name__)

_Inputs = list[np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Job:
    """A task taken, with who sent it and when it arrived."""

    task: Task
    sender: str
    received: float


# An input may decode to at most this many times its size on the wire (and never past the codec's own cap):
# real tensors shrink 2-10x with the codecs (fp16, int8, zstd, lz4); a decompression bomb shrinks 1000x and
# more, and is refused from its header before anything is allocated.
MAX_INFLATION = 64


def inflation_bound(encoded: bytes) -> int:
    """The most bytes an input of ``len(encoded)`` bytes may decode to here."""
    return min(DEFAULT_MAX_TENSOR_BYTES, max(1 << 20, MAX_INFLATION * len(encoded)))


class Runner:
    """The task queue and the workers that run it.

    Args:
        config: the agent's configuration (``queue_size``, who the coordinator is).
        models: the loaded models (the installer's table, read only here).
        settings: the live settings (``max_batch``, ``max_wait_ms``), changed by remote configuration.
        delivery: answers each task and forwards split-model stages.
        cache: told which models are used, so the least recently used go first.
    """

    def __init__(
        self,
        config: AgentConfig,
        models: Mapping[str, LoadedModel],
        settings: Mapping[str, Any],
        delivery: Delivery,
        cache: ModelCache,
    ) -> None:
        self._config = config
        self._models = models
        self._settings = settings
        self._delivery = delivery
        self._cache = cache
        self._queue: asyncio.Queue[Job] = asyncio.Queue(config.queue_size)
        self.busy = 0  # batches being run

    @property
    def depth(self) -> int:
        """Tasks waiting."""
        return self._queue.qsize()

    @property
    def load(self) -> float:
        """Tasks waiting and batches running, relative to the queue's size."""
        return min(1e6, (self._queue.qsize() + self.busy) / self._config.queue_size)

    def take(self, task: Task, sender: str) -> bool:
        """Queue a task; False when the queue is full (the caller refuses it)."""
        try:
            self._queue.put_nowait(Job(task, sender, time.monotonic()))
        except asyncio.QueueFull:
            return False
        return True

    async def drained(self) -> None:
        """Return once no task waits or runs; the caller bounds the wait (it polls, only while closing)."""
        while not self._queue.empty() or self.busy:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def work(self) -> None:
        """One worker: take a micro-batch, run it, answer every task in it; forever."""
        carry: Job | None = None
        while True:
            # An idle wait for work: closing the agent cancels it.
            first = carry or await self._queue.get()
            carry = None
            self.busy += 1
            batch = [first]
            try:
                batch, carry = await self._collect(first)
                await self._run_batch(batch)
            except Exception:  # a worker must outlive any one batch; the tasks are answered below
                log.exception("batch of %s failed", first.task.model_id)
                for job in batch:
                    with contextlib.suppress(Exception):
                        await self._delivery.fail(
                            job.task, job.sender, "backend_failure", "the device failed running this task"
                        )
            finally:
                self.busy -= 1

    async def _collect(self, first: Job) -> tuple[list[Job], Job | None]:
        """The batch that starts with ``first``, and the task taken that belongs to the next one."""
        limit, wait_s = self._settings["max_batch"], self._settings["max_wait_ms"] / 1000
        if first.task.route or first.sender != self._config.coordinator:
            # A stage of a split model runs its requests one by one: a micro-batch would move
            # the requests in flight through the pipeline together and leave the other stages
            # idle meanwhile (measured: 0.93x the whole model with batches of 8, 1.4x with
            # half the queue, 1.5x one by one).
            limit, wait_s = 1, 0.0
        batch = [first]
        deadline = time.monotonic() + wait_s
        while len(batch) < limit:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with timeout_after(remaining):
                        nxt = await self._queue.get()
                except TimeoutError:
                    break
            if nxt.task.model_id != first.task.model_id:
                return batch, nxt
            batch.append(nxt)
        return batch, None

    async def _run_batch(self, batch: Sequence[Job]) -> None:
        now_ms = time.time_ns() // 1_000_000
        ready: list[tuple[Job, _Inputs]] = []
        model = self._models.get(batch[0].task.model_id)
        for job in batch:
            task = job.task
            if task.deadline_ms and task.deadline_ms < now_ms:
                await self._delivery.fail(task, job.sender, "deadline", "the deadline passed before the task ran")
            elif model is None:
                await self._delivery.fail(
                    task, job.sender, "model_missing", f"model {task.model_id!r} is not loaded here"
                )
            else:
                try:
                    ready.append(
                        (job, [model.pre(decode_tensor(x, max_bytes=inflation_bound(x))) for x in task.inputs])
                    )
                except EdgeSpeedError as exc:
                    await self._delivery.fail(task, job.sender, "bad_input", str(exc))
        if not ready or model is None:
            return
        self._cache.touch(batch[0].task.model_id)
        groups: dict[tuple[Any, ...], list[tuple[Job, _Inputs]]] = {}
        for job, arrays in ready:
            groups.setdefault(tuple((a.dtype.str, a.shape[1:]) for a in arrays), []).append((job, arrays))
        for group in groups.values():
            await self._run_group(model, group)

    async def _run_group(self, model: LoadedModel, group: list[tuple[Job, _Inputs]]) -> None:
        try:
            if len(group) == 1:
                outputs = [await model.run(group[0][1])]
            else:
                stacked = [np.concatenate([arrays[i] for _, arrays in group]) for i in range(len(group[0][1]))]
                merged = await model.run(stacked)
                sizes = np.cumsum([arrays[0].shape[0] for _, arrays in group])[:-1]
                outputs = [list(parts) for parts in zip(*(np.split(o, sizes) for o in merged), strict=True)]
        except BackendError as exc:
            if len(group) > 1:  # find the one input that broke the batch; the others still get answers
                for item in group:
                    await self._run_group(model, [item])
                return
            job = group[0][0]
            await self._delivery.fail(job.task, job.sender, exc.reason, str(exc))
            return
        answers = []
        for (job, _), outs in zip(group, outputs, strict=True):
            task = job.task
            try:
                if task.route:  # a split model: the next stage gets our outputs as its inputs, sealed for it
                    hop = task.route[0]
                    forwarded = Task(
                        task.task_id,
                        task.attempt,
                        hop.model_id,
                        task.deadline_ms,
                        tuple(encode_with_codec(model.post(o), hop.codec) for o in outs),
                        reply_to=task.reply_to or job.sender,
                        route=task.route[1:],
                    )
                    answers.append(self._delivery.send(hop.device, forwarded))
                    continue
                result = Result(task.task_id, task.attempt, tuple(encode_tensor(model.post(o)) for o in outs))
            except EdgeSpeedError as exc:
                answers.append(self._delivery.fail(task, job.sender, "backend_failure", str(exc)))
                continue
            answers.append(self._delivery.answer(task, job.sender, result))
        if len(answers) == 1:
            await answers[0]
        else:
            await asyncio.gather(*answers)  # published together: one broker round trip, not one per task
