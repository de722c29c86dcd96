"""Integration tests of MqttTransport against a real Mosquitto (and amqtt)."""

import asyncio
import time

import pytest

from edgespeed.errors import ConnectError, NotConnectedError, PayloadTooLargeError
from edgespeed.security import issue_certificate
from edgespeed.transport import BrokerSettings, EmbeddedBroker, MqttTransport, TlsConfig, Will
from tests.conftest import Pki, mqtt_config, take

pytestmark = pytest.mark.mosquitto


async def test_round_trip_over_mqtt5_and_311(broker: EmbeddedBroker, prefix: str, client_id: str) -> None:
    for protocol in ("auto", "3.1.1"):
        cfg_pub = mqtt_config(broker.url, client_id + "p", protocol=protocol)
        cfg_sub = mqtt_config(broker.url, client_id + "s", protocol=protocol)
        async with MqttTransport(cfg_pub) as pub, MqttTransport(cfg_sub) as sub:
            assert pub.protocol == ("5" if protocol == "auto" else "3.1.1")
            await sub.subscribe(f"{prefix}/{protocol}/#")
            for i in range(20):
                await pub.publish(f"{prefix}/{protocol}/x", b"m%d" % i)
            got = await take(sub, 20)
            assert [m.payload for m in got] == [b"m%d" % i for i in range(20)]


async def test_mutual_tls(broker: EmbeddedBroker, pki: Pki, prefix: str) -> None:
    async with MqttTransport(mqtt_config(broker.tls_url, "dev-a", tls=pki.tls("dev-a"))) as t:
        await t.subscribe(f"{prefix}/t")
        await t.publish(f"{prefix}/t", b"secure")
        (m,) = await take(t, 1)
        assert m.payload == b"secure"


