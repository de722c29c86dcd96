"""Split models as the coordinator keeps them: the shards in order, the codec, the plan and how it fared.

A split model's description lives in the ledger (`Ledger.put_split`), so every coordinator that shares
the ledger places its requests, and a restarted one finds it again.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgespeed.errors import ConfigError
from edgespeed.optimize.planner import Link, Objective, Plan, plan
from edgespeed.optimize.split import Segment, profile_onnx, sample_inputs, split_onnx
from edgespeed.protocol.messages import CODECS

__all__ = ["SplitModel", "choose_cuts", "prepare_split"]


@dataclass
class SplitModel:
    """A model served as a pipeline of shards (``<name>-s1``, ``<name>-s2``, ...)."""

    name: str
    version: int
    shards: list[str]
    cuts: list[str]
    codec: str
    preferred: list[str]  # the planned device of each stage
    predicted_s: float
    objective: str
    segments: list[list[Any]] = field(default_factory=list)  # [start, end, seconds, out_bytes] per piece
    link: list[float] = field(default_factory=lambda: [Link().bytes_per_s, Link().rtt_s])
    input_bytes: int = 0
    speeds: dict[str, float] = field(default_factory=dict)  # device -> speed factor, measured on the device
    predicted_rps: float = 0.0
    measured: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # latency of each request

    def record(self, latency_s: float) -> None:
        """A request went through the pipeline."""
        self.measured.append(latency_s)

    def stage_seconds(self) -> list[float]:
        """This machine's measurement of each stage (the sum of its segments)."""
        ends = [str(s[1]) for s in self.segments[:-1]]
        bounds = [0, *(ends.index(c) + 1 for c in self.cuts), len(self.segments)]
        return [sum(float(s[2]) for s in self.segments[a:b]) for a, b in itertools.pairwise(bounds)]

    def replan(self, devices: Sequence[str]) -> Plan | None:
        """Choose devices for the same cuts among ``devices`` (a planned one was lost); None if none left."""
        if not devices or not self.segments:
            return None
        pieces = [Segment(str(a), str(b), float(t), int(n)) for a, b, t, n in self.segments]
        ends = [p.end for p in pieces[:-1]]
        bounds = [ends.index(c) + 1 for c in self.cuts]
        ratio = _codec_ratio(self.codec)
        link = Link(bytes_per_s=self.link[0], rtt_s=self.link[1])
        speeds = {d: self.speeds.get(d, 1.0) for d in devices}
        best = plan(
            pieces,
            speeds,
            link,
            objective=_objective(self.objective),
            input_bytes=self.input_bytes,
            codec_ratio=ratio,
            bounds=bounds,
        )
        self.preferred = best.devices
        self.predicted_s = best.latency_s
        self.predicted_rps = best.throughput
        return best

    def report(self) -> dict[str, Any]:
        """The planner's prediction against what happened (latency of completed requests)."""
        out: dict[str, Any] = {
            "predicted_ms": round(self.predicted_s * 1000, 3),
            "predicted_rps": round(self.predicted_rps, 1),
            "requests": len(self.measured),
        }
        if self.measured:
            fastest = min(self.measured)  # the least queued request: the pipeline's own latency
            out["measured_p50_ms"] = round(statistics.median(self.measured) * 1000, 3)
            out["measured_min_ms"] = round(fastest * 1000, 3)
            out["latency_error"] = round((fastest - self.predicted_s) / fastest, 3)
        return out

    def fit_speeds(self, run_ms: Sequence[Mapping[str, float]], devices: Sequence[str]) -> Plan | None:
        """Re-plan with each device's speed as it measured the shards itself (``run_ms``: per stage, device ->
        a warm run in ms). A device's factor is the median, over the stages, of its run against this
        machine's measurement of the same stage (the planner's unit). None if no device measured any.
        """
        local = self.stage_seconds()
        speeds = {}
        for device in devices:
            ratios = [
                runs[device] / 1000 / seconds
                for runs, seconds in zip(run_ms, local, strict=True)
                if device in runs and seconds > 0
            ]
            if ratios:
                speeds[device] = statistics.median(ratios)
        if not speeds:
            return None
        self.speeds = speeds
        return self.replan(sorted(speeds))

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "measured"})

    @classmethod
    def from_json(cls, text: str) -> SplitModel:
        return cls(**json.loads(text))


