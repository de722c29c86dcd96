"""The fleet harness (`edgespeed.testing`) end to end: fleets that run a real task, and that clean up."""

import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.errors import ConfigError, EdgeSpeedError
from edgespeed.testing import FleetProcess, affine_onnx, fleet, start_process, wait_ready
from tests.conftest import _need_mosquitto

pytestmark = pytest.mark.mosquitto


@pytest.fixture(autouse=True)
def _runtimes() -> None:
    _need_mosquitto()
    pytest.importorskip("onnx", reason="onnx is needed: pip install 'edgespeed[onnx]'")
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed: pip install 'edgespeed[onnx]'")


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "processes"])
async def test_a_two_agent_fleet_runs_a_real_task(in_process: bool, tmp_path: Path) -> None:
    async with fleet(devices=2, in_process=in_process, folder=tmp_path) as f:
        assert f.url.startswith("mqtts://") and f.device_ids == ("dev-1", "dev-2")
        started = dict(f.devices if in_process else f.processes)
        assert sorted(started) == ["dev-1", "dev-2"]
        assert all(isinstance(a, Device if in_process else FleetProcess) for a in started.values())
        model = affine_onnx(tmp_path / "affine.onnx", scale=2.0, bias=1.0)
        async with f.coordinator() as c:
            await f.wait_devices(c, timeout=60)
            report = await c.publish_model([model], name="affine", timeout=60)
            assert report.ok and report.ready == {"dev-1": "onnx", "dev-2": "onnx"}, report
            await wait_ready(c, "affine", 2)
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            np.testing.assert_allclose(await c.infer("affine", x, deadline=30), x * 2 + 1)
    assert not f.broker.running and not f.devices and not f.processes
    if not in_process:
        assert all(p.returncode is not None for p in started.values())  # reaped
        assert (tmp_path / "logs" / "dev-1.log").is_file() and (tmp_path / "dev-1.toml").is_file()


async def test_everything_started_is_stopped_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the body failed"):
        async with fleet(devices=2, in_process=False, folder=tmp_path, production=False) as f:
            agents = list(f.processes.values())
            sleeper = f.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
            with pytest.raises(ConfigError, match="already running: dev-1"):
                async with f.agents(["dev-1"], in_process=True):
                    pass
            assert f.processes["dev-1"].alive  # a refused start stops nothing
            raise RuntimeError("the body failed")
    assert not f.broker.running and not f.processes
    assert all(p.returncode is not None for p in [*agents, sleeper])


async def test_processes_are_checked_waited_for_and_reaped(tmp_path: Path) -> None:
    script = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready'); time.sleep(600)"
    stubborn = start_process("stubborn", [sys.executable, "-c", script], tmp_path / "stubborn.log", grace=0.5)
    async with stubborn:
        await stubborn.wait_for_output("ready", timeout=30)
        stubborn.check()  # still running
    assert stubborn.returncode == -signal.SIGKILL  # SIGTERM ignored: killed after the grace period

    failing = start_process("failing", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "f.log")
    with failing, pytest.raises(EdgeSpeedError, match=r"failing exited with status 3(.|\n)*boom"):
        await failing.wait_for_output("never printed", timeout=30)

    quiet = start_process("quiet", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "q.log")
    with quiet, pytest.raises(TimeoutError):
        await quiet.wait_for_output("ready", timeout=0.5)
    assert quiet.returncode == -signal.SIGTERM
