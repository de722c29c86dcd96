"""Benchmark `rollout`: a 64 MiB model delivered to 2 devices, against raw paho pushing the same bytes.

Ours: `Coordinator.publish_model` encrypts a real 64 MiB ONNX model once,
signs the manifest, and serves it in 512 KiB chunks; two device agents
(processes) fetch it receiver-driven, verify every chunk and the whole,
cache it encrypted, decrypt it and load it in ONNX Runtime; timed from the
publish call to both devices reporting ready. Baseline: raw paho-mqtt
publishing the same bytes as 512 KiB QoS 1 messages to two raw subscriber
processes, timed until both have them all. Goodput counts the bytes each
device receives (2 x 64 MiB); ratio ours / raw, goal >= 0.7.

Then a cut: the broker is restarted in the middle of a rollout to two fresh
devices, and the transfer must resume and finish (``resumed``).

Run: python -m edgespeed.bench.rollout [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgespeed.bench._fleet import Fleet, bench_main, big_onnx, entry, fleet, median, raw_paho, raw_peer

CHUNK = 512 * 1024


def raw_push(client: Any, data: bytes, sinks: list[str]) -> float:
    done = threading.Semaphore(0)
    client.on_message = lambda *a: done.release()
    for sink in sinks:
        client.subscribe(f"raw/{sink}/done", qos=1)
    time.sleep(0.2)
    start = time.perf_counter()
    for offset in range(0, len(data), CHUNK):
        info = client.publish("raw/sink", data[offset : offset + CHUNK], qos=1)
        while len(client._out_messages) > 32:  # keep a window, as our receivers do
            time.sleep(0.0005)
        del info
    for _ in sinks:
        if not done.acquire(timeout=120):
            raise TimeoutError("raw sinks did not receive everything")
    seconds = time.perf_counter() - start
    for sink in sinks:
        client.unsubscribe(f"raw/{sink}/done")
    return seconds


async def ours(f: Fleet, model: Path, version: int, devices: list[str]) -> float:
    for name in devices:
        shutil.rmtree(f.base / name, ignore_errors=True)  # nothing cached: the whole model travels
    async with f.agents(devices), f.coordinator() as c:
        await c.wait_for_devices(len(devices), devices=devices)
        start = time.perf_counter()
        report = await c.publish_model([model], name="big", version=version, targets=",".join(devices), timeout=300)
        seconds = time.perf_counter() - start
        if not report.ok:
            raise RuntimeError(f"rollout failed: {report}")
        return seconds


async def cut(f: Fleet, model: Path, version: int) -> bool:
    """Restart the broker mid-rollout; True if both devices still end ready."""
    devices = ["dev-3", "dev-4"]
    async with f.agents(devices), f.coordinator() as c:
        await c.wait_for_devices(len(devices), devices=devices)
        publish = asyncio.create_task(
            c.publish_model([model], name="big", version=version, targets=",".join(devices), timeout=300)
        )
        while c.chunks_served < 40:  # noqa: ASYNC110 - a third of one device's chunks
            await asyncio.sleep(0.01)
        await f.broker.restart(down_for=0.5)
        report = await publish
        return report.ok


async def run(quick: bool) -> list[dict[str, Any]]:
    rounds = 1 if quick else 3
    async with fleet(devices=4) as f:
        model = big_onnx(f.base / "big.onnx", 64)
        data = model.read_bytes()
        for name in ("raw-a", "raw-b"):
            await raw_peer(f, "sink", name, str(len(data)))
        client = await asyncio.to_thread(raw_paho, f, "raw-c")
        mine, raw = [], []
        try:
            for i in range(rounds):
                seconds = await ours(f, model, i + 1, ["dev-1", "dev-2"])
                mine.append(2 * len(data) / seconds / 1e6)
                seconds = await asyncio.to_thread(raw_push, client, data, ["raw-a", "raw-b"])
                raw.append(2 * len(data) / seconds / 1e6)
            resumed = await cut(f, model, rounds + 1)
        finally:
            client.loop_stop()
            await f.stop(["raw-a", "raw-b"])
    result = entry(
        "rollout",
        median(mine),
        median(raw),
        "MB/s",
        ">= 0.7, and resumes after a cut",
        higher_is_better=True,
        resumed=resumed,
        model_mib=round(len(data) / 2**20, 1),
    )
    result["meets"] = result["meets"] and resumed
    return [result]


if __name__ == "__main__":
    bench_main(run, __doc__)
