"""Benchmark `agent-rss`: resident memory of an idle device agent (absolute; the goal is <= 60 MB).

Starts a broker, a fleet PKI and the agent daemon (`edgespeed-agent`, what the systemd unit runs) in its own process,
configured with the ONNX backend (onnxruntime installed) and no model loaded,
waits until it has joined and settled, and reads its VmRSS.

Run: python -m edgespeed.bench.agent_rss [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from edgespeed._compat import timeout
from edgespeed.bench._fleet import emit, entry
from edgespeed.protocol import topics
from edgespeed.testing import agent_config, agent_process, make_pki, start_broker
from edgespeed.transport import MqttConfig, MqttTransport


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pki = make_pki(base / "pki", "bench", devices=["dev-1"], coordinators=["coord"])
        async with start_broker(None, base, production=False, persistence=False) as broker:
            config = agent_config(broker, pki, "dev-1", base / "state", test_timings=False, backends=("onnx",))
            async with MqttTransport(MqttConfig(broker.url, "watcher")) as watcher:
                await watcher.subscribe(topics.birth("bench", "dev-1"))
                async with agent_process(config, log_file=base / "agent.log") as proc:
                    async with timeout(60):
                        async for _ in watcher.messages():
                            break
                    await asyncio.sleep(3)  # settle: heartbeats running, nothing loaded
                    samples = []
                    for _ in range(5):
                        samples.append(rss_mb(proc.pid))
                        await asyncio.sleep(0.2)
    return entry("agent-rss", max(samples), None, "MB", "<= 60", higher_is_better=False, absolute=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit([asyncio.run(run())], args.json)


if __name__ == "__main__":
    main()
