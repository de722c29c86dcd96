"""Split inference: shards that are valid models, the planner, and pipelines across agents on Mosquitto."""

import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgespeed.agent import Device
from edgespeed.coordinator import Coordinator
from edgespeed.errors import ConfigError, TaskError
from edgespeed.optimize import Link, boundaries, plan, profile_onnx, split_onnx, split_torch
from edgespeed.optimize.split import Segment
from edgespeed.protocol.messages import Hop, Task
from edgespeed.protocol.tensor import decode_tensor, encode_with_codec
from edgespeed.transport import EmbeddedBroker
from tests.conftest import Pki
from tests.models import DigitsModel
from tests.test_agent import agent_config
from tests.test_coordinator import agent_process, agent_toml, coord_config


def run_chain(shards: list[bytes], x: np.ndarray) -> np.ndarray:
    for shard in shards:
        session = ort.InferenceSession(shard, providers=["CPUExecutionProvider"])
        x = session.run(None, {session.get_inputs()[0].name: x})[0]
    return x


def test_onnx_shards_are_valid_models_that_chain_to_the_whole(digits: DigitsModel) -> None:
    cuts = [b.tensor for b in boundaries(digits.onnx)]
    assert len(cuts) >= 4  # conv, relu, conv, relu, pool, flatten, linear, relu: a chain
    for chosen in ([cuts[1]], [cuts[1], cuts[4]], cuts):  # 2, 3 and every stage
        shards = split_onnx(digits.onnx, chosen)
        assert len(shards) == len(chosen) + 1
        out = run_chain([s.SerializeToString() for s in shards], digits.x_test[:16])
        np.testing.assert_allclose(out, digits.reference[:16], atol=1e-4)
    with pytest.raises(ConfigError, match="cannot cut"):
        split_onnx(digits.onnx, ["not-a-tensor"])
    with pytest.raises(ConfigError, match="order"):
        split_onnx(digits.onnx, [cuts[3], cuts[1]])


def test_a_torch_model_split_with_fx_chains_to_the_whole(digits: DigitsModel) -> None:
    import torch
    from safetensors.torch import load_file

    from edgespeed.engine.zoo import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(load_file(str(digits.safetensors)))
    model.eval()
    for parts in (2, 3):
        shards = split_torch(model, torch.from_numpy(digits.x_test[:2]), parts)
        assert len(shards) == parts
        np.testing.assert_allclose(run_chain(shards, digits.x_test[:16]), digits.reference[:16], atol=1e-4)


def test_profiling_measures_every_segment(digits: DigitsModel) -> None:
    segments = profile_onnx(digits.onnx, [digits.x_test[:1]])
    assert len(segments) == len(boundaries(digits.onnx)) + 1
    assert all(s.seconds > 0 for s in segments)
    assert segments[-1].out_bytes == 10 * 4  # one row of logits


def test_the_planner_splits_only_when_it_pays() -> None:
    heavy = [Segment("", "a", 0.010, 4000), Segment("a", "b", 0.010, 4000), Segment("b", "", 0.010, 40)]
    two = {"gw-1": 1.0, "gw-2": 1.0}
    fast = plan(heavy, two, Link(bytes_per_s=125e6, rtt_s=0.001), objective="throughput", input_bytes=256)
    assert len(fast.stages) == 2 and fast.throughput > 1 / 0.030  # a pipeline beats one device
    slow_link = Link(bytes_per_s=1e3, rtt_s=0.05)  # 8 kbit/s: moving 4 KB costs 4 s
    assert len(plan(heavy, two, slow_link, objective="throughput", input_bytes=256).stages) == 1
    assert len(plan(heavy, two, Link(), objective="latency", input_bytes=256).stages) == 1  # transfers only add
    strong = plan(heavy, {"weak": 3.0, "strong": 1.0}, slow_link, objective="latency", input_bytes=256)
    assert strong.devices == ["strong"]  # all on the strongest node
    assert "predicted" in strong.describe()


