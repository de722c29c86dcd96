"""Benchmark `seal`: goodput of 1 MiB payloads sealed and opened, against the same payloads unsealed.

Both sides stream Result messages carrying 1 MiB through a local Mosquitto
(plain TCP, so TLS costs hide nothing) to a receiver in its own process (as a
device is), with QoS 1 and up to 16 publishes in flight; a round ends when the
receiver has opened every message. Ours seals each message for the receiver
and the receiver opens it (AES-256-GCM, replay window on disk); the baseline
packs and opens it in clear. Rounds alternate between the two, so
machine noise hits both alike; medians are reported. The ratio is
ours / baseline goodput, higher is better; the goal is >= 0.9.

A second entry, ``seal-codec``, times the same work without the broker, for
context: it bounds what sealing costs per byte on this CPU.

Run: python -m edgespeed.bench.seal [--rounds N] [--messages N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from edgespeed._compat import timeout
from edgespeed.bench._fleet import emit, entry
from edgespeed.protocol.envelope import decode_header, open_message, pack_message
from edgespeed.protocol.messages import Result
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, load_identity
from edgespeed.testing import make_pki, start_broker, start_process
from edgespeed.transport import MqttConfig, MqttTransport

SIZE = 1024 * 1024
TOPIC = "bench/seal/in"
DONE = "bench/seal/done"


async def receiver(url: str, pki: Path, count: int) -> None:
    """The receiving end, in its own process as on a device: open every message, say when ``count`` arrived."""
    keys = KeyDirectory(pki / "ca.crt")
    keys.add_directory(pki)
    with tempfile.TemporaryDirectory() as tmp:
        identity = load_identity(pki, "dev-1", ca_file=pki / "ca.crt")
        opener = Sealer("dev-1", identity.seal_key(), keys, replay=ReplayGuard(Path(tmp) / "replay.db"))
        config = MqttConfig(url, "bench-rx", max_packet_size=4 * SIZE, queue_size=64)
        async with MqttTransport(config) as rx:
            await rx.subscribe(TOPIC)
            print("ready", flush=True)
            got = 0
            async for message in rx.messages():
                header, _ = decode_header(message.payload)
                opener.open(message.payload) if header.sealed else open_message(message.payload)
                got += 1
                if got == count:
                    got = 0
                    await rx.publish(DONE, b"1")


async def stream(sender: MqttTransport, done: AsyncIterator[Any], count: int, make: Callable[[], Any]) -> float:
    """Seconds to move ``count`` payloads to the receiver process, until it has opened them all."""
    slots = asyncio.Semaphore(16)

    async def one() -> None:
        async with slots:
            await sender.publish(TOPIC, make())

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    async with timeout(120):
        await anext(done)
    return time.perf_counter() - start


async def run(rounds: int, messages: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp) / "pki", "bench", devices=["dev-1"], coordinators=["coord"])
        ids = {n: pki.identity(n) for n in ("coord", "dev-1")}
        keys = KeyDirectory(pki.ca.cert_file)
        keys.add_directory(pki.directory)
        sealer = Sealer("coord", ids["coord"].seal_key(), keys, replay=None)
        opener = Sealer("dev-1", ids["dev-1"].seal_key(), keys, replay=ReplayGuard(Path(tmp) / "replay.db"))
        message = Result("t-1", 0, (os.urandom(SIZE),))

        def sealed() -> bytearray:
            return sealer.seal(message, recipient="dev-1")

        def plain() -> bytes:
            return pack_message(message, sender="coord", recipient="dev-1")

        sides: dict[str, tuple[Callable[[], Any], Callable[[bytes], Any]]] = {
            "ours": (sealed, opener.open),
            "baseline": (plain, open_message),
        }
        async with start_broker(None, Path(tmp), production=False, persistence=False) as broker:
            receiver = [sys.executable, "-m", "edgespeed.bench.seal", "--receive", broker.url, str(pki.directory)]
            async with start_process("receiver", [*receiver, str(messages)], Path(tmp) / "receiver.log") as proc:
                await proc.wait_for_output("ready", timeout=60)
                config = MqttConfig(broker.url, "bench-tx", max_packet_size=4 * SIZE, queue_size=64)
                async with MqttTransport(config) as tx:
                    await tx.subscribe(DONE)
                    done = aiter(tx.messages())
                    net: dict[str, list[float]] = {"ours": [], "baseline": []}
                    for _ in range(rounds):
                        for name, (make, _) in sides.items():
                            seconds = await stream(tx, done, messages, make)
                            net[name].append(messages * SIZE / seconds / 1e6)
        cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
        for _ in range(rounds):
            for name, (make, take) in sides.items():
                start = time.perf_counter()
                for _ in range(messages):
                    take(make())
                cpu[name].append(messages * SIZE / (time.perf_counter() - start) / 1e6)
    med = {k: statistics.median(v) for k, v in net.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return [
        entry("seal", med["ours"], med["baseline"], "MB/s", ">= 0.9", higher_is_better=True),
        {
            **entry("seal-codec", cmed["ours"], cmed["baseline"], "MB/s", ">= 0", higher_is_better=True),
            "goal": "context only",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--receive", nargs=3, metavar=("URL", "PKI", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        url, pki, count = args.receive
        asyncio.run(receiver(url, Path(pki), int(count)))
        return
    emit(asyncio.run(run(args.rounds, args.messages)), args.json)


if __name__ == "__main__":
    main()
