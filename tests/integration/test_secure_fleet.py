"""Security promises checked end to end, against Mosquitto running the rendered production config."""

import asyncio
import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from edgespeed.errors import ConnectError, PublishRefusedError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import DEFAULT_CHUNK_SIZE, BlobSource
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import ModelManifest, Result, Task
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.security import (
    KeyDirectory,
    ReplayGuard,
    Sealer,
    create_ca,
    decrypt_blob,
    encrypt_blob,
    issue_certificate,
    revoke_certificate,
    sign_manifest,
    verify_manifest,
)
from edgespeed.security.blobcrypt import TAG_SIZE
from edgespeed.transfer import BlobServer, fetch_blob
from edgespeed.transport import EmbeddedBroker, Message, MqttTransport, TlsConfig
from edgespeed.transport.broker import production_settings
from tests.conftest import SECURE_FLEET, Pki, _need_mosquitto, mqtt_config

pytestmark = pytest.mark.mosquitto
FLEET = SECURE_FLEET
INPUT_MARKER = b"PLAINTEXT-INPUT-MARKER"
OUTPUT_MARKER = b"PLAINTEXT-OUTPUT-MARKER"
WEIGHT_MARKER = b"PLAINTEXT-WEIGHT-MARKER"


def connect(broker: EmbeddedBroker, pki: Pki, name: str, **kw: object) -> MqttTransport:
    return MqttTransport(mqtt_config(broker.tls_url, name, tls=pki.tls(name), **kw))


async def collect(t: MqttTransport, seconds: float) -> list[Message]:
    got: list[Message] = []

    async def run() -> None:
        async for m in t.messages():
            got.append(m)

    try:
        await asyncio.wait_for(run(), seconds)
    except TimeoutError:
        pass
    return got


async def test_only_fleet_certificates_connect(secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path) -> None:
    old = issue_certificate(
        pki.ca, "dev-old", out_dir=tmp_path, days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    )
    refused = [
        TlsConfig(pki.ca.cert_file),  # no certificate
        TlsConfig(pki.ca.cert_file, pki.foreign_device.cert_file, pki.foreign_device.key_file),  # foreign CA
        TlsConfig(pki.ca.cert_file, old.cert_file, old.key_file),  # expired
    ]
    for tls in refused:
        with pytest.raises(ConnectError):
            async with MqttTransport(mqtt_config(secure_broker.tls_url, "dev-a", tls=tls)):
                pass
    with pytest.raises(ConnectError):  # no plain listener at all
        async with MqttTransport(
            mqtt_config(secure_broker.tls_url.replace("mqtts", "mqtt"), "dev-a", connect_timeout=1.0)
        ):
            pass
    async with connect(secure_broker, pki, "dev-a") as ok:
        assert ok.connected


async def test_revoked_certificate_is_refused(tmp_path: Path) -> None:
    _need_mosquitto()
    ca = create_ca(tmp_path / "pki", fleet=FLEET)
    issue_certificate(ca, "broker", role="broker")
    good, bad = issue_certificate(ca, "dev-good"), issue_certificate(ca, "dev-bad")
    revoke_certificate(ca, bad.cert_file)
    settings = production_settings(
        ca.directory, fleet=FLEET, coordinators=["coord"], out_dir=tmp_path / "b", host="127.0.0.1", tls_port=0
    )
    async with EmbeddedBroker(settings) as broker:
        tls = {i.name: TlsConfig(ca.cert_file, i.cert_file, i.key_file) for i in (good, bad)}
        async with MqttTransport(mqtt_config(broker.tls_url, "dev-good", tls=tls["dev-good"])):
            pass
        with pytest.raises(ConnectError):
            async with MqttTransport(mqtt_config(broker.tls_url, "dev-bad", tls=tls["dev-bad"])):
                pass


async def test_a_device_can_neither_read_nor_pose_as_another(secure_broker: EmbeddedBroker, pki: Pki) -> None:
    async with (
        connect(secure_broker, pki, "coord") as coord,
        connect(secure_broker, pki, "dev-a") as a,
        connect(secure_broker, pki, "dev-b") as b,
    ):
        await coord.subscribe(f"es/1/{FLEET}/#")
        await a.subscribe(topics.device_inbox(FLEET, "dev-a"), topics.device_inbox(FLEET, "dev-b"), f"es/1/{FLEET}/#")
        await b.subscribe(topics.device_inbox(FLEET, "dev-b"))
        await coord.publish(topics.device_inbox(FLEET, "dev-b"), b"for b only")
        await coord.publish(topics.device_inbox(FLEET, "dev-a"), b"for a")
        # dev-a writes as dev-b: birth, heartbeat and coordinator inbox of dev-b.
        for topic in (
            topics.heartbeat(FLEET, "dev-b"),
            topics.coordinator_inbox(FLEET, "dev-b"),
            topics.birth(FLEET, "dev-b"),
        ):
            try:
                await a.publish(topic, b"posing as b")
            except PublishRefusedError:
                pass  # MQTT 5 says so; 3.1.1 brokers drop it silently
        await a.publish(topics.heartbeat(FLEET, "dev-a"), b"a is alive")
        got_a, got_b, got_coord = await asyncio.gather(collect(a, 1.5), collect(b, 1.5), collect(coord, 1.5))
    assert {m.payload for m in got_a} == {b"for a"}  # overlapping filters may deliver it twice
    assert [m.payload for m in got_b] == [b"for b only"]
    coord_saw = {(m.topic, m.payload) for m in got_coord}
    assert (topics.heartbeat(FLEET, "dev-a"), b"a is alive") in coord_saw
    assert not any(p == b"posing as b" for _, p in coord_saw)


