"""The task table and the scheduler, with no broker: coordinators on the in-memory transport, a SQLite
ledger in a temporary folder, real (tiny) ONNX models published for real, devices played by raw clients
that announce themselves, report models ready under their own seal and read their inbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from edgespeed._compat import timeout
from edgespeed.coordinator import Coordinator, CoordinatorConfig, SqliteLedger, TaskState
from edgespeed.coordinator.ledger import TaskRecord
from edgespeed.coordinator.splits import SplitModel
from edgespeed.coordinator.tasks import TaskTable
from edgespeed.errors import TaskError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import Birth, DeviceCard, Heartbeat, ModelStatus, Task
from edgespeed.security import KeyDirectory, Sealer
from edgespeed.transport.memory import MemoryBroker, MemoryTransport
from tests.conftest import Pki

FLEET = "unit"


def config(pki: Pki, state: Path) -> CoordinatorConfig:
    # A long heartbeat interval: nothing here may end a task for want of a device while the test runs.
    return CoordinatorConfig(
        fleet=FLEET,
        broker="mqtt://127.0.0.1:1",  # unused: the coordinator runs on the in-memory transport
        pki_dir=pki.ca.directory,
        state_dir=state,
        heartbeat_s=60.0,
        deadline_s=60.0,
    )


@asynccontextmanager
async def coordinator(
    broker: MemoryBroker, pki: Pki, state: Path, client_id: str = "coord"
) -> AsyncIterator[Coordinator]:
    ledger = SqliteLedger(state / "ledger.db")
    try:
        async with Coordinator(
            config(pki, state), client_id=client_id, ledger=ledger, transport=MemoryTransport(broker, client_id)
        ) as c:
            yield c
    finally:
        ledger.close()


class FakeDevice:
    """A device as the coordinator sees it: a birth, heartbeats listing its models, sealed tasks in its inbox."""

    def __init__(self, broker: MemoryBroker, pki: Pki, name: str, models: tuple[str, ...]) -> None:
        self.name = name
        self.models = models
        self.transport = MemoryTransport(broker, name)
        keys = KeyDirectory(pki.ca.cert_file)
        keys.add_directory(pki.ca.directory)
        self.sealer = Sealer(name, pki.devices[name].seal_key(), keys, replay=None)
        self.tasks: asyncio.Queue[Task] = asyncio.Queue(100)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeDevice:
        t = self.transport
        await t.__aenter__()
        await t.subscribe(topics.device_inbox(FLEET, self.name))
        card = DeviceCard(self.name, "x86_64", "linux", "0.1.0", 2, 1 << 30, ("onnx",), ("cpu",))
        await t.publish(topics.birth(FLEET, self.name), pack_message(Birth(card, 1), sender=self.name), retain=True)
        await self.beat()
        self._reader = asyncio.create_task(self._read())
        return self

    async def ready(self, model: str, version: int = 1) -> None:
        """Report a model installed, sealed for the coordinator (as the agent does)."""
        status = ModelStatus(model, version, "ready", backend="onnx")
        await self.transport.publish(
            topics.coordinator_inbox(FLEET, self.name), self.sealer.seal(status, recipient="coord")
        )

    async def beat(self) -> None:
        beat = Heartbeat(1, load=0.0, queue_depth=0, models=self.models)
        await self.transport.publish(topics.heartbeat(FLEET, self.name), pack_message(beat, sender=self.name))

    async def _read(self) -> None:
        async for message in self.transport.messages():
            _, body = self.sealer.open(message.payload)
            if isinstance(body, Task):
                self.tasks.put_nowait(body)

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.transport.close()


def tiny_onnx(path: Path) -> Path:
    """A real one-node ONNX model: y = x + 1 over float32[N, 4]."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


async def publish(c: Coordinator, tmp_path: Path, *names: str) -> None:
    for name in names:
        report = await c.publish_model([tiny_onnx(tmp_path / "tiny.onnx")], name=name, wait=False, settle=0)
        assert report.version == 1


