"""The inference engine on a real model: every backend agrees with the trained reference."""

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgespeed.engine import ModelSpec, available_backends, backend_class, backend_names
from edgespeed.engine.onnx import OnnxBackend
from edgespeed.engine.torch import TorchBackend
from edgespeed.errors import BackendError, ConfigError, MissingDependencyError, UnsafeFileError
from edgespeed.hardware import cpu_info, detect_cuda, detect_npu, device_card
from edgespeed.pipeline import Pipeline
from tests.models import DigitsModel

DIGITS = ModelSpec(architecture="digits-cnn")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def test_onnx_and_torch_agree_with_the_reference(digits: DigitsModel) -> None:
    with (
        OnnxBackend(threads=1).load(digits.onnx) as onnx,
        TorchBackend(device="cpu").load(digits.safetensors, DIGITS) as torch_backend,
    ):
        (onnx_out,) = onnx.run([digits.x_test])
        (torch_out,) = torch_backend.run([digits.x_test])
    np.testing.assert_allclose(onnx_out, digits.reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(torch_out, digits.reference, rtol=1e-5, atol=1e-5)
    assert accuracy(onnx_out, digits.y_test) > 0.9


async def test_run_async_is_off_the_loop_and_equal(digits: DigitsModel) -> None:
    backend = OnnxBackend().load(digits.onnx)
    (out,) = await backend.run_async([digits.x_test[:8]])
    np.testing.assert_allclose(out, digits.reference[:8], rtol=1e-4, atol=1e-4)


def test_a_manifest_pipeline_around_the_model(digits: DigitsModel) -> None:
    pre = Pipeline.from_spec(
        [
            {"op": "cast", "dtype": "float32"},
            {"op": "scale", "factor": 1 / 16},
            {"op": "reshape", "shape": [-1, 1, 8, 8]},
        ]
    )
    post = Pipeline.from_spec([{"op": "softmax"}, {"op": "argmax"}])
    raw = np.rint(digits.x_test * 16).astype(np.uint8).reshape(-1, 64)  # what a camera would send
    with OnnxBackend().load(digits.onnx) as backend:
        labels = post(backend.run([pre(raw)])[0])
    assert (labels == digits.reference.argmax(axis=1)).mean() == 1.0
    assert Pipeline.from_spec(post.to_spec()) == post


def test_backend_errors_are_typed(digits: DigitsModel, tmp_path: Path) -> None:
    backend = OnnxBackend()
    with pytest.raises(BackendError) as info:
        backend.run([digits.x_test])
    assert info.value.reason == "model_missing"
    backend.load(digits.onnx)
    with pytest.raises(BackendError) as info:
        backend.run([np.zeros((1, 64), np.float32)])
    assert info.value.reason == "bad_input"
    with pytest.raises(BackendError):
        backend.run([digits.x_test, digits.x_test])
    with pytest.raises(BackendError, match="already"):
        backend.load(digits.onnx)
    with pytest.raises(UnsafeFileError):
        OnnxBackend().load(digits.onnx, ModelSpec(max_bytes=100))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    with pytest.raises(BackendError):
        OnnxBackend().load(garbage)
    torch_backend = TorchBackend(device="cpu").load(digits.safetensors, DIGITS)
    with pytest.raises(BackendError) as info:
        torch_backend.run([np.zeros((1, 64), np.float32)])
    assert info.value.reason == "bad_input"
    with pytest.raises(BackendError, match="does not fit"):
        TorchBackend(device="cpu").load(digits.safetensors, ModelSpec("mlp", {"inputs": 64, "outputs": 10}))
    with pytest.raises(ConfigError, match="unknown architecture"):
        TorchBackend(device="cpu").load(digits.safetensors, ModelSpec("resnet-9000"))
    with pytest.raises(ConfigError, match="architecture"):
        TorchBackend(device="cpu").load(digits.safetensors)


def test_onnx_external_data_must_stay_in_the_model_folder(digits: DigitsModel, tmp_path: Path) -> None:
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(digits.onnx))
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location="../../etc/passwd")
    tensor.ClearField("raw_data")
    evil = tmp_path / "evil.onnx"
    onnx.save(model, str(evil))
    with pytest.raises(UnsafeFileError) as info:
        OnnxBackend().load(evil)
    assert info.value.reason == "external_data"


def test_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"onnx", "torch", "npu", "tflite"} <= set(backend_names())
    assert {"onnx", "torch", "tflite"} <= set(available_backends())
    assert ("npu" in available_backends()) == bool(detect_npu())
    assert backend_class("onnx") is OnnxBackend
    with pytest.raises(ConfigError, match="unknown backend"):
        backend_class("quantum")
    # A third-party plugin, found through a real entry point on sys.path.
    (tmp_path / "es_plugin.py").write_text(
        textwrap.dedent("""
        from edgespeed.engine.onnx import OnnxBackend
        class EchoBackend(OnnxBackend):
            name = "echo"
        NotABackend = object
    """)
    )
    dist = tmp_path / "es_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: es-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[edgespeed.backends]\necho = es_plugin:EchoBackend\nbroken = es_plugin:NotABackend\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "echo" in backend_names()
    assert backend_class("echo").__name__ == "EchoBackend"
    with pytest.raises(BackendError, match="not an edgespeed Backend"):
        backend_class("broken")
    assert "broken" not in available_backends()


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"edgespeed\[onnx\]"):
        OnnxBackend.providers()


