"""Chunked blob transfer over transports: in memory, and a 200 MiB blob through a real Mosquitto."""

import asyncio
import os
from pathlib import Path

import pytest

from edgespeed.errors import BlobError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import BlobSource
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import BlobInfo, ChunkRequest
from edgespeed.transfer import BlobServer, fetch_blob
from edgespeed.transport import MemoryBroker, MemoryTransport


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
