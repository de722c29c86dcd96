"""The coordinator end to end: real agents, the digits CNN, Mosquitto with the production config (mTLS, ACL)."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.coordinator import Coordinator, PostgresLedger, SyncCoordinator, TaskState
from edgespeed.errors import ConfigError, TaskError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message
from edgespeed.protocol.messages import CoordinatorState
from edgespeed.testing import agent_config, coordinator_config, wait_ready
from edgespeed.transport import EmbeddedBroker, MqttTransport
from tests.conftest import PG_DSN, SECURE_FLEET, Pki, mqtt_config, postgres_or_skip, take
from tests.models import DigitsModel

pytestmark = pytest.mark.mosquitto
FLEET = SECURE_FLEET
FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
async def fleet(secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[Device, Device]]:
    """Two agents: dev-a runs ONNX Runtime only, dev-b torch only."""
    a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
    b = agent_config(secure_broker, pki, "dev-b", tmp_path / "b", backends=("torch",))
    async with Device(a) as dev_a, Device(b) as dev_b:
        yield dev_a, dev_b


async def test_publish_then_infer_map_scatter_and_ensembles_across_backends(
    secure_broker: EmbeddedBroker, pki: Pki, fleet: tuple[Device, Device], digits: DigitsModel, tmp_path: Path
) -> None:
    dev_a, _ = fleet
    progress: list[int] = []
    async with Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c:
        await dev_a.wait_coordinator(5)  # the retained presence
        report = await c.publish_model(
            [digits.onnx, digits.safetensors],
            name="digits",
            architecture="digits-cnn",
            timeout=60,
            on_progress=lambda r, _: progress.append(len(r.ready)),
        )
        assert report.ok and report.version == 1, report
        assert report.ready == {"dev-a": "onnx", "dev-b": "torch"}
        assert progress[-1] == 2
        assert c.ledger.rollouts("digits", 1) == {"dev-a": ("ready", "onnx"), "dev-b": ("ready", "torch")}
        await wait_ready(c, "digits", 2)

        x = digits.x_test
        one = await c.infer("digits", x[:1], deadline=10)
        assert isinstance(one, np.ndarray)
        np.testing.assert_allclose(one, digits.reference[:1], atol=1e-4)

        mapped = await c.map("digits", [x[i : i + 1] for i in range(40)], concurrency=8)
        np.testing.assert_allclose(np.concatenate(mapped), digits.reference[:40], atol=1e-4)

        before = dict(c.stats)
        batch = await c.scatter("digits", x[:100])  # one part per device
        assert isinstance(batch, np.ndarray)
        np.testing.assert_allclose(batch, digits.reference[:100], atol=1e-4)
        assert c.stats["dispatched"] - before.get("dispatched", 0) == 2

        mean = await c.ensemble("digits", x[:50])  # ONNX Runtime on dev-a, torch on dev-b
        np.testing.assert_allclose(mean, digits.reference[:50], atol=1e-4)
        votes = await c.ensemble("digits", x[:50], mode="vote")
        np.testing.assert_array_equal(votes, digits.reference[:50].argmax(axis=1))
        accuracy = float((votes == digits.y_test[:50]).mean())
        assert accuracy > 0.85

        counts = await c.counts()
        assert counts["done"] == 1 + 40 + 2 + 2 + 2 and counts["failed"] == 0


async def test_a_model_no_device_can_run_fails_fast_and_bad_inputs_fail_clearly(
    secure_broker: EmbeddedBroker, pki: Pki, fleet: tuple[Device, Device], digits: DigitsModel, tmp_path: Path
) -> None:
    async with Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c:
        report = await c.publish_model([FIXTURES / "digits.tflite"], name="tfl", timeout=5)
        assert report.targets == ("dev-a", "dev-b") and not report.ready
        started = time.monotonic()
        with pytest.raises(TaskError) as caught:
            await c.infer("tfl", digits.x_test[:1], deadline=30)
        assert caught.value.code == "no_capable_device"
        assert "tflite" in str(caught.value)
        assert time.monotonic() - started < 5  # fast: not at the 30 s deadline

        with pytest.raises(TaskError) as caught:
            await c.infer("never-published", digits.x_test[:1], deadline=30)
        assert caught.value.code == "unknown_model"

        await c.publish_model([digits.onnx], name="digits", timeout=30)
        with pytest.raises(TaskError) as caught:
            await c.infer("digits", np.zeros((1, 3, 3), np.float32))  # the wrong shape
        assert caught.value.code == "bad_input"
        with pytest.raises(TaskError) as caught:
            await c.infer("digits", np.zeros((1, 3, 1024, 1024), np.float32))  # 12 MiB: over the 8 MiB limit
        assert caught.value.code == "input_too_large"
        with pytest.raises(TaskError) as caught:
            await c.infer("digits", digits.x_test[:1], device="dev-b")  # dev-b has no ONNX runtime
        assert caught.value.code == "no_capable_device"
        with pytest.raises(ConfigError):
            await c.publish_model([digits.onnx], name="digits", version=1)  # not newer than v1
        with pytest.raises(ConfigError):
            await c.publish_model([digits.safetensors], name="digits2")  # no architecture
        with pytest.raises(ConfigError):
            await c.submit("digits", digits.x_test[:1], task_id="../etc")
        counts = await c.counts()
        assert counts["failed"] == 5 and counts["pending"] == counts["dispatched"] == 0


async def test_a_restarted_coordinator_finishes_the_batch_and_delivers_each_result_once(
    secure_broker: EmbeddedBroker, pki: Pki, fleet: tuple[Device, Device], digits: DigitsModel, tmp_path: Path
) -> None:
    config = coordinator_config(secure_broker, pki, tmp_path / "coord")
    x = digits.x_test
    async with Coordinator(config) as first:
        await first.publish_model([digits.onnx, digits.safetensors], name="digits", architecture="digits-cnn")
        await wait_ready(first, "digits", 2)
        ids = [(await first.submit("digits", x[i % len(x)][None], deadline=60)).task_id for i in range(300)]
        while first.stats["completed"] < 20:
            await asyncio.sleep(0.005)
    first_completed = first.stats["completed"]
    assert first_completed < 300, "the batch ended before the restart: nothing was tested"
    async with Coordinator(config) as second:
        outputs = [await second.wait(task_id, timeout=60) for task_id in ids]
        for i, out in enumerate(outputs):
            np.testing.assert_allclose(out[0], digits.reference[i % len(x)][None], atol=1e-4)
        # Every task was completed by exactly one of the two; later copies were refused as duplicates.
        assert (await second.counts())["done"] == 300
        record = second.ledger.get(ids[-1])
        assert record is not None and record.state is TaskState.DONE
    # Every task was completed by exactly one of the two; later copies were refused as duplicates.
    assert first_completed + second.stats["completed"] == 300


async def test_a_broker_restart_loses_nothing(
    secure_broker: EmbeddedBroker, pki: Pki, fleet: tuple[Device, Device], digits: DigitsModel, tmp_path: Path
) -> None:
    async with Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c:
        await c.publish_model([digits.onnx, digits.safetensors], name="digits", architecture="digits-cnn")
        await wait_ready(c, "digits", 2)
        x = digits.x_test
        batch = asyncio.create_task(c.map("digits", [x[i : i + 1] for i in range(120)], concurrency=4, deadline=60))
        while c.stats["completed"] < 20:
            await asyncio.sleep(0.005)
        await secure_broker.restart(down_for=0.5)
        outputs = await batch
        np.testing.assert_allclose(np.concatenate(outputs), digits.reference[:120], atol=1e-4)
        assert (await c.counts())["done"] == 120


async def test_presence_is_retained_with_a_will(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path, client_id: str
) -> None:
    async with MqttTransport(mqtt_config(secure_broker.tls_url, "audit", tls=pki.tls("audit"))) as watcher:
        await watcher.subscribe(topics.coordinator_state(FLEET))
        c = Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord"))
        await c.__aenter__()
        [online] = await take(watcher, 1)
        assert open_message(online.payload)[1] == CoordinatorState(True, c.epoch)
        await c._parts.transport.abort()  # vanish without a goodbye: the broker publishes the will
        await c.close()
        [offline] = await take(watcher, 1)
        assert open_message(offline.payload)[1] == CoordinatorState(False, c.epoch)


async def test_the_sync_facade_for_scripts(
    secure_broker: EmbeddedBroker, pki: Pki, fleet: tuple[Device, Device], digits: DigitsModel, tmp_path: Path
) -> None:
    def script() -> tuple[np.ndarray, list[np.ndarray]]:
        with SyncCoordinator(coordinator_config(secure_broker, pki, tmp_path / "coord"), timeout=60) as c:
            report = c.publish_model([digits.onnx], name="digits", targets="backend=onnx")
            assert report.ok and report.targets == ("dev-a",), report
            one = c.infer("digits", digits.x_test[:4], deadline=10)
            many = c.map("digits", [digits.x_test[i : i + 1] for i in range(8)])
            return one, many  # type: ignore[return-value]

    one, many = await asyncio.to_thread(script)  # the agents run on this test's loop meanwhile
    np.testing.assert_allclose(one, digits.reference[:4], atol=1e-4)
    np.testing.assert_allclose(np.concatenate(many), digits.reference[:8], atol=1e-4)


async def test_two_coordinators_share_the_fleet_through_postgres_and_a_shared_subscription(
    secure_broker: EmbeddedBroker, pki: Pki, fleet: tuple[Device, Device], digits: DigitsModel, tmp_path: Path
) -> None:
    postgres_or_skip()
    prefix = f"t_{uuid.uuid4().hex[:10]}"
    shared = {"ledger": PG_DSN, "ledger_prefix": prefix, "shared_group": "coords"}
    one = coordinator_config(secure_broker, pki, tmp_path / "c1", **shared)
    two = coordinator_config(secure_broker, pki, tmp_path / "c2", **shared, presence=False)
    try:
        async with Coordinator(one) as c1, Coordinator(two, client_id="coord-2") as c2:
            report = await c1.publish_model([digits.onnx], name="digits", timeout=30, targets="backend=onnx")
            # Some reports reached c2 only; c1 read them from the shared ledger.
            assert report.ok and report.targets == ("dev-a",), report
            await wait_ready(c1, "digits", 1)
            x = digits.x_test
            outputs = await c1.map("digits", [x[i : i + 1] for i in range(60)], concurrency=16)
            np.testing.assert_allclose(np.concatenate(outputs), digits.reference[:60], atol=1e-4)
            # The broker split the answers: both coordinators recorded results in the shared ledger.
            assert c1.stats["completed"] > 0 and c2.stats["completed"] > 0
            assert c1.stats["completed"] + c2.stats["completed"] == 60
    finally:
        cleaner = PostgresLedger(PG_DSN, prefix=prefix)
        cleaner.drop()
        cleaner.close()


async def test_a_device_cannot_abort_another_devices_download_with_a_forged_error(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    """dev-b floods dev-a's inbox with unsealed blob errors that claim to come from the coordinator."""
    from edgespeed.bench._fleet import big_onnx
    from edgespeed.protocol.envelope import pack_message
    from edgespeed.protocol.messages import Error

    model = big_onnx(tmp_path / "big.onnx", 8)  # a download long enough to be hit many times
    forged = pack_message(Error("unknown_blob", "forged"), sender="coord", recipient="dev-a")
    a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
    async with (
        MqttTransport(mqtt_config(secure_broker.tls_url, "dev-b", tls=pki.tls("dev-b"))) as rogue,
        Device(a),
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c,
    ):
        stop = asyncio.Event()

        async def flood() -> int:
            sent = 0
            while not stop.is_set():
                await rogue.publish(topics.device_inbox(FLEET, "dev-a"), forged)
                sent += 1
                await asyncio.sleep(0.002)
            return sent

        flooding = asyncio.create_task(flood())
        report = await c.publish_model([model], name="big", targets="dev-a", timeout=60)
        stop.set()
        assert await flooding > 10
        assert report.ok, report


