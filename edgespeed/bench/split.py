"""Benchmark `split`: a compute-bound model split in 2 stages over 2 devices, against the whole on one.

The model is a CNN of seven 3x3 convolutions of 384 channels on 16x16 inputs
(about 4 GFLOP a request, 384 KiB activations, 37 MB of weights). Every agent
is a separate process with one intra-op thread, pinned to its own core where
the OS allows, as separate gateways would be.
Ours: the model published with ``--split 2``; stage 1 on one device forwards
its activation, sealed, straight to stage 2 on the other. Baseline: the same
model whole on one such device. 8 requests in flight on both sides; rounds
alternate. Ratio: ours / baseline requests per second, goal >= 1.4.

The agents run with their default micro-batching (up to 8), which serves the
whole model; stages of a split model run their requests one by one, so the
stages overlap (batching all 8 requests in flight together starved the other
stage: 0.93x). ``unbatched_ratio`` is the comparison with micro-batching off
on both sides.

It also runs both options with the agents' uplinks paced to several link
speeds (``uplink_bytes_per_s``) and records whether the planner chose the
faster one.

Run: python -m edgespeed.bench.split [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.bench._fleet import bench_main, entry, fleet, median
from edgespeed.coordinator import Coordinator
from edgespeed.optimize import Link, plan, profile_onnx

PACED = [("20 Mbit/s", 2.5e6), ("100 Mbit/s", 12.5e6), ("1 Gbit/s", 125e6)]
PACED_QUICK = [("100 Mbit/s", 12.5e6)]


def conv_onnx(path: Path) -> Path:
    """A compute-bound CNN: 3x8x8 in, seven 3x3 convolutions of 384 channels (~1 GFLOP a request), 384 out.

    Its activations are 96 KiB and its weights 32 MB: compute dominates, as in the models worth splitting.
    """
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i, cin in enumerate([3, 384, 384, 384, 384, 384, 384]):
        w = (rng.standard_normal((384, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(384, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 384])],
        weights,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


async def _rate(c: Coordinator, model: str, x: np.ndarray, count: int) -> float:
    start = time.perf_counter()
    await c.map(model, [x] * count, concurrency=8, deadline=120)
    return count / (time.perf_counter() - start)


async def run(quick: bool) -> list[dict[str, Any]]:
    rounds, count = (2, 24) if quick else (3, 64)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = {"dev-1": cpus[0], "dev-2": cpus[1 % len(cpus)]} if cpus else {}
    async with fleet(devices=2) as f:
        model = conv_onnx(f.base / "convnet.onnx")
        x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
        async with f.agents(["dev-1", "dev-2"], cpus=pin), f.coordinator(max_inflight=16) as c:
            await c.wait_for_devices(2)
            await c.publish_model([model], name="whole", targets="dev-1", timeout=120)
            await c.publish_model([model], name="piped", split="2", sample=[x], timeout=120)
            await c.wait_for_devices(1, model="whole")
            expected = await c.infer("whole", x)
            np.testing.assert_allclose(await c.infer("piped", x), expected, rtol=1e-4, atol=1e-4)
            await _rate(c, "whole", x, 16)
            await _rate(c, "piped", x, 16)
            ours, base = [], []
            for _ in range(rounds):
                base.append(await _rate(c, "whole", x, count))
                ours.append(await _rate(c, "piped", x, count))
            split = c.splits()["piped"]
            report = split.report()
        # Without micro-batching: pipelining alone (the batched whole model gains more from batching).
        async with f.agents(["dev-1", "dev-2"], cpus=pin, max_batch=1), f.coordinator(max_inflight=16) as c:
            await c.wait_for_devices(1, model="whole")
            for shard in c.splits()["piped"].shards:
                await c.wait_for_devices(1, model=shard)
            batched_whole = await _rate(c, "whole", x, count)
            batched_piped = await _rate(c, "piped", x, count)
        segments = await asyncio.to_thread(profile_onnx, model, [x])
        # The planner's choice against both options measured, with the agents' uplinks paced.
        table = []
        for label, speed in PACED_QUICK if quick else PACED:
            link = Link(bytes_per_s=speed)
            chosen = plan(segments, {"dev-1": 1.0, "dev-2": 1.0}, link, objective="throughput", input_bytes=x.nbytes)
            async with (
                f.agents(["dev-1", "dev-2"], cpus=pin, max_batch=1, uplink_bytes_per_s=speed),
                f.coordinator(max_inflight=16) as c,
            ):
                await c.wait_for_devices(1, model="whole")
                for shard in c.splits()["piped"].shards:
                    await c.wait_for_devices(1, model=shard)
                whole_rps = await _rate(c, "whole", x, 8 if quick else 16)
                piped_rps = await _rate(c, "piped", x, 8 if quick else 16)
            best = "split" if piped_rps > whole_rps else "whole"
            picked = "split" if len(chosen.stages) > 1 else "whole"
            table.append(
                {
                    "link": label,
                    "planner": f"{len(chosen.stages)} stage(s)",
                    "planner_predicted_rps": round(chosen.throughput, 1),
                    "measured_whole_rps": round(whole_rps, 1),
                    "measured_split_rps": round(piped_rps, 1),
                    "planner_right": picked == best,
                }
            )
    return [
        entry(
            "split",
            median(ours),
            median(base),
            "requests/s",
            ">= 1.4",
            higher_is_better=True,
            stages=len(split.shards),
            cut_at=split.cuts,
            planner=report,
            unbatched_ratio=round(batched_piped / batched_whole, 3),
            planner_throughput_error=round((median(ours) - split.predicted_rps) / median(ours), 3),
            planner_by_link=table,
            pinned=bool(pin),
        )
    ]


if __name__ == "__main__":
    bench_main(run, __doc__)
