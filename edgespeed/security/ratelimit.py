"""Per-peer rate limits: what one fleet member can make another do (serve chunks, run stage tasks).

A token bucket per peer: ``rate`` events a second on average, bursts up to ``burst``. The table of
peers is bounded (the least recently seen is forgotten first), so a flood of made-up ids cannot grow it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from edgespeed.errors import ConfigError

__all__ = ["PeerLimiter"]


class PeerLimiter:
    """Allows each peer ``rate`` events a second, in bursts of at most ``burst``.

    Args:
        rate: sustained events per second per peer.
        burst: the most events a peer may spend at once (its bucket's size).
        max_peers: peers remembered at most.
        clock: monotonic seconds (for tests).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_peers: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_peers < 1:
            raise ConfigError("a rate limit needs rate > 0, burst >= 1 and max_peers >= 1")
        self.rate = rate
        self.burst = burst
        self._max_peers = max_peers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, when)
        self.refused = 0

    def allow(self, peer: str, cost: float = 1.0) -> bool:
        """Spend ``cost`` of ``peer``'s allowance; False (and nothing spent) when it has not enough."""
        now = self._clock()
        tokens, since = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - since) * self.rate)
        allowed = tokens >= cost
        self._buckets[peer] = (tokens - cost if allowed else tokens, now)
        if len(self._buckets) > self._max_peers:
            self._buckets.popitem(last=False)
        if not allowed:
            self.refused += 1
        return allowed
