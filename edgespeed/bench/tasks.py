"""Benchmarks `rtt`, `throughput` and `tensor`: tasks through the whole stack against raw paho request/response.

Ours: the `Coordinator` in this process places sealed tasks on device agents
(separate processes, ONNX Runtime running an Identity model: the echo
backend), through a local Mosquitto over mutual TLS; every task is recorded in
the SQLite ledger, sealed both ways and checked against replay. Baseline: raw
paho-mqtt in this process publishing the same bytes at QoS 1 to raw paho echo
processes on the same broker, which publish them back. Rounds alternate.

* ``rtt``: one 100-byte task at a time; p50 ratio (ours / raw, lower is better), goal <= 1.5; p99 printed.
* ``throughput``: 32 tasks in flight over 2 devices; tasks/s ratio (ours / raw), goal >= 0.5.
* ``tensor``: a 16 MiB tensor echoed; goodput both ways, ratio (ours / raw), goal >= 0.8.

The agents run with ``max_wait_ms = 0`` (no micro-batching window), as a latency-minded deployment would.

Run: python -m edgespeed.bench.tasks [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np

from edgespeed.bench._fleet import (
    Fleet,
    bench_main,
    entry,
    fleet,
    identity_onnx,
    median,
    percentile,
    raw_paho,
    raw_peer,
)
from edgespeed.coordinator import Coordinator
from edgespeed.testing import wait_ready

SWEEP = [1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
SWEEP_QUICK = [1 << 10, 64 << 10, 1 << 20, 16 << 20]


def raw_round_trips(client: Any, peer: str, payload: bytes, count: int) -> list[float]:
    """Sequential request/response round trips, seconds each."""
    got = threading.Event()
    client.on_message = lambda *a: got.set()
    client.subscribe(f"raw/{peer}/resp", qos=1)
    time.sleep(0.2)
    out = []
    for _ in range(count):
        got.clear()
        start = time.perf_counter()
        client.publish(f"raw/{peer}/req", payload, qos=1)
        if not got.wait(30):
            raise TimeoutError("raw echo did not answer")
        out.append(time.perf_counter() - start)
    client.unsubscribe(f"raw/{peer}/resp")
    return out


def raw_throughput(client: Any, peers: list[str], payload: bytes, count: int, concurrency: int) -> float:
    """Request/response pairs per second with ``concurrency`` outstanding, spread over ``peers``."""
    slots = threading.Semaphore(concurrency)
    done = threading.Event()
    answered = [0]

    def on_message(*a: Any) -> None:
        answered[0] += 1
        slots.release()
        if answered[0] == count:
            done.set()

    client.on_message = on_message
    for peer in peers:
        client.subscribe(f"raw/{peer}/resp", qos=1)
    time.sleep(0.2)
    start = time.perf_counter()
    for i in range(count):
        if not slots.acquire(timeout=30):
            raise TimeoutError("raw echo stalled")
        client.publish(f"raw/{peers[i % len(peers)]}/req", payload, qos=1)
    if not done.wait(60):
        raise TimeoutError("raw echo did not answer everything")
    seconds = time.perf_counter() - start
    for peer in peers:
        client.unsubscribe(f"raw/{peer}/resp")
    return count / seconds


async def run(quick: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 7
    n_rtt = 100 if quick else 300
    n_tp = 400 if quick else 2000
    n_tensor = 2 if quick else 4
    async with fleet(devices=2) as f:
        model = identity_onnx(f.base / "echo.onnx")
        await raw_peer(f, "echo", "raw-a")
        await raw_peer(f, "echo", "raw-b")
        client = await asyncio.to_thread(raw_paho, f, "raw-c")
        try:
            async with f.agents(["dev-1", "dev-2"], max_wait_ms=0, queue_size=128), f.coordinator(max_inflight=64) as c:
                await c.publish_model([model], name="echo", timeout=60)
                await wait_ready(c, "echo", 2, timeout=60)
                return await _measure(f, c, client, rounds, n_rtt, n_tp, n_tensor, quick)
        finally:
            client.loop_stop()
            await f.stop(["raw-a", "raw-b"])


async def _measure(
    f: Fleet, c: Coordinator, client: Any, rounds: int, n_rtt: int, n_tp: int, n_tensor: int, quick: bool
) -> list[dict[str, Any]]:
    small = np.arange(100, dtype=np.uint8).reshape(1, 100)
    for _ in range(20):  # warm up both paths
        await c.infer("echo", small, device="dev-1")
    await asyncio.to_thread(raw_round_trips, client, "raw-a", small.tobytes(), 20)

    ours_rtt: list[float] = []
    raw_rtt: list[float] = []
    ours_tp: list[float] = []
    raw_tp: list[float] = []
    for _ in range(rounds):
        for _ in range(n_rtt // rounds):
            start = time.perf_counter()
            out = await c.infer("echo", small, device="dev-1")
            ours_rtt.append(time.perf_counter() - start)
            assert np.array_equal(out, small)
        raw_rtt += await asyncio.to_thread(raw_round_trips, client, "raw-a", small.tobytes(), n_rtt // rounds)

        start = time.perf_counter()
        await c.map("echo", [small] * (n_tp // rounds), concurrency=32)
        ours_tp.append((n_tp // rounds) / (time.perf_counter() - start))
        raw_tp.append(
            await asyncio.to_thread(raw_throughput, client, ["raw-a", "raw-b"], small.tobytes(), n_tp // rounds, 32)
        )

    big = np.random.default_rng(0).integers(0, 255, (1, 16 * 2**20), dtype=np.uint8)
    ours_tensor: list[float] = []
    raw_tensor: list[float] = []
    for _ in range(n_tensor):
        start = time.perf_counter()
        out = await c.infer("echo", big, device="dev-1", deadline=60)
        ours_tensor.append(2 * big.nbytes / (time.perf_counter() - start) / 1e6)
        assert np.array_equal(out, big)
        [seconds] = await asyncio.to_thread(raw_round_trips, client, "raw-a", big.tobytes(), 1)
        raw_tensor.append(2 * big.nbytes / seconds / 1e6)

    sweep: dict[str, list[float]] = {"bytes": [], "ours": [], "baseline": []}
    for size in SWEEP_QUICK if quick else SWEEP:
        payload = np.random.default_rng(size).integers(0, 255, (1, size), dtype=np.uint8)
        repeat = max(1, min(20, (4 << 20) // size))
        start = time.perf_counter()
        for _ in range(repeat):
            await c.infer("echo", payload, device="dev-1", deadline=60)
        sweep["ours"].append(2 * size * repeat / (time.perf_counter() - start) / 1e6)
        seconds = sum(await asyncio.to_thread(raw_round_trips, client, "raw-a", payload.tobytes(), repeat))
        sweep["baseline"].append(2 * size * repeat / seconds / 1e6)
        sweep["bytes"].append(size)

    ours_p50, raw_p50 = median(ours_rtt) * 1000, median(raw_rtt) * 1000
    rtt = entry(
        "rtt",
        ours_p50,
        raw_p50,
        "ms (p50)",
        "<= 1.5 (p50 ratio)",
        higher_is_better=False,
        ours_p99=round(percentile(ours_rtt, 0.99) * 1000, 3),
        baseline_p99=round(percentile(raw_rtt, 0.99) * 1000, 3),
        samples_ms={"ours": [round(t * 1000, 4) for t in ours_rtt], "baseline": [round(t * 1000, 4) for t in raw_rtt]},
    )
    tp = entry("throughput", median(ours_tp), median(raw_tp), "tasks/s", ">= 0.5", higher_is_better=True, in_flight=32)
    tensor = entry(
        "tensor",
        median(ours_tensor),
        median(raw_tensor),
        "MB/s",
        ">= 0.8",
        higher_is_better=True,
        tensor_mib=16,
        goodput_by_size={k: [round(v, 3) for v in vs] for k, vs in sweep.items()},
    )
    return [rtt, tp, tensor]


if __name__ == "__main__":
    bench_main(run, __doc__)
