"""The device agent: joins the fleet, keeps models, runs tasks, answers.

`Device` is the facade. It owns the agent's lifecycle (open the identity, the
sealer, the outbox and the connection; announce the device's birth; start the
parts; close them in order) and the one dispatcher, which reads the connection
and routes each message to the part that owns it:

- a sealed task: `Runner` (runner.py), or a refusal through `Delivery` when the
  agent is shutting down or the task queue is full;
- a chunk, or a blob error: the download in `Installer` (installer.py) that asked for it;
- a signed model manifest: `Installer`;
- a signed remote configuration: `RemoteConfig` (remote_config.py);
- a coordinator asking who is alive: `Heartbeats` (heartbeat.py);
- the coordinator's retained state: the event `wait_coordinator` waits on.

Every answer goes out through `Delivery` (delivery.py), so an answer produced
while the broker is away is sent when it comes back. The parts run under one
`Supervisor` (supervisor.py): a part that fails takes the agent down, and
`run_until_closed` raises the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from edgespeed._compat import Self
from edgespeed._compat import timeout as timeout_after
from edgespeed.agent.cache import ModelCache
from edgespeed.agent.config import AgentConfig
from edgespeed.agent.delivery import Delivery
from edgespeed.agent.heartbeat import Heartbeats
from edgespeed.agent.installer import Installer, LoadedModel
from edgespeed.agent.remote_config import RemoteConfig
from edgespeed.agent.revocation import DeviceRevocation
from edgespeed.agent.runner import Runner
from edgespeed.agent.supervisor import PartFailedError, Supervisor
from edgespeed.errors import (
    EdgeSpeedError,
    ProtocolError,
    ReplayError,
    SecurityError,
    TransportClosedError,
)
from edgespeed.hardware import device_card
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import (
    Birth,
    Chunk,
    CoordinatorState,
    Death,
    DeviceConfig,
    Error,
    MessageKind,
    ModelManifest,
    Task,
)
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, load_data_key, load_identity
from edgespeed.security.atrest import private_database, private_dir
from edgespeed.security.ratelimit import PeerLimiter
from edgespeed.transport.base import Transport, Will
from edgespeed.transport.mqtt import MqttTransport

__all__ = ["Device", "PartFailedError"]

log = logging.getLogger(__name__)

# How long an agent whose part failed keeps answering what it holds before it leaves.
_FAILURE_DRAIN_S = 5.0


@dataclass(frozen=True)
class _Parts:
    delivery: Delivery
    installer: Installer
    runner: Runner
    heartbeats: Heartbeats


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
        self.dropped = 0  # messages refused or that could not be handled
        self._peer_limits = PeerLimiter(*PEER_STAGE_LIMIT)  # stage tasks each peer may forward us
        self._transport = transport
        self._remote = RemoteConfig(config)
        self._parts: _Parts | None = None
        self._online = asyncio.Event()
        self._accepting = True
        self._supervisor = Supervisor(f"device[{config.device_id}]", self._part_failed)
        self._closing: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._failure: PartFailedError | None = None
        self._failure_raised = False

    # -- what the agent shows ------------------------------------------------

    @property
    def models(self) -> dict[str, int]:
        """Loaded models and their versions."""
        if self._parts is None:
            return {}
        return {name: m.version for name, m in self._parts.installer.models.items()}

    @property
    def settings(self) -> dict[str, Any]:
        """The settings in force: the configuration's, then the last remote configuration's."""
        return self._remote.settings

    @property
    def config_version(self) -> int | None:
        """The version of the remote configuration applied, None if none was."""
        return self._remote.version

    @property
    def failure(self) -> PartFailedError | None:
        """Why the agent closed itself, if a part failed."""
        return self._failure

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        cfg = self.config
        private_dir(cfg.state_dir)  # mode 0700
        identity = load_identity(cfg.pki_dir, cfg.device_id, ca_file=cfg.pki_dir / "ca.crt")
        self._keys = KeyDirectory.from_folder(cfg.pki_dir)  # with the folder's revocation list
        self.revocation = DeviceRevocation(self._keys, cfg.state_dir)  # and the lists broadcast since
        self.revocation.load_saved()
        self._sealer = Sealer(
            cfg.device_id,
            identity.seal_key(),
            self._keys,
            replay=ReplayGuard(private_database(cfg.state_dir / "replay.db")),
        )
        from edgespeed.agent.outbox import Outbox  # sqlite3 only when an agent runs

        self._outbox = Outbox(cfg.state_dir, key=load_data_key(cfg.state_dir, cfg.data_key_file))
        try:
            await self._start()
        except BaseException:
            # Leave nothing half open: tasks, the connection, the outbox's database.
            await self._supervisor.stop()
            if self._transport is not None:
                with contextlib.suppress(Exception):
                    await self._transport.close()
            self._outbox.close()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.config
        cache = ModelCache(cfg.state_dir / "models", cfg.cache_bytes)
        self._remote.load()
        if self._transport is None:
            death = pack_message(Death(self.epoch, "lost"), sender=cfg.device_id)
            self._transport = MqttTransport(cfg.mqtt(Will(topics.death(cfg.fleet, cfg.device_id), death)))
        transport = self._transport
        await transport.__aenter__()
        await transport.subscribe(
            topics.device_inbox(cfg.fleet, cfg.device_id),
            topics.coordinator_state(cfg.fleet),
            topics.model_filter(cfg.fleet),
            topics.broadcast(cfg.fleet, "config"),
            topics.broadcast(cfg.fleet, "discover"),
            topics.crl(cfg.fleet),
        )
        # Counting GPUs and NPUs imports torch: only worth it when a torch backend may run.
        probe = not cfg.backends or any(b in ("torch", "npu") for b in cfg.backends)
        card = await asyncio.to_thread(device_card, cfg.device_id, probe_accelerators=probe)
        if cfg.backends:
            card = type(card)(**{**_fields(card), "backends": tuple(b for b in cfg.backends if b in card.backends)})
        birth = pack_message(Birth(card, self.epoch), sender=cfg.device_id)
        await transport.publish(topics.birth(cfg.fleet, cfg.device_id), birth, retain=True)
        self.card = card

        delivery = Delivery(cfg, transport, self._sealer, self._outbox)
        installer = Installer(cfg, cache, self._sealer, self._keys, transport, delivery)
        runner = Runner(cfg, installer.models, self._remote.settings, delivery, cache)
        heartbeats = Heartbeats(
            cfg, transport, self.epoch, self._remote.settings, runner, installer.models, birth=birth
        )
        self._parts = parts = _Parts(delivery, installer, runner, heartbeats)
        start = self._supervisor.start
        start("dispatch", self._dispatch(transport, parts))
        start("heartbeat", heartbeats.run())
        start("install", installer.run())
        start("outbox", delivery.run())
        for i in range(cfg.concurrency):
            start(f"worker{i}", runner.work())

    async def close(self, *, drain_timeout: float = 10.0) -> None:
        """Stop taking tasks, finish those queued (up to ``drain_timeout``), send what is owed, leave.

        Closing again, or while a close is under way, waits for that close.
        """
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown(drain_timeout, "shutdown"))
        await asyncio.shield(self._closing)

    def _part_failed(self, failure: PartFailedError) -> None:
        self._failure = failure
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._shutdown(_FAILURE_DRAIN_S, "failed"))

    async def _shutdown(self, drain_timeout: float, reason: str) -> None:
        self._accepting = False
        parts, transport = self._parts, self._transport
        assert parts is not None and transport is not None, "close() of an agent that never started"
        try:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(drain_timeout):
                    await parts.runner.drained()
                    await parts.delivery.drained()
            with contextlib.suppress(EdgeSpeedError):
                death = pack_message(Death(self.epoch, reason), sender=self.config.device_id)
                await transport.publish(topics.death(self.config.fleet, self.config.device_id), death)
            await self._supervisor.stop()
            await transport.close()
        finally:
            parts.installer.close()
            self._outbox.close()
            self._closed.set()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        if exc_type is None:
            self._raise_failure()

    async def run_until_closed(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set or the agent closes, whichever comes first.

        The wait a daemon's main task makes, so it has no timeout. When ``stop`` is set, it
        returns at once and leaves the draining to `close` (or the ``async with``'s end).

        Raises:
            PartFailedError: a part of the agent failed, and the agent closed itself.
        """
        waits = [asyncio.ensure_future(self._closed.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._closed.is_set():
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None and not self._failure_raised:
            self._failure_raised = True  # raised once: by run_until_closed, else by the async with
            raise self._failure

    async def wait_coordinator(self, timeout: float) -> None:
        """Wait until the coordinator's retained state says it is online.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        async with timeout_after(timeout):
            await self._online.wait()

    # -- the dispatcher --------------------------------------------------------

    async def _dispatch(self, transport: Transport, parts: _Parts) -> None:
        """Route every message to the part that owns it, until the connection closes."""
        cfg = self.config
        inbox = topics.device_inbox(cfg.fleet, cfg.device_id)
        models_prefix = topics.broadcast(cfg.fleet, "models") + "/"
        config_topic = topics.broadcast(cfg.fleet, "config")
        discover_topic = topics.broadcast(cfg.fleet, "discover")
        state_topic = topics.coordinator_state(cfg.fleet)
        crl_topic = topics.crl(cfg.fleet)
        async for message in transport.messages():
            topic = message.topic
            try:
                if topic == inbox:
                    self._on_inbox(message.payload, parts)
                elif topic.startswith(models_prefix):
                    if not message.payload:
                        continue  # a retained manifest withdrawn
                    _, manifest = open_message(message.payload)
                    if isinstance(manifest, ModelManifest) and topic == topics.model_manifest(
                        cfg.fleet, manifest.model_id
                    ):
                        parts.installer.offer(manifest)
                elif topic == config_topic:
                    _, remote = open_message(message.payload)
                    if isinstance(remote, DeviceConfig):
                        self._remote.apply(remote, self._keys)
                elif topic == discover_topic:
                    _, hello = open_message(message.payload)
                    if isinstance(hello, CoordinatorState):
                        parts.heartbeats.beat_now()
                elif topic == crl_topic:
                    self.revocation.on_message(message.payload)
                elif topic == state_topic:
                    _, state = open_message(message.payload)
                    if isinstance(state, CoordinatorState):
                        (self._online.set if state.online else self._online.clear)()
            except ReplayError:
                continue  # a duplicate from at-least-once delivery
            except (ProtocolError, SecurityError) as exc:
                self.dropped += 1
                log.warning("dropped a message on %s: %s", topic, exc)
            except Exception:  # the dispatcher must outlive any one message
                self.dropped += 1
                log.exception("failed handling a message on %s", topic)
        # Closing the agent cancels the dispatcher first: the connection ending under it is a fault.
        raise TransportClosedError("the connection to the broker closed while the agent was running")

    def _on_inbox(self, payload: bytes, parts: _Parts) -> None:
        envelope, body = self._sealer.open(payload, allow_plain={MessageKind.CHUNK})
        if isinstance(body, Chunk) or (isinstance(body, Error) and not body.task_id):
            # Chunk data is ciphertext checked against the signed manifest. A blob error ends a
            # download: it counts only sealed, so only from the coordinator.
            if isinstance(body, Chunk) or envelope.sender == self.config.coordinator:
                parts.installer.feed(body)
            return
        if isinstance(body, Task):
            if envelope.sender != self.config.coordinator and not self._forwarded_ok(
                body, envelope.sender, parts.installer.models
            ):
                self.dropped += 1
                log.warning(
                    "refused a task for %s from %s: peers only forward split-model stages",
                    body.model_id,
                    envelope.sender,
                )
                return
            if not self._accepting:
                parts.delivery.refuse(body, envelope.sender, "shutting_down", "the device is shutting down")
            elif not parts.runner.take(body, envelope.sender):
                parts.delivery.refuse(body, envelope.sender, "queue_full", "the device's task queue is full")

    def _forwarded_ok(self, task: Task, sender: str, models: dict[str, LoadedModel]) -> bool:
        """Whether a task from a peer device is the next stage of a split model (answering the coordinator).

        Any fleet member can seal a task for us; only the coordinator may have us run whole models or
        answer elsewhere, and each peer may forward at most its allowance (`PEER_STAGE_LIMIT`). A stage
        not loaded yet is let through: it gets ``model_missing`` (to the coordinator), which re-places it.
        """
        if task.reply_to != self.config.coordinator:
            return False
        model = models.get(task.model_id)
        return (model is None or model.stage >= 2) and self._peer_limits.allow(sender)


# What one peer may make this device run: stage tasks a second, and at once. A pipeline's honest
# stage forwards what the coordinator gave the stage before it, far under this.
PEER_STAGE_LIMIT = (500.0, 200.0)


def _fields(card: Any) -> dict[str, Any]:
    return {name: getattr(card, name) for name in card.__dataclass_fields__}
