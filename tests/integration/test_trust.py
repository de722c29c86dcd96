"""A fleet member with a valid certificate acting against the others, against Mosquitto with the rendered
production configuration (mutual TLS, the fleet ACL). Each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.coordinator import Coordinator
from edgespeed.errors import ConfigError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import Birth, CoordinatorState, DeviceCard, Heartbeat, ModelStatus, Result, Task
from edgespeed.protocol.tensor import Compression, encode_tensor
from edgespeed.security import KeyDirectory, Sealer
from edgespeed.testing import agent_config, coordinator_config
from edgespeed.transport import EmbeddedBroker, MqttTransport
from tests.conftest import SECURE_FLEET, Pki, mqtt_config, take
from tests.models import DigitsModel

pytestmark = pytest.mark.mosquitto
FLEET = SECURE_FLEET


class Rogue:
    """A fleet member with a valid certificate that behaves as an attacker would: it announces itself,
    claims whatever models it likes in its heartbeats, and answers the tasks it gets as it pleases."""

    def __init__(self, transport: MqttTransport, pki: Pki, name: str) -> None:
        self.transport = transport
        self.name = name
        keys = KeyDirectory(pki.ca.cert_file)
        keys.add_directory(pki.ca.directory)
        self.sealer = Sealer(name, pki.devices[name].seal_key(), keys, replay=None)
        self.tasks: list[Task] = []

    async def join(self, models: tuple[str, ...]) -> None:
        card = DeviceCard(self.name, "x86_64", "linux", "0", 2, 1 << 30, ("onnx",), ("cpu",))
        await self.transport.subscribe(topics.device_inbox(FLEET, self.name))
        birth = pack_message(Birth(card, 7), sender=self.name)
        await self.transport.publish(topics.birth(FLEET, self.name), birth, retain=True)
        self._beat = pack_message(Heartbeat(7, 0.0, 0, models=models), sender=self.name)
        await self.beat()

    async def beat(self) -> None:
        await self.transport.publish(topics.heartbeat(FLEET, self.name), self._beat, qos=0)

    async def say_ready(self, model: str, version: int) -> None:
        status = ModelStatus(model, version, "ready", backend="onnx")
        await self.transport.publish(
            topics.coordinator_inbox(FLEET, self.name), self.sealer.seal(status, recipient="coord")
        )

    async def answer(self, make: Callable[[Task], tuple[bytes, ...]]) -> None:
        """Answer every task that arrives with ``make(task)``."""
        async for message in self.transport.messages():
            _, body = self.sealer.open(message.payload)
            if isinstance(body, Task):
                self.tasks.append(body)
                result = Result(body.task_id, body.attempt, make(body))
                await self.transport.publish(
                    topics.coordinator_inbox(FLEET, self.name), self.sealer.seal(result, recipient="coord")
                )


@asynccontextmanager
async def rogue(broker: EmbeddedBroker, pki: Pki, name: str = "dev-c") -> AsyncIterator[Rogue]:
    async with MqttTransport(mqtt_config(broker.tls_url, name, tls=pki.tls(name))) as transport:
        yield Rogue(transport, pki, name)


async def keep_beating(member: Rogue) -> None:
    while True:
        await member.beat()
        await asyncio.sleep(0.1)


async def test_a_member_claiming_a_model_it_was_never_given_gets_no_inputs(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
    async with (
        Device(a),
        rogue(secure_broker, pki) as member,
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c,
    ):
        await c.wait_for_devices(1, devices=["dev-a"])
        report = await c.publish_model([digits.onnx], name="digits", targets="dev-a", timeout=60)
        assert report.ok, report
        await member.join(models=("digits",))  # not a target, no key wrapped for it: it claims the model anyway
        beating = asyncio.create_task(keep_beating(member))
        try:
            await c.wait_for_devices(2)
            outputs = await c.map("digits", [digits.x_test[i : i + 1] for i in range(40)], concurrency=8)
            np.testing.assert_allclose(np.concatenate(outputs), digits.reference[:40], atol=1e-4)
            assert c.devices_for("digits") == ["dev-a"]
            with pytest.raises(TimeoutError):
                await take(member.transport, 1, timeout=0.5)  # not one input reached the rogue
        finally:
            beating.cancel()


async def test_a_result_that_does_not_match_the_model_is_refused_and_its_sender_gets_no_more_work(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    """A target that reported ready answers with a decompression bomb (an 8 KB tensor that declares 256 MiB):
    it is refused from its header, the device is quarantined, and the task is answered by an honest device."""
    bomb = encode_tensor(np.zeros((4096, 16384), np.float32), compression=Compression.ZSTD)
    assert len(bomb) < 64 * 1024
    async with (
        rogue(secure_broker, pki) as member,
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c,
    ):
        await member.join(models=("digits",))
        beating = asyncio.create_task(keep_beating(member))
        answering = asyncio.create_task(member.answer(lambda task: (bomb,)))
        try:
            await c.wait_for_devices(1)
            report = await c.publish_model([digits.onnx], name="digits", wait=False)  # dev-c is a target
            await member.say_ready("digits", report.version)
            await c.wait_for_devices(1, model="digits")
            handle = await c.submit("digits", digits.x_test[:1], deadline=60)
            for _ in range(500):
                if member.tasks:
                    break
                await asyncio.sleep(0.02)
            assert member.tasks, "the rogue, the only device, got the task"
            # An honest device joins; the task, refused from the rogue, goes to it.
            a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
            async with Device(a):
                (out,) = await handle.result(timeout=60)
                np.testing.assert_allclose(out, digits.reference[:1], atol=1e-4)
                assert "dev-c" in c.registry.quarantined()
                assert c.stats["nonconforming"] == 1
                assert c.devices_for("digits") == ["dev-a"]
                taken = len(member.tasks)
                await c.map("digits", [digits.x_test[i : i + 1] for i in range(10)])
                assert len(member.tasks) == taken  # no more work for it
        finally:
            answering.cancel()
            beating.cancel()


async def test_a_manifest_that_does_not_validate_is_refused_and_a_damaged_store_entry_is_not_fatal(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    config = coordinator_config(secure_broker, pki, tmp_path / "coord")
    async with Coordinator(config) as c:
        with pytest.raises(ConfigError, match=r"pipeline|step"):
            await c.publish_model([digits.onnx], name="bad", pipeline=["cast"], wait=False)  # type: ignore[list-item]
        assert not (tmp_path / "coord" / "models" / "bad").exists()  # nothing of it was stored
        assert (await c.publish_model([digits.onnx], name="good", wait=False)).version == 1
    # A damaged entry (a bad manifest written by hand, or by an older version): skipped, never fatal.
    (tmp_path / "coord" / "models" / "good" / "1" / "manifest.msg").write_bytes(b"\x00garbage")
    async with Coordinator(config) as again:
        assert (await again.publish_model([digits.onnx], name="good", wait=False)).version == 2


async def test_only_the_coordinators_own_session_writes_its_presence(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    config = coordinator_config(secure_broker, pki, tmp_path / "coord")
    async with (
        MqttTransport(mqtt_config(secure_broker.tls_url, "audit", tls=pki.tls("audit"))) as watcher,
        Coordinator(config) as primary,
    ):
        await watcher.subscribe(topics.coordinator_state(FLEET))
        [online] = await take(watcher, 1)
        assert open_message(online.payload)[1] == CoordinatorState(True, primary.epoch)
        async with Coordinator(config, client_id="coord-cli-1"):  # a short-lived client beside it
            pass
        with pytest.raises(TimeoutError):
            await take(watcher, 1, timeout=1.0)  # it said nothing: the coordinator is still there


async def test_a_member_spraying_forged_chunks_during_a_rollout_cannot_break_it(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    """Chunks travel unsealed (they are ciphertext); a rogue writes forged ones, well-formed and at the right
    offsets, into the installing device's inbox as fast as it can. Before: the install failed (blob_hash)."""
    import hashlib
    import os

    from edgespeed.protocol.messages import Chunk, ModelManifest

    async with (
        rogue(secure_broker, pki) as member,
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c,
    ):
        await member.transport.subscribe(topics.model_filter(FLEET))
        spraying = True
        sprayed = 0

        async def spray() -> None:
            nonlocal sprayed
            async for message in member.transport.messages():
                _, manifest = open_message(message.payload)
                if isinstance(manifest, ModelManifest):
                    break
            shard = manifest.shards[0]
            while spraying:
                for offset in range(0, shard.size, shard.chunk_size):
                    data = os.urandom(min(shard.chunk_size, shard.size - offset))
                    forged = Chunk(shard.name, offset, data, hashlib.sha256(data).digest())
                    await member.transport.publish(
                        topics.device_inbox(FLEET, "dev-a"), pack_message(forged, sender="coord")
                    )
                    sprayed += 1
                await asyncio.sleep(0)

        a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
        async with Device(a):
            await c.wait_for_devices(1, devices=["dev-a"])
            attack = asyncio.create_task(spray())
            try:
                report = await c.publish_model([digits.onnx], name="digits", timeout=90)
            finally:
                spraying = False
                await asyncio.wait_for(attack, 30)
            assert report.ok, report
            assert sprayed > 0
            out = await c.infer("digits", digits.x_test[:4])
            np.testing.assert_allclose(out, digits.reference[:4], atol=1e-4)
