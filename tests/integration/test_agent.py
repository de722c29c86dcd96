"""The device agent end to end, over Mosquitto with the production config (mutual TLS, ACLs).

The harness's `StubCoordinator` plays the coordinator (the real one is tested
on its own): it publishes signed, encrypted models, serves their chunks, seals
tasks and opens what devices send back.
"""

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.errors import EdgeSpeedError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import (
    Birth,
    Death,
    DeviceConfig,
    Heartbeat,
    ModelStatus,
    Result,
    Task,
)
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.security.signing import sign_message
from edgespeed.testing import StubCoordinator, agent_config
from edgespeed.transport import EmbeddedBroker, MqttTransport
from tests.conftest import SECURE_FLEET, Pki
from tests.models import DigitsModel

pytestmark = pytest.mark.mosquitto
FLEET = SECURE_FLEET


def shards(digits: DigitsModel) -> list[tuple[str, bytes, dict]]:  # type: ignore[type-arg]
    return [
        ("digits.onnx", digits.onnx.read_bytes(), {"format": "onnx"}),
        (
            "digits.safetensors",
            digits.safetensors.read_bytes(),
            {"format": "safetensors", "architecture": "digits-cnn"},
        ),
    ]


def task(i: int, x: np.ndarray, *, model: str = "digits", deadline_s: float = 30.0) -> Task:
    return Task(f"t-{i}", 0, model, time.time_ns() // 1_000_000 + int(deadline_s * 1000), (encode_tensor(x),))


@pytest.fixture
async def harness(secure_broker: EmbeddedBroker, pki: Pki) -> AsyncIterator[StubCoordinator]:
    async with StubCoordinator(secure_broker, pki) as h:
        yield h


async def test_agents_join_install_signed_models_and_answer(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, digits: DigitsModel, tmp_path: Path
) -> None:
    a_cfg = agent_config(secure_broker, pki, "dev-a", tmp_path / "a")
    b_cfg = agent_config(secure_broker, pki, "dev-b", tmp_path / "b", backends=("torch",))
    async with Device(a_cfg) as dev_a, Device(b_cfg):
        birth = await harness.wait_for(lambda s, b: s == "dev-a" and isinstance(b, Birth))
        assert "onnx" in birth.card.backends and birth.epoch == dev_a.epoch
        await dev_a.wait_coordinator(5)
        await harness.publish_model(1, shards(digits), ["dev-a", "dev-b"])
        ready_a = await harness.wait_for(lambda s, b: s == "dev-a" and isinstance(b, ModelStatus))
        ready_b = await harness.wait_for(lambda s, b: s == "dev-b" and isinstance(b, ModelStatus))
        assert (ready_a.state, ready_a.backend) == ("ready", "onnx")
        assert (ready_b.state, ready_b.backend) == ("ready", "torch")  # its configuration prefers torch

        # Tasks of 1 to 4 images, sealed; both devices answer like the trained model.
        batches = [digits.x_test[i : i + 1 + i % 4] for i in range(0, 60, 5)]
        for device in ("dev-a", "dev-b"):
            for i, x in enumerate(batches):
                await harness.send(device, task(i, x))
        for device in ("dev-a", "dev-b"):
            await harness.wait_for(lambda s, b, d=device: len(harness.answers(d)) == len(batches))
            answers = harness.answers(device)
            for i, x in enumerate(batches):
                result = answers[f"t-{i}"]
                assert isinstance(result, Result), result
                start = 5 * i
                np.testing.assert_allclose(
                    decode_tensor(result.outputs[0]), digits.reference[start : start + len(x)], rtol=1e-4, atol=1e-4
                )

        # Typed errors, one per failure, never silence.
        await harness.send("dev-a", task(100, digits.x_test[:1], model="other"))
        await harness.send("dev-a", task(101, np.zeros((1, 64), np.float32)))
        await harness.send("dev-a", task(102, digits.x_test[:1], deadline_s=-1))
        await harness.wait_for(lambda s, b: len(harness.answers("dev-a")) == len(batches) + 3)
        codes = {t: getattr(harness.answers("dev-a")[t], "code", None) for t in ("t-100", "t-101", "t-102")}
        assert codes == {"t-100": "model_missing", "t-101": "bad_input", "t-102": "deadline"}

        beat = await harness.wait_for(lambda s, b: s == "dev-a" and isinstance(b, Heartbeat) and b.models)
        assert beat.models == ("digits",) and beat.epoch == dev_a.epoch

        # A newer version installs; an older one and a forged one are refused and reported.
        await harness.publish_model(2, shards(digits), ["dev-a"])
        await harness.wait_for(lambda s, b: s == "dev-a" and isinstance(b, ModelStatus) and b.version == 2)
        assert dev_a.models == {"digits": 2}
        await harness.publish_model(1, shards(digits), ["dev-a"])
        rollback = await harness.wait_for(
            lambda s, b: s == "dev-a" and isinstance(b, ModelStatus) and b.state == "failed"
        )
        assert (rollback.version, rollback.reason) == (1, "rollback")
        # v2 was wrapped for dev-a only: dev-b is not a target, keeps v1 and reports nothing about v2.
        assert not [b for s, b in harness.received if s == "dev-b" and isinstance(b, ModelStatus) and b.version == 2]
        await harness.publish_model(5, shards(digits), ["dev-a"], tamper=True)
        forged = await harness.wait_for(lambda s, b: s == "dev-a" and isinstance(b, ModelStatus) and b.version == 6)
        assert (forged.state, forged.reason) == ("failed", "bad_signature")
        assert dev_a.models == {"digits": 2}
        assert not list((tmp_path / "a").rglob("*.onnx")) or all(
            b"pytorch" not in p.read_bytes() for p in (tmp_path / "a").rglob("digits.onnx")
        )
    death = await harness.wait_for(lambda s, b: s == "dev-a" and isinstance(b, Death))
    assert death.reason == "shutdown"


async def test_no_answer_is_lost_when_the_broker_restarts_mid_batch(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, digits: DigitsModel, tmp_path: Path
) -> None:
    cfg = agent_config(secure_broker, pki, "dev-a", tmp_path / "a")
    async with Device(cfg):
        await harness.publish_model(1, shards(digits), ["dev-a"])
        await harness.wait_for(lambda s, b: isinstance(b, ModelStatus) and b.state == "ready")
        count = 60
        sent: set[int] = set()

        async def send_all() -> None:
            while len(sent) < count:
                for i in range(count):
                    if i in sent:
                        continue
                    try:
                        await harness.send("dev-a", task(i, digits.x_test[i : i + 1]))
                        sent.add(i)
                    except EdgeSpeedError:
                        await asyncio.sleep(0.1)  # broker away: send the rest once it is back
                        break
                    await asyncio.sleep(0.01)

        sender = asyncio.create_task(send_all())
        await harness.wait_for(lambda s, b: len(harness.answers("dev-a")) >= 10)
        await secure_broker.restart(down_for=0.5)
        await sender
        await harness.wait_for(lambda s, b: len(harness.answers("dev-a")) == count, timeout=60)
        answers = harness.answers("dev-a")
        assert sorted(answers) == sorted(f"t-{i}" for i in range(count))
        assert all(isinstance(a, Result) for a in answers.values())


async def test_a_restarted_agent_reloads_its_cached_model(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, digits: DigitsModel, tmp_path: Path
) -> None:
    cfg = agent_config(secure_broker, pki, "dev-a", tmp_path / "a")
    async with Device(cfg):
        await harness.publish_model(1, shards(digits), ["dev-a"])
        await harness.wait_for(lambda s, b: isinstance(b, ModelStatus) and b.state == "ready")
    served = harness.server.served
    harness.received.clear()
    async with Device(cfg) as again:
        await harness.wait_for(lambda s, b: isinstance(b, ModelStatus) and b.state == "ready")
        assert again.models == {"digits": 1}
        await harness.send("dev-a", task(1, digits.x_test[:2]))
        result = await harness.wait_for(lambda s, b: isinstance(b, Result))
        np.testing.assert_allclose(decode_tensor(result.outputs[0]), digits.reference[:2], rtol=1e-4, atol=1e-4)
    assert harness.server.served == served  # nothing fetched again
    cached = list((tmp_path / "a" / "models").rglob("digits.onnx"))
    assert cached and digits.onnx.read_bytes()[:64] not in cached[0].read_bytes()  # stored encrypted


async def test_remote_configuration_is_signed_and_applied(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, tmp_path: Path
) -> None:
    coord_key, dev_key = pki.devices["coord"].sign_key(), pki.devices["dev-b"].sign_key()
    topic = topics.broadcast(FLEET, "config")

    async def publish(config: DeviceConfig) -> None:
        await harness.transport.publish(topic, pack_message(config, sender="coord"), retain=True)

    async def settled(device: Device, version: int) -> None:
        for _ in range(100):
            if device.config_version == version:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"config v{version} not applied; at v{device.config_version}")

    cfg = agent_config(secure_broker, pki, "dev-a", tmp_path / "a")
    async with Device(cfg) as dev:
        await publish(
            sign_message(DeviceConfig(2, {"heartbeat_s": 0.1, "max_batch": 2}), signer="coord", key=coord_key)
        )
        await settled(dev, 2)
        assert dev.settings["max_batch"] == 2 and dev.settings["heartbeat_s"] == 0.1
        refused = [
            dataclasses.replace(
                sign_message(DeviceConfig(3, {"max_batch": 3}), signer="coord", key=coord_key),
                settings={"max_batch": 4096},
            ),  # forged after signing
            sign_message(DeviceConfig(4, {"max_batch": 4}), signer="dev-b", key=dev_key),  # not a coordinator
            sign_message(DeviceConfig(5, {"colour": "blue"}), signer="coord", key=coord_key),  # unknown setting
            sign_message(DeviceConfig(1, {"max_batch": 1}), signer="coord", key=coord_key),  # older
            sign_message(DeviceConfig(6, {"max_batch": 6}, targets=("dev-b",)), signer="coord", key=coord_key),
        ]
        for config in refused:
            await publish(config)
        await publish(
            sign_message(DeviceConfig(7, {"max_wait_ms": 1.5, "log_level": "WARNING"}), signer="coord", key=coord_key)
        )
        await settled(dev, 7)  # arrived after every refused one, in order
        assert dev.settings["max_batch"] == 2 and dev.settings["max_wait_ms"] == 1.5
        assert dev.dropped >= 4
    async with Device(cfg) as again:  # kept across a restart
        assert again.config_version == 7 and again.settings["max_batch"] == 2
    await harness.transport.publish(topic, b"", retain=True)