async def test_tls_refusals(broker: EmbeddedBroker, pki: Pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    no_cert = TlsConfig(pki.ca.cert_file)
    foreign = TlsConfig(pki.ca.cert_file, pki.foreign_device.cert_file, pki.foreign_device.key_file)
    wrong_ca = TlsConfig(pki.foreign_ca.cert_file, pki.devices["dev-a"].cert_file, pki.devices["dev-a"].key_file)
    import datetime as dt

    old = issue_certificate(
        pki.ca, "dev-old", out_dir=tmp_path, days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    )
    expired = TlsConfig(pki.ca.cert_file, old.cert_file, old.key_file)
    for tls in (no_cert, foreign, wrong_ca, expired):
        with pytest.raises(ConnectError):
            async with MqttTransport(mqtt_config(broker.tls_url, "dev-a", tls=tls)):
                pass


async def test_ack_only_after_handover(broker: EmbeddedBroker, prefix: str, client_id: str) -> None:
    """A message queued but never handed over is redelivered to the next session."""
    cfg = mqtt_config(broker.url, client_id, clean_start=False)
    first = MqttTransport(cfg)
    await first.__aenter__()
    await first.subscribe(f"{prefix}/q", qos=1)
    async with MqttTransport(mqtt_config(broker.url, client_id + "p")) as pub:
        await pub.publish(f"{prefix}/q", b"precious")
        for _ in range(100):
            if first._queue:  # received, not yet handed over
                break
            await asyncio.sleep(0.02)
        assert first._queue
        await first.abort()
        async with MqttTransport(cfg) as second:
            (m,) = await take(second, 1)
            assert m.payload == b"precious"


async def test_full_queue_pauses_reading_and_loses_nothing(broker: EmbeddedBroker, prefix: str, client_id: str) -> None:
    async with (
        MqttTransport(mqtt_config(broker.url, client_id, queue_size=5)) as sub,
        MqttTransport(mqtt_config(broker.url, client_id + "p")) as pub,
    ):
        await sub.subscribe(f"{prefix}/bp")
        await asyncio.gather(*(pub.publish(f"{prefix}/bp", b"%d" % i, qos=i % 2) for i in range(200)))
        await asyncio.sleep(0.3)
        assert len(sub._queue) <= 5 + sub.config.max_inflight
        got = await take(sub, 200)
        assert sorted(int(m.payload) for m in got) == list(range(200))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_full_queue_still_lets_our_own_publish_be_acknowledged(
    broker: EmbeddedBroker, prefix: str, client_id: str, protocol: str
) -> None:
    """A program that publishes while it handles a message (a coordinator welcoming a burst of devices) with
    its incoming queue full: the PUBACK sits behind unread messages. Before: reads were paused, the PUBACK
    was never read, and the publish waited out its timeout."""
    async with (
        MqttTransport(mqtt_config(broker.url, client_id, queue_size=8, protocol=protocol)) as busy,
        MqttTransport(mqtt_config(broker.url, client_id + "p")) as pub,
    ):
        await busy.subscribe(f"{prefix}/burst")
        await asyncio.gather(*(pub.publish(f"{prefix}/burst", b"%d" % i) for i in range(100)))
        for _ in range(200):  # the queue fills; nothing is handed over yet
            if len(busy._queue) >= 8:
                break
            await asyncio.sleep(0.02)
        await busy.publish(f"{prefix}/elsewhere", b"welcome")  # the test config allows 10 s
        assert len(busy._queue) <= 8 + 64  # still bounded (see MqttTransport._hold_reads)
        got = await take(busy, 100)
        assert sorted(int(m.payload) for m in got) == list(range(100))


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_reconnects_and_resubscribes_after_broker_restart(
    broker: EmbeddedBroker, prefix: str, client_id: str, how: str
) -> None:
    async with (
        MqttTransport(mqtt_config(broker.url, client_id)) as sub,
        MqttTransport(mqtt_config(broker.url, client_id + "p")) as pub,
    ):
        await sub.subscribe(f"{prefix}/r")
        if how == "restart":
            await broker.restart(down_for=0.3)
        else:
            await broker.kill()  # SIGKILL: nothing saved, sockets reset
            assert not broker.running
            await broker.start()
        for _ in range(200):
            if sub.connected and pub.connected:
                break
            await asyncio.sleep(0.05)
        assert sub.reconnects >= 1 and pub.reconnects >= 1
        await pub.publish(f"{prefix}/r", b"after")
        (m,) = await take(sub, 1)
        assert m.payload == b"after"


async def test_publish_while_broker_down_times_out_clearly(broker: EmbeddedBroker, client_id: str) -> None:
    async with MqttTransport(mqtt_config(broker.url, client_id, publish_timeout=0.5)) as t:
        await broker.stop()
        for _ in range(100):
            if not t.connected:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(NotConnectedError):
            await t.publish("x/y", b"lost?")


async def test_will_is_published_when_a_client_vanishes(broker: EmbeddedBroker, prefix: str, client_id: str) -> None:
    async with MqttTransport(mqtt_config(broker.url, client_id + "w")) as watcher:
        await watcher.subscribe(f"{prefix}/death")
        doomed = MqttTransport(mqtt_config(broker.url, client_id, will=Will(f"{prefix}/death", b"bye")))
        await doomed.__aenter__()
        await doomed.abort()
        (m,) = await take(watcher, 1)
        assert m.payload == b"bye"


async def test_oversized_publish_is_refused_on_our_side(tmp_path, client_id: str) -> None:  # type: ignore[no-untyped-def]
    if not __import__("edgespeed.transport", fromlist=["find_mosquitto"]).find_mosquitto():
        pytest.skip("mosquitto is not installed")
    async with EmbeddedBroker(BrokerSettings(backend="mosquitto", max_packet_size=64 * 1024)) as b:
        async with MqttTransport(mqtt_config(b.url, client_id)) as t:
            assert t.max_payload < 64 * 1024  # learnt from the broker's CONNACK
            with pytest.raises(PayloadTooLargeError):
                await t.publish("big", bytes(100 * 1024))
            await t.publish("small", bytes(1024))  # the connection is still good
        # MQTT 3.1.1 announces no limit: our own configured limit applies.
        cfg = mqtt_config(b.url, client_id, protocol="3.1.1", max_packet_size=32 * 1024)
        async with MqttTransport(cfg) as t:
            with pytest.raises(PayloadTooLargeError):
                await t.publish("big", bytes(40 * 1024))


async def test_amqtt_fallback_broker_with_mqtt311_and_websockets(prefix: str, client_id: str) -> None:
    settings = BrokerSettings(backend="amqtt", websocket_port=0)
    async with EmbeddedBroker(settings) as b:
        assert b.backend == "amqtt"
        for url in (b.url, b.ws_url):
            async with MqttTransport(mqtt_config(url, client_id)) as t:
                assert t.protocol == "3.1.1"  # amqtt speaks 3.1.1 only: auto fell back
                await t.subscribe(f"{prefix}/a")
                await t.publish(f"{prefix}/a", url.encode())
                (m,) = await take(t, 1)
                assert m.payload == url.encode()


async def test_unreachable_broker_fails_within_the_timeout(client_id: str) -> None:
    from edgespeed.transport.broker import free_port

    cfg = mqtt_config(f"mqtt://127.0.0.1:{free_port()}", client_id, connect_timeout=1.0)
    with pytest.raises(ConnectError, match="within"):
        async with MqttTransport(cfg):
            pass


async def test_tcp_nodelay_is_set_on_plain_and_tls_sockets(broker: EmbeddedBroker, pki: Pki, client_id: str) -> None:
    import socket

    for url, tls in ((broker.url, None), (broker.tls_url, pki.tls("dev-a"))):
        async with MqttTransport(mqtt_config(url, "dev-a" if tls else client_id, tls=tls)) as t:
            assert t._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_a_paced_uplink_sends_no_faster_than_its_rate(broker: EmbeddedBroker, client_id: str) -> None:
    """The simulated slow link that split-model benchmarks use: 5 x 100 kB at 1 MB/s take at least 0.4 s."""
    config = mqtt_config(broker.url, client_id, uplink_bytes_per_s=1e6)
    async with MqttTransport(config) as t:
        start = time.monotonic()
        for _ in range(5):
            await t.publish("test/paced", bytes(100_000), qos=0)
        assert time.monotonic() - start >= 0.4