async def test_eavesdropper_with_full_rights_sees_no_plaintext(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    directory = KeyDirectory(pki.ca.cert_file)
    directory.add_directory(pki.ca.directory)
    coord_seal = Sealer("coord", pki.devices["coord"].seal_key(), directory, replay=ReplayGuard())
    dev_seal = Sealer("dev-a", pki.devices["dev-a"].seal_key(), directory, replay=ReplayGuard())

    async with connect(secure_broker, pki, "audit") as audit:
        await audit.subscribe("#")
        seen: list[Message] = []

        async def spy() -> None:
            async for m in audit.messages():
                seen.append(m)

        spying = asyncio.create_task(spy())
        async with connect(secure_broker, pki, "coord") as coord, connect(secure_broker, pki, "dev-a") as dev:
            # 1. Model rollout: encrypted once, key wrapped for dev-a, manifest signed and broadcast.
            weights = WEIGHT_MARKER * 50_000
            ciphertext, content_key = encrypt_blob(weights, blob_id="w.bin", chunk_size=DEFAULT_CHUNK_SIZE)
            source = BlobSource("w.bin", ciphertext, chunk_size=DEFAULT_CHUNK_SIZE + TAG_SIZE)
            manifest = sign_manifest(
                ModelManifest(
                    "marker-model",
                    1,
                    "raw",
                    (source.info,),
                    keys=coord_seal.wrap_key(content_key, ["dev-a"], context="marker-model/1"),
                ),
                signer="coord",
                key=pki.devices["coord"].sign_key(),
            )
            server = BlobServer(coord, fleet=FLEET, server_id="coord")
            server.add(source)
            await dev.subscribe(topics.model_filter(FLEET))
            await coord.publish(
                topics.model_manifest(FLEET, manifest.model_id), pack_message(manifest, sender="coord"), retain=True
            )
            async for message in dev.messages():
                _, received = open_message(message.payload)
                break
            assert isinstance(received, ModelManifest)
            verify_manifest(received, directory, installed_version=0)
            serving = asyncio.create_task(server.run())
            path = await fetch_blob(
                dev, received.shards[0], tmp_path / "cache" / "w.bin", fleet=FLEET, device_id="dev-a"
            )
            serving.cancel()
            assert WEIGHT_MARKER not in path.read_bytes()  # encrypted at rest as it arrived
            key = dev_seal.unwrap_key("coord", received.keys["dev-a"], context="marker-model/1")
            assert decrypt_blob(path, key, blob_id="w.bin", chunk_size=DEFAULT_CHUNK_SIZE) == weights

            # 2. A task and its result, sealed end to end.
            await coord.subscribe(topics.coordinator_inbox(FLEET, "dev-a"))
            x = np.frombuffer(INPUT_MARKER * 8, dtype=np.uint8)
            task = Task("t-1", 0, "marker-model", 0, (encode_tensor(x),))
            await coord.publish(topics.device_inbox(FLEET, "dev-a"), coord_seal.seal(task, recipient="dev-a"))
            async for message in dev.messages():
                envelope, got = dev_seal.open(message.payload)
                break
            assert isinstance(got, Task)
            assert decode_tensor(got.inputs[0]).tobytes() == INPUT_MARKER * 8
            y = np.frombuffer(OUTPUT_MARKER * 8, dtype=np.uint8)
            result = Result("t-1", 0, (encode_tensor(y),))
            await dev.publish(
                topics.coordinator_inbox(FLEET, "dev-a"),
                dev_seal.seal(result, recipient="coord", correlation_id=envelope.message_id),
            )
            async for message in coord.messages():
                if message.topic == topics.coordinator_inbox(FLEET, "dev-a"):
                    _, answer = coord_seal.open(message.payload, topic_sender="dev-a")
                    break
            assert answer == result
        await asyncio.sleep(0.5)  # let the last messages reach the auditor
        spying.cancel()
    topics_seen = {m.topic for m in seen}
    assert topics.device_inbox(FLEET, "dev-a") in topics_seen  # chunks and the task
    assert topics.coordinator_inbox(FLEET, "dev-a") in topics_seen  # chunk requests and the result
    assert topics.model_manifest(FLEET, "marker-model") in topics_seen
    assert sum(len(m.payload) for m in seen) > len(weights)  # the whole rollout went past the auditor
    for message in seen:
        for marker in (INPUT_MARKER, OUTPUT_MARKER, WEIGHT_MARKER):
            assert marker not in message.payload, f"{marker!r} in clear on {message.topic}"
