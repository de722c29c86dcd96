"""Heartbeats: the device tells the fleet it is alive, how loaded it is, and what it runs.

`Heartbeats` publishes a `Heartbeat` (QoS 0: the next one replaces a lost
one) every ``heartbeat_s`` seconds of the live settings, jittered by 20% so a
fleet started together does not beat together, and at once when a
coordinator (re)starting asks who is alive (``discover``). Then it also
publishes the device's retained birth again (the same epoch, so a coordinator
that knows it changes nothing): a coordinator that lost it, after a broker
restart without persistence, learns of the device at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from typing import Any

from edgespeed._compat import timeout as timeout_after
from edgespeed.agent.config import AgentConfig
from edgespeed.agent.installer import LoadedModel
from edgespeed.agent.runner import Runner
from edgespeed.errors import EdgeSpeedError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import Heartbeat
from edgespeed.transport.base import Transport

__all__ = ["Heartbeats"]


class Heartbeats:
    """Sends the device's heartbeats.

    Args:
        config: the agent's configuration.
        transport: the agent's open transport.
        epoch: the agent's epoch (its birth's), so a stale beat is told apart.
        settings: the live settings (``heartbeat_s``).
        runner: how loaded the device is.
        models: the loaded models (the installer's table, read only here).
        birth: the device's packed birth, announced again (retained) when a coordinator asks.
    """

    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        epoch: int,
        settings: Mapping[str, Any],
        runner: Runner,
        models: Mapping[str, LoadedModel],
        *,
        birth: bytes | None = None,
    ) -> None:
        self._config = config
        self._transport = transport
        self._epoch = epoch
        self._settings = settings
        self._runner = runner
        self._models = models
        self._now = asyncio.Event()
        self._birth = birth
        self._announce = False

    def beat_now(self) -> None:
        """Send the birth again and a heartbeat at once: a coordinator (re)starting wants to know who is alive."""
        self._announce = True
        self._now.set()

    async def run(self) -> None:
        """Beat until cancelled."""
        cfg = self._config
        topic = topics.heartbeat(cfg.fleet, cfg.device_id)
        while True:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(self._settings["heartbeat_s"] * random.uniform(0.8, 1.2)):
                    await self._now.wait()
            self._now.clear()
            if self._announce and self._birth is not None:
                self._announce = False
                with contextlib.suppress(EdgeSpeedError):  # the broker away: the next discover asks again
                    await self._transport.publish(topics.birth(cfg.fleet, cfg.device_id), self._birth, retain=True)
            beat = Heartbeat(
                self._epoch,
                load=self._runner.load,
                queue_depth=self._runner.depth,
                models=tuple(sorted(self._models)),
            )
            with contextlib.suppress(EdgeSpeedError):  # the broker away: the next beat will do
                await self._transport.publish(topic, pack_message(beat, sender=cfg.device_id), qos=0)
