"""Revocation end to end, and a broker configuration that persists, against Mosquitto running the rendered
production configuration (mutual TLS, the fleet ACL). Real certificates, real crypto, no mocks; each test
failed on the code before revocation was wired through.

Each test that revokes makes a PKI of its own: the session's is shared with every other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from typer.testing import CliRunner

from edgespeed.agent import Device
from edgespeed.cli.main import app
from edgespeed.coordinator import Coordinator
from edgespeed.errors import ConnectError, PublishRefusedError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import Birth, DeviceCard, Heartbeat, Message, ModelStatus, Result, RevocationList, Task
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.security import KeyDirectory, Sealer, parse_crl, refresh_crl, revoke_certificate
from edgespeed.security.pki import FleetCA
from edgespeed.testing import FleetPki, affine_onnx, agent_config, coordinator_config, make_pki, start_broker
from edgespeed.testing.broker import broker_settings
from edgespeed.transport import EmbeddedBroker, MqttTransport, TlsConfig
from edgespeed.transport.base import Message as MqttMessage
from edgespeed.transport.broker import find_mosquitto, free_port
from tests.conftest import SECURE_FLEET, Pki, _need_mosquitto, mqtt_config

pytestmark = pytest.mark.mosquitto
FLEET = SECURE_FLEET
NOW = dt.datetime.now(dt.timezone.utc)


# -- helpers ---------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait until ``condition()`` holds (checked every 50 ms), or fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def admitted(url: str, tls: TlsConfig, client_id: str) -> bool:
    """Whether the broker lets this certificate in."""
    try:
        async with MqttTransport(mqtt_config(url, client_id, tls=tls, connect_timeout=5.0)):
            return True
    except ConnectError:
        return False


def tls_of(fleet: FleetPki, name: str) -> TlsConfig:
    return fleet.tls(name)


async def next_on(transport: MqttTransport, topic: str, timeout: float = 30.0) -> MqttMessage:
    """The next message on ``topic`` (others are skipped)."""

    async def run() -> MqttMessage:
        async for message in transport.messages():
            if message.topic == topic:
                return message
        raise AssertionError("the transport closed")

    return await asyncio.wait_for(run(), timeout)


def sign_crl(ca: FleetCA, serials: list[int], *, last: dt.datetime, next_: dt.datetime) -> bytes:
    """A CRL of the fleet CA with any dates, a past nextUpdate included (PEM)."""
    key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    builder = x509.CertificateRevocationListBuilder().issuer_name(cert.subject).last_update(last).next_update(next_)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


class Member:
    """A fleet member on a raw connection: it joins, reports ready under its seal, answers every task
    correctly (``y = 2x + 1``, the affine model), and keeps talking once it is revoked."""

    def __init__(self, transport: MqttTransport, fleet: FleetPki, name: str) -> None:
        self.transport = transport
        self.name = name
        keys = KeyDirectory(fleet.ca.cert_file)  # its own view of the fleet, from before the revocation
        keys.add_directory(fleet.directory)
        self.sealer = Sealer(name, fleet.identity(name).seal_key(), keys, replay=None)
        self.tasks: list[Task] = []

    async def join(self, models: tuple[str, ...]) -> None:
        card = DeviceCard(self.name, "x86_64", "linux", "0", 2, 1 << 30, ("onnx",), ("cpu",))
        await self.transport.subscribe(topics.device_inbox(FLEET, self.name))
        await self.transport.publish(
            topics.birth(FLEET, self.name), pack_message(Birth(card, 7), sender=self.name), retain=True
        )
        self._beat = pack_message(Heartbeat(7, 0.0, 0, models=models), sender=self.name)

    async def keep_beating(self) -> None:
        while True:
            await self.transport.publish(topics.heartbeat(FLEET, self.name), self._beat, qos=0)
            await asyncio.sleep(0.1)

    async def to_coordinator(self, message: Message) -> None:
        await self.transport.publish(
            topics.coordinator_inbox(FLEET, self.name), self.sealer.seal(message, recipient="coord")
        )

    async def to_device(self, device: str, message: Message) -> None:
        await self.transport.publish(topics.device_inbox(FLEET, device), self.sealer.seal(message, recipient=device))

    async def answer(self) -> None:
        async for message in self.transport.messages():
            if message.topic != topics.device_inbox(FLEET, self.name):
                continue
            _, body = self.sealer.open(message.payload)
            if isinstance(body, Task):
                self.tasks.append(body)
                y = decode_tensor(body.inputs[0]) * 2 + 1
                await self.to_coordinator(Result(body.task_id, body.attempt, (encode_tensor(y),)))


def stage_task(task_id: str, x: np.ndarray) -> Task:
    """What a peer forwards: a later stage of a split model, answering the coordinator."""
    return Task(task_id, 1, "affine-s2", time.time_ns() // 1_000_000 + 30_000, (encode_tensor(x),), reply_to="coord")


# -- A. revocation ------------------------------------------------------------------


async def test_a_revoked_device_is_refused_after_a_broker_restart_or_reload(tmp_path: Path) -> None:
    """The configuration is rendered before anything is revoked: it names the list all the same."""
    _need_mosquitto()
    fleet = make_pki(tmp_path / "pki", FLEET, devices=["dev-a", "dev-b", "dev-c"])
    settings = broker_settings(fleet, tmp_path)  # production: rendered now, before any revocation
    assert settings.tls is not None and settings.tls.crl_file == fleet.ca.crl_file
    async with EmbeddedBroker(settings) as broker:
        url = broker.tls_url
        for name in ("dev-a", "dev-b", "dev-c"):
            assert await admitted(url, fleet.tls(name), name)
        revoke_certificate(fleet.ca, fleet.identity("dev-b").cert_file)
        await broker.restart()
        assert not await admitted(url, fleet.tls("dev-b"), "dev-b")
        assert await admitted(url, fleet.tls("dev-a"), "dev-a")
        # A reload (SIGHUP) reads the list again too, without dropping anyone connected.
        async with MqttTransport(mqtt_config(url, "dev-a", tls=fleet.tls("dev-a"))) as staying:
            revoke_certificate(fleet.ca, fleet.identity("dev-c").cert_file)
            broker.reload()
            deadline = time.monotonic() + 30
            while await admitted(url, fleet.tls("dev-c"), "dev-c"):
                assert time.monotonic() < deadline, "the reloaded broker still admits dev-c"
                await asyncio.sleep(0.2)
            assert staying.connected
        assert await admitted(url, fleet.tls("dev-a"), "dev-a")


async def test_a_connected_device_once_revoked_gets_no_work_no_keys_and_no_hearing(tmp_path: Path) -> None:
    """dev-c stays connected (the broker only checks at the next connection) and keeps talking: the
    coordinator picks the revocation up from its PKI folder, quarantines dev-c, gives its work to others,
    wraps no key for it, and reads nothing it sends; the agents refuse its stage tasks once the broadcast
    list reached them; and it cannot replace that list."""
    _need_mosquitto()
    fleet = make_pki(tmp_path / "pki", FLEET, devices=["dev-a", "dev-b", "dev-c"], auditors=["audit"])
    model = affine_onnx(tmp_path / "affine.onnx")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    async with start_broker(fleet, tmp_path) as broker:
        a = Device(agent_config(broker, fleet, "dev-a", tmp_path / "a", backends=("onnx",)))
        b = Device(agent_config(broker, fleet, "dev-b", tmp_path / "b", backends=("onnx",)))
        # The coordinator counts dev-c lost only after 5 of its (30 s) intervals: it is still online when the
        # next model is published, so the publish itself must leave it out.
        config = coordinator_config(broker, fleet, tmp_path / "coord", policy="round-robin", heartbeat_s=30.0)
        async with (
            a,
            b,
            MqttTransport(mqtt_config(broker.tls_url, "dev-c", tls=fleet.tls("dev-c"))) as link,
            MqttTransport(mqtt_config(broker.tls_url, "audit", tls=fleet.tls("audit"))) as audit,
            Coordinator(config) as c,
        ):
            member = Member(link, fleet, "dev-c")
            await member.join(models=("affine",))
            workers = [asyncio.create_task(member.keep_beating()), asyncio.create_task(member.answer())]
            try:
                await c.wait_for_devices(3, timeout=60)
                first = await c.publish_model([model], name="affine", wait=False)
                assert set(first.targets) == {"dev-a", "dev-b", "dev-c"}
                await member.to_coordinator(ModelStatus("affine", first.version, "ready", backend="onnx"))
                await c.wait_for_devices(3, model="affine", timeout=60)
                for i in range(30):  # round robin: dev-c gets its share while its certificate is valid
                    y = await c.infer("affine", x + i)
                    np.testing.assert_allclose(y, (x + i) * 2 + 1)
                    if member.tasks:
                        break
                assert member.tasks
                # A stage task sealed by dev-c reaches dev-a, which takes it (and answers model_missing).
                await audit.subscribe(topics.coordinator_inbox(FLEET, "dev-a"))
                await member.to_device("dev-a", stage_task("t-stage-1", x))
                await next_on(audit, topics.coordinator_inbox(FLEET, "dev-a"))

                revoke_certificate(fleet.ca, fleet.identity("dev-c").cert_file)  # what 'edgespeed certs revoke' does
                await eventually(lambda: c.registry.quarantined().get("dev-c") == "certificate revoked", "quarantine")
                await eventually(lambda: {"dev-c"} <= a.revocation.revoked & b.revocation.revoked, "agents revoke")

                placed = len(member.tasks)
                outputs = await c.map("affine", [x + i for i in range(12)], concurrency=4)
                for i, y in enumerate(outputs):
                    np.testing.assert_allclose(y, (x + i) * 2 + 1)
                assert len(member.tasks) == placed, "a task went to the revoked device"
                assert "dev-c" not in c.devices_for("affine")

                second = await c.publish_model([model], name="affine", timeout=60)
                assert second.ok and set(second.targets) == {"dev-a", "dev-b"}, second
                assert set(c.models()["affine"].keys) == {"dev-a", "dev-b"}  # no key wrapped for dev-c

                workers[0].cancel()  # no more heartbeats: what is refused next is its sealed report
                refused = c.stats["refused_revoked_coordinator_inbox"]
                await member.to_coordinator(ModelStatus("affine", second.version, "ready", backend="onnx"))
                await eventually(lambda: c.stats["refused_revoked_coordinator_inbox"] > refused, "report refused")
                assert "dev-c" not in c.devices_for("affine")

                dropped = a.dropped
                await member.to_device("dev-a", stage_task("t-stage-2", x))
                await eventually(lambda: a.dropped > dropped, "dev-a refuses the stage task of dev-c")

                # It cannot replace the retained list (only coordinators write bcast/#).
                with contextlib.suppress(PublishRefusedError):
                    forged = pack_message(RevocationList(b"0" * 64), sender="dev-c")
                    await link.publish(topics.crl(FLEET), forged, retain=True)
                await audit.subscribe(topics.crl(FLEET))
                _, kept = open_message((await next_on(audit, topics.crl(FLEET))).payload)
                assert isinstance(kept, RevocationList)
                crl = parse_crl(kept.crl, x509.load_pem_x509_certificate(fleet.ca.cert_file.read_bytes()))
                assert fleet.identity("dev-c").certificate().serial_number in crl.revoked
            finally:
                for worker in workers:
                    worker.cancel()


async def test_a_list_past_its_next_update_locks_everyone_out_until_refreshed(tmp_path: Path) -> None:
    _need_mosquitto()
    fleet = make_pki(tmp_path / "pki", FLEET, devices=["dev-a", "dev-c"])
    revoke_certificate(fleet.ca, fleet.identity("dev-c").cert_file)
    serial = fleet.identity("dev-c").certificate().serial_number
    fleet.ca.crl_file.write_bytes(
        sign_crl(fleet.ca, [serial], last=NOW - dt.timedelta(days=10), next_=NOW - dt.timedelta(days=1))
    )
    shown = cli("certs", "crl", "show", "--dir", str(fleet.directory))
    assert "EXPIRED" in shown and "dev-c" in shown and "crl refresh" in shown
    async with EmbeddedBroker(broker_settings(fleet, tmp_path)) as broker:
        url = broker.tls_url
        assert not await admitted(url, fleet.tls("dev-a"), "dev-a")  # a valid device, locked out
        refreshed = refresh_crl(fleet.ca)
        assert set(refreshed.revoked) == {serial} and refreshed.health() == "ok"
        await broker.restart()
        assert await admitted(url, fleet.tls("dev-a"), "dev-a")
        assert not await admitted(url, fleet.tls("dev-c"), "dev-c")  # the refresh kept the entry
    assert "valid until" in cli("certs", "crl", "show", "--dir", str(fleet.directory))


async def test_a_list_close_to_its_next_update_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under 7 days left: the coordinator logs a WARNING at start, 'broker config' and 'certs crl show' say so."""
    _need_mosquitto()
    fleet = make_pki(tmp_path / "pki", FLEET, devices=["dev-a"])
    fleet.ca.crl_file.write_bytes(sign_crl(fleet.ca, [], last=NOW, next_=NOW + dt.timedelta(days=3)))
    assert "renew it now" in cli("certs", "crl", "show", "--dir", str(fleet.directory))
    rendered = cli("broker", "config", "--pki", str(fleet.directory), "--out", str(tmp_path / "conf"), "--fleet", FLEET)
    assert "renew it now" in rendered
    with caplog.at_level(logging.WARNING, logger="edgespeed.coordinator.revocation"):
        async with (
            start_broker(fleet, tmp_path) as broker,
            Coordinator(coordinator_config(broker, fleet, tmp_path / "coord")),
        ):
            await eventually(
                lambda: any("renew it" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records),
                "a warning about the revocation list",
            )