async def test_a_task_that_expires_on_a_silent_device_gives_its_slot_back(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    """A device that takes tasks and never answers: each expires, and the next one still gets placed."""
    from edgespeed.protocol.envelope import pack_message
    from edgespeed.protocol.messages import Birth, DeviceCard, Heartbeat, ModelStatus
    from edgespeed.security import KeyDirectory, Sealer
    from edgespeed.testing import affine_onnx

    keys = KeyDirectory(pki.ca.cert_file)
    keys.add_directory(pki.ca.directory)
    sealer = Sealer("dev-c", pki.devices["dev-c"].seal_key(), keys, replay=None)
    card = DeviceCard("dev-c", "x86_64", "linux", "0", 2, 1 << 30, ("onnx",), ("cpu",))
    async with MqttTransport(mqtt_config(secure_broker.tls_url, "dev-c", tls=pki.tls("dev-c"))) as silent:
        await silent.subscribe(topics.device_inbox(FLEET, "dev-c"))
        await silent.publish(topics.birth(FLEET, "dev-c"), pack_message(Birth(card, 7), sender="dev-c"), retain=True)
        beat = pack_message(Heartbeat(7, 0.0, 0, models=("m",)), sender="dev-c")
        # It is a signed target of the model and says, under its own seal, that it installed it.
        ready = sealer.seal(ModelStatus("m", 1, "ready", backend="onnx"), recipient="coord")

        async def heartbeats() -> None:
            while True:
                await silent.publish(topics.heartbeat(FLEET, "dev-c"), beat, qos=0)
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(heartbeats())
        try:
            async with Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord", max_inflight=1)) as c:
                await c.wait_for_devices(1)
                await c.publish_model([affine_onnx(tmp_path / "m.onnx")], name="m", wait=False, settle=0)
                await silent.publish(topics.coordinator_inbox(FLEET, "dev-c"), ready)
                await c.wait_for_devices(1, model="m")
                for _ in range(2):
                    with pytest.raises(TaskError) as caught:
                        await c.infer("m", np.zeros((1, 4), np.float32), deadline=0.5)
                    assert caught.value.code == "deadline"
                received = await take(silent, 2, timeout=5)  # the second task was placed too
                assert len(received) == 2
        finally:
            beating.cancel()
