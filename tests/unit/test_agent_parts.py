"""The device agent's parts, on the in-memory broker: no Mosquitto, real crypto, real ONNX models.

A small stand-in coordinator publishes signed manifests of tiny ONNX models
(y = k * x), encrypted and served in chunks by a `BlobServer`, seals tasks, and
opens what the agent sends back. Every wait is on a condition, with a generous
timeout: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgespeed.agent import AgentConfig, Device, PartFailedError
from edgespeed.agent.cache import ModelCache
from edgespeed.agent.heartbeat import Heartbeats
from edgespeed.agent.installer import PendingManifests
from edgespeed.errors import EdgeSpeedError, ReplayError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import DEFAULT_CHUNK_SIZE, BlobSource
from edgespeed.protocol.envelope import decode_header, open_message, pack_message
from edgespeed.protocol.messages import (
    CoordinatorState,
    Death,
    Error,
    MessageKind,
    ModelManifest,
    ModelStatus,
    Result,
    Task,
)
from edgespeed.protocol.tensor import decode_tensor, encode_tensor
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, encrypt_blob, sign_manifest
from edgespeed.security.blobcrypt import TAG_SIZE
from edgespeed.transfer import BlobServer
from edgespeed.transport.base import Will
from edgespeed.transport.memory import MemoryBroker, MemoryTransport
from tests.conftest import Pki

FLEET = "parts"
DEVICE = "dev-a"
WAIT_S = 120.0  # generous: a loaded 2-core machine installs 40 models slowly


@pytest.fixture(autouse=True)
def _onnx() -> None:
    pytest.importorskip("onnx", reason="onnx is needed: pip install 'edgespeed[onnx]'")
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed: pip install 'edgespeed[onnx]'")


def tiny_onnx(scale: float, width: int = 4) -> bytes:
    """A real ONNX model, y = scale * x, for inputs of shape (n, width)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "tiny", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return bytes(model.SerializeToString())


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Wait until ``predicate()`` holds; TimeoutError saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