def prepare_split(
    source: Path,
    *,
    name: str,
    version: int,
    spec: str,
    codec: str,
    devices: Sequence[str],
    link: Link,
    objective: str,
    sample: Sequence[Any] | None,
    folder: Path,
) -> tuple[SplitModel, list[Path]]:
    """Profile an ONNX model, choose its cuts (see `choose_cuts`) and write each stage to ``folder``.

    Blocking (profiling runs the model): call it in a thread. Returns the split and the stage files.
    """
    inputs = list(sample) if sample is not None else sample_inputs(source)
    segments = profile_onnx(source, inputs)
    input_bytes = sum(int(x.nbytes) for x in inputs)
    cuts, chosen = choose_cuts(
        segments, spec, devices, link=link, objective=objective, codec=codec, input_bytes=input_bytes
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, shard in enumerate(split_onnx(source, cuts), start=1):
        path = folder / f"stage{k}.onnx"
        path.write_bytes(shard.SerializeToString())
        paths.append(path)
    split = SplitModel(
        name,
        version,
        [f"{name}-s{k}" for k in range(1, len(paths) + 1)],
        cuts,
        codec,
        chosen.devices,
        chosen.latency_s,
        objective,
        segments=[[g.start, g.end, g.seconds, g.out_bytes] for g in segments],
        link=[link.bytes_per_s, link.rtt_s],
        input_bytes=input_bytes,
        predicted_rps=chosen.throughput,
    )
    return split, paths


def choose_cuts(
    segments: Sequence[Segment],
    spec: str,
    devices: Sequence[str],
    *,
    link: Link,
    objective: str,
    codec: str,
    input_bytes: int,
) -> tuple[list[str], Plan]:
    """Where to cut, from ``--split``: ``auto`` (the planner decides), ``N`` (stages of even measured time),
    or the tensor names to cut at (``NODE,NODE``). Returns the cuts and the plan for them.

    Raises:
        ConfigError: a bad spec, or no device to plan for.
    """
    if codec not in CODECS:
        raise ConfigError(f"unknown activation codec {codec!r}; one of {', '.join(c or '(none)' for c in CODECS)}")
    if not devices:
        raise ConfigError("no device to plan a split for: start the agents first")
    speeds = {d: 1.0 for d in devices}
    ratio = _codec_ratio(codec)
    ends = [s.end for s in segments[:-1]]
    if spec == "auto":
        best = plan(segments, speeds, link, objective=_objective(objective), input_bytes=input_bytes, codec_ratio=ratio)
        return best.cuts, best
    if spec.isdigit():
        stages = int(spec)
        if not 1 <= stages <= len(segments):
            raise ConfigError(f"--split {stages}: the model has {len(segments)} pieces")
        cuts = [ends[i - 1] for i in _balanced(segments, stages)]
    else:
        cuts = [c.strip() for c in spec.split(",") if c.strip()]
        unknown = [c for c in cuts if c not in ends]
        if unknown:
            raise ConfigError(f"cannot cut at {', '.join(unknown)}: the cuts of this model are {', '.join(ends)}")
    bounds = [ends.index(c) + 1 for c in cuts]
    fixed = plan(
        segments,
        speeds,
        link,
        objective=_objective(objective),
        input_bytes=input_bytes,
        codec_ratio=ratio,
        bounds=bounds,
    )
    return cuts, fixed


def _balanced(segments: Sequence[Segment], stages: int) -> list[int]:
    """Boundaries (segment indexes where stages 2.. start) that make the slowest stage as fast as possible."""
    n = len(segments)
    prefix = [0.0]
    for segment in segments:
        prefix.append(prefix[-1] + segment.seconds)
    # best[k][i]: the smallest possible slowest stage when the first i segments form k stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                slowest = max(best[k - 1][j], prefix[i] - prefix[j])
                if slowest < best[k][i]:
                    best[k][i], cut[k][i] = slowest, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return sorted(b for b in bounds if b > 0)


def _objective(value: str) -> Objective:
    if value not in ("latency", "throughput"):
        raise ConfigError(f"split objective {value!r} is latency or throughput")
    return "latency" if value == "latency" else "throughput"


def _codec_ratio(codec: str) -> float:
    """The share of an activation's bytes a codec sends, as the planner counts it (compression not counted)."""
    return 0.25 if codec.startswith("int8") else 0.5 if codec.startswith("fp16") else 1.0
