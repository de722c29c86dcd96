"""Split inference: shards that are valid models, the planner, and pipelines across agents on Mosquitto."""

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgespeed.agent import AgentConfig
from edgespeed.coordinator import Coordinator
from edgespeed.testing import agent_config, agent_process, coordinator_config, wait_ready
from edgespeed.transport import EmbeddedBroker
from tests.conftest import Pki
from tests.models import DigitsModel

# Heartbeats each second: a frozen agent stays "online" (no heartbeat missed yet) for 2.5 s, time enough
# for the coordinator to give it tasks it cannot answer, however loaded the machine.
HEARTBEAT_S = 1.0


def onnx_agent(broker: EmbeddedBroker, pki: Pki, device: str, tmp_path: Path) -> AgentConfig:
    """The configuration of an agent process (`edgespeed device run`): ONNX Runtime, a 5 ms batching window."""
    return agent_config(
        broker, pki, device, tmp_path / device, backends=("onnx",), max_wait_ms=5, heartbeat_s=HEARTBEAT_S
    )


async def freeze_holding_tasks(c: Coordinator, proc: Any, device: str) -> None:
    """Freeze an agent (SIGSTOP) once it holds tasks it has not answered, then kill it (SIGKILL).

    Frozen, it answers nothing more; answers it sent before arrive within moments, and a device that
    still counts as online is given new tasks, which it cannot answer. So it surely dies holding tasks,
    however loaded the machine (killed at once, it may have answered all it held, its answers on the way).
    """
    proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(0.3)  # answers already sent arrive
    async with asyncio.timeout(30):
        while c.tasks.load(device) == 0:
            await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)


@pytest.mark.mosquitto
async def test_kill_9_of_a_middle_stage_during_a_stream(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    names = ("dev-a", "dev-b", "dev-c")
    async with contextlib.AsyncExitStack() as stack:
        procs = {
            n: await stack.enter_async_context(agent_process(onnx_agent(secure_broker, pki, n, tmp_path), cli=True))
            for n in names
        }
        async with Coordinator(
            coordinator_config(secure_broker, pki, tmp_path / "coord", max_inflight=4, heartbeat_s=HEARTBEAT_S)
        ) as c:
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
            await freeze_holding_tasks(c, procs[middle], middle)
            started = time.monotonic()
            outputs = [await h.result() for h in handles]
            for i, out in enumerate(outputs):
                np.testing.assert_allclose(out[0], digits.reference[i % len(x)][None], atol=1e-4)
            assert c.stats["redispatched"] > 0
            assert time.monotonic() - started < 30
            assert c.stats["replanned"] >= 1 and middle not in c.splits()["d3"].preferred


async def test_kill_9_of_a_device_during_a_batch_loses_no_task(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(agent_process(onnx_agent(secure_broker, pki, name, tmp_path), cli=True))
            for name in ("dev-a", "dev-b")
        ]
        async with Coordinator(
            coordinator_config(secure_broker, pki, tmp_path / "coord", max_inflight=4, heartbeat_s=HEARTBEAT_S)
        ) as c:
            report = await c.publish_model([digits.onnx], name="digits", timeout=60, settle=0)
            if not report.ok:  # the agents may not have been born when the model went out
                await wait_ready(c, "digits", 2)
            await wait_ready(c, "digits", 2)
            x = digits.x_test
            # dev-a freezes as the batch starts: still counted online (no heartbeat missed yet), it is given
            # its share of tasks and answers none of them; dev-b works on. Then, mid-batch, it is killed
            # holding them, whatever the machine's load.
            procs[0].send_signal(signal.SIGSTOP)
            handles = [await c.submit("digits", x[i % len(x)][None], deadline=60) for i in range(300)]
            async with asyncio.timeout(60):
                while c.tasks.load("dev-a") == 0 or (await c.counts())["done"] < 30:
                    await asyncio.sleep(0.01)
            procs[0].send_signal(signal.SIGKILL)
            outputs = [await h.result() for h in handles]
            for i, out in enumerate(outputs):
                np.testing.assert_allclose(out[0], digits.reference[i % len(x)][None], atol=1e-4)
            assert c.stats["redispatched"] > 0  # dev-a held tasks when it died; they went to dev-b
            assert c.registry.get("dev-a").status.value == "lost"  # type: ignore[union-attr]
            assert (await c.counts())["done"] == 300