async def until(condition: Callable[[], bool]) -> None:
    async with timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def online(c: Coordinator, *names: str) -> None:
    async with timeout(10):
        while not set(names) <= {d.device_id for d in c.registry.online()}:
            await asyncio.sleep(0.01)


def test_a_task_settles_exactly_once() -> None:
    async def body() -> None:
        table = TaskTable()
        waiter = table.waiter("t-1")
        table.hold("t-1", "dev-a", "dev-b")
        assert table.load("dev-a") == table.load("dev-b") == 1
        table.fail("t-1", "deadline", "no result by the deadline")
        table.finish("t-1", (b"late",))  # a late answer changes nothing
        with pytest.raises(TaskError) as caught:
            await waiter
        assert caught.value.code == "deadline"
        assert table.load("dev-a") == table.load("dev-b") == 0 and "t-1" not in table
        # The ledger's word settles a waiter too, and only for a task that has ended.
        waiter = table.waiter("t-2")
        pending = TaskRecord("t-2", "m", (), 0, TaskState.PENDING, 0, None, 0, None, None, None, 0)
        assert not table.settle(pending) and not waiter.done()
        assert table.settle(TaskRecord("t-2", "m", (), 0, TaskState.DONE, 1, "dev-a", 0, (b"x",), None, None, 0))
        assert await waiter == (b"x",)

    asyncio.run(body())


async def test_a_task_failed_by_a_peer_settles_the_local_waiter_at_once(pki: Pki, tmp_path: Path) -> None:
    broker = MemoryBroker()
    async with coordinator(broker, pki, tmp_path, client_id="coord-cli-1") as c:
        handle = await c.submit("digits", np.zeros((1, 4), np.float32), deadline=60)
        peer = SqliteLedger(tmp_path / "ledger.db")  # another process sharing the ledger ends it
        try:
            assert peer.abort(handle.task_id, "cancelled", "cancelled by an operator")
        finally:
            peer.close()
        started = time.monotonic()
        with pytest.raises(TaskError) as caught:
            await handle.result(timeout=10)
        assert caught.value.code == "cancelled"
        assert time.monotonic() - started < 5  # long before the task's own deadline


async def test_a_split_published_by_another_process_is_placed_not_aborted(pki: Pki, tmp_path: Path) -> None:
    broker = MemoryBroker()
    async with (
        coordinator(broker, pki, tmp_path) as c,
        FakeDevice(broker, pki, "dev-a", ("d2-s1",)) as a,
        FakeDevice(broker, pki, "dev-b", ("d2-s2",)) as b,
    ):
        await online(c, "dev-a", "dev-b")
        await publish(c, tmp_path, "d2-s1", "d2-s2")
        await a.ready("d2-s1")
        await b.ready("d2-s2")
        await until(lambda: c.devices_for("d2-s1") == ["dev-a"] and c.devices_for("d2-s2") == ["dev-b"])
        # Another process (a CLI beside `coordinator run`) publishes a 2-stage split: it is in the ledger.
        split = SplitModel("d2", 1, ["d2-s1", "d2-s2"], ["h"], "fp16", ["dev-a", "dev-b"], 0.01, "latency")
        peer = SqliteLedger(tmp_path / "ledger.db")
        try:
            peer.put_split(split.name, split.version, split.to_json())
        finally:
            peer.close()
        handle = await c.submit("d2", np.zeros((1, 4), np.float32))
        async with timeout(10):
            task = await a.tasks.get()
        assert (task.task_id, task.model_id) == (handle.task_id, "d2-s1")
        assert [(h.device, h.model_id, h.codec) for h in task.route] == [("dev-b", "d2-s2", "fp16")]
        assert task.reply_to == "coord" and b.tasks.empty()
        record = c.ledger.get(handle.task_id)
        assert record is not None and record.state is TaskState.DISPATCHED