def test_device_card_and_detection() -> None:
    cpu = cpu_info()
    assert cpu["cores"] >= 1 and cpu["memory_bytes"] > 0
    card = device_card("gw-1", probe_accelerators=True)
    assert card.device_id == "gw-1" and "onnx" in card.backends and card.accelerators[0] == "cpu"
    assert "CPUExecutionProvider" in card.extra["onnx_providers"]
    assert card.extra["onnxruntime"].startswith("onnxruntime")
    lean = device_card("gw-1")  # no probing: nothing heavy imported
    assert "onnx_providers" not in lean.extra and lean.extra["onnxruntime"] == card.extra["onnxruntime"]
    assert card.extra["litert"] == "yes" and "tflite" in card.backends
    import torch

    assert bool(detect_cuda()) == torch.cuda.is_available()
    assert len(card.accelerators) == 1 + len(detect_cuda()) + len(detect_npu())


@pytest.mark.cuda
def test_torch_and_onnx_on_cuda(digits: DigitsModel) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    with TorchBackend(device="cuda").load(digits.safetensors, DIGITS) as backend:
        assert backend.describe()["device"].startswith("cuda")
        np.testing.assert_allclose(backend.run([digits.x_test])[0], digits.reference, rtol=1e-3, atol=1e-3)


@pytest.mark.npu
def test_npu_backend_on_ascend(digits: DigitsModel) -> None:
    if not detect_npu():
        pytest.skip("no Ascend NPU with torch_npu on this machine")
    from edgespeed.engine.npu import NpuBackend

    with NpuBackend().load(digits.safetensors, DIGITS) as backend:
        np.testing.assert_allclose(backend.run([digits.x_test])[0], digits.reference, rtol=1e-3, atol=1e-3)


def test_npu_backend_says_what_is_missing(digits: DigitsModel) -> None:
    if detect_npu():
        pytest.skip("an NPU is present; the execution test covers it")
    from edgespeed.engine.npu import NpuBackend

    with pytest.raises((MissingDependencyError, BackendError)):
        NpuBackend().load(digits.safetensors, DIGITS)


FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_tflite_agrees_with_onnx_on_the_same_weights(digits: DigitsModel, tmp_path: Path) -> None:
    """The committed TFLite model (scripts/make_tflite_fixture.py) against ONNX Runtime on the same weights."""
    pytest.importorskip("ai_edge_litert", reason="LiteRT is an optional extra: pip install 'edgespeed[tflite]'")
    import warnings

    import torch
    from safetensors.torch import load_file

    from edgespeed.engine.tflite import TfliteBackend
    from edgespeed.engine.zoo import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(load_file(str(FIXTURES / "digits-tflite.safetensors")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 1, 8, 8),),
            str(tmp_path / "same.onnx"),
            input_names=["x"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )
    nhwc = Pipeline.from_spec([{"op": "transpose", "axes": [0, 2, 3, 1]}])
    with (
        TfliteBackend(threads=1).load(FIXTURES / "digits.tflite") as tflite,
        OnnxBackend().load(tmp_path / "same.onnx") as onnx,
    ):
        (lite,) = tflite.run([nhwc(digits.x_test)])
        (ref,) = onnx.run([digits.x_test])
        (one,) = tflite.run([nhwc(digits.x_test[:1])])  # another batch size resizes the interpreter
        with pytest.raises(BackendError):
            tflite.run([digits.x_test])  # NCHW where NHWC is expected
    np.testing.assert_allclose(lite, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one, ref[:1], rtol=1e-4, atol=1e-4)
    assert accuracy(lite, digits.y_test) > 0.85


def test_every_backend_loads_from_bytes(digits: DigitsModel) -> None:
    """Decrypted models load from memory: the plaintext never touches the disk."""
    from edgespeed.engine.tflite import TfliteBackend

    with OnnxBackend().load(digits.onnx.read_bytes()) as onnx:
        np.testing.assert_allclose(onnx.run([digits.x_test])[0], digits.reference, rtol=1e-4, atol=1e-4)
    with TorchBackend(device="cpu").load(digits.safetensors.read_bytes(), DIGITS) as torch_backend:
        np.testing.assert_allclose(torch_backend.run([digits.x_test])[0], digits.reference, rtol=1e-5, atol=1e-5)
    with TfliteBackend().load((FIXTURES / "digits.tflite").read_bytes()) as tflite:
        assert tflite.run([np.zeros((2, 8, 8, 1), np.float32)])[0].shape == (2, 10)
    with pytest.raises(UnsafeFileError):
        OnnxBackend().load(b"x" * 200, ModelSpec(max_bytes=100))