async def test_forwarding_full_queue_eviction_and_the_tflite_variant(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, digits: DigitsModel, tmp_path: Path
) -> None:
    from edgespeed.engine.tflite import TfliteBackend

    pytest.importorskip("ai_edge_litert", reason="LiteRT is an optional extra: pip install 'edgespeed[tflite]'")
    tflite = (Path(__file__).parents[1] / "fixtures" / "digits.tflite").read_bytes()
    lite_variant = {"format": "tflite", "pre": [{"op": "transpose", "axes": [0, 2, 3, 1]}]}
    # dev-c runs LiteRT with a cache too small for two models and a queue of one.
    c_cfg = agent_config(
        secure_broker,
        pki,
        "dev-c",
        tmp_path / "c",
        backends=("tflite",),
        queue_size=1,
        cache_bytes=len(tflite) + 1000,
        max_wait_ms=0,
    )
    b_cfg = agent_config(secure_broker, pki, "dev-b", tmp_path / "b")
    async with Device(c_cfg) as dev_c, Device(b_cfg):
        await harness.publish_model(1, [*shards(digits), ("digits.tflite", tflite, lite_variant)], ["dev-b", "dev-c"])
        ready = await harness.wait_for(lambda s, b: s == "dev-c" and isinstance(b, ModelStatus))
        assert (ready.state, ready.backend) == ("ready", "tflite")
        await harness.wait_for(lambda s, b: s == "dev-b" and isinstance(b, ModelStatus))

        # The result of a task with reply_to goes sealed to that device, not to the coordinator:
        # dev-b's answer lands in dev-c's inbox as an unexpected Result, which dev-c opens and ignores.
        x = digits.x_test[:3]
        forwarded = dataclasses.replace(task(1, x), reply_to="dev-c")
        await harness.send("dev-b", forwarded)
        await harness.send("dev-c", task(2, x))
        answer = await harness.wait_for(lambda s, b: s == "dev-c" and isinstance(b, Result) and b.task_id == "t-2")
        expected = TfliteBackend().load(tflite).run([np.ascontiguousarray(x.transpose(0, 2, 3, 1))])[0]
        np.testing.assert_allclose(decode_tensor(answer.outputs[0]), expected, rtol=1e-5, atol=1e-5)
        await asyncio.sleep(0.5)
        assert "t-1" not in harness.answers("dev-b")  # it went to dev-c, as asked
        assert dev_c.dropped == 0  # and dev-c could open it: sealed for dev-c by dev-b

        # A burst bigger than the queue: some tasks are refused with queue_full, none goes unanswered.
        # Sent all at once, so they arrive together however fast dev-c runs each one.
        await asyncio.gather(*(harness.send("dev-c", task(i, digits.x_test[:64])) for i in range(10, 40)))
        burst = {f"t-{i}" for i in range(10, 40)}
        await harness.wait_for(lambda s, b: burst <= set(harness.answers("dev-c")), timeout=10)
        codes = [getattr(harness.answers("dev-c")[f"t-{i}"], "code", "ok") for i in range(10, 40)]
        assert "queue_full" in codes and "ok" in codes and set(codes) <= {"ok", "queue_full"}

        # A second model does not fit next to the first: the least recently used one is evicted.
        await harness.publish_model(1, [("other.tflite", tflite, lite_variant)], ["dev-c"], model_id="other")
        await harness.wait_for(lambda s, b: s == "dev-c" and isinstance(b, ModelStatus) and b.model_id == "other")
        assert dev_c.models == {"other": 1}
        assert sorted(p.name for p in (tmp_path / "c" / "models").iterdir() if p.is_dir()) == ["other"]


