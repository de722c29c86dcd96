"""The device agent: joins the fleet, keeps models, runs tasks, answers.

One dispatcher reads the transport and routes: sealed tasks to a bounded
queue, chunks to the download that asked for them, signed manifests to the
installer, the coordinator's presence to an event. Workers take compatible
tasks in micro-batches and run them off the event loop. Every answer (result,
error, model status) goes through the outbox, so an answer produced while the
broker is away is sent when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgespeed._compat import Self
from edgespeed._compat import timeout as timeout_after
from edgespeed.agent.cache import ModelCache
from edgespeed.agent.config import AgentConfig
from edgespeed.engine.base import Backend, ModelSpec
from edgespeed.engine.registry import available_backends, backend_class
from edgespeed.errors import (
    BackendError,
    EdgeSpeedError,
    NotConnectedError,
    PayloadTooLargeError,
    ProtocolError,
    ReplayError,
    SecurityError,
    TransportError,
)
from edgespeed.hardware import device_card
from edgespeed.pipeline import Pipeline
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.formats import BACKEND_ORDER, backends_for
from edgespeed.protocol.messages import (
    Birth,
    Chunk,
    CoordinatorState,
    Death,
    DeviceConfig,
    Error,
    Heartbeat,
    Message,
    MessageKind,
    ModelManifest,
    ModelStatus,
    Result,
    Task,
)
from edgespeed.protocol.tensor import decode_tensor, encode_tensor, encode_with_codec
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, iter_decrypted, load_identity, verify_manifest
from edgespeed.security.blobcrypt import TAG_SIZE
from edgespeed.security.signing import verify_signed
from edgespeed.transfer import fetch_from
from edgespeed.transport.base import Transport, Will
from edgespeed.transport.mqtt import MqttTransport

__all__ = ["Device"]

log = logging.getLogger(__name__)


# A model whose runs take less than this (moving average) runs on the event loop:
# the hop to a worker thread would cost more than the run.
_INLINE_S = 0.0005


@dataclass
class _Model:
    version: int
    backend: Backend
    pre: Pipeline
    post: Pipeline
    seconds: float = 1.0  # moving average of a run; starts slow, so first runs go to a thread
    stage: int = 0  # its place in a split model (signed in the manifest); 0 for a whole model

    async def run(self, inputs: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        start = time.perf_counter()
        if self.seconds < _INLINE_S:
            outputs = self.backend.run(inputs)
        else:
            outputs = await self.backend.run_async(inputs)
        elapsed = time.perf_counter() - start
        self.seconds = elapsed if self.seconds == 1.0 else 0.8 * self.seconds + 0.2 * elapsed
        return outputs


@dataclass(frozen=True)
class _Job:
    task: Task
    sender: str
    received: float


class Device:
    """A device agent. Use as ``async with Device(config) as device``; it runs until closed.

    Args:
        config: the agent's configuration.
        transport: a transport to use instead of an MQTT connection from the
            configuration (it must carry the agent's will).
    """

    def __init__(self, config: AgentConfig, *, transport: Transport | None = None) -> None:
        self.config = config
        self.epoch = time.time_ns()
        self._transport = transport
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(config.queue_size)
        self._manifests: asyncio.Queue[ModelManifest] = asyncio.Queue(16)
        self._fetches: dict[str, asyncio.Queue[Chunk | Error | None]] = {}
        self._models: dict[str, _Model] = {}
        self._busy = 0
        self._online = asyncio.Event()
        self._accepting = True
        self._wake_outbox = asyncio.Event()
        self._beat_now = asyncio.Event()
        self.dropped = 0
        self.settings: dict[str, Any] = {
            "heartbeat_s": config.heartbeat_s,
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "log_level": logging.getLevelName(logging.getLogger("edgespeed").getEffectiveLevel()),
        }
        self.config_version: int | None = None

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        identity = load_identity(cfg.pki_dir, cfg.device_id, ca_file=cfg.pki_dir / "ca.crt")
        self._directory = KeyDirectory(cfg.pki_dir / "ca.crt")
        self._directory.add_directory(cfg.pki_dir)
        self._sealer = Sealer(
            cfg.device_id, identity.seal_key(), self._directory, replay=ReplayGuard(cfg.state_dir / "replay.db")
        )
        from edgespeed.agent.outbox import Outbox  # sqlite3 only when an agent runs

        self._outbox = Outbox(cfg.state_dir)
        try:
            await self._start()
        except BaseException:
            # Leave nothing half open: tasks, the connection, the outbox's database.
            for task in self._tasks:
                task.cancel()
            if self._transport is not None:
                with contextlib.suppress(Exception):
                    await self._transport.close()
            self._outbox.close()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.config
        self._cache = ModelCache(cfg.state_dir / "models", cfg.cache_bytes)
        self._load_remote_config()
        death = pack_message(Death(self.epoch, "lost"), sender=cfg.device_id)
        if self._transport is None:
            self._transport = MqttTransport(cfg.mqtt(Will(topics.death(cfg.fleet, cfg.device_id), death)))
        await self._transport.__aenter__()
        t = self._transport
        await t.subscribe(
            topics.device_inbox(cfg.fleet, cfg.device_id),
            topics.coordinator_state(cfg.fleet),
            topics.model_filter(cfg.fleet),
            topics.broadcast(cfg.fleet, "config"),
            topics.broadcast(cfg.fleet, "discover"),
        )
        # Counting GPUs and NPUs imports torch: only worth it when a torch backend may run.
        probe = not cfg.backends or any(b in ("torch", "npu") for b in cfg.backends)
        card = await asyncio.to_thread(device_card, cfg.device_id, probe_accelerators=probe)
        if cfg.backends:
            card = type(card)(**{**_fields(card), "backends": tuple(b for b in cfg.backends if b in card.backends)})
        await t.publish(
            topics.birth(cfg.fleet, cfg.device_id),
            pack_message(Birth(card, self.epoch), sender=cfg.device_id),
            retain=True,
        )
        self.card = card
        name = f"device[{cfg.device_id}]"
        self._tasks = [
            asyncio.create_task(self._dispatch(), name=f"{name}.dispatch"),
            asyncio.create_task(self._heartbeat(), name=f"{name}.heartbeat"),
            asyncio.create_task(self._installer(), name=f"{name}.install"),
            asyncio.create_task(self._flush_outbox(), name=f"{name}.outbox"),
            *(asyncio.create_task(self._worker(), name=f"{name}.worker{i}") for i in range(cfg.concurrency)),
        ]
        for manifest in self._cache.manifests():  # reload what was installed before a restart
            self._manifests.put_nowait(manifest)

    async def close(self, *, drain_timeout: float = 10.0) -> None:
        """Stop taking tasks, finish those queued (up to ``drain_timeout``), send what is owed, leave."""
        self._accepting = False
        with contextlib.suppress(TimeoutError):
            async with timeout_after(drain_timeout):
                # Polls only while shutting down, under the drain timeout.
                while not self._queue.empty() or self._busy:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                while len(self._outbox):
                    self._wake_outbox.set()
                    await asyncio.sleep(0.05)
        t = self._transport
        assert t is not None
        with contextlib.suppress(EdgeSpeedError):
            death = pack_message(Death(self.epoch, "shutdown"), sender=self.config.device_id)
            await t.publish(topics.death(self.config.fleet, self.config.device_id), death)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await t.close()
        for model in self._models.values():
            model.backend.close()
        self._outbox.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_coordinator(self, timeout: float) -> None:
        """Wait until the coordinator's retained state says it is online.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        async with timeout_after(timeout):
            await self._online.wait()

    @property
    def models(self) -> dict[str, int]:
        """Loaded models and their versions."""
        return {name: m.version for name, m in self._models.items()}

    # -- receiving -----------------------------------------------------------

    async def _dispatch(self) -> None:
        cfg = self.config
        assert self._transport is not None
        inbox = topics.device_inbox(cfg.fleet, cfg.device_id)
        models_prefix = topics.broadcast(cfg.fleet, "models") + "/"
        async for message in self._transport.messages():
            try:
                if message.topic == inbox:
                    await self._on_inbox(message.payload)
                elif message.topic.startswith(models_prefix):
                    if not message.payload:
                        continue  # a retained manifest withdrawn
                    _, manifest = open_message(message.payload)
                    if isinstance(manifest, ModelManifest) and message.topic == topics.model_manifest(
                        cfg.fleet, manifest.model_id
                    ):
                        if self._manifests.full():
                            log.warning("manifest of %s dropped: installer queue full", manifest.model_id)
                        else:
                            self._manifests.put_nowait(manifest)
                elif message.topic == topics.broadcast(cfg.fleet, "config"):
                    _, remote = open_message(message.payload)
                    if isinstance(remote, DeviceConfig):
                        self._apply_remote_config(remote)
                elif message.topic == topics.broadcast(cfg.fleet, "discover"):
                    _, hello = open_message(message.payload)
                    if isinstance(hello, CoordinatorState):
                        self._beat_now.set()  # a coordinator (re)starting wants to know who is alive
                elif message.topic == topics.coordinator_state(cfg.fleet):
                    _, state = open_message(message.payload)
                    if isinstance(state, CoordinatorState):
                        (self._online.set if state.online else self._online.clear)()
            except ReplayError:
                continue  # a duplicate from at-least-once delivery
            except (ProtocolError, SecurityError) as exc:
                self.dropped += 1
                log.warning("dropped a message on %s: %s", message.topic, exc)
            except Exception:  # the dispatcher must outlive any one message
                self.dropped += 1
                log.exception("failed handling a message on %s", message.topic)

    async def _on_inbox(self, payload: bytes) -> None:
        envelope, body = self._sealer.open(payload, allow_plain={MessageKind.CHUNK})
        if isinstance(body, Chunk) or (isinstance(body, Error) and not body.task_id):
            # Chunk data is ciphertext checked against the signed manifest. A blob error ends a
            # download: it counts only sealed, so only from the coordinator.
            if isinstance(body, Error) and envelope.sender != self.config.coordinator:
                return
            for blob_id, queue in self._fetches.items():
                if isinstance(body, Error) or body.blob_id == blob_id:
                    with contextlib.suppress(asyncio.QueueFull):  # asked for again on timeout
                        queue.put_nowait(body)
            return
        if isinstance(body, Task):
            if envelope.sender != self.config.coordinator and not self._forwarded_ok(body):
                self.dropped += 1
                log.warning(
                    "refused a task for %s from %s: peers only forward split-model stages",
                    body.model_id,
                    envelope.sender,
                )
                return
            if not self._accepting:
                self._refuse(body, envelope.sender, "shutting_down", "the device is shutting down")
            elif self._queue.full():
                self._refuse(body, envelope.sender, "queue_full", "the device's task queue is full")
            else:
                self._queue.put_nowait(_Job(body, envelope.sender, time.monotonic()))

    def _forwarded_ok(self, task: Task) -> bool:
        """Whether a task from a peer device is the next stage of a split model (answering the coordinator).

        Any fleet member can seal a task for us; only the coordinator may have us run whole models or
        answer elsewhere. A stage not loaded yet is let through: it gets ``model_missing`` (to the
        coordinator), which re-places it.
        """
        if task.reply_to != self.config.coordinator:
            return False
        model = self._models.get(task.model_id)
        return model is None or model.stage >= 2

    # -- remote configuration ------------------------------------------------

    def _apply_remote_config(self, remote: DeviceConfig) -> None:
        """Apply a signed configuration meant for us and newer than the last one.

        Raises:
            SecurityError: unsigned, forged, not newer, or a setting out of range (nothing is applied).
        """
        if remote.targets and self.config.device_id not in remote.targets:
            return
        if remote.version == self.config_version:
            return  # a retained configuration seen again
        verify_signed(remote, self._directory, installed_version=self.config_version)
        settings = _check_settings(remote.settings)
        self.settings.update(settings)
        if "log_level" in settings:
            logging.getLogger("edgespeed").setLevel(settings["log_level"])
        self.config_version = remote.version
        path = self.config.state_dir / "remote-config.json"
        path.write_text(json.dumps({"version": remote.version, "settings": self.settings}))
        log.info("applied remote configuration v%d: %s", remote.version, settings)

    def _load_remote_config(self) -> None:
        path = self.config.state_dir / "remote-config.json"
        if path.exists():
            saved = json.loads(path.read_text())
            self.settings.update(_check_settings(saved["settings"]))
            self.config_version = int(saved["version"])

    # -- models --------------------------------------------------------------

    async def _installer(self) -> None:
        while True:
            manifest = await self._manifests.get()
            try:
                status = await self._install(manifest)
            except EdgeSpeedError as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                log.warning("model %s v%d not installed: %s", manifest.model_id, manifest.version, exc)
                status = ModelStatus(manifest.model_id, manifest.version, "failed", reason=str(reason))
            if status is not None:
                await self._send(self.config.coordinator, status)

    def _choose(self, manifest: ModelManifest) -> tuple[dict[str, Any], str]:
        variants = manifest.variants or tuple({"shard": s.name, "format": manifest.format} for s in manifest.shards[:1])
        here = set(available_backends())
        order = self.config.backends or BACKEND_ORDER
        for variant in variants:
            for name in order:
                if name in backends_for(variant["format"]) and name in here:
                    return variant, name
        formats = sorted({str(v["format"]) for v in variants})
        raise BackendError(f"no backend here runs {formats}", reason="no_backend")

    async def _install(self, manifest: ModelManifest) -> ModelStatus | None:
        cfg = self.config
        installed = self._cache.installed_version(manifest.model_id)
        loaded = self._models.get(manifest.model_id)
        if loaded is not None and loaded.version == manifest.version:
            return None  # a retained manifest seen again
        verify_manifest(
            manifest, self._directory, installed_version=installed if installed != manifest.version else None
        )
        if manifest.keys and cfg.device_id not in manifest.keys:
            return None  # not a target of this model (a coordinator wraps the key for us if we become one)
        variant, backend_name = self._choose(manifest)
        shard = next(s for s in manifest.shards if s.name == variant["shard"])
        path = self._cache.path(manifest, shard)
        if not path.exists():
            assert self._transport is not None
            queue: asyncio.Queue[Chunk | Error | None] = asyncio.Queue(64)
            self._fetches[shard.name] = queue
            try:
                await fetch_from(
                    self._transport,
                    shard,
                    path,
                    queue,
                    fleet=cfg.fleet,
                    device_id=cfg.device_id,
                    timeout=cfg.fetch_timeout,
                )
            finally:
                del self._fetches[shard.name]
        if manifest.keys:
            wrapped = manifest.keys[cfg.device_id]
            key = self._sealer.unwrap_key(manifest.signer, wrapped, context=f"{manifest.model_id}/{manifest.version}")
            source: Any = b"".join(
                iter_decrypted(path, key, blob_id=shard.name, chunk_size=shard.chunk_size - TAG_SIZE)
            )
        else:
            source = path
        backend = backend_class(backend_name)(threads=cfg.threads)  # type: ignore[call-arg]
        spec = ModelSpec(architecture=str(variant.get("architecture", "")), options=dict(variant.get("options", {})))
        await asyncio.to_thread(backend.load, source, spec)
        run_ms = await asyncio.to_thread(_warm_run_ms, backend)
        model = _Model(
            manifest.version,
            backend,
            Pipeline.from_spec([*manifest.pipeline, *variant.get("pre", ())]),
            Pipeline.from_spec(variant.get("post", ())),
            seconds=run_ms / 1000 if run_ms else 1.0,
            stage=int(variant.get("stage", 0)),
        )
        old = self._models.get(manifest.model_id)
        self._models[manifest.model_id] = model
        if old is not None:
            old.backend.close()
        self._cache.record(manifest, shard)
        for evicted in self._cache.evict(keep=manifest.model_id):
            gone = self._models.pop(evicted, None)
            if gone is not None:
                gone.backend.close()
        log.info("model %s v%d ready on %s", manifest.model_id, manifest.version, backend_name)
        return ModelStatus(manifest.model_id, manifest.version, "ready", backend=backend_name, run_ms=run_ms)

    # -- tasks ---------------------------------------------------------------

    async def _worker(self) -> None:
        carry: _Job | None = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            batch = [first]
            self._busy += 1
            try:
                limit, wait_s = self.settings["max_batch"], self.settings["max_wait_ms"] / 1000
                if first.task.route or first.sender != self.config.coordinator:
                    # A stage of a split model runs its requests one by one: a micro-batch would move
                    # the requests in flight through the pipeline together and leave the other stages
                    # idle meanwhile (measured: 0.93x the whole model with batches of 8, 1.4x with
                    # half the queue, 1.5x one by one).
                    limit, wait_s = 1, 0.0
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
                    if nxt.task.model_id == first.task.model_id:
                        batch.append(nxt)
                    else:
                        carry = nxt
                        break
                await self._run_batch(batch)
            except Exception:  # a worker must outlive any one batch; the tasks are answered below
                log.exception("batch of %s failed", first.task.model_id)
                for job in batch:
                    with contextlib.suppress(Exception):
                        await self._fail(job, "backend_failure", "the device failed running this task")
            finally:
                self._busy -= 1

    async def _run_batch(self, batch: Sequence[_Job]) -> None:
        now_ms = time.time_ns() // 1_000_000
        ready: list[tuple[_Job, list[np.ndarray[Any, Any]]]] = []
        model = self._models.get(batch[0].task.model_id)
        for job in batch:
            task = job.task
            if task.deadline_ms and task.deadline_ms < now_ms:
                await self._fail(job, "deadline", "the deadline passed before the task ran")
            elif model is None:
                await self._fail(job, "model_missing", f"model {task.model_id!r} is not loaded here")
            else:
                try:
                    ready.append((job, [model.pre(decode_tensor(x)) for x in task.inputs]))
                except EdgeSpeedError as exc:
                    await self._fail(job, "bad_input", str(exc))
        if not ready or model is None:
            return
        self._cache.touch(batch[0].task.model_id)
        groups: dict[tuple[Any, ...], list[tuple[_Job, list[np.ndarray[Any, Any]]]]] = {}
        for job, arrays in ready:
            groups.setdefault(tuple((a.dtype.str, a.shape[1:]) for a in arrays), []).append((job, arrays))
        for group in groups.values():
            await self._run_group(model, group)

    async def _run_group(self, model: _Model, group: list[tuple[_Job, list[np.ndarray[Any, Any]]]]) -> None:
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
            await self._fail(group[0][0], exc.reason, str(exc))
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
                    answers.append(self._send(hop.device, forwarded))
                    continue
                result = Result(task.task_id, task.attempt, tuple(encode_tensor(model.post(o)) for o in outs))
            except EdgeSpeedError as exc:
                answers.append(self._fail(job, "backend_failure", str(exc)))
                continue
            answers.append(self._answer(task, job.sender, result))
        if len(answers) == 1:
            await answers[0]
        else:
            await asyncio.gather(*answers)  # published together: one broker round trip, not one per task

    async def _fail(self, job: _Job, code: str, message: str) -> None:
        await self._answer(
            job.task, job.sender, Error(code, message, task_id=job.task.task_id, attempt=job.task.attempt)
        )

    async def _answer(self, task: Task, sender: str, message: Result | Error) -> None:
        # Every stage of a split model answers (its errors, the last stage's result) to reply_to.
        recipient = task.reply_to or sender
        await self._send(recipient, message)

    # -- sending -------------------------------------------------------------

    def _topic(self, recipient: str) -> str:
        cfg = self.config
        if recipient == cfg.coordinator:
            return topics.coordinator_inbox(cfg.fleet, cfg.device_id)
        return topics.device_inbox(cfg.fleet, recipient)

    async def _send(self, recipient: str, message: Message) -> None:
        await self._deliver(None, recipient, self._topic(recipient), message)

    def _refuse(self, task: Task, sender: str, code: str, message: str) -> None:
        """Answer a task the dispatcher cannot take, through the outbox.

        The dispatcher must never wait for a broker acknowledgement: while a burst fills the
        transport's incoming queue, socket reads pause, and the acknowledgement would never be read.
        """
        recipient = task.reply_to or sender
        refusal = Error(code, message, task_id=task.task_id, attempt=task.attempt)
        self._outbox.put(recipient, self._topic(recipient), refusal)
        self._wake_outbox.set()

    async def _deliver(self, row: int | None, recipient: str, topic: str, message: Message) -> bool:
        """Publish an answer; one that cannot go now waits in the outbox (``row``: already there)."""
        assert self._transport is not None
        try:
            await self._transport.publish(topic, self._sealer.seal(message, recipient=recipient))
        except (NotConnectedError, TransportError) as exc:
            if row is None:
                # Kept on disk, encrypted, until the broker takes it. (An answer lost in a crash
                # before this point is not lost work: the coordinator gives the task out again.)
                self._outbox.put(recipient, topic, message)
                log.info("answer kept in the outbox (%s)", exc)
            self._wake_outbox.set()
            return False
        except PayloadTooLargeError as exc:
            # Retrying would never succeed: replace the answer by an error that fits.
            if row is not None:
                self._outbox.remove(row)
            log.error("answer to %s is too large to send: %s", recipient, exc)
            if isinstance(message, Result):
                await self._send(
                    recipient, Error("result_too_large", str(exc), task_id=message.task_id, attempt=message.attempt)
                )
            return True
        if row is not None:
            self._outbox.remove(row)
        return True

    async def _flush_outbox(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(1.0):
                    await self._wake_outbox.wait()
            self._wake_outbox.clear()
            assert self._transport is not None
            if not self._transport.connected:
                continue
            try:
                for row, recipient, topic, message in self._outbox.pending():
                    if not await self._deliver(row, recipient, topic, message):
                        break
            except Exception:  # the flusher must outlive any one message; they stay in the outbox
                log.exception("sending the outbox failed; retrying")

    async def _heartbeat(self) -> None:
        cfg = self.config
        assert self._transport is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(self.settings["heartbeat_s"] * random.uniform(0.8, 1.2)):
                    await self._beat_now.wait()
            self._beat_now.clear()
            beat = Heartbeat(
                self.epoch,
                load=min(1e6, (self._queue.qsize() + self._busy) / cfg.queue_size),
                queue_depth=self._queue.qsize(),
                models=tuple(sorted(self._models)),
            )
            with contextlib.suppress(EdgeSpeedError):
                await self._transport.publish(
                    topics.heartbeat(cfg.fleet, cfg.device_id), pack_message(beat, sender=cfg.device_id), qos=0
                )


_SETTINGS = {
    "heartbeat_s": lambda v: isinstance(v, int | float) and 0.05 <= v <= 3600,
    "max_batch": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096,
    "max_wait_ms": lambda v: isinstance(v, int | float) and 0 <= v <= 10_000,
    "log_level": lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
}


def _check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    for key, value in settings.items():
        check = _SETTINGS.get(key)
        if check is None or not check(value):
            raise SecurityError(f"remote setting {key}={value!r} is unknown or out of range", reason="bad_config")
    return dict(settings)


def _warm_run_ms(backend: Backend) -> float:
    """The median of three runs on zeros shaped like the model's inputs: the model warmed up, and its
    speed on this device measured (0 when the backend cannot say what its inputs look like)."""
    sample = backend.sample_inputs()
    if sample is None:
        return 0.0
    times = []
    try:
        for _ in range(4):
            start = time.perf_counter()
            backend.run(sample)
            times.append(time.perf_counter() - start)
    except BackendError:
        return 0.0
    return round(sorted(times[1:])[1] * 1000, 4)


def _fields(card: Any) -> dict[str, Any]:
    return {name: getattr(card, name) for name in card.__dataclass_fields__}
