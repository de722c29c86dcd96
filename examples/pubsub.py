"""Publish and receive EdgeSpeed envelopes through the zero-setup broker.

Run: python examples/pubsub.py
"""

import asyncio

import numpy as np

from edgespeed.protocol import Result, decode_tensor, encode_tensor, open_message, pack_message, topics
from edgespeed.transport import EmbeddedBroker, MqttConfig, MqttTransport


async def main() -> None:
    async with EmbeddedBroker() as broker:
        print(f"broker: {broker.backend} at {broker.url}")
        async with (
            MqttTransport(MqttConfig(broker.url, "coord")) as coord,
            MqttTransport(MqttConfig(broker.url, "dev-1")) as device,
        ):
            inbox = topics.coordinator_inbox("example", "dev-1")
            await coord.subscribe(inbox)
            result = Result("task-1", 0, (encode_tensor(np.eye(3, dtype=np.float32)),))
            await device.publish(inbox, pack_message(result, sender="dev-1", recipient="coord"))
            async for message in coord.messages():
                envelope, body = open_message(message.payload)
                assert isinstance(body, Result)
                print(f"{envelope.sender} -> {envelope.recipient}: {body.task_id}")
                print(decode_tensor(body.outputs[0]))
                break


if __name__ == "__main__":
    asyncio.run(main())
