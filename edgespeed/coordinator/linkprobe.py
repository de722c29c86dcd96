"""The link probe: measures the network a split model's activations cross, through the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time

from edgespeed._compat import timeout as timeout_after
from edgespeed.errors import EdgeSpeedError
from edgespeed.optimize.planner import Link
from edgespeed.protocol import topics
from edgespeed.transport.base import Message, Transport

__all__ = ["LinkProbe"]

log = logging.getLogger(__name__)


class LinkProbe:
    """Sends messages to itself through the broker and times them (``lane``: one topic per coordinator)."""

    def __init__(self, transport: Transport, *, fleet: str, lane: int) -> None:
        self._transport = transport
        self._topic = topics.coordinator_probe(fleet, lane)
        self._echoes: asyncio.Queue[int] | None = None

    def handle(self, message: Message) -> bool:
        """Take a probe's echo; False if the message is not one."""
        if message.topic != self._topic:
            return False
        if self._echoes is not None:
            with contextlib.suppress(asyncio.QueueFull):  # a late echo of a probe already timed out
                self._echoes.put_nowait(len(message.payload))
        return True

    async def measure(self, *, size: int = 256 * 1024, rounds: int = 5) -> Link:
        """The latency of one hop (from small messages) and the bandwidth (from ``size``-byte ones).

        Falls back to the default `Link` when the probe gets no answer in 10 s.
        """
        self._echoes = asyncio.Queue(8)
        await self._transport.subscribe(self._topic)
        try:
            times: dict[int, list[float]] = {64: [], size: []}
            for n in (64, size):
                payload = os.urandom(n)
                for _ in range(rounds + 1):
                    start = time.perf_counter()
                    await self._transport.publish(self._topic, payload)
                    async with timeout_after(10):
                        await self._echoes.get()
                    times[n].append(time.perf_counter() - start)
            small = statistics.median(times[64][1:])  # the first of each size warms the path up
            large = statistics.median(times[size][1:])
        except TimeoutError:
            log.warning("the link probe got no answer in 10 s; planning with the default link")
            return Link()
        finally:
            self._echoes = None
            with contextlib.suppress(EdgeSpeedError):
                await self._transport.unsubscribe(self._topic)
        link = Link(bytes_per_s=size / max(large - small, 1e-6), rtt_s=2 * small)
        log.info("link: %.1f MB/s, %.2f ms per hop", link.bytes_per_s / 1e6, small * 1000)
        return link
