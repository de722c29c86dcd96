"""Chunked blob transfer over transports: in memory, and a 200 MiB blob through a real Mosquitto."""

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from edgespeed.protocol.blob import BlobSource
from edgespeed.transfer import BlobServer, fetch_blob
from edgespeed.transport import EmbeddedBroker, MqttTransport
from tests.conftest import mqtt_config


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