async def test_a_pin_survives_a_restart(pki: Pki, tmp_path: Path) -> None:
    broker = MemoryBroker()
    async with FakeDevice(broker, pki, "dev-a", ("digits",)) as a:
        async with coordinator(broker, pki, tmp_path) as c:
            await online(c, "dev-a")
            await publish(c, tmp_path, "digits")
            await a.ready("digits")
            await until(lambda: c.devices_for("digits") == ["dev-a"])
            handle = await c.submit("digits", np.zeros((1, 4), np.float32), device="dev-b", deadline=120)
            await asyncio.sleep(0.3)  # a few rounds: dev-a runs the model but the task is not for it
            assert a.tasks.empty()
        # A new coordinator on the same ledger: dev-a runs the model, but the task is still not for it.
        async with coordinator(broker, pki, tmp_path) as again:
            await a.beat()
            await until(lambda: again.devices_for("digits") == ["dev-a"])
            await asyncio.sleep(0.3)
            assert a.tasks.empty()
            async with FakeDevice(broker, pki, "dev-b", ("digits",)) as b:  # the pinned device comes online
                await online(again, "dev-b")
                await b.ready("digits")  # its key is wrapped when it joins; it installs and says so
                async with timeout(10):
                    task = await b.tasks.get()
                assert task.task_id == handle.task_id
                assert a.tasks.empty()


async def test_an_older_echo_of_a_manifest_never_drops_a_wrapped_key(pki: Pki, tmp_path: Path) -> None:
    """Each join re-signs the manifest with one more wrapped key, and the coordinator hears its own
    announces come back, not always in order. Before: an older echo arriving after a newer announce
    replaced it, and the next join was wrapped on top of the older key set (in the field, 6-16 of 102
    devices kept their keys)."""
    from edgespeed.protocol.envelope import open_message, pack_message
    from edgespeed.protocol.messages import ModelManifest

    broker = MemoryBroker()
    async with coordinator(broker, pki, tmp_path) as c, MemoryTransport(broker, "echo") as echo:
        await echo.subscribe(topics.model_manifest(FLEET, "m"))
        await publish(c, tmp_path, "m")
        async with FakeDevice(broker, pki, "dev-a", ()):
            await until(lambda: set(c.models()["m"].keys) == {"dev-a"})
            older = None
            async with timeout(10):
                async for message in echo.messages():
                    _, manifest = open_message(message.payload)
                    if isinstance(manifest, ModelManifest) and set(manifest.keys) == {"dev-a"}:
                        older = manifest
                        break
            async with FakeDevice(broker, pki, "dev-b", ()):
                await until(lambda: set(c.models()["m"].keys) == {"dev-a", "dev-b"})
                # The announce with dev-a's key alone comes back late.
                await echo.publish(topics.model_manifest(FLEET, "m"), pack_message(older, sender="coord"))
                async with FakeDevice(broker, pki, "dev-c", ()):
                    await until(lambda: "dev-c" in c.models()["m"].keys)
                    assert set(c.models()["m"].keys) == {"dev-a", "dev-b", "dev-c"}


async def test_only_the_device_that_holds_a_task_can_give_it_back(pki: Pki, tmp_path: Path) -> None:
    """Before: any member's sealed `queue_full` for a task it was never given put that task back, so a rogue
    could have tasks run again and again."""
    from edgespeed.protocol.messages import Error

    broker = MemoryBroker()
    async with (
        coordinator(broker, pki, tmp_path) as c,
        FakeDevice(broker, pki, "dev-a", ("m",)) as a,
        FakeDevice(broker, pki, "dev-b", ()) as rogue,
    ):
        await online(c, "dev-a", "dev-b")
        await publish(c, tmp_path, "m")
        await a.ready("m")
        await until(lambda: c.devices_for("m") == ["dev-a"])
        handle = await c.submit("m", np.zeros((1, 4), np.float32))
        async with timeout(10):
            task = await a.tasks.get()
        refusal = Error("queue_full", "not now", task_id=handle.task_id, attempt=task.attempt)
        await rogue.transport.publish(
            topics.coordinator_inbox(FLEET, "dev-b"), rogue.sealer.seal(refusal, recipient="coord")
        )
        await asyncio.sleep(0.5)  # several scheduling rounds
        record = c.ledger.get(handle.task_id)
        assert record is not None and record.attempt == 1 and record.device_id == "dev-a"
        assert a.tasks.empty()  # not given out again
