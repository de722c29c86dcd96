"""The partition planner, in the line of Neurosurgeon and EdgeShard.

Given a model's segments (measured: seconds each and the bytes each hands to
the next), the devices (a speed factor each: 1.0 runs like the machine that
profiled, 2.0 takes twice as long) and the link (bandwidth and round trip), it
tries every way to cut the segments into consecutive stages and every
assignment of stages to distinct devices, and keeps the best for the
objective:

* ``latency``: input to the first stage, every stage's compute, every
  activation's transfer, the output back;
* ``throughput``: requests per second of the pipeline, bounded by its slowest
  stage or transfer (stages work on different requests at once).

Keeping the whole model on one device (each device, so the strongest too) is
among the candidates, so a split is chosen only when it wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edgespeed.errors import ConfigError
from edgespeed.optimize.split import Segment

__all__ = ["Link", "Objective", "Plan", "StagePlan", "plan"]

Objective = Literal["latency", "throughput"]


@dataclass(frozen=True, slots=True)
class Link:
    """The network between devices (through the broker): bytes per second and round trip in seconds."""

    bytes_per_s: float = 12.5e6  # 100 Mbit/s
    rtt_s: float = 0.002
    per_message_s: float = 0.0003  # sealing, opening, the broker's hop: paid by every message

    def seconds(self, nbytes: float) -> float:
        """One message of ``nbytes`` from one device to another, start to end."""
        return self.rtt_s / 2 + self.busy(nbytes)

    def busy(self, nbytes: float) -> float:
        """How long one message occupies the link (what bounds throughput)."""
        return self.per_message_s + nbytes / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class StagePlan:
    """Segments ``first`` to ``last`` (inclusive) on ``device``; ``cut`` is the tensor it hands on."""

    first: int
    last: int
    device: str
    cut: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Plan:
    """A placement and what the planner predicts for it."""

    stages: tuple[StagePlan, ...]
    latency_s: float
    throughput: float
    objective: Objective

    @property
    def cuts(self) -> list[str]:
        """The tensors to cut at (none for a whole model)."""
        return [s.cut for s in self.stages[:-1]]

    @property
    def devices(self) -> list[str]:
        return [s.device for s in self.stages]

    def describe(self) -> str:
        parts = [f"{s.device}[{s.first}..{s.last}]" for s in self.stages]
        return (
            f"{' -> '.join(parts)}: predicted {self.latency_s * 1000:.2f} ms, "
            f"{self.throughput:.1f} requests/s ({self.objective})"
        )


def _evaluate(
    segments: Sequence[Segment],
    bounds: Sequence[int],
    devices: Sequence[str],
    speed: Mapping[str, float],
    link: Link,
    input_bytes: int,
    codec_ratio: float,
    objective: Objective,
) -> Plan:
    stages = []
    first = 0
    for end, device in zip([*bounds, len(segments)], devices, strict=True):
        seconds = sum(s.seconds for s in segments[first:end]) * speed[device]
        cut = segments[end - 1].end if end < len(segments) else ""
        stages.append(StagePlan(first, end - 1, device, cut, seconds))
        first = end
    sizes = [input_bytes, *(segments[b - 1].out_bytes * codec_ratio for b in bounds), segments[-1].out_bytes]
    latency = sum(s.seconds for s in stages) + sum(link.seconds(n) for n in sizes)
    slowest = max([s.seconds for s in stages] + [link.busy(n) for n in sizes])
    return Plan(tuple(stages), latency, 1 / slowest if slowest > 0 else float("inf"), objective)


def plan(
    segments: Sequence[Segment],
    devices: Mapping[str, float],
    link: Link,
    *,
    objective: Objective = "throughput",
    input_bytes: int = 0,
    codec_ratio: float = 1.0,
    max_stages: int = 4,
    bounds: Sequence[int] | None = None,
) -> Plan:
    """The best placement of ``segments`` on ``devices`` for ``objective``.

    Args:
        segments: the model's pieces in order, as `profile_onnx` measures them.
        devices: device id -> speed factor (seconds multiplier against the profiling machine).
        link: the network between devices.
        input_bytes: the size of one request's input.
        codec_ratio: the fraction of an activation's bytes the chosen codec sends (0.25 for int8).
        max_stages: at most this many stages.
        bounds: cut here (segment indexes where stages 2.. start) and only choose the devices; a
            device may then hold several stages when there are fewer devices than stages.

    Raises:
        ConfigError: no segments or no devices.
    """
    if not segments or not devices:
        raise ConfigError("planning needs at least one segment and one device")
    names = sorted(devices)
    if bounds is not None:
        stages = len(bounds) + 1
        assignments: Any = (
            itertools.permutations(names, stages) if len(names) >= stages else itertools.product(names, repeat=stages)
        )
        cuts: list[tuple[Sequence[int], Any]] = [(bounds, assignments)]
    else:
        cuts = [
            (b, itertools.permutations(names, count))
            for count in range(1, min(max_stages, len(segments), len(names)) + 1)
            for b in itertools.combinations(range(1, len(segments)), count - 1)
        ]
    best: Plan | None = None
    for cut, assignments in cuts:
        for chosen in assignments:
            candidate = _evaluate(segments, cut, chosen, devices, link, input_bytes, codec_ratio, objective)
            if best is None or _better(candidate, best, objective):
                best = candidate
    assert best is not None
    return best


def _better(a: Plan, b: Plan, objective: Objective) -> bool:
    if objective == "latency":
        return (a.latency_s, -a.throughput, len(a.stages)) < (b.latency_s, -b.throughput, len(b.stages))
    # Throughput within 2% counts as a tie: then the lower latency (usually fewer stages) wins.
    if a.throughput > b.throughput * 1.02:
        return True
    if b.throughput > a.throughput * 1.02:
        return False
    return (a.latency_s, len(a.stages)) < (b.latency_s, len(b.stages))
