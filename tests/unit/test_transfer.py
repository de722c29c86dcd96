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
from edgespeed.transfer import BlobServer, fetch_blob
from edgespeed.transport import MemoryBroker, MemoryTransport, Message


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


async def test_forged_chunks_are_dropped_and_the_genuine_ones_still_land(tmp_path: Path) -> None:
    """A fleet member spraying forged chunks (valid framing, right offsets, garbage data) into a receiver's
    inbox during a fetch: with the content key each chunk is checked as it arrives, the forgeries are
    dropped, and the blob still arrives whole."""
    from edgespeed.protocol.messages import Chunk
    from edgespeed.security import encrypt_blob
    from edgespeed.security.blobcrypt import TAG_SIZE
    from edgespeed.transfer import chunk_verifier, fetch_from

    hub = MemoryBroker()
    plain = os.urandom(200_000)
    ciphertext, key = encrypt_blob(plain, blob_id="model", chunk_size=16_000)
    stride = 16_000 + TAG_SIZE
    async with MemoryTransport(hub, "coord") as ct, MemoryTransport(hub, "dev-1") as dt:
        server = BlobServer(ct, fleet="f", server_id="coord")
        info = server.add(BlobSource("model", ciphertext, chunk_size=stride))
        serving = asyncio.create_task(server.run())
        await dt.subscribe(topics.device_inbox("f", "dev-1"))
        incoming: asyncio.Queue[Chunk | None] = asyncio.Queue(64)
        forged = 0

        async def pump() -> None:
            nonlocal forged
            from edgespeed.protocol.envelope import open_message

            async for message in dt.messages():
                _, body = open_message(message.payload)
                if isinstance(body, Chunk):
                    # Before each genuine chunk, a forgery of the same place arrives first.
                    garbage = os.urandom(len(body.data))
                    fake = Chunk(body.blob_id, body.offset, garbage, hashlib.sha256(garbage).digest())
                    forged += 1
                    await incoming.put(fake)
                    await incoming.put(body)

        pumping = asyncio.create_task(pump())
        dest = tmp_path / "model"
        path = await fetch_from(
            dt,
            info,
            dest,
            incoming,
            fleet="f",
            device_id="dev-1",
            window=4,
            verify=chunk_verifier(info, key),  # type: ignore[arg-type]
        )
        assert path.read_bytes() == ciphertext and forged >= len(ciphertext) // stride
        # Without the check, the first forgery is taken and the whole blob fails its hash.
        dest.unlink()
        with pytest.raises(BlobError):
            await fetch_from(dt, info, dest, incoming, fleet="f", device_id="dev-1", window=4, timeout=10)  # type: ignore[arg-type]
        for task in (pumping, serving):
            task.cancel()


async def test_a_peer_flooding_chunk_requests_is_held_to_its_allowance(tmp_path: Path) -> None:
    hub = MemoryBroker()
    data = os.urandom(64_000)
    async with MemoryTransport(hub, "coord") as ct, MemoryTransport(hub, "dev-1"):
        server = BlobServer(ct, fleet="f", server_id="coord", per_peer=(5.0, 10.0))
        server.add(BlobSource("blob", data, chunk_size=1_000))
        request = ChunkRequest("blob", 0, 1_000)
        for _ in range(200):  # far faster than 5 a second
            message = pack_message(request, sender="dev-1")
            await server.handle(Message(topics.coordinator_inbox("f", "dev-1"), message))
        await asyncio.sleep(0.1)
        assert server.served <= 12 and server.rejected >= 188  # the burst of 10, and a token or two more
        # Another device is not held back by the flood.
        async with MemoryTransport(hub, "dev-2") as dt:
            serving = asyncio.create_task(server.run())
            await asyncio.sleep(0)
            small = server.add(BlobSource("small", data[:5_000], chunk_size=1_000))
            path = await fetch_blob(dt, small, tmp_path / "small", fleet="f", device_id="dev-2", timeout=30)
            assert path.read_bytes() == data[:5_000]
            serving.cancel()
