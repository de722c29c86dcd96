"""Benchmark `agent-rss`: resident memory of an idle device agent (absolute; the goal is <= 60 MB).

Starts a broker, a fleet PKI and the agent daemon (`edgespeed-agent`, what the systemd unit runs) in its own process,
configured with the ONNX backend (onnxruntime installed) and no model loaded,
waits until it has joined and settled, and reads its VmRSS.

Run: python -m edgespeed.bench.agent_rss [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgespeed._compat import timeout
from edgespeed.bench._fleet import emit, entry
from edgespeed.protocol import topics
from edgespeed.security import create_ca, issue_certificate
from edgespeed.transport import EmbeddedBroker, MqttConfig, MqttTransport


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ca = create_ca(base / "pki", fleet="bench")
        for name, role in (("dev-1", "device"), ("coord", "coordinator")):
            issue_certificate(ca, name, role=role)  # type: ignore[arg-type]
        async with EmbeddedBroker() as broker:
            config = base / "agent.toml"
            config.write_text(
                f'device_id = "dev-1"\nfleet = "bench"\nbroker = "{broker.url}"\ncoordinator = "coord"\n'
                f'pki_dir = "pki"\nstate_dir = "state"\nbackends = ["onnx"]\n'
            )
            async with MqttTransport(MqttConfig(broker.url, "watcher")) as watcher:
                await watcher.subscribe(topics.birth("bench", "dev-1"))
                proc = subprocess.Popen(  # noqa: ASYNC220 - started once; only its memory is read
                    [sys.executable, "-m", "edgespeed.agent", "--config", str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                try:
                    async with timeout(60):
                        async for _ in watcher.messages():
                            break
                    await asyncio.sleep(3)  # settle: heartbeats running, nothing loaded
                    samples = []
                    for _ in range(5):
                        samples.append(rss_mb(proc.pid))
                        await asyncio.sleep(0.2)
                finally:
                    proc.terminate()
                    proc.wait(timeout=20)
    return entry("agent-rss", max(samples), None, "MB", "<= 60", higher_is_better=False, absolute=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit([asyncio.run(run())], args.json)


if __name__ == "__main__":
    main()
