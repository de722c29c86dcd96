"""The coordinator's one router: every incoming message goes to the subsystem that owns it.

Device answers (sealed, on the coordinator inbox) go to the answers (results, errors), to the
rollouts (model status) or to the chunk server (chunk requests); births, deaths and heartbeats to
the registry; retained manifests to the rollouts; the link probe's echoes to the probe. A message
that fails to open or parse is counted and logged, never fatal: the reader outlives any one message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from edgespeed.coordinator.answers import Answers
from edgespeed.coordinator.linkprobe import LinkProbe
from edgespeed.coordinator.registry import DeviceStatus, Registry
from edgespeed.coordinator.revocation import Revocation
from edgespeed.coordinator.rollout import Rollouts
from edgespeed.coordinator.scheduler import Scheduler
from edgespeed.errors import ProtocolError, ReplayError, SecurityError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message
from edgespeed.protocol.messages import Birth, Death, Error, Heartbeat, ModelManifest, ModelStatus, Result
from edgespeed.security import Sealer
from edgespeed.transfer import BlobServer
from edgespeed.transport.base import Message, Transport

__all__ = ["Router"]

log = logging.getLogger(__name__)

_DEVICE_KINDS = frozenset(
    {topics.TopicKind.BIRTH, topics.TopicKind.DEATH, topics.TopicKind.HEARTBEAT, topics.TopicKind.MODEL}
)


class Router:
    """Reads the transport and hands each message to its owner; ``changed`` is set after each one."""

    def __init__(
        self,
        transport: Transport,
        *,
        registry: Registry,
        sealer: Sealer,
        server: BlobServer,
        scheduler: Scheduler,
        answers: Answers,
        rollouts: Rollouts,
        probe: LinkProbe,
        stats: Counter[str],
        changed: asyncio.Event,
        revocation: Revocation | None = None,
    ) -> None:
        self._transport = transport
        self._registry = registry
        self._sealer = sealer
        self._server = server
        self._scheduler = scheduler
        self._answers = answers
        self._rollouts = rollouts
        self._probe = probe
        self._stats = stats
        self._changed = changed
        self._revocation = revocation

    async def run(self) -> None:
        async for message in self._transport.messages():
            try:
                await self.route(message)
            except ReplayError:
                continue  # a duplicate from at-least-once delivery
            except (ProtocolError, SecurityError) as exc:
                self._stats["dropped"] += 1
                log.warning("dropped a message on %s: %s", message.topic, exc)
            except Exception:  # the reader must outlive any one message
                self._stats["dropped"] += 1
                log.exception("failed handling a message on %s", message.topic)
            finally:
                self._changed.set()

    async def route(self, message: Message) -> None:
        if self._probe.handle(message):
            return
        name = topics.parse_topic(message.topic)
        kind = name.kind
        if self._revocation is not None and not self._revocation.admits(name):
            return  # a revoked (or unknown) identity: nothing it sends is read
        if kind is topics.TopicKind.COORDINATOR_INBOX:
            if await self._server.handle(message):
                return
            assert name.id is not None
            _, body = self._sealer.open(message.payload, topic_sender=name.id)
            if isinstance(body, Result):
                await self._answers.on_result(name.id, body)
            elif isinstance(body, Error):
                await self._answers.on_error(name.id, body)
            elif isinstance(body, ModelStatus):
                await self._rollouts.on_status(name.id, body)
                self._scheduler.wake()
            return
        if not message.payload or kind not in _DEVICE_KINDS:
            return  # a retained message being cleared, or one we did not subscribe to
        envelope, body = open_message(message.payload)
        if kind is topics.TopicKind.MODEL:
            if isinstance(body, ModelManifest) and body.model_id == name.id and await self._rollouts.on_manifest(body):
                self._scheduler.wake()
            return
        if envelope.sender != name.id:
            raise SecurityError(f"{envelope.sender!r} wrote on {message.topic}", reason="sender_mismatch")
        if kind is topics.TopicKind.BIRTH and isinstance(body, Birth) and body.card.device_id == name.id:
            info = self._registry.on_birth(body, retained=message.retain)
            if info is not None:
                if not message.retain:
                    await self._scheduler.device_lost(name.id)  # what the old session held is gone
                await self._rollouts.welcome(info)
                self._scheduler.wake()
        elif kind is topics.TopicKind.DEATH and isinstance(body, Death):
            if self._registry.on_death(name.id, body):
                log.info("device %s left (%s)", name.id, body.reason)
                await self._scheduler.device_lost(name.id)
        elif kind is topics.TopicKind.HEARTBEAT and isinstance(body, Heartbeat):
            was = self._registry.get(name.id)
            if self._registry.on_heartbeat(name.id, body) and (was is None or was.status is not DeviceStatus.ONLINE):
                self._scheduler.wake()
