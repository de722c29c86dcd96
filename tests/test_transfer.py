"""Chunked blob transfer over transports: in memory, and a 200 MiB blob through a real Mosquitto."""

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from edgespeed.errors import BlobError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import BlobSource
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import BlobInfo, ChunkRequest
from edgespeed.protocol.transfer import BlobServer, fetch_blob
from edgespeed.transport import EmbeddedBroker, MemoryBroker, MemoryTransport, MqttTransport
from tests.conftest import mqtt_config


async def test_transfer_in_memory(tmp_path: Path) -> None:
    hub = MemoryBroker()
    data = os.urandom(300_000)
    async with MemoryTransport(hub, "coord") as ct, MemoryTransport(hub, "dev-1") as dt:
        server = BlobServer(ct, fleet="f", server_id="coord")
        info = server.add(BlobSource("blob", data, chunk_size=32_000))
        task = asyncio.create_task(server.run())
        await asyncio.sleep(0)
        path = await fetch_blob(dt, info, tmp_path / "blob", fleet="f", device_id="dev-1", window=4)
        assert path.read_bytes() == data
        assert server.served == 10
        task.cancel()


async def test_unknown_blob_is_a_clear_error(tmp_path: Path) -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "coord") as ct, MemoryTransport(hub, "dev-1") as dt:
        task = asyncio.create_task(BlobServer(ct, fleet="f", server_id="coord").run())
        await asyncio.sleep(0)
        info = BlobInfo("missing", 10, bytes(32), 5)
        with pytest.raises(BlobError, match="unknown_blob"):
            await fetch_blob(dt, info, tmp_path / "m", fleet="f", device_id="dev-1", timeout=5)
        task.cancel()


async def test_server_drops_requests_whose_sender_does_not_match_the_topic(tmp_path: Path) -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "coord") as ct, MemoryTransport(hub, "evil") as et:
        server = BlobServer(ct, fleet="f", server_id="coord")
        server.add(BlobSource("blob", b"secret"))
        task = asyncio.create_task(server.run())
        await asyncio.sleep(0)
        forged = pack_message(ChunkRequest("blob", 0, 6), sender="dev-1")
        await et.publish(topics.coordinator_inbox("f", "evil"), forged)
        await et.publish(topics.coordinator_inbox("f", "evil"), b"garbage")
        for _ in range(50):
            if server.rejected == 2:
                break
            await asyncio.sleep(0.01)
        assert server.rejected == 2 and server.served == 0
        task.cancel()


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_200_mib_blob_survives_a_broker_restart_and_a_receiver_restart(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    size = 200 * 1024 * 1024
    src = tmp_path / "model.bin"
    with open(src, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))
    source = BlobSource("model.bin", src)
    dest = tmp_path / "cache" / "model.bin"
    progress: list[int] = []
    async with MqttTransport(mqtt_config(broker.url, "coord")) as ct:
        server = BlobServer(ct, fleet="f", server_id="coord")
        info = server.add(source)
        serve = asyncio.create_task(server.run())

        # 1. The receiving process stops a third of the way in.
        async with MqttTransport(mqtt_config(broker.url, "dev-1")) as dt:
            fetch = asyncio.create_task(
                fetch_blob(
                    dt, info, dest, fleet="f", device_id="dev-1", on_progress=lambda done, total: progress.append(done)
                )
            )
            while not progress or progress[-1] < size // 3:
                await asyncio.sleep(0.01)
            fetch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fetch
        stopped_at = progress[-1]
        served_before = server.served

        # 2. A new receiver resumes from the partial file; the broker restarts half way.
        progress.clear()
        async with MqttTransport(mqtt_config(broker.url, "dev-1")) as dt:
            fetch = asyncio.create_task(
                fetch_blob(
                    dt,
                    info,
                    dest,
                    fleet="f",
                    device_id="dev-1",
                    request_timeout=2.0,
                    on_progress=lambda done, total: progress.append(done),
                )
            )
            while not progress or progress[-1] < size * 2 // 3:
                await asyncio.sleep(0.01)
            await broker.restart(down_for=0.5)
            path = await asyncio.wait_for(fetch, 120)
            assert dt.reconnects >= 1
        serve.cancel()

    assert progress[0] >= stopped_at - info.chunk_size  # resumed, did not start over
    chunks = -(-size // info.chunk_size)
    assert server.served - served_before < chunks  # only what was missing was fetched again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    assert h.digest() == info.sha256 == source.info.sha256
    source.close()
