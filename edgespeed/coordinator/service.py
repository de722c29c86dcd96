"""The coordinator: one facade in front of the fleet.

`Coordinator` holds the lifecycle, the one router of incoming messages and the public API. The work
is done by subsystems, each small and testable alone:

- `Registry` (registry.py): devices, from births, deaths and heartbeats;
- `TaskTable` (tasks.py): one record per live task, settled exactly once;
- `Scheduler` (scheduler.py): placement, dispatch, leases, re-dispatch, device loss;
- `Rollouts` (rollout.py): publishing, signing, key wrapping, readiness, split models;
- fan-out helpers (fanout.py) and the link probe (linkprobe.py);
- the `Ledger` (ledger.py): every fact that must survive a restart or be shared with a peer.

Several coordinators may share a fleet: each has its own MQTT client and replay lane, they share a
PostgreSQL ledger (claims are atomic there), and with ``shared_group`` the broker splits the device
answers between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from edgespeed._compat import Self
from edgespeed._compat import timeout as timeout_after
from edgespeed.coordinator import fanout
from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger, ledger_caller, now_ms, open_ledger
from edgespeed.coordinator.parts import Parts, open_parts
from edgespeed.coordinator.policies import LeastLoaded, Policy, RoundRobin
from edgespeed.coordinator.registry import Registry
from edgespeed.coordinator.rollout import RolloutReport
from edgespeed.coordinator.splits import SplitModel
from edgespeed.coordinator.store import ModelStore
from edgespeed.coordinator.tasks import Array, Outputs, TaskHandle, TaskTable, await_outputs
from edgespeed.errors import ConfigError, EdgeSpeedError, ProtocolError, TaskError
from edgespeed.optimize.planner import Link
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import CoordinatorState, ModelManifest, validate_blob_id
from edgespeed.protocol.tensor import encode_tensor
from edgespeed.security import Sealer
from edgespeed.transport.base import Transport, Will

__all__ = ["Array", "Coordinator", "Outputs", "RolloutReport", "TaskHandle", "default_client_id", "open_ledger"]

T = TypeVar("T")


def default_client_id(config: CoordinatorConfig, purpose: str) -> str:
    """A client id for a short-lived tool beside the coordinator (``coord-cli-1234``)."""
    return f"{config.coordinator_id}-{purpose}-{os.getpid()}"


class Coordinator:
    """The fleet's coordinator. Use as ``async with Coordinator(config) as c``.

    Args:
        config: the coordinator's configuration.
        client_id: the MQTT client id. The default, the coordinator's id, makes a
            persistent session that keeps device answers while it is away. Give
            another (the CLI does) for a short-lived client beside a running
            coordinator: it gets a clean session and its own replay lane.
        ledger: a ledger to use instead of the one the configuration names.
        policy: a placement policy instead of the configured one.
        transport: a transport to use instead of an MQTT connection.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        client_id: str | None = None,
        ledger: Ledger | None = None,
        policy: Policy | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id or config.coordinator_id
        self.primary = self.client_id == config.coordinator_id
        self.epoch = time.time_ns()
        self.policy: Policy = policy or (RoundRobin() if config.policy == "round-robin" else LeastLoaded())
        self.registry = Registry(heartbeat_s=config.heartbeat_s)
        self.tasks = TaskTable()
        self.stats: Counter[str] = Counter()
        self._given_ledger = ledger
        self._given_transport = transport
        self._changed = asyncio.Event()  # the registry or a model's readiness changed
        self._open: Parts | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._open = await open_parts(
            self.config,
            client_id=self.client_id,
            registry=self.registry,
            tasks=self.tasks,
            policy=self.policy,
            stats=self.stats,
            changed=self._changed,
            ledger=self._given_ledger,
            transport=self._given_transport,
            will=self._will(),
        )
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise
        return self

    @property
    def _presence(self) -> bool:
        # Only the coordinator's own session says whether the coordinator is there: a short-lived
        # client beside it (the CLI, the demo's second client) must not say "offline" when it leaves.
        return self.config.presence and self.primary

    def _will(self) -> Will | None:
        if not self._presence:
            return None
        offline = pack_message(CoordinatorState(False, self.epoch), sender=self.config.coordinator_id)
        return Will(topics.coordinator_state(self.config.fleet), offline, retain=True)

    async def _start(self) -> None:
        cfg, o = self.config, self._parts
        await o.transport.__aenter__()
        await o.rollouts.load()
        await o.transport.subscribe(
            topics.coordinator_inbox_filter(cfg.fleet, shared_group=cfg.shared_group),
            topics.device_filter(cfg.fleet, "birth"),
            topics.device_filter(cfg.fleet, "death"),
            topics.device_filter(cfg.fleet, "hb"),
            topics.model_filter(cfg.fleet),
        )
        name = f"coordinator[{self.client_id}]"
        o.workers += [
            asyncio.create_task(o.router.run(), name=f"{name}.read"),
            asyncio.create_task(o.scheduler.run(), name=f"{name}.schedule"),
        ]
        if o.revocation is not None:  # the revocation list: watched, applied, broadcast to the devices
            o.workers.append(asyncio.create_task(o.revocation.run(), name=f"{name}.revocation"))
        hello = pack_message(CoordinatorState(True, self.epoch), sender=cfg.coordinator_id)
        if self._presence:
            await o.transport.publish(topics.coordinator_state(cfg.fleet), hello, retain=True)
        # Devices answer with a heartbeat at once: no waiting a whole interval to learn who is alive.
        await o.transport.publish(topics.broadcast(cfg.fleet, "discover"), hello, qos=0)

    async def close(self) -> None:
        """Leave cleanly: presence offline, connection closed. Unfinished tasks stay in the ledger."""
        if self._closed or self._open is None:
            return
        self._closed = True
        o = self._open
        # Let the scheduler finish its round: a task it claimed is sent, not left to its lease.
        o.scheduler.closed = True
        o.scheduler.wake()
        if len(o.workers) > 1:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with timeout_after(5.0):
                    await asyncio.shield(o.workers[1])
        if o.transport.connected and self._presence:
            with contextlib.suppress(EdgeSpeedError):
                offline = pack_message(CoordinatorState(False, self.epoch), sender=self.config.coordinator_id)
                await o.transport.publish(topics.coordinator_state(self.config.fleet), offline, retain=True)
        await self._teardown()

    async def _teardown(self) -> None:
        o = self._open
        if o is None:
            return
        for task in o.workers:
            task.cancel()
        for task in o.workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        o.server.stop()
        self.tasks.close()
        with contextlib.suppress(Exception):
            await o.transport.close()
        if o.own_ledger:
            o.ledger.close()
        o.replay.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _parts(self) -> Parts:
        if self._open is None:
            raise ConfigError("the coordinator is not open: use `async with Coordinator(...)`")
        return self._open

    @property
    def ledger(self) -> Ledger:
        return self._parts.ledger

    @property
    def store(self) -> ModelStore:
        """The published models this coordinator serves."""
        return self._parts.store

    @property
    def sealer(self) -> Sealer:
        return self._parts.sealer

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result: T = await ledger_caller(self.ledger)(fn, *args, **kwargs)
        return result

    @property
    def chunks_served(self) -> int:
        """Model chunks this coordinator has served to devices."""
        return self._parts.server.served

    # -- tasks: the API ------------------------------------------------------

    async def submit(
        self,
        model: str,
        inputs: Array | Sequence[Array],
        *,
        deadline: float | None = None,
        device: str | None = None,
        task_id: str | None = None,
    ) -> TaskHandle:
        """Record a task and have it placed; returns at once with a handle.

        Args:
            model: the model id.
            inputs: one array, or one per model input (batch first).
            deadline: seconds from now (default: the configured ``deadline_s``).
            device: run only on this device (kept in the ledger: a restart or a peer honours it).
            task_id: an id of your own (submitting an id twice does not run it twice).

        Raises:
            ConfigError: a bad deadline or id.
            TensorError: an input the wire format cannot carry.
        """
        arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
        seconds = self.config.deadline_s if deadline is None else deadline
        if not 0 < seconds <= 7 * 86400:
            raise ConfigError("deadline must be between 0 and 7 days")
        task_id = task_id or f"t-{secrets.token_hex(8)}"
        try:
            if device is not None:
                topics.validate_id(device, "device id")
            validate_blob_id(task_id)
            topics.validate_id(model, "model id")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        encoded = tuple(bytes(encode_tensor(np.ascontiguousarray(a))) for a in arrays)
        deadline_ms = now_ms() + int(seconds * 1000)
        self.tasks.waiter(task_id)  # before the task can end: nothing it says is missed
        await self._parts.scheduler.admit(task_id, model, encoded, deadline_ms, device)
        return TaskHandle(self, task_id, model)

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Outputs:
        """The outputs of a task in the ledger (submitted here, by a peer, or before a restart).

        Raises:
            TaskError: it ended without a result, or is unknown.
            TimeoutError: ``timeout`` passed first.
        """
        live = self.tasks.get(task_id)
        if live is None or live.waiter is None:
            record = await self._db(self.ledger.get, task_id)
            if record is None:
                raise TaskError(f"no task {task_id!r} in the ledger", code="unknown_task", task_id=task_id)
            future = self.tasks.waiter(task_id)
            self.tasks.settle(record)  # ended already: the waiter has its outcome; else the scheduler polls
        else:
            future = live.waiter
        return await await_outputs(future, timeout)

    async def infer(
        self, model: str, inputs: Array | Sequence[Array], *, deadline: float | None = None, device: str | None = None
    ) -> Array | Outputs:
        """Run ``model`` on ``inputs`` somewhere in the fleet.

        Returns:
            The output array, or a tuple of them for a model with several outputs.

        Raises:
            TaskError: no result by the deadline, no device can run the model, or the device refused the input.
        """
        handle = await self.submit(model, inputs, deadline=deadline, device=device)
        outputs = await handle.result()
        return outputs[0] if len(outputs) == 1 else outputs

    async def map(
        self,
        model: str,
        inputs: Iterable[Array | Sequence[Array]],
        *,
        concurrency: int = 16,
        deadline: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """`infer` over many inputs, at most ``concurrency`` in flight; results in input order.

        With ``return_exceptions`` a failed task gives its `TaskError` in its place instead of raising.
        """
        return await fanout.map_inputs(
            self, model, inputs, concurrency=concurrency, deadline=deadline, return_exceptions=return_exceptions
        )

    async def scatter(
        self, model: str, batch: Array, *, parts: int | None = None, deadline: float | None = None
    ) -> Array | Outputs:
        """Split ``batch`` along its first axis across devices (data parallel); outputs merged in order.

        Args:
            parts: how many tasks; default one per device that runs the model now.
        """
        return await fanout.scatter(self, model, batch, parts=parts, deadline=deadline)

    async def ensemble(
        self,
        model: str,
        inputs: Array | Sequence[Array],
        *,
        devices: Sequence[str] | None = None,
        mode: Literal["mean", "vote"] = "mean",
        deadline: float | None = None,
    ) -> Array:
        """Run the same input on several devices and combine the first output.

        ``mean`` averages the outputs; ``vote`` takes each member's argmax over
        the last axis and returns the most common class per row (ties: the lowest).

        Raises:
            TaskError: no device runs the model now, or a member failed.
        """
        return await fanout.ensemble(self, model, inputs, devices=devices, mode=mode, deadline=deadline)

    async def wait_for_devices(
        self, count: int, *, model: str | None = None, devices: Sequence[str] = (), timeout: float = 60.0
    ) -> list[str]:
        """Wait until ``count`` devices are online (and run ``model``, and are among ``devices``, if given).

        Returns:
            The ids of those devices.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        rollouts = self._parts.rollouts

        def current() -> list[str]:
            found = [d.device_id for d in self.registry.online() if model is None or rollouts.runs(d, model)]
            return [d for d in found if not devices or d in devices]

        async with timeout_after(timeout):
            while len(current()) < count:
                self._changed.clear()
                await self._changed.wait()
        return current()

    def devices_for(self, model: str) -> list[str]:
        """Online devices that run ``model`` now."""
        return self._parts.rollouts.devices_for(model)

    def models(self) -> dict[str, ModelManifest]:
        """The newest manifest of every model published in the fleet."""
        return self._parts.rollouts.manifests()

    async def counts(self) -> dict[str, int]:
        """Tasks in the ledger by state."""
        return await self._db(self.ledger.counts)

    # -- models --------------------------------------------------------------

    async def publish_model(
        self,
        paths: Sequence[Path | str],
        *,
        name: str,
        version: int | None = None,
        targets: str = "all",
        architecture: str = "",
        pipeline: Sequence[dict[str, Any]] = (),
        wait: bool = True,
        timeout: float = 300.0,
        settle: float = 0.5,
        on_progress: Callable[[RolloutReport, int], None] | None = None,
        split: str = "",
        codec: str = "",
        sample: Sequence[Array] | None = None,
        link: Link | None = None,
    ) -> RolloutReport:
        """Encrypt, sign, store and publish a model; wait for the targets to report.

        Each path is one variant: ``.onnx``, ``.tflite``, or ``.safetensors``
        (with ``architecture``, a registered torch architecture). Devices pick the
        variant their backends run. The content key is wrapped for every target
        device known now; a running coordinator wraps it for those that join later.

        Args:
            targets: a selector (see `edgespeed.coordinator.selector`), ``all`` by default.
            wait: wait until every target reported ready or failed (or ``timeout``).
            settle: seconds to let retained births arrive before choosing targets.
            on_progress: called with the report so far and chunks served, as devices report.
            split: serve the model as a pipeline of shards on several devices: ``auto`` (the
                planner decides, possibly not to split), ``N`` stages of even measured time, or
                the tensor names to cut at (``a,b``). One ``.onnx`` file only.
            codec: how stages send activations on: ``fp16``, ``int8``, ``int8c`` (per channel),
                optionally ``+zstd`` or ``+lz4``; empty for as they are.
            sample: inputs to profile the model with (default: zeros of its input shape, batch 1).
            link: the network the planner assumes (default: measured through the broker).

        Raises:
            ConfigError: an unknown file type, a missing architecture, or a version not newer.
        """
        o = self._parts
        report = await o.rollouts.publish(
            paths,
            name=name,
            version=version,
            targets=targets,
            architecture=architecture,
            pipeline=pipeline,
            wait=wait,
            timeout=timeout,
            settle=settle,
            on_progress=on_progress,
            split=split,
            codec=codec,
            sample=sample,
            link=link if link is not None else self.measure_link,
        )
        o.scheduler.wake()
        return report

    async def measure_link(self, *, size: int = 256 * 1024, rounds: int = 5) -> Link:
        """Measure the network a stage's activation crosses (through the broker) with real transfers.

        Sends small and ``size``-byte messages to ourselves through the broker, one at a time: the
        small ones give the latency of one hop between devices, the large ones its bandwidth.
        """
        return await self._parts.probe.measure(size=size, rounds=rounds)

    def splits(self) -> dict[str, SplitModel]:
        """The split models, with their stages, plan and the planner's prediction against what happened."""
        return dict(self._parts.rollouts.splits)