class Coordinator:
    """Stands in for the coordinator on a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, pki: Pki) -> None:
        self.pki = pki
        self.broker = broker
        keys = KeyDirectory(pki.ca.cert_file)
        keys.add_directory(pki.ca.directory)
        self.sealer = Sealer("coord", pki.devices["coord"].seal_key(), keys, replay=ReplayGuard())
        self.main = MemoryTransport(broker, "coord")
        self._blobs = MemoryTransport(broker, "coord-blobs")
        self.server = BlobServer(self._blobs, fleet=FLEET, server_id="coord")
        self.received: list[tuple[str, object]] = []
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Coordinator:
        await self.main.__aenter__()
        await self._blobs.__aenter__()
        await self.main.subscribe(topics.coordinator_inbox_filter(FLEET), topics.device_filter(FLEET, "death"))
        await self.main.publish(
            topics.coordinator_state(FLEET), pack_message(CoordinatorState(True, 1), sender="coord"), retain=True
        )
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self.server.run())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.main.close()
        await self._blobs.close()

    async def _read(self) -> None:
        async for message in self.main.messages():
            name = topics.parse_topic(message.topic)
            try:
                header, _ = decode_header(message.payload)
                if header.kind is MessageKind.CHUNK_REQUEST:
                    continue  # the blob server's
                if name.kind is topics.TopicKind.COORDINATOR_INBOX:
                    _, body = self.sealer.open(message.payload, topic_sender=name.id)
                else:
                    _, body = open_message(message.payload)
            except ReplayError:
                continue
            except EdgeSpeedError as exc:
                body = exc
            self.received.append((name.id or "", body))
            self._arrived.set()

    async def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        """The first truthy ``predicate()``, re-checked as messages arrive."""
        deadline = time.monotonic() + timeout
        while not (found := predicate()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [type(b).__name__ for _, b in self.received[-12:]]
                raise TimeoutError(f"{what}: not within {timeout}s; last received {kinds}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass
        return found

    def statuses(self, state: str) -> dict[str, int]:
        return {b.model_id: b.version for _, b in self.received if isinstance(b, ModelStatus) and b.state == state}

    def answers(self) -> dict[str, Result | Error]:
        out: dict[str, Result | Error] = {}
        for _, body in self.received:
            if isinstance(body, Result | Error) and body.task_id:
                out.setdefault(body.task_id, body)
        return out

    async def publish_model(self, model_id: str, version: int, data: bytes, devices: list[str]) -> None:
        """Publish a signed manifest of one encrypted ONNX shard, served by the blob server."""
        name = f"{model_id}-{version}.onnx"
        ciphertext, key = encrypt_blob(data, blob_id=name, chunk_size=DEFAULT_CHUNK_SIZE)
        info = self.server.add(BlobSource(name, ciphertext, chunk_size=DEFAULT_CHUNK_SIZE + TAG_SIZE))
        manifest = sign_manifest(
            ModelManifest(
                model_id,
                version,
                "onnx",
                (info,),
                variants=({"shard": name, "format": "onnx"},),
                keys=self.sealer.wrap_key(key, devices, context=f"{model_id}/{version}"),
            ),
            signer="coord",
            key=self.pki.devices["coord"].sign_key(),
        )
        await self.main.publish(
            topics.model_manifest(FLEET, model_id), pack_message(manifest, sender="coord"), retain=True
        )

    async def send(self, task: Task, device: str = DEVICE) -> None:
        await self.main.publish(topics.device_inbox(FLEET, device), self.sealer.seal(task, recipient=device))


def agent_config(pki: Pki, state: Path, **kw: Any) -> AgentConfig:
    return AgentConfig(
        device_id=DEVICE,
        fleet=FLEET,
        broker="mqtt://127.0.0.1:1883",  # not dialled: the agent gets a memory transport
        pki_dir=pki.ca.directory,
        state_dir=state,
        backends=("onnx",),
        threads=1,
        **kw,
    )


def memory_agent(broker: MemoryBroker, config: AgentConfig) -> Device:
    will = Will(topics.death(FLEET, config.device_id), pack_message(Death(0), sender=config.device_id))
    return Device(config, transport=MemoryTransport(broker, config.device_id, will=will))


def task(task_id: str, model_id: str, x: np.ndarray[Any, Any]) -> Task:
    return Task(task_id, 0, model_id, time.time_ns() // 1_000_000 + 120_000, (encode_tensor(x),))


@pytest.fixture
async def coordinator(pki: Pki) -> AsyncIterator[Coordinator]:
    async with Coordinator(MemoryBroker(), pki) as coord:
        yield coord


# -- installing --------------------------------------------------------------


async def test_an_agent_restarts_with_40_cached_models_and_loads_them_all(
    coordinator: Coordinator, pki: Pki, tmp_path: Path
) -> None:
    # Before: manifests waited in a queue of 16: the dispatcher dropped the retained ones beyond it,
    # and an agent restarting with more than 16 models cached died of QueueFull.
    names = [f"m{i:02d}" for i in range(40)]
    for i, name in enumerate(names):
        await coordinator.publish_model(name, 1, tiny_onnx(float(i + 1)), [DEVICE])
    config = agent_config(pki, tmp_path / "state")
    async with memory_agent(coordinator.broker, config) as first:
        await coordinator.wait_for(lambda: len(coordinator.statuses("ready")) == 40, "40 models ready")
        assert first.models == dict.fromkeys(names, 1)
    assert coordinator.server.served >= 40

    # A broker with nothing retained and nobody serving chunks: the models can only come from the cache.
    async with Coordinator(MemoryBroker(), pki) as empty, memory_agent(empty.broker, config) as again:
        await until(lambda: len(again.models) == 40, "40 cached models reloaded")
        assert again.models == dict.fromkeys(names, 1)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        await empty.send(task("after-restart", "m07", x))
        result = await empty.wait_for(lambda: empty.answers().get("after-restart"), "an answer from m07")
        assert isinstance(result, Result), result
        np.testing.assert_allclose(decode_tensor(result.outputs[0]), 8 * x)
        assert empty.server.served == 0


async def test_a_burst_of_manifests_larger_than_the_old_queue_is_installed_completely(
    coordinator: Coordinator, pki: Pki, tmp_path: Path
) -> None:
    # Before: the dispatcher put manifests in a queue of 16 and dropped the rest of a burst.
    async with memory_agent(coordinator.broker, agent_config(pki, tmp_path / "state")) as device:
        await device.wait_coordinator(WAIT_S)  # the dispatcher is reading
        burst = [coordinator.publish_model(f"b{i:02d}", 1, tiny_onnx(1.0 + i), [DEVICE]) for i in range(30)]
        burst.append(coordinator.publish_model("b00", 2, tiny_onnx(-1.0), [DEVICE]))  # replaces a pending v1
        await asyncio.gather(*burst)
        expected = {f"b{i:02d}": 1 for i in range(30)} | {"b00": 2}
        await until(lambda: device.models == expected, "30 models of a burst installed")
        assert not coordinator.statuses("failed")
        x = np.ones((1, 4), np.float32)
        await coordinator.send(task("newest", "b00", x))
        result = await coordinator.wait_for(lambda: coordinator.answers().get("newest"), "an answer from b00")
        assert isinstance(result, Result), result
        np.testing.assert_allclose(decode_tensor(result.outputs[0]), -x)  # v2 runs


def test_pending_manifests_keep_the_newest_per_model_and_lose_none() -> None:
    async def scenario() -> list[tuple[str, int]]:
        pending = PendingManifests()
        for model_id, version in [("a", 1), ("b", 1), ("a", 3), ("a", 2), ("c", 1), ("b", 1)]:
            pending.offer(ModelManifest(model_id, version, "onnx", ()))
        assert len(pending) == 3  # bounded by the models, however many manifests came
        return [(m.model_id, m.version) for m in [await pending.take() for _ in range(3)]]

    # In arrival order of the models; an older version never replaces a newer one waiting.
    assert asyncio.run(scenario()) == [("a", 3), ("b", 1), ("c", 1)]


# -- running -----------------------------------------------------------------


async def test_the_runner_micro_batches_compatible_tasks_and_answers_each(
    coordinator: Coordinator, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgespeed.engine.onnx import OnnxBackend

    # A long max_wait makes the batches deterministic: each ends when full or when a task of another
    # model comes, never on a timer.
    config = agent_config(pki, tmp_path / "state", max_batch=4, max_wait_ms=10_000, concurrency=1)
    async with memory_agent(coordinator.broker, config) as device:
        await coordinator.publish_model("m", 1, tiny_onnx(3.0, width=4), [DEVICE])
        await coordinator.publish_model("n", 1, tiny_onnx(5.0, width=6), [DEVICE])
        await until(lambda: device.models == {"m": 1, "n": 1}, "two models loaded")

        runs: list[tuple[int, ...]] = []
        run = OnnxBackend.run

        def counted(self: OnnxBackend, inputs: Any) -> Any:
            runs.append(tuple(inputs[0].shape))
            return run(self, inputs)

        monkeypatch.setattr(OnnxBackend, "run", counted)
        plan = [("m", 1), ("m", 2), ("m", 3), ("m", 1), ("n", 2), ("m", 3), ("m", 1), ("m", 2), ("m", 2)]
        inputs = {}
        for i, (model_id, rows) in enumerate(plan):
            width = 4 if model_id == "m" else 6
            inputs[f"t{i}"] = (model_id, np.random.default_rng(i).normal(size=(rows, width)).astype(np.float32))
        for task_id, (model_id, x) in inputs.items():
            await coordinator.send(task(task_id, model_id, x))
        await coordinator.wait_for(lambda: len(coordinator.answers()) == len(plan), "every task answered")

        # Four tasks of m in one run, n alone (it broke the batch), then four of m again.
        assert runs == [(7, 4), (2, 6), (8, 4)]
        answers = coordinator.answers()
        for task_id, (model_id, x) in inputs.items():
            result = answers[task_id]
            assert isinstance(result, Result), result
            np.testing.assert_allclose(decode_tensor(result.outputs[0]), x * (3.0 if model_id == "m" else 5.0))


# -- supervision ---------------------------------------------------------------


async def test_an_installer_that_crashes_takes_the_agent_down_loudly(
    coordinator: Coordinator,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: an exception outside EdgeSpeedError ended the installer's task, and nobody noticed.
    def disk_full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelCache, "record", disk_full)
    device = memory_agent(coordinator.broker, agent_config(pki, tmp_path / "state"))
    with caplog.at_level(logging.CRITICAL, logger="edgespeed.agent"), pytest.raises(PartFailedError) as failed:
        async with device:
            await coordinator.publish_model("m", 1, tiny_onnx(2.0), [DEVICE])
            await asyncio.wait_for(device.run_until_closed(), WAIT_S)
    assert failed.value.part == "install" and device.failure is failed.value
    assert isinstance(failed.value.__cause__, OSError)
    assert "No space left on device" in str(failed.value)
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical and critical[0].exc_info is not None and "install" in critical[0].getMessage()
    death = await coordinator.wait_for(
        lambda: next((b for s, b in coordinator.received if s == DEVICE and isinstance(b, Death)), None),
        "the agent's goodbye",
    )
    assert death.reason == "failed"


async def test_a_dispatcher_whose_connection_closes_under_it_takes_the_agent_down(
    coordinator: Coordinator, pki: Pki, tmp_path: Path
) -> None:
    async with memory_agent(coordinator.broker, agent_config(pki, tmp_path / "state")) as device:
        intruder = MemoryTransport(coordinator.broker, DEVICE)  # MQTT: the same client id takes over
        async with intruder:
            with pytest.raises(PartFailedError) as failed:
                await asyncio.wait_for(device.run_until_closed(), WAIT_S)
        assert failed.value.part == "dispatch"
    # Raised once, by run_until_closed: leaving the async with does not raise it again.


def agent_with_a_deadline(config: AgentConfig) -> Device:
    """An agent on a broker of its own, and SIGTERM (the daemon's stop signal) after WAIT_S: an agent
    whose failure goes unnoticed then leaves with status 0, and the test fails instead of hanging."""
    asyncio.get_running_loop().call_later(WAIT_S, os.kill, os.getpid(), signal.SIGTERM)
    return memory_agent(MemoryBroker(), config)


def test_the_agent_daemon_exits_1_with_a_clear_message_when_a_part_fails(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgespeed.agent import __main__ as daemon

    async def broken(self: Heartbeats) -> None:
        raise RuntimeError("heartbeat broke")

    monkeypatch.setattr(Heartbeats, "run", broken)
    monkeypatch.setattr(daemon, "Device", agent_with_a_deadline)
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\nbroker = "mqtt://127.0.0.1:1883"\n'
        f'pki_dir = "{pki.ca.directory}"\nstate_dir = "{tmp_path / "state"}"\nbackends = ["onnx"]\n'
    )
    assert daemon.main(["--config", str(toml)]) == 1
    err = capsys.readouterr().err
    assert "error: the agent stopped: its heartbeat part failed (RuntimeError: heartbeat broke)" in err


def test_edgespeed_device_run_exits_1_when_a_part_fails(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from edgespeed.cli import device as cli

    async def broken(self: Heartbeats) -> None:
        raise RuntimeError("heartbeat broke")

    monkeypatch.setattr(Heartbeats, "run", broken)
    monkeypatch.setattr(cli, "Device", agent_with_a_deadline)
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\nbroker = "mqtt://127.0.0.1:1883"\n'
        f'pki_dir = "{pki.ca.directory}"\nstate_dir = "{tmp_path / "state"}"\nbackends = ["onnx"]\n'
    )
    result = CliRunner().invoke(cli.app, ["run", "--config", str(toml)])
    assert result.exit_code == 1, result.output
    assert "heartbeat part failed" in result.output


# -- hostile inputs and failed downloads ----------------------------------------


async def test_an_input_that_would_inflate_far_past_its_size_is_refused_before_anything_is_allocated(
    coordinator: Coordinator, pki: Pki, tmp_path: Path
) -> None:
    """Before: an 8 KB tensor declaring 256 MiB was inflated in the agent (+257 MB of memory)."""
    from edgespeed.protocol.tensor import Compression

    async with memory_agent(coordinator.broker, agent_config(pki, tmp_path / "state")) as device:
        await coordinator.publish_model("m", 1, tiny_onnx(2.0, width=4), [DEVICE])
        await until(lambda: device.models == {"m": 1}, "the model installed")
        bomb = encode_tensor(np.zeros((16 * 1024 * 1024, 4), np.float32), compression=Compression.ZSTD)
        assert len(bomb) < 64 * 1024
        deadline = time.time_ns() // 1_000_000 + 120_000
        await coordinator.send(Task("bomb", 0, "m", deadline, (bomb,)))
        answer = await coordinator.wait_for(lambda: coordinator.answers().get("bomb"), "an answer to the bomb")
        assert isinstance(answer, Error) and answer.code == "bad_input", answer
        # An honest compressed input of the same model still runs.
        x = np.ones((64, 4), np.float32)
        await coordinator.send(Task("fine", 0, "m", deadline, (encode_tensor(x, compression=Compression.ZSTD),)))
        result = await coordinator.wait_for(lambda: coordinator.answers().get("fine"), "an answer")
        assert isinstance(result, Result), result


async def test_a_download_that_fails_is_reported_and_tried_again_until_it_succeeds(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a failed download was reported once and never tried again; the model never came."""
    from edgespeed.agent import installer

    monkeypatch.setattr(installer, "RETRY_BASE_S", 0.2)
    async with Coordinator(MemoryBroker(), pki) as coord:
        serving = coord.server
        coord.server = BlobServer(MemoryTransport(coord.broker, "nobody"), fleet=FLEET, server_id="coord")
        await coord.publish_model("late", 1, tiny_onnx(3.0), [DEVICE])  # its chunks served by nobody yet
        config = agent_config(pki, tmp_path / "state", fetch_timeout=1.0)
        async with memory_agent(coord.broker, config) as device:
            await coord.wait_for(lambda: coord.statuses("failed").get("late"), "the failed download reported")
            for source in coord.server._sources.values():
                serving.add(source)  # the server has the blob now
            await until(lambda: device.models == {"late": 1}, "the model installed on a later attempt")
            await coord.wait_for(lambda: coord.statuses("ready").get("late"), "ready reported")
