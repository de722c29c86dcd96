"""The coordinator: one service in front of the fleet.

It keeps the registry from births, deaths and heartbeats, publishes signed and
encrypted models and serves their chunks, and runs tasks: every task is
recorded in the ledger first, then placed on a capable device, sealed and sent.
The first result of an attempt given to that device ends the task; a device
that dies or whose lease runs out gives its tasks back to the ledger, and they
go elsewhere. Every task ends with a result or a `TaskError`.

Several coordinators may share a fleet: each has its own MQTT client and
replay lane, they share a PostgreSQL ledger (claims are atomic there), and
with ``shared_group`` the broker splits the device answers between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from edgespeed._compat import Self
from edgespeed._compat import timeout as timeout_after
from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger, PostgresLedger, SqliteLedger, TaskRecord, TaskState, now_ms
from edgespeed.coordinator.policies import LeastLoaded, Policy, Requirements, RoundRobin, capable
from edgespeed.coordinator.registry import DeviceInfo, DeviceStatus, Registry
from edgespeed.coordinator.selector import matches
from edgespeed.coordinator.splits import SplitModel, choose_cuts, load_splits
from edgespeed.coordinator.store import ModelStore, StoredModel
from edgespeed.errors import (
    ConfigError,
    EdgeSpeedError,
    PayloadTooLargeError,
    ProtocolError,
    ReplayError,
    SecurityError,
    TaskError,
    TransportError,
)
from edgespeed.optimize.planner import Link
from edgespeed.optimize.split import Segment, _onnx, profile_onnx, split_onnx
from edgespeed.protocol import topics
from edgespeed.protocol.blob import DEFAULT_CHUNK_SIZE, BlobSource
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.formats import SUFFIX_FORMATS, format_of
from edgespeed.protocol.messages import (
    Birth,
    CoordinatorState,
    Death,
    Error,
    Heartbeat,
    Hop,
    ModelManifest,
    ModelStatus,
    Result,
    Task,
    validate_blob_id,
)
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, encrypt_blob, load_identity, sign_manifest
from edgespeed.security.blobcrypt import TAG_SIZE
from edgespeed.security.signing import verify_manifest
from edgespeed.transfer import BlobServer
from edgespeed.transport.base import Message, Transport, Will
from edgespeed.transport.mqtt import MqttTransport

__all__ = ["Coordinator", "RolloutReport", "TaskHandle", "open_ledger"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Array = np.ndarray[Any, Any]
Outputs = tuple[Array, ...]

# Device errors that say "not now, not here": the task goes to another device.
RETRYABLE = frozenset({"queue_full", "shutting_down", "model_missing"})
_TICK_S = 0.1
_DEVICE_KINDS = frozenset(
    {topics.TopicKind.BIRTH, topics.TopicKind.DEATH, topics.TopicKind.HEARTBEAT, topics.TopicKind.MODEL}
)
_POLL_S = 0.25


def open_ledger(config: CoordinatorConfig) -> Ledger:
    """The ledger the configuration names: PostgreSQL for a connection string, else SQLite in ``state_dir``."""
    if config.ledger:
        return PostgresLedger(config.ledger, prefix=config.ledger_prefix)
    return SqliteLedger(config.state_dir / "ledger.db", prefix=config.ledger_prefix)


@dataclass(frozen=True, slots=True)
class RolloutReport:
    """How a model version reached its target devices."""

    model_id: str
    version: int
    targets: tuple[str, ...]
    ready: dict[str, str] = field(default_factory=dict)  # device -> backend
    failed: dict[str, str] = field(default_factory=dict)  # device -> reason

    @property
    def missing(self) -> tuple[str, ...]:
        """Targets that did not report in time."""
        return tuple(d for d in self.targets if d not in self.ready and d not in self.failed)

    @property
    def ok(self) -> bool:
        """Every target is ready."""
        return all(d in self.ready for d in self.targets)


class TaskHandle:
    """A submitted task; ``await handle.result()`` for its outputs."""

    def __init__(self, coordinator: Coordinator, task_id: str, model_id: str) -> None:
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


@dataclass
class _Model:
    """What the coordinator knows of a model: its newest manifest, and where it runs."""

    manifest: ModelManifest
    stored: StoredModel | None = None
    status: dict[str, tuple[str, str]] = field(default_factory=dict)  # device -> (state, reason or backend)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    run_ms: dict[str, float] = field(default_factory=dict)  # device -> a warm run, as the device measured it

    @property
    def formats(self) -> tuple[str, ...]:
        variants = self.manifest.variants or ({"format": self.manifest.format},)
        return tuple(sorted({str(v["format"]) for v in variants}))


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
        self._ledger = ledger
        self._own_ledger = ledger is None
        self._transport = transport
        self._models: dict[str, _Model] = {}
        self._waiters: dict[str, asyncio.Future[tuple[bytes, ...]]] = {}
        self._poll: set[str] = set()
        self._inflight: defaultdict[str, set[str]] = defaultdict(set)
        self._avoid: defaultdict[str, set[str]] = defaultdict(set)
        self._pins: dict[str, str] = {}
        self._why: dict[str, str] = {}
        self._ready_on: defaultdict[str, set[str]] = defaultdict(set)
        self._splits: dict[str, SplitModel] = {}
        self._probe: asyncio.Queue[int] | None = None
        self._routes: dict[str, tuple[int, list[str]]] = {}  # split task -> (attempt, its stage devices)
        self._submitted: dict[str, tuple[str, float]] = {}  # split task -> (model, when), for the planner's report
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # the registry or a model's readiness changed
        self._backlog = True  # until the first round has looked at the ledger
        self._last_round = 0.0
        self._inline_db = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.stats: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        identity = load_identity(cfg.pki_dir, cfg.coordinator_id, ca_file=cfg.pki_dir / "ca.crt")
        self._sign_key = identity.sign_key()
        self._directory = KeyDirectory(cfg.pki_dir / "ca.crt")
        self._directory.add_directory(cfg.pki_dir)
        # The primary keeps its replay window across restarts; a short-lived client seals on a lane of its own.
        replay = ReplayGuard(cfg.state_dir / "replay.db") if self.primary else ReplayGuard()
        lane = 0 if self.primary else secrets.randbelow(255) + 1
        self.sealer = Sealer(cfg.coordinator_id, identity.seal_key(), self._directory, replay=replay, lane=lane)
        self.store = ModelStore(cfg.state_dir / "models")
        if self._ledger is None:
            self._ledger = await asyncio.to_thread(open_ledger, cfg)
        self._inline_db = isinstance(self._ledger, SqliteLedger)
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.config
        if self._transport is None:
            will = None
            if cfg.presence:
                offline = pack_message(CoordinatorState(False, self.epoch), sender=cfg.coordinator_id)
                will = Will(topics.coordinator_state(cfg.fleet), offline, retain=True)
            self._transport = MqttTransport(cfg.mqtt(self.client_id, will=will, persistent=self.primary))
        await self._transport.__aenter__()
        self._server = BlobServer(self._transport, fleet=cfg.fleet, server_id=cfg.coordinator_id, sealer=self.sealer)
        for stored in await asyncio.to_thread(self.store.latest):
            self._hold(stored)
        self._splits = await asyncio.to_thread(load_splits, self.store.root)
        inbox = topics.coordinator_inbox_filter(cfg.fleet, shared_group=cfg.shared_group)
        await self._transport.subscribe(
            inbox,
            topics.device_filter(cfg.fleet, "birth"),
            topics.device_filter(cfg.fleet, "death"),
            topics.device_filter(cfg.fleet, "hb"),
            topics.model_filter(cfg.fleet),
        )
        self._started = time.monotonic()
        name = f"coordinator[{self.client_id}]"
        self._tasks = [
            asyncio.create_task(self._read(), name=f"{name}.read"),
            asyncio.create_task(self._schedule(), name=f"{name}.schedule"),
        ]
        hello = pack_message(CoordinatorState(True, self.epoch), sender=cfg.coordinator_id)
        if cfg.presence:
            await self._transport.publish(topics.coordinator_state(cfg.fleet), hello, retain=True)
        # Devices answer with a heartbeat at once: no waiting a whole interval to learn who is alive.
        await self._transport.publish(topics.broadcast(cfg.fleet, "discover"), hello, qos=0)

    async def close(self) -> None:
        """Leave cleanly: presence offline, connection closed. Unfinished tasks stay in the ledger."""
        if self._closed:
            return
        self._closed = True
        # Let the scheduler finish its round: a task it claimed is sent, not left to its lease.
        self._wake.set()
        if len(self._tasks) > 1:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with timeout_after(5.0):
                    await asyncio.shield(self._tasks[1])
        t = self._transport
        if t is not None and t.connected and self.config.presence:
            with contextlib.suppress(EdgeSpeedError):
                offline = pack_message(CoordinatorState(False, self.epoch), sender=self.config.coordinator_id)
                await t.publish(topics.coordinator_state(self.config.fleet), offline, retain=True)
        await self._teardown()

    async def _teardown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if hasattr(self, "_server"):
            self._server.stop()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(TaskError("the coordinator closed before the task ended", code="closed"))
                future.exception()  # retrieved: nobody may be waiting
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
        if self._ledger is not None and self._own_ledger:
            self._ledger.close()
        if hasattr(self, "sealer") and self.sealer._replay is not None:
            self.sealer._replay.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "the coordinator is not open"
        return self._ledger

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # The ledger is synchronous. A SQLite call is one short local transaction (tens of
        # microseconds in WAL mode), cheaper than the hop to a thread; a server round trip is not.
        if self._inline_db:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

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
            device: run only on this device.
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
        if device is not None:
            topics.validate_id(device, "device id")
            self._pins[task_id] = device
        try:
            validate_blob_id(task_id)
            topics.validate_id(model, "model id")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        encoded = [bytes(encode_tensor(np.ascontiguousarray(a))) for a in arrays]
        future = self._waiters.get(task_id) or asyncio.get_running_loop().create_future()
        self._waiters[task_id] = future
        deadline_ms = now_ms() + int(seconds * 1000)
        if model in self._splits:
            self._submitted[task_id] = (model, time.perf_counter())
        if self._backlog or model in self._splits:
            device_id = None  # others wait already (or a pipeline to place): the scheduler places it
        else:
            # Nothing is waiting for a device: place this one now, recorded and claimed in one transaction.
            record = TaskRecord(task_id, model, (), deadline_ms, TaskState.PENDING, 0, None, 0, None, None, None, 0)
            device_id = self._choose(record)[0]
        if device_id is not None:
            lease = int(self.config.lease_s * 1000)
            added = await self._db(
                self.ledger.add_claimed, task_id, model, encoded, deadline_ms, device_id, lease_ms=lease
            )
            if added:
                self.stats["submitted"] += 1
                self._inflight[device_id].add(task_id)
                if self.config.shared_group:
                    self._poll.add(task_id)
                await self._send(device_id, Task(task_id, 1, model, deadline_ms, tuple(encoded)))
                return TaskHandle(self, task_id, model)
        else:
            added = await self._db(self.ledger.add, task_id, model, encoded, deadline_ms)
            self.stats["submitted"] += added
            if added:
                self._backlog = True
                self._wake.set()
        if not added or self.config.shared_group:
            self._poll.add(task_id)  # known already, or a peer may hear the answer: the ledger will say
        return TaskHandle(self, task_id, model)

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Outputs:
        """The outputs of a task in the ledger (submitted here, by a peer, or before a restart).

        Raises:
            TaskError: it ended without a result, or is unknown.
            TimeoutError: ``timeout`` passed first.
        """
        future = self._waiters.get(task_id)
        if future is None:
            record = await self._db(self.ledger.get, task_id)
            if record is None:
                raise TaskError(f"no task {task_id!r} in the ledger", code="unknown_task", task_id=task_id)
            future = asyncio.get_running_loop().create_future()
            self._waiters[task_id] = future
            self._settle(record)
            self._poll.add(task_id)
        try:
            if timeout is None:
                raw = await asyncio.shield(future)
            else:
                async with timeout_after(timeout):
                    raw = await asyncio.shield(future)
        finally:
            if future.done():
                self._waiters.pop(task_id, None)
                self._poll.discard(task_id)
        return tuple(decode_tensor(o) for o in raw)

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
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        slots = asyncio.Semaphore(concurrency)

        async def one(x: Array | Sequence[Array]) -> Any:
            async with slots:
                return await self.infer(model, x, deadline=deadline)

        return await _gather([one(x) for x in inputs], return_exceptions)

    async def scatter(
        self, model: str, batch: Array, *, parts: int | None = None, deadline: float | None = None
    ) -> Array | Outputs:
        """Split ``batch`` along its first axis across devices (data parallel); outputs merged in order.

        Args:
            parts: how many tasks; default one per device that runs the model now.
        """
        if parts is None:
            parts = max(1, len(self.devices_for(model)))
        pieces = [p for p in np.array_split(batch, min(parts, len(batch))) if len(p)]
        handles = [await self.submit(model, p, deadline=deadline) for p in pieces]
        results = await _gather([h.result() for h in handles], False)
        merged = tuple(np.concatenate([r[i] for r in results]) for i in range(len(results[0])))
        return merged[0] if len(merged) == 1 else merged

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
        members = list(devices) if devices is not None else self.devices_for(model)
        if not members:
            raise TaskError(f"no device runs {model!r} now", code="no_capable_device")
        handles = [await self.submit(model, inputs, deadline=deadline, device=d) for d in members]
        firsts = [r[0] for r in await _gather([h.result() for h in handles], False)]
        if mode == "mean":
            mean: Array = np.mean(np.stack(firsts).astype(np.float64), axis=0)
            return mean.astype(firsts[0].dtype)
        if mode == "vote":
            votes = np.stack([f.argmax(axis=-1) for f in firsts])  # members x rows
            classes = firsts[0].shape[-1]
            counts = np.apply_along_axis(np.bincount, 0, votes, minlength=classes)  # classes x rows
            return counts.argmax(axis=0)  # type: ignore[no-any-return]
        raise ConfigError(f"unknown ensemble mode {mode!r}: mean or vote")

    async def wait_for_devices(
        self, count: int, *, model: str | None = None, devices: Sequence[str] = (), timeout: float = 60.0
    ) -> list[str]:
        """Wait until ``count`` devices are online (and run ``model``, and are among ``devices``, if given).

        Returns:
            The ids of those devices.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """

        def current() -> list[str]:
            found = [d.device_id for d in self.registry.online() if model is None or self._runs(d, model)]
            return [d for d in found if not devices or d in devices]

        async with timeout_after(timeout):
            while len(current()) < count:
                self._changed.clear()
                await self._changed.wait()
        return current()

    def devices_for(self, model: str) -> list[str]:
        """Online devices that run ``model`` now."""
        return [d.device_id for d in self.registry.online() if self._runs(d, model)]

    def models(self) -> dict[str, ModelManifest]:
        """The newest manifest of every model published in the fleet."""
        return {model_id: entry.manifest for model_id, entry in sorted(self._models.items())}

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
            link: the network the planner assumes (default: `Link()`; 100 Mbit/s, 2 ms).

        Raises:
            ConfigError: an unknown file type, a missing architecture, or a version not newer.
        """
        model_id = topics.validate_id(name, "model name")
        if not paths:
            raise ConfigError("give at least one model file")
        files = [Path(p) for p in paths]
        for path in files:
            if format_of(path.suffix) is None:
                raise ConfigError(f"{path}: unknown model type; use {', '.join(SUFFIX_FORMATS)}")
            if not path.is_file():
                raise ConfigError(f"{path}: no such file")
            if path.suffix == ".safetensors" and not architecture:
                raise ConfigError(f"{path}: safetensors weights need --architecture (e.g. digits-cnn)")
        if split and (len(files) != 1 or files[0].suffix != ".onnx"):
            raise ConfigError("a split model is published from one .onnx file")
        await asyncio.sleep(max(0.0, settle - (time.monotonic() - self._started)))
        newest = self._newest(model_id)
        version = newest + 1 if version is None else version
        if version <= newest:
            raise ConfigError(f"{model_id} v{newest} exists: the new version must be greater")
        chosen = [d.device_id for d in self.registry.devices(DeviceStatus.ONLINE, DeviceStatus.SUSPECT)]
        chosen = [d for d in chosen if matches(targets, self.registry.get(d))]  # type: ignore[arg-type]
        if split:
            entries = await self._publish_split(files, model_id, version, split, codec, targets, chosen, sample, link)
        else:
            entries = [await self._publish_files(model_id, files, version, targets, chosen, architecture, pipeline)]
        report = self._combined(model_id, version, entries, chosen)
        if not wait or not chosen:
            return report
        with contextlib.suppress(TimeoutError):
            async with timeout_after(timeout):
                while report.missing:
                    if on_progress is not None:
                        on_progress(report, self._server.served)
                    for entry in entries:
                        entry.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with timeout_after(0.5):
                            await asyncio.wait(
                                [asyncio.ensure_future(e.changed.wait()) for e in entries],
                                return_when=asyncio.FIRST_COMPLETED,
                            )
                    if self.config.shared_group:  # a peer may have heard some reports: they are in the ledger
                        for entry in entries:
                            shard, shard_version = entry.manifest.model_id, entry.manifest.version
                            rows = await self._db(self.ledger.rollouts, shard, shard_version)
                            for device, (state, detail) in rows.items():
                                entry.status[device] = (f"{state}@{shard_version}", detail)
                    report = self._combined(model_id, version, entries, chosen)
        if on_progress is not None:
            on_progress(report, self._server.served)
        if split and report.ready:
            self._fit_speeds(self._splits[model_id], entries, list(report.ready))
        return report

    def _fit_speeds(self, split: SplitModel, entries: Sequence[_Model], devices: Sequence[str]) -> None:
        """Re-plan a split model with each device's speed as it measured the shards itself.

        A device's factor is the median, over the shards, of its warm run against this machine's
        measurement of the same stage (the planner's unit).
        """
        local = split.stage_seconds()
        speeds = {}
        for device in devices:
            ratios = [
                e.run_ms[device] / 1000 / seconds
                for e, seconds in zip(entries, local, strict=True)
                if device in e.run_ms and seconds > 0
            ]
            if ratios:
                speeds[device] = statistics.median(ratios)
        if speeds:
            split.speeds = speeds
            replanned = split.replan(sorted(speeds))
            if replanned is not None:
                log.info("%s planned with measured device speeds %s: %s", split.name, speeds, replanned.describe())
                split.save(self.store.root / split.name / str(split.version))

    async def _publish_split(
        self,
        files: Sequence[Path],
        name: str,
        version: int,
        spec: str,
        codec: str,
        targets: str,
        chosen: Sequence[str],
        sample: Sequence[Array] | None,
        link: Link | None,
    ) -> list[_Model]:
        """Profile, plan, cut, and publish each shard (to every target, so any of them can take a stage over)."""
        if link is None:
            link = await self.measure_link()
        source = files[0]
        segments, inputs = await asyncio.to_thread(_profile, source, sample)
        input_bytes = sum(int(x.nbytes) for x in inputs)
        cuts, chosen_plan = choose_cuts(
            segments,
            spec,
            chosen,
            link=link,
            objective=self.config.split_objective,
            codec=codec,
            input_bytes=input_bytes,
        )
        log.info("%s: %s", name, chosen_plan.describe())
        folder = self.store.root / name / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        shards = await asyncio.to_thread(split_onnx, source, cuts)
        entries, shard_ids = [], []
        for k, shard in enumerate(shards, start=1):
            shard_id = f"{name}-s{k}"
            path = folder / f"stage{k}.onnx"
            await asyncio.to_thread(path.write_bytes, shard.SerializeToString())
            shard_version = max(self._newest(shard_id) + 1, version)
            entries.append(await self._publish_files(shard_id, [path], shard_version, targets, chosen, stage=k))
            shard_ids.append(shard_id)
        split = SplitModel(
            name,
            version,
            shard_ids,
            cuts,
            codec,
            chosen_plan.devices,
            chosen_plan.latency_s,
            self.config.split_objective,
            segments=[[g.start, g.end, g.seconds, g.out_bytes] for g in segments],
            link=[link.bytes_per_s, link.rtt_s],
            input_bytes=input_bytes,
            predicted_rps=chosen_plan.throughput,
        )
        await asyncio.to_thread(split.save, folder)
        self._splits[name] = split
        return entries

    async def measure_link(self, *, size: int = 256 * 1024, rounds: int = 5) -> Link:
        """Measure the network a stage's activation crosses (through the broker) with real transfers.

        Sends small and ``size``-byte messages to ourselves through the broker, one at a time: the
        small ones give the latency of one hop between devices, the large ones its bandwidth.
        """
        assert self._transport is not None
        topic = topics.coordinator_probe(self.config.fleet, self.sealer.lane)
        self._probe = asyncio.Queue(8)
        await self._transport.subscribe(topic)
        try:
            times: dict[int, list[float]] = {64: [], size: []}
            for n in (64, size):
                payload = os.urandom(n)
                for _ in range(rounds + 1):
                    start = time.perf_counter()
                    await self._transport.publish(topic, payload)
                    async with timeout_after(10):
                        await self._probe.get()
                    times[n].append(time.perf_counter() - start)
            small = statistics.median(times[64][1:])
            large = statistics.median(times[size][1:])
        except TimeoutError:
            log.warning("the link probe got no answer in 10 s; planning with the default link")
            return Link()
        finally:
            self._probe = None
            with contextlib.suppress(EdgeSpeedError):
                await self._transport.unsubscribe(topic)
        link = Link(bytes_per_s=size / max(large - small, 1e-6), rtt_s=2 * small)
        log.info("link: %.1f MB/s, %.2f ms per hop", link.bytes_per_s / 1e6, small * 1000)
        return link

    def splits(self) -> dict[str, SplitModel]:
        """The split models, with their stages, plan and the planner's prediction against what happened."""
        return dict(self._splits)

    def _newest(self, model_id: str) -> int:
        known = self._models.get(model_id)
        newest = max(self.store.versions(model_id) or [0], default=0)
        split = self._splits.get(model_id)
        return max(newest, known.manifest.version if known else 0, split.version if split else 0)

    def _combined(
        self, model_id: str, version: int, entries: Sequence[_Model], targets: Sequence[str]
    ) -> RolloutReport:
        """One report for a model: a device is ready when every shard is ready on it."""
        reports = [self._report(e, targets) for e in entries]
        ready = {d: reports[0].ready[d] for d in targets if all(d in r.ready for r in reports)}
        failed: dict[str, str] = {}
        for r in reports:
            for device, reason in r.failed.items():
                failed.setdefault(device, reason)
        return RolloutReport(model_id, version, tuple(targets), ready, failed)

    async def _publish_files(
        self,
        model_id: str,
        files: Sequence[Path],
        version: int,
        targets: str,
        chosen: Sequence[str],
        architecture: str = "",
        pipeline: Sequence[dict[str, Any]] = (),
        stage: int = 0,
    ) -> _Model:
        """Encrypt, store, sign and announce one model id's variants (``stage``: its place in a split model)."""

        def build() -> tuple[list[BlobSource], bytes]:
            key: bytes | None = None
            sources = []
            for i, path in enumerate(files):
                shard = f"{model_id}-v{version}-{i}{path.suffix}"
                ciphertext, key = encrypt_blob(path.read_bytes(), blob_id=shard, chunk_size=DEFAULT_CHUNK_SIZE, key=key)
                stored = self.store.shard_path(model_id, version, shard)
                stored.write_bytes(ciphertext)
                sources.append(BlobSource(shard, stored, chunk_size=DEFAULT_CHUNK_SIZE + TAG_SIZE))
            assert key is not None
            return sources, key

        sources, key = await asyncio.to_thread(build)
        variants = []
        for path, source in zip(files, sources, strict=True):
            variant: dict[str, Any] = {"shard": source.blob_id, "format": SUFFIX_FORMATS[path.suffix]}
            if path.suffix == ".safetensors":
                variant["architecture"] = architecture
            if stage:
                variant["stage"] = stage  # signed: devices take this shard's tasks from the stage before
            variants.append(variant)
        manifest = ModelManifest(
            model_id,
            version,
            "mixed" if len({v["format"] for v in variants}) > 1 else variants[0]["format"],
            tuple(s.info for s in sources),
            pipeline=tuple(pipeline),
            variants=tuple(variants),
        )
        manifest = self._sign(manifest, key, chosen)
        await asyncio.to_thread(self.store.save, manifest, key, targets)
        stored = StoredModel(
            manifest, key, {s.blob_id: self.store.shard_path(model_id, version, s.blob_id) for s in sources}, targets
        )
        entry = self._hold(stored)
        await self._announce(manifest)
        log.info("published %s v%d to %s", model_id, version, ", ".join(chosen) or "no device yet")
        return entry

    def _report(self, entry: _Model, targets: Sequence[str]) -> RolloutReport:
        version = entry.manifest.version
        ready: dict[str, str] = {}
        failed: dict[str, str] = {}
        for device, (state, detail) in entry.status.items():
            if device in targets and state.endswith(f"@{version}"):
                (ready if state.startswith("ready") else failed)[device] = detail
        return RolloutReport(entry.manifest.model_id, version, tuple(targets), ready, failed)

    def _sign(self, manifest: ModelManifest, key: bytes, devices: Sequence[str]) -> ModelManifest:
        context = f"{manifest.model_id}/{manifest.version}"
        unsigned = dataclasses.replace(
            manifest, keys=self.sealer.wrap_key(key, sorted(devices), context=context), signer="", signature=b""
        )
        return sign_manifest(unsigned, signer=self.config.coordinator_id, key=self._sign_key)

    def _hold(self, stored: StoredModel) -> _Model:
        """Serve a stored version's chunks and remember it."""
        for name, path in stored.shards.items():
            info = next(s for s in stored.manifest.shards if s.name == name)
            self._server.add(BlobSource(name, path, chunk_size=info.chunk_size, sha256=info.sha256))
        entry = self._models.get(stored.model_id)
        if entry is None or entry.manifest.version <= stored.version:
            entry = _Model(stored.manifest, stored, dict(entry.status) if entry else {})
            self._models[stored.model_id] = entry
        return entry

    async def _announce(self, manifest: ModelManifest) -> None:
        assert self._transport is not None
        await self._transport.publish(
            topics.model_manifest(self.config.fleet, manifest.model_id),
            pack_message(manifest, sender=self.config.coordinator_id),
            retain=True,
        )

    async def _welcome(self, info: DeviceInfo) -> None:
        """A device joined: wrap the keys of the models it is a target of, if it lacks them."""
        for entry in list(self._models.values()):
            stored = entry.stored
            if stored is None or stored.version != entry.manifest.version:
                continue
            if info.device_id in entry.manifest.keys or not matches(stored.targets, info):
                continue
            devices = [*entry.manifest.keys, info.device_id]
            manifest = self._sign(entry.manifest, stored.key, devices)
            entry.manifest = manifest
            entry.stored = dataclasses.replace(stored, manifest=manifest)
            await asyncio.to_thread(self.store.update_manifest, manifest)
            await self._announce(manifest)
            log.info("%s v%d: key wrapped for %s, who joined", manifest.model_id, manifest.version, info.device_id)

    # -- receiving -----------------------------------------------------------

    async def _read(self) -> None:
        assert self._transport is not None
        async for message in self._transport.messages():
            try:
                await self._on_message(message)
            except ReplayError:
                continue  # a duplicate from at-least-once delivery
            except (ProtocolError, SecurityError) as exc:
                self.stats["dropped"] += 1
                log.warning("dropped a message on %s: %s", message.topic, exc)
            except Exception:  # the reader must outlive any one message
                self.stats["dropped"] += 1
                log.exception("failed handling a message on %s", message.topic)

    async def _on_message(self, message: Message) -> None:
        if self._probe is not None and "/coord/probe/" in message.topic:
            with contextlib.suppress(asyncio.QueueFull):
                self._probe.put_nowait(len(message.payload))
            return
        try:
            await self._handle(message)
        finally:
            self._changed.set()

    async def _handle(self, message: Message) -> None:
        name = topics.parse_topic(message.topic)
        kind = name.kind
        if kind is topics.TopicKind.COORDINATOR_INBOX:
            if await self._server.handle(message):
                return
            assert name.id is not None
            _, body = self.sealer.open(message.payload, topic_sender=name.id)
            if isinstance(body, Result):
                await self._on_result(name.id, body)
            elif isinstance(body, Error):
                await self._on_error(name.id, body)
            elif isinstance(body, ModelStatus):
                await self._on_status(name.id, body)
            return
        if not message.payload or kind not in _DEVICE_KINDS:
            return  # a retained message being cleared, or one we did not subscribe to
        envelope, body = open_message(message.payload)
        if kind is topics.TopicKind.MODEL:
            if isinstance(body, ModelManifest) and body.model_id == name.id:
                await self._on_manifest(body)
            return
        if envelope.sender != name.id:
            raise SecurityError(f"{envelope.sender!r} wrote on {message.topic}", reason="sender_mismatch")
        if kind is topics.TopicKind.BIRTH and isinstance(body, Birth) and body.card.device_id == name.id:
            info = self.registry.on_birth(body, retained=message.retain)
            if info is not None:
                for ready in self._ready_on.values():
                    ready.discard(name.id)  # a new session: it reports its models again
                if not message.retain:
                    await self._device_lost(name.id)  # what the old session held is gone
                await self._welcome(info)
                self._wake.set()
        elif kind is topics.TopicKind.DEATH and isinstance(body, Death):
            if self.registry.on_death(name.id, body):
                log.info("device %s left (%s)", name.id, body.reason)
                await self._device_lost(name.id)
        elif kind is topics.TopicKind.HEARTBEAT and isinstance(body, Heartbeat):
            was = self.registry.get(name.id)
            if self.registry.on_heartbeat(name.id, body) and (was is None or was.status is not DeviceStatus.ONLINE):
                self._wake.set()

    async def _on_manifest(self, manifest: ModelManifest) -> None:
        verify_manifest(manifest, self._directory)
        entry = self._models.get(manifest.model_id)
        if entry is not None and entry.manifest.version > manifest.version:
            return
        if entry is not None and entry.manifest.version == manifest.version:
            entry.manifest = manifest  # keys wrapped for more devices
            return
        stored = await asyncio.to_thread(self.store.load, manifest.model_id, manifest.version)
        if stored is not None:  # published by a CLI beside us: serve it from now on
            self._hold(stored)
        else:
            self._models[manifest.model_id] = _Model(manifest, None, entry.status if entry else {})
        self._wake.set()

    async def _on_result(self, device: str, result: Result) -> None:
        self._inflight[device].discard(result.task_id)
        route = self._routes.pop(result.task_id, None)
        for stage in route[1] if route else ():
            self._inflight[stage].discard(result.task_id)
        if self._inline_db:  # no await between the commit and the accounting: nothing to interrupt
            accepted = self.ledger.complete(result.task_id, result.attempt, device, result.outputs)
        else:
            job = asyncio.ensure_future(
                self._db(self.ledger.complete, result.task_id, result.attempt, device, result.outputs)
            )
            try:
                accepted = await asyncio.shield(job)
            except asyncio.CancelledError:
                # Closing while the ledger commits: account for what it committed, then stop.
                self._account(result, await job)
                raise
        self._account(result, accepted)
        if not accepted and result.task_id in self._waiters:
            # A peer coordinator recorded it first: its outcome is in the ledger already.
            record = await self._db(self.ledger.get, result.task_id)
            if record is not None:
                self._settle(record)
        self._wake.set()

    def _account(self, result: Result, accepted: bool) -> None:
        if accepted:
            self.stats["completed"] += 1
            submitted = self._submitted.pop(result.task_id, None)
            if submitted is not None and submitted[0] in self._splits:
                self._splits[submitted[0]].record(time.perf_counter() - submitted[1])
            self._finish(result.task_id, result.outputs)
        else:
            self.stats["duplicates"] += 1  # a late or repeated answer: the first one won

    async def _on_error(self, device: str, error: Error) -> None:
        if not error.task_id:
            log.warning("%s reported %s: %s", device, error.code, error.message)
            return
        self._inflight[device].discard(error.task_id)
        route = self._routes.get(error.task_id)
        if route is not None and device in route[1]:
            self._routes.pop(error.task_id, None)
            for stage in route[1]:
                self._inflight[stage].discard(error.task_id)
            device = route[1][-1]  # the attempt is recorded as the last stage's
        if error.code in RETRYABLE:
            self._avoid[error.task_id].add(device)
            self._why[error.task_id] = f"{device}: {error.code}"
            await self._db(self.ledger.release, error.task_id, error.attempt)
            self.stats["retried"] += 1
        elif await self._db(self.ledger.fail, error.task_id, error.attempt, device, error.code, error.message):
            self._fail(error.task_id, error.code, f"{device}: {error.message}")
        self._wake.set()

    async def _on_status(self, device: str, status: ModelStatus) -> None:
        detail = status.backend if status.state == "ready" else status.reason
        await self._db(self.ledger.set_rollout, status.model_id, status.version, device, status.state, detail)
        entry = self._models.get(status.model_id)
        if entry is not None:
            entry.status[device] = (f"{status.state}@{status.version}", detail)
            if status.run_ms:
                entry.run_ms[device] = status.run_ms
            entry.changed.set()
        if status.state == "ready":
            self._ready_on[status.model_id].add(device)
        log.info("%s: %s v%d %s (%s)", device, status.model_id, status.version, status.state, detail)
        self._wake.set()

    async def _device_lost(self, device: str) -> None:
        for split in self._splits.values():
            if device in split.preferred:
                left = [
                    d.device_id
                    for d in self.registry.online()
                    if d.device_id != device and all(self._runs(d, shard) for shard in split.shards)
                ]
                replanned = split.replan(left)
                if replanned is not None:
                    log.info("%s re-planned without %s: %s", split.name, device, replanned.describe())
                    self.stats["replanned"] += 1
        for task_id, (attempt, devices) in list(self._routes.items()):
            if device in devices:  # a stage of its pipeline is gone: the whole request is placed again
                self._routes.pop(task_id, None)
                for other in devices:
                    self._inflight[other].discard(task_id)
                if await self._db(self.ledger.release, task_id, attempt):
                    self.stats["redispatched"] += 1
        self._inflight.pop(device, None)
        for ready in self._ready_on.values():
            ready.discard(device)
        released = await self._db(self.ledger.release_device, device)
        if released:
            log.info("%d tasks of %s go to other devices", len(released), device)
            self.stats["redispatched"] += len(released)
        self._wake.set()

    # -- outcomes ------------------------------------------------------------

    def _finish(self, task_id: str, outputs: tuple[bytes, ...]) -> None:
        self._forget(task_id)
        future = self._waiters.pop(task_id, None)  # a later wait() reads the ledger
        if future is not None and not future.done():
            future.set_result(outputs)

    def _fail(self, task_id: str, code: str, message: str) -> None:
        self._forget(task_id)
        future = self._waiters.pop(task_id, None)
        if future is not None and not future.done():
            future.set_exception(TaskError(f"task {task_id}: {message}", code=code, task_id=task_id))
            future.exception()  # marked seen: a waiter still gets it, a task nobody awaits logs nothing

    def _forget(self, task_id: str) -> None:
        """Drop what was kept in memory for an unfinished task (a device's slot included)."""
        self._submitted.pop(task_id, None)
        self._avoid.pop(task_id, None)
        self._pins.pop(task_id, None)
        self._why.pop(task_id, None)
        self._poll.discard(task_id)
        self._routes.pop(task_id, None)
        for held in self._inflight.values():
            held.discard(task_id)

    def _settle(self, record: TaskRecord) -> None:
        """Resolve a waiter from what the ledger says, if the task has ended."""
        if record.state is TaskState.DONE and record.outputs is not None:
            self._finish(record.task_id, record.outputs)
        elif record.state is TaskState.FAILED:
            self._fail(record.task_id, record.error_code or "failed", record.error_message or "failed")

    # -- placing -------------------------------------------------------------

    async def _schedule(self) -> None:
        last_poll = 0.0
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(_TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                await self._tick()
                if self._poll and time.monotonic() - last_poll > _POLL_S:
                    last_poll = time.monotonic()
                    for task_id in list(self._poll)[:256]:
                        record = await self._db(self.ledger.get, task_id)
                        if record is not None:
                            self._settle(record)
            except Exception:  # the scheduler must outlive any one failure; the ledger keeps the work
                log.exception("scheduling failed; retrying")
                await asyncio.sleep(_TICK_S)

    async def _tick(self) -> None:
        now = time.monotonic()
        periodic = now - self._last_round >= _TICK_S
        if periodic:
            # Deadlines, silent devices and run-out leases are checked every tick; between ticks a
            # wake-up only places what waits for a device.
            self._last_round = now
            for device, status in self.registry.sweep():
                log.info("device %s is %s", device, status.value)
                if status is DeviceStatus.LOST:
                    await self._device_lost(device)
            for task_id in await self._db(self.ledger.expire):
                why = self._why.get(task_id)
                self._fail(task_id, "deadline", "no result by the deadline" + (f" ({why})" if why else ""))
        assert self._transport is not None
        if not self._transport.connected or not (periodic or self._backlog):
            return
        sends: list[Awaitable[None]] = []
        backlog = False
        for record in await self._db(self.ledger.due, limit=512):
            send = await self._place(record)
            if send is not None:
                sends.append(send)
            else:
                backlog = True
        self._backlog = backlog
        if sends:
            await asyncio.gather(*sends)

    async def _place(self, record: TaskRecord) -> Awaitable[None] | None:
        task_id = record.task_id
        if record.attempt >= self.config.max_attempts:
            why = self._why.get(task_id, "")
            await self._abort(task_id, "attempts_exhausted", f"{record.attempt} attempts failed {why}".strip())
            return None
        split = self._splits.get(record.model_id)
        if split is not None:
            return await self._place_split(record, split)
        device, verdict = self._choose(record)
        if device is None:
            if verdict is not None:
                await self._abort(task_id, *verdict)
            return None
        attempt = await self._db(self.ledger.claim, task_id, device, lease_ms=int(self.config.lease_s * 1000))
        if attempt is None:
            return None  # a peer coordinator took it
        self._inflight[device].add(task_id)
        task = Task(task_id, attempt, record.model_id, record.deadline_ms, record.inputs)
        return self._send(device, task)

    async def _place_split(self, record: TaskRecord, split: SplitModel) -> Awaitable[None] | None:
        """Give each stage a device that runs its shard; the last one answers, so the attempt is its."""
        devices: list[str] = []
        for k, shard in enumerate(split.shards):
            stage = dataclasses.replace(record, model_id=shard)
            preferred = split.preferred[k] if k < len(split.preferred) else ""
            info = self.registry.get(preferred)
            cap = self.config.max_inflight
            if (
                info is not None
                and info.status is DeviceStatus.ONLINE
                and self._runs(info, shard)
                and len(self._inflight[preferred]) < cap
                and preferred not in self._avoid.get(record.task_id, set())
            ):
                devices.append(preferred)
                continue
            device, verdict = self._choose(stage)  # the planned device is gone or busy: re-place this stage
            if device is None:
                if verdict is not None:
                    await self._abort(record.task_id, verdict[0], f"stage {k + 1} ({shard}): {verdict[1]}")
                return None
            devices.append(device)
        attempt = await self._db(
            self.ledger.claim, record.task_id, devices[-1], lease_ms=int(self.config.lease_s * 1000)
        )
        if attempt is None:
            return None
        for device in devices:
            self._inflight[device].add(record.task_id)
        self._routes[record.task_id] = (attempt, devices)
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

    async def _send(self, device: str, task: Task) -> None:
        assert self._transport is not None
        try:
            await self._transport.publish(
                topics.device_inbox(self.config.fleet, device), self.sealer.seal(task, recipient=device)
            )
            self.stats["dispatched"] += 1
        except PayloadTooLargeError as exc:
            self._inflight[device].discard(task.task_id)
            await self._abort(task.task_id, "input_too_large", f"the task does not fit in one message: {exc}")
        except TransportError as exc:
            log.info("task %s not sent to %s (%s); it stays due", task.task_id, device, exc)
            self._inflight[device].discard(task.task_id)
            await self._db(self.ledger.release, task.task_id, task.attempt)

    async def _abort(self, task_id: str, code: str, message: str) -> None:
        if await self._db(self.ledger.abort, task_id, code, message):
            self._fail(task_id, code, message)

    def _runs(self, device: DeviceInfo, model: str) -> bool:
        return model in device.models or device.device_id in self._ready_on.get(model, ())

    def _choose(self, record: TaskRecord) -> tuple[str | None, tuple[str, str] | None]:
        """A device for the task; or None and, when no device ever could, the error to end it with."""
        model = record.model_id
        pinned = self._pins.get(record.task_id)
        avoid = self._avoid.get(record.task_id, set())
        ready = [d for d in self.registry.online() if self._runs(d, model)]
        if pinned is not None:
            ready = [d for d in ready if d.device_id == pinned]
        cap = self.config.max_inflight
        free = [d for d in ready if d.device_id not in avoid and len(self._inflight[d.device_id]) < cap]
        if free:
            # Our own count of outstanding tasks is fresher than the last heartbeat's load.
            views = [dataclasses.replace(d, load=len(self._inflight[d.device_id]) + d.load) for d in free]
            chosen = self.policy.choose(views, task_id=record.task_id)
            return (chosen.device_id if chosen else None), None
        if ready:
            if avoid and all(d.device_id in avoid for d in ready):
                self._avoid.pop(record.task_id, None)  # every device said "not now": try them again next tick
            return None, None
        alive = self.registry.devices(DeviceStatus.ONLINE, DeviceStatus.SUSPECT)
        entry = self._models.get(model)
        if entry is None:
            if time.monotonic() - self._started < max(2.0, 1.5 * self.config.heartbeat_s) or any(
                model in d.models for d in alive
            ):
                self._why[record.task_id] = f"waiting to learn of model {model!r}"
                return None, None
            return None, ("unknown_model", f"no model {model!r} is published in fleet {self.config.fleet!r}")
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
            self._why[record.task_id] = f"waiting for {model} on {', '.join(hopeful)}"
            return None, None
        if not alive:
            self._why[record.task_id] = "no device online" + (f" named {pinned}" if pinned else "")
            return None, None
        return None, ("no_capable_device", f"no device can run {model} v{version}: " + "; ".join(reasons))


async def _gather(aws: Sequence[Awaitable[T]], return_exceptions: bool) -> list[Any]:
    """Await all; on the first error (unless returned) the rest are cancelled before raising."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks, return_exceptions=return_exceptions))
    finally:
        for task in tasks:
            task.cancel()


def default_client_id(config: CoordinatorConfig, purpose: str) -> str:
    """A client id for a short-lived tool beside the coordinator (``coord-cli-1234``)."""
    return f"{config.coordinator_id}-{purpose}-{os.getpid()}"


def _profile(path: Path, sample: Sequence[Array] | None) -> tuple[list[Segment], list[Array]]:
    """Profile an ONNX model's segments with ``sample`` (default: zeros of its input shapes, batch 1)."""
    if sample is None:
        onnx = _onnx()
        model = onnx.load(str(path), load_external_data=False)
        weights = {i.name for i in model.graph.initializer}
        sample = []
        for meta in model.graph.input:
            if meta.name in weights:
                continue
            tensor = meta.type.tensor_type
            shape = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            sample.append(np.zeros(shape, dtype=dtype))
    inputs = list(sample)
    return profile_onnx(path, inputs), inputs