# -- C. births announced again -----------------------------------------------------------


async def test_agents_announce_their_birth_again_when_a_coordinator_asks(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    """The broker lost the retained birth (a restart without persistence): a coordinator that starts
    then learns of the connected device at once, in the same session (epoch)."""
    config = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
    async with Device(config) as device:
        async with MqttTransport(mqtt_config(secure_broker.tls_url, "coord-wipe", tls=pki.tls("coord"))) as t:
            await t.subscribe(topics.birth(FLEET, "dev-a"))
            await next_on(t, topics.birth(FLEET, "dev-a"))  # its retained birth
            await t.publish(topics.birth(FLEET, "dev-a"), b"", retain=True)  # now gone
        started = time.monotonic()
        async with Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c:
            await c.wait_for_devices(1, devices=["dev-a"], timeout=30)
            info = c.registry.get("dev-a")
            assert info is not None and info.epoch == device.epoch
        assert time.monotonic() - started < 20


# -- B. a broker configuration that persists --------------------------------------------


@contextlib.asynccontextmanager
async def mosquitto(conf: Path, url: str, tls: TlsConfig) -> AsyncIterator[None]:
    """Run stock Mosquitto on ``conf`` until it admits ``tls``; stopped with SIGTERM (it saves) on the way out."""
    binary = find_mosquitto()
    assert binary is not None
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not await admitted(url, tls, "probe"):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "mosquitto exited"
            assert time.monotonic() < deadline, "mosquitto did not admit a fleet client"
            await asyncio.sleep(0.1)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()


async def check_persistence(pki_dir: Path, out: Path, fleet: FleetPki) -> str:
    """Render with 'broker config', keep a retained message across a clean restart; returns the config."""
    port = free_port()
    cli(
        "broker", "config", "--pki", str(pki_dir), "--out", str(out), "--fleet", FLEET,
        "--host", "127.0.0.1", "--tls-port", str(port),
    )  # fmt: skip
    data = out / "data"
    assert data.is_dir() and data.stat().st_mode & 0o777 == 0o700
    conf = (out / "mosquitto.conf").read_text()
    assert f"crlfile {pki_dir / 'crl.pem'}" in conf and f"persistence_location {data}/" in conf
    url, tls = f"mqtts://127.0.0.1:{port}", fleet.tls("coord")
    topic = topics.birth(FLEET, "dev-a")
    async with mosquitto(out / "mosquitto.conf", url, tls), MqttTransport(mqtt_config(url, "coord", tls=tls)) as t:
        await t.publish(topic, b"kept across restarts", retain=True)
    assert (data / "mosquitto.db").is_file()
    async with mosquitto(out / "mosquitto.conf", url, tls), MqttTransport(mqtt_config(url, "coord", tls=tls)) as t:
        await t.subscribe(topic)
        assert (await next_on(t, topic)).payload == b"kept across restarts"
    return conf


async def test_broker_config_creates_its_data_folder_and_persists(tmp_path: Path) -> None:
    _need_mosquitto()
    fleet = make_pki(tmp_path / "pki", FLEET, devices=["dev-a"])
    conf = await check_persistence(fleet.directory, tmp_path / "conf", fleet)
    if os.geteuid() == 0:
        assert "\nuser root\n" in conf and "# Run as root: " in conf  # pytest's folders are root's alone


@pytest.mark.skipif(os.geteuid() != 0, reason="the broker drops to the mosquitto user only when started as root")
async def test_broker_config_runs_mosquitto_unprivileged_when_it_can_read_the_keys() -> None:
    _need_mosquitto()
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user on this machine")
    base = Path(os.path.realpath("/tmp")) / f"es-broker-user-{os.getpid()}"  # reachable by the mosquitto user
    base.mkdir(mode=0o755)
    try:
        fleet = make_pki(base / "pki", FLEET, devices=["dev-a"])
        os.chmod(fleet.directory, 0o755)
        os.chown(fleet.broker.key_file, 0, account.pw_gid)
        os.chmod(fleet.broker.key_file, 0o640)
        conf = await check_persistence(fleet.directory, base / "conf", fleet)
        assert "\nuser mosquitto\n" in conf
        assert (base / "conf" / "data" / "mosquitto.db").stat().st_uid == account.pw_uid
    finally:
        shutil.rmtree(base)
