"""Variants of one model at several precisions, on a real fleet (Mosquitto, production config): one publish
of an fp32 and an int8 variant; the agent that prefers int8 runs int8, the one that prefers fp32 runs fp32,
and both answer correctly."""

from pathlib import Path

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.coordinator import Coordinator
from edgespeed.testing import agent_config, coordinator_config, wait_ready
from edgespeed.transport import EmbeddedBroker
from tests.conftest import Pki
from tests.models import DigitsModel

pytestmark = pytest.mark.mosquitto


async def test_one_publish_of_two_precisions_each_device_runs_its_own(
    secure_broker: EmbeddedBroker, pki: Pki, digits: DigitsModel, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime.quantization")
    from edgespeed.optimize import make_variants

    # What `model publish digits.onnx --optimize int8 --calibration cal.npz` does before publishing.
    variants = make_variants(digits.onnx, ["int8"], tmp_path / "variants", calibration={"x": digits.x_test[:128]})
    files = [path for path, _, _ in variants]
    assert [p for _, p, _ in variants] == ["fp32", "int8"]

    a = agent_config(secure_broker, pki, "dev-a", tmp_path / "a", backends=("onnx",), precisions=("int8", "fp32"))
    b = agent_config(secure_broker, pki, "dev-b", tmp_path / "b", backends=("onnx",), precisions=("fp32", "int8"))
    async with Device(a), Device(b), Coordinator(coordinator_config(secure_broker, pki, tmp_path / "coord")) as c:
        report = await c.publish_model(files, name="digits", timeout=60)
        assert report.ok, report
        assert report.ready == {"dev-a": "onnx:int8", "dev-b": "onnx:fp32"}  # what `status` shows per device
        manifest = c.models()["digits"]
        assert [v["precision"] for v in manifest.variants] == ["fp32", "int8"]
        assert c.ledger.rollouts("digits", 1) == {"dev-a": ("ready", "onnx:int8"), "dev-b": ("ready", "onnx:fp32")}
        await wait_ready(c, "digits", 2)

        x, labels = digits.x_test, digits.y_test
        int8 = await c.infer("digits", x, device="dev-a", deadline=30)
        fp32 = await c.infer("digits", x, device="dev-b", deadline=30)
        assert isinstance(int8, np.ndarray) and isinstance(fp32, np.ndarray)
        np.testing.assert_allclose(fp32, digits.reference, atol=1e-4)  # dev-b runs the original
        assert not np.allclose(int8, digits.reference, atol=1e-4)  # dev-a really runs the int8 variant...
        reference_accuracy = float((digits.reference.argmax(1) == labels).mean())
        assert float((int8.argmax(1) == labels).mean()) >= reference_accuracy - 0.01  # ...and answers correctly
        assert float(np.abs(int8 - digits.reference).max()) < 0.5
