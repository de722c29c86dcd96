"""`edgespeed model publish`, `task submit`, `status` and `coordinator run`, as a user runs them."""

import asyncio
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.testing import agent_config, coordinator_config, write_coordinator_toml
from edgespeed.transport import EmbeddedBroker
from tests.conftest import Pki
from tests.models import DigitsModel

pytestmark = pytest.mark.mosquitto


async def edgespeed(*args: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgespeed",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "160"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def coordinator_toml(broker: EmbeddedBroker, pki: Pki, tmp_path: Path) -> Path:
    """The coordinator's TOML file for the CLI: the coordinator's defaults, heartbeats as the agents'."""
    config = coordinator_config(broker, pki, tmp_path / "coord", test_timings=False, heartbeat_s=0.3)
    return write_coordinator_toml(config, tmp_path / "coordinator.toml")


async def test_publish_submit_and_status_from_the_command_line(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    config = str(coordinator_toml(secure_broker, pki, tmp_path))
    a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
    b = agent_config(secure_broker, pki, "dev-b", tmp_path / "b", backends=("torch",))
    async with Device(a), Device(b):
        await asyncio.sleep(0.5)  # the births
        code, out = await edgespeed(
            "model", "publish", str(digits.onnx), str(digits.safetensors), "--name", "digits",
            "--architecture", "digits-cnn", "--config", config,
        )  # fmt: skip
        assert code == 0, out
        assert "digits v1" in out and "dev-a" in out and "onnx" in out and "torch" in out

        np.save(tmp_path / "x.npy", digits.x_test[:5])
        code, out = await edgespeed(
            "task", "submit", "--model", "digits", "--input", str(tmp_path / "x.npy"),
            "--output", str(tmp_path / "y.npy"), "--config", config,
        )  # fmt: skip
        assert code == 0, out
        expected = digits.reference[:5].argmax(axis=1).tolist()
        assert f"argmax per row: {expected}" in out
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), digits.reference[:5], atol=1e-4)

        code, out = await edgespeed("task", "submit", "--model", "nothing", "--input", str(tmp_path / "x.npy"),
                                    "--config", config)  # fmt: skip
        assert code == 2 and "unknown_model" in out, out
        (tmp_path / "bad.npy").write_bytes(b"not numpy")
        code, out = await edgespeed("task", "submit", "--model", "digits", "--input", str(tmp_path / "bad.npy"),
                                    "--config", config)  # fmt: skip
        assert code == 1 and "cannot read" in out and "Traceback" not in out

        code, out = await edgespeed(
            "model", "publish", str(digits.onnx), "--name", "dsplit", "--split", "2", "--targets", "dev-a",
            "--config", config,
        )  # fmt: skip
        assert code == 0 and "2 stages, cut at" in out, out
        code, out = await edgespeed(
            "task", "submit", "--model", "dsplit", "--input", str(tmp_path / "x.npy"), "--config", config
        )
        assert code == 0 and f"argmax per row: {expected}" in out, out

        code, out = await edgespeed("status", "--config", config)
        assert code == 0, out
        for text in ("dev-a", "dev-b", "online", "digits", "done 2", "failed 1", "dsplit-s1", "dsplit-s2"):
            assert text in out, (text, out)

        code, out = await edgespeed("model", "publish", str(tmp_path / "x.npy"), "--name", "x", "--config", config)
        assert code == 1 and "unknown model type" in out


async def test_coordinator_run_serves_a_model_published_beside_it(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    """The CLI publishes and leaves; a device that joins later still gets the model from `coordinator run`."""
    config = str(coordinator_toml(secure_broker, pki, tmp_path))
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgespeed", "coordinator", "run", "--config", config,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",))
        async with Device(a):
            await asyncio.sleep(0.5)
            code, out = await edgespeed("model", "publish", str(digits.onnx), "--name", "digits", "--config", config)
            assert code == 0 and "ready" in out, out
            late = agent_config(secure_broker, pki, "dev-c", tmp_path / "c", backends=("onnx",))
            async with Device(late) as dev_c:
                for _ in range(200):  # the running coordinator wraps the key for dev-c and serves the chunks
                    if dev_c.models.get("digits") == 1:
                        break
                    await asyncio.sleep(0.05)
                assert dev_c.models == {"digits": 1}
    finally:
        service.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(service.communicate(), 20)
    assert service.returncode == 0, out.decode()
    assert "coordinating fleet" in out.decode()
