"""Move a file of any size through MQTT in verified, resumable chunks.

Run: python examples/blob_transfer.py PATH
Interrupt it and run it again: it resumes from the partial file.
"""

import asyncio
import sys
import tempfile
from pathlib import Path

from edgespeed.protocol import BlobSource
from edgespeed.transfer import BlobServer, fetch_blob
from edgespeed.transport import EmbeddedBroker, MqttConfig, MqttTransport


async def main(path: Path) -> None:
    async with (
        EmbeddedBroker() as broker,
        MqttTransport(MqttConfig(broker.url, "coord")) as coord,
        MqttTransport(MqttConfig(broker.url, "dev-1")) as device,
    ):
        server = BlobServer(coord, fleet="example", server_id="coord")
        info = server.add(BlobSource("payload.bin", path))
        serving = asyncio.create_task(server.run())
        dest = Path(tempfile.gettempdir()) / "edgespeed-example" / info.name
        done = await fetch_blob(
            device,
            info,
            dest,
            fleet="example",
            device_id="dev-1",
            on_progress=lambda got, total: print(f"\r{got}/{total} bytes", end=""),
        )
        print(f"\nverified copy at {done}")
        serving.cancel()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else sys.executable)))
