"""Split inference: shards that are valid models, the planner, and pipelines across agents on Mosquitto."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.coordinator import Coordinator
from edgespeed.errors import ConfigError, TaskError
from edgespeed.protocol.messages import Task
from edgespeed.testing import agent_config, coordinator_config
from edgespeed.transport import EmbeddedBroker
from tests.conftest import Pki
from tests.models import DigitsModel


@pytest.mark.mosquitto
async def test_split_models_run_as_pipelines_across_agents(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    configs = [
        agent_config(secure_broker, pki, d, tmp_path / d, backends=("onnx",)) for d in ("dev-a", "dev-b", "dev-c")
    ]
    async with (
        Device(configs[0]),
        Device(configs[1]),
        Device(configs[2]),
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c,
    ):
        await c.wait_for_devices(3)
        x = digits.x_test
        for name, spec, stages in (("d2", "2", 2), ("d3", "3", 3)):
            report = await c.publish_model([digits.onnx], name=name, split=spec, sample=[x[:1]])
            assert report.ok, report
            split = c.splits()[name]
            assert len(split.shards) == stages and len(set(split.preferred)) == stages
            # Each device timed the shards itself; the plan uses those speeds.
            assert set(split.speeds) == {"dev-a", "dev-b", "dev-c"} and all(v > 0 for v in split.speeds.values())
            sent = c.stats["dispatched"]
            outputs = await c.map(name, [x[i : i + 1] for i in range(40)], concurrency=8)
            np.testing.assert_allclose(np.concatenate(outputs), digits.reference[:40], atol=1e-4)
            assert c.stats["dispatched"] - sent == 40  # the coordinator sends stage 1 only: stages forward
            assert split.report()["requests"] == 40
        whole = await c.infer("d3", x[:5])  # infer behaves the same for a split model
        np.testing.assert_allclose(whole, digits.reference[:5], atol=1e-4)
        with pytest.raises(TaskError) as late:  # deadlines hold through a pipeline too
            await c.infer("d3", x[:5], deadline=0.001)
        assert late.value.code == "deadline"

        report = await c.publish_model([digits.onnx], name="d8", split="3", codec="int8", sample=[x[:1]])
        assert report.ok
        outputs = np.concatenate(await c.map("d8", [x[i : i + 1] for i in range(len(x))], concurrency=16))
        agreement = float((outputs.argmax(axis=1) == digits.reference.argmax(axis=1)).mean())
        assert agreement >= 0.99, agreement
        assert np.abs(outputs - digits.reference).max() < 0.5  # int8 activations: close, not equal
        with pytest.raises(ConfigError, match=r"one \.onnx"):
            await c.publish_model([digits.safetensors], name="bad", split="2", architecture="digits-cnn")

        # A second real model: the demo's MLP trained on digits, split at its hidden layer.
        from edgespeed.demo import export_onnx, train_digits_mlp

        mlp = train_digits_mlp(epochs=200)
        mlp_path = export_onnx(mlp, tmp_path / "mlp.onnx")
        assert (await c.publish_model([mlp_path], name="mlp", split="2", sample=[mlp.x_test[:1]])).ok
        got = np.concatenate(await c.map("mlp", [mlp.x_test[i : i + 1] for i in range(30)], concurrency=8))
        np.testing.assert_allclose(got, mlp(mlp.x_test[:30]), rtol=1e-4, atol=1e-4)

        link = await c.measure_link()  # real transfers through this broker
        assert link.bytes_per_s > 1e6 and 0 < link.rtt_s < 1

    # A restarted coordinator knows the split models from its store.
    async with (
        Device(configs[0]),
        Device(configs[1]),
        Device(configs[2]),
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as again,
    ):
        assert again.splits()["d3"].cuts == split.cuts
        await again.wait_for_devices(3, model="d3-s3")
        np.testing.assert_allclose(await again.infer("d3", x[:3]), digits.reference[:3], atol=1e-4)


@pytest.mark.mosquitto
async def test_peers_may_only_forward_split_model_stages(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    """Any fleet member can seal a task for a device; only the coordinator may have it run whole models."""
    from edgespeed.protocol import topics
    from edgespeed.protocol.tensor import encode_tensor
    from edgespeed.security import KeyDirectory, Sealer
    from edgespeed.transport import MqttTransport
    from tests.conftest import SECURE_FLEET, mqtt_config

    keys = KeyDirectory(pki.ca.cert_file)
    keys.add_directory(pki.ca.directory)
    rogue_sealer = Sealer("dev-c", pki.devices["dev-c"].seal_key(), keys, replay=None)
    a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
    async with (
        Device(a) as dev_a,
        Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c,
        MqttTransport(mqtt_config(secure_broker.tls_url, "dev-c", tls=pki.tls("dev-c"))) as rogue,
    ):
        await c.wait_for_devices(1)
        assert (await c.publish_model([digits.onnx], name="digits")).ok
        assert (await c.publish_model([digits.onnx], name="d2", split="2", sample=[digits.x_test[:1]])).ok
        x = (encode_tensor(digits.x_test[:1]),)
        deadline = int(time.time() * 1000) + 30_000

        async def send(model: str, reply_to: str) -> None:
            task = Task(f"r-{model}-{reply_to}", 1, model, deadline, x, reply_to=reply_to)
            await rogue.publish(topics.device_inbox(SECURE_FLEET, "dev-a"), rogue_sealer.seal(task, recipient="dev-a"))

        before = dev_a.dropped
        await send("digits", "dev-c")  # a whole model, answered to the rogue: refused
        await send("digits", "coord")  # a whole model: refused
        await send("d2-s1", "coord")  # a first stage: only the coordinator starts a pipeline
        await send("d2-s2", "coord")  # the next stage of a split model: taken (its answer goes to coord)
        for _ in range(100):
            if dev_a.dropped - before >= 3:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert dev_a.dropped - before == 3
        await c.infer("d2", digits.x_test[:1])  # real pipelines still run