async def test_close_drains_queued_tasks_before_leaving(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, digits: DigitsModel, tmp_path: Path
) -> None:
    cfg = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", max_batch=1, max_wait_ms=0)
    device = Device(cfg)
    await device.__aenter__()
    await harness.publish_model(1, shards(digits), ["dev-a"])
    await harness.wait_for(lambda s, b: isinstance(b, ModelStatus) and b.state == "ready")
    for i in range(20):
        await harness.send("dev-a", task(i, digits.x_test[:32]))
    await harness.wait_for(lambda s, b: len(harness.answers("dev-a")) >= 1)  # work is under way
    await device.close()  # must answer what it took before leaving
    await harness.wait_for(lambda s, b: len(harness.answers("dev-a")) == 20)
    answers = list(harness.answers("dev-a").values())
    # Taken before the close: a result. Arriving during it: a clear refusal, never silence.
    assert all(isinstance(a, Result) or getattr(a, "code", "") == "shutting_down" for a in answers)
    assert sum(isinstance(a, Result) for a in answers) >= 10
    death = await harness.wait_for(lambda s, b: isinstance(b, Death))
    assert death.reason == "shutdown"


async def test_a_result_too_large_for_the_broker_becomes_an_error(
    secure_broker: EmbeddedBroker, pki: Pki, harness: StubCoordinator, digits: DigitsModel, tmp_path: Path
) -> None:
    from edgespeed.transport.base import Will

    cfg = agent_config(secure_broker, pki, "dev-a", tmp_path / "a")
    death = pack_message(Death(0), sender="dev-a")
    small = cfg.mqtt(Will(topics.death(FLEET, "dev-a"), death)).replace(max_packet_size=8 * 1024)
    async with Device(cfg, transport=MqttTransport(small)):
        await harness.publish_model(1, shards(digits), ["dev-a"])
        await harness.wait_for(lambda s, b: isinstance(b, ModelStatus) and b.state == "ready")
        await harness.send("dev-a", task(1, digits.x_test[:2]))  # 80 bytes of logits: fits
        await harness.send("dev-a", task(2, np.repeat(digits.x_test, 2, axis=0)))  # 23 KiB of logits: does not
        await harness.wait_for(lambda s, b: len(harness.answers("dev-a")) == 2)
        answers = harness.answers("dev-a")
        assert isinstance(answers["t-1"], Result)
        assert getattr(answers["t-2"], "code", None) == "result_too_large"