def test_a_route_travels_in_the_task_and_codecs_are_lossy_only_for_floats() -> None:
    from edgespeed.protocol._body import decode_body, encode_body

    task = Task("t-1", 1, "m-s1", 0, (b"x",), reply_to="coord", route=(Hop("gw-2", "m-s2", "int8+zstd"),))
    assert decode_body(Task, encode_body(task)) == task
    assert b"route" not in encode_body(Task("t-1", 1, "m", 0, ()))  # omitted when empty: old peers unaffected
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16)
    assert np.abs(decode_tensor(encode_with_codec(x, "int8c+lz4")) - x).max() < 0.01
    labels = np.arange(5, dtype=np.int64)
    np.testing.assert_array_equal(decode_tensor(encode_with_codec(labels, "int8")), labels)


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
        Coordinator(coord_config(secure_broker, pki, tmp_path / "coord")) as c,
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
        Coordinator(coord_config(secure_broker, pki, tmp_path / "coord")) as again,
    ):
        assert again.splits()["d3"].cuts == split.cuts
        await again.wait_for_devices(3, model="d3-s3")
        np.testing.assert_allclose(await again.infer("d3", x[:3]), digits.reference[:3], atol=1e-4)


@pytest.mark.mosquitto
async def test_kill_9_of_a_middle_stage_during_a_stream(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    names = ("dev-a", "dev-b", "dev-c")
    procs = {n: agent_process(agent_toml(secure_broker, pki, n, tmp_path / n, '"onnx"')) for n in names}
    try:
        async with Coordinator(coord_config(secure_broker, pki, tmp_path / "coord", max_inflight=4)) as c:
            await c.wait_for_devices(3, timeout=60)
            # Two stages across agent processes first, then three, one of which is killed mid-stream.
            assert (await c.publish_model([digits.onnx], name="d2", split="2", sample=[digits.x_test[:1]])).ok
            two = await c.map("d2", [digits.x_test[i : i + 1] for i in range(20)], concurrency=4)
            np.testing.assert_allclose(np.concatenate(two), digits.reference[:20], atol=1e-4)
            report = await c.publish_model([digits.onnx], name="d3", split="3", sample=[digits.x_test[:1]])
            assert report.ok, report
            middle = c.splits()["d3"].preferred[1]
            x = digits.x_test
            handles = [await c.submit("d3", x[i % len(x)][None], deadline=60) for i in range(200)]
            while (await c.counts())["done"] < 20:
                await asyncio.sleep(0.01)
            procs[middle].send_signal(signal.SIGKILL)
            started = time.monotonic()
            outputs = [await h.result() for h in handles]
            for i, out in enumerate(outputs):
                np.testing.assert_allclose(out[0], digits.reference[i % len(x)][None], atol=1e-4)
            assert c.stats["redispatched"] > 0
            assert time.monotonic() - started < 30
            assert c.stats["replanned"] >= 1 and middle not in c.splits()["d3"].preferred
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_n_stages_are_cut_where_the_slowest_stage_is_fastest() -> None:
    from edgespeed.coordinator.splits import choose_cuts

    # A cheap first layer, six equal heavy ones, a cheap head: 2 stages cut after the third heavy one.
    times = [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.05]
    segments = [Segment(f"t{i - 1}" if i else "", f"t{i}" if i < 7 else "", t, 100) for i, t in enumerate(times)]
    cuts, chosen = choose_cuts(
        segments, "2", ["gw-1", "gw-2"], link=Link(), objective="throughput", codec="", input_bytes=1
    )
    assert cuts == ["t3"] and len(chosen.stages) == 2
    cuts, _ = choose_cuts(
        segments, "t1,t5", ["gw-1", "gw-2"], link=Link(), objective="latency", codec="", input_bytes=1
    )
    assert cuts == ["t1", "t5"]
    with pytest.raises(ConfigError, match="cannot cut"):
        choose_cuts(segments, "t9", ["gw-1"], link=Link(), objective="latency", codec="", input_bytes=1)
    with pytest.raises(ConfigError, match="codec"):
        choose_cuts(segments, "2", ["gw-1"], link=Link(), objective="latency", codec="gzip", input_bytes=1)


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
        Coordinator(coord_config(secure_broker, pki, tmp_path / "coord")) as c,
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
