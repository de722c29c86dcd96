"""Model optimisation on the digits CNN: INT8 and FP16 quantisation, pruning, fusion, shards, variants,
bad inputs; and how an agent chooses among variants of several precisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgespeed.errors import ConfigError, OptimizeError
from tests.models import DigitsModel

# Quantising, pruning and fine-tuning real models takes a while: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

pytest.importorskip("onnxruntime.quantization", reason="onnxruntime is needed: pip install 'edgespeed[optimize]'")


@pytest.fixture(scope="module")
def train() -> dict[str, np.ndarray]:
    """The digits the CNN was trained on (rows 0..1499): calibration and fine-tune data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return {"x": x[:1500], "labels": digits.target[:1500].astype(np.int64)}


@pytest.fixture(scope="module")
def held_out(digits: DigitsModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The held-out digits, their labels and the trained model's logits, as an .npz."""
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    np.savez(path, x=digits.x_test, labels=digits.y_test, reference=digits.reference)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- quantisation -----------------------------------------------------------------------------------


def test_static_int8_keeps_accuracy_within_a_point_at_a_third_of_the_size(
    digits: DigitsModel, train: dict[str, np.ndarray], held_out: Path, tmp_path: Path
) -> None:
    from edgespeed.optimize import onnx_outputs, precision_of, quantize

    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=train["x"][:320])
    seen: list[tuple[str, int, int]] = []
    report = quantize(
        digits.onnx,
        precision="int8",
        output=tmp_path / "digits.int8.onnx",
        calibration=calibration,
        evaluation=held_out,
        latency=False,
        progress=lambda what, done, total: seen.append((what, done, total)),
    )
    assert report.original.accuracy is not None and report.original.accuracy > 0.9
    assert report.accuracy_drop is not None and report.accuracy_drop <= 1.0, report.rows()
    assert report.size_ratio <= 0.35, report.rows()
    assert report.settings["mode"] == "static" and report.settings["calibration_rows"] == 320
    assert report.error_against == "reference" and report.error_max is not None and report.error_max < 0.5
    # The 1-channel first convolution (a reduction of 9) stays float: int8 is slower and no smaller there.
    assert len(report.kept_fp32) == 1
    assert ("calibrating", 10, 10) in seen and any(w.startswith("evaluating") for w, _, _ in seen)
    out = Path(report.output)
    assert precision_of(out) == "int8"
    assert onnx_outputs(out) == onnx_outputs(digits.onnx)  # the declared outputs (float32 logits) stay
    assert leftovers(tmp_path) == ["calibration.npz", "digits.int8.onnx"]


def test_fp16_halves_the_weights_and_keeps_outputs_within_1e_2(digits: DigitsModel, tmp_path: Path) -> None:
    from edgespeed.optimize import onnx_outputs, precision_of, quantize

    evaluation = {"x": digits.x_test}  # no reference: compared with the original model's outputs
    report = quantize(digits.onnx, precision="fp16", output=tmp_path / "h.onnx", evaluation=evaluation, latency=False)
    assert report.error_against == "original"
    assert report.error_max is not None and report.error_max <= 1e-2, report.rows()
    assert report.optimized.weight_bytes <= 0.501 * report.original.weight_bytes  # float weights halved (shapes stay)
    assert report.size_ratio <= 0.5, report.rows()
    assert precision_of(report.output) == "fp16"
    assert onnx_outputs(report.output) == onnx_outputs(digits.onnx)  # inputs and outputs stay float32


def test_dynamic_int8_needs_no_calibration(digits: DigitsModel, held_out: Path, tmp_path: Path) -> None:
    from edgespeed.optimize import quantize

    report = quantize(digits.onnx, output=tmp_path / "d.onnx", evaluation=held_out, latency=False)
    assert report.settings["mode"] == "dynamic"
    assert report.accuracy_drop is not None and report.accuracy_drop <= 1.0
    assert report.size_ratio <= 0.35


def test_quantised_shards_are_each_calibrated_on_the_activations_that_reach_them(
    digits: DigitsModel, train: dict[str, np.ndarray], tmp_path: Path
) -> None:
    import onnx

    from edgespeed.optimize import quantize_shards, split_onnx
    from edgespeed.optimize.data import Samples
    from edgespeed.optimize.report import run_all, session

    shards = split_onnx(digits.onnx, ["max_pool2d"])
    calibration = {"x": train["x"][:256]}
    reports = quantize_shards(shards, calibration, tmp_path)
    assert [Path(r.output).name for r in reports] == ["stage1.int8.onnx", "stage2.int8.onnx"]
    # Stage 2 was calibrated on what stage 1, as quantised, hands on: its input scale is their range / 255.
    reaching = run_all(Path(reports[0].output), Samples(calibration))
    stage2 = onnx.load(reports[1].output)
    first_q = next(n for n in stage2.graph.node if n.op_type == "QuantizeLinear")
    scale = next(onnx.numpy_helper.to_array(t) for t in stage2.graph.initializer if t.name == first_q.input[1])
    expected = (reaching.max() - min(0.0, reaching.min())) / 255
    np.testing.assert_allclose(float(scale), expected, rtol=1e-3)
    # Chained, the int8 shards classify the held-out digits within a point of the float model.
    s1, s2 = (session(r.output) for r in reports)
    logits = s2.run(None, {s2.get_inputs()[0].name: s1.run(None, {"x": digits.x_test})[0]})[0]
    ours = float((logits.argmax(1) == digits.y_test).mean())
    theirs = float((digits.reference.argmax(1) == digits.y_test).mean())
    assert (theirs - ours) * 100 <= 1.0


# -- pruning and fusion -----------------------------------------------------------------------------


def test_structured_pruning_of_half_the_channels_with_a_short_fine_tune(
    digits: DigitsModel, train: dict[str, np.ndarray], held_out: Path, tmp_path: Path
) -> None:
    import onnx

    from edgespeed.cli.optimize import load_torch
    from edgespeed.optimize import prune

    module = load_torch(digits.safetensors, "digits-cnn")
    seen: list[str] = []
    report = prune(
        module,
        amount=0.5,
        structured=True,
        output=tmp_path / "pruned.onnx",
        finetune=train,
        epochs=5,
        lr=3e-3,
        evaluation=held_out,
        latency=False,
        progress=lambda what, done, total: seen.append(what),
    )
    assert report.accuracy_drop is not None and report.accuracy_drop <= 2.0, report.rows()
    assert report.optimized.flops < 0.5 * report.original.flops, report.rows()  # counted, per sample
    assert report.original.flops == 2 * (16 * 64 * 9 + 32 * 64 * 16 * 9 + 512 * 64 + 64 * 10)
    weights = {t.name: tuple(t.dims) for t in onnx.load(report.output).graph.initializer}
    assert sorted(d[0] for d in weights.values() if len(d) >= 2) == [8, 10, 16, 32]  # 16, 32, 64 halved; 10 kept
    assert "fine-tuning" in seen
    assert report.size_ratio < 0.35


def test_unstructured_pruning_zeroes_weights_and_shrinks_the_compressed_model(
    digits: DigitsModel, held_out: Path, tmp_path: Path
) -> None:
    import onnx

    from edgespeed.optimize import prune

    report = prune(digits.onnx, amount=0.5, output=tmp_path / "sparse.onnx", evaluation=held_out, latency=False)
    model = onnx.load(report.output)
    big = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2]
    assert all(abs((w == 0).mean() - 0.5) < 0.01 for w in big)
    assert report.optimized.compressed_bytes < 0.75 * report.original.compressed_bytes
    assert report.accuracy_drop is not None and report.accuracy_drop <= 3.0
    with pytest.raises(OptimizeError) as caught:
        prune(digits.onnx, structured=True, output=tmp_path / "x.onnx")
    assert caught.value.reason == "unsupported" and "torch module" in str(caught.value)


def test_fusion_has_fewer_nodes_and_the_same_outputs(digits: DigitsModel, held_out: Path, tmp_path: Path) -> None:
    from edgespeed.optimize import fuse

    report = fuse(digits.onnx, output=tmp_path / "fused.onnx", evaluation={"x": digits.x_test}, latency=False)
    assert report.optimized.nodes < report.original.nodes, report.rows()
    assert report.error_against == "original" and report.error_max is not None and report.error_max <= 1e-5
    assert report.optimized.flops == report.original.flops  # fusion moves work, it does not remove it
    basic = fuse(digits.onnx, output=tmp_path / "basic.onnx", level="basic", evaluation=held_out, latency=False)
    assert basic.error_max is not None and basic.error_max <= 1e-4 and basic.accuracy_drop == 0


def test_the_report_measures_latency_and_serialises(digits: DigitsModel, tmp_path: Path) -> None:
    from edgespeed.optimize import fuse

    report = fuse(digits.onnx, output=tmp_path / "f.onnx")
    assert report.original.latency_ms_1 > 0 and report.optimized.latency_ms_all > 0  # measured, never asserted
    data = report.to_dict()
    assert data["kind"] == "fuse" and data["optimized"]["nodes"] == report.optimized.nodes
    assert {row[0] for row in report.rows()} >= {"size", "nodes", "FLOPs/sample", "latency, 1 thread"}


# -- bad input: a typed error naming the problem, and nothing left behind ---------------------------


@pytest.mark.parametrize(
    ("data", "reason", "named"),
    [
        (lambda x: {"x": x[:, 0]}, "bad_data", "shape"),  # (N, 8, 8) for (N, 1, 8, 8)
        (lambda x: {"x": x.astype(np.float64)}, "bad_data", "float64"),
        (lambda x: {"image": x, "other": x}, "bad_data", "inputs are ['x']"),
        (lambda x: {"x": x[:0]}, "empty_data", "no rows"),
        (lambda x: {}, "empty_data", "no input arrays"),
    ],
)
def test_bad_calibration_data_is_a_typed_error_and_nothing_is_written(
    digits: DigitsModel, tmp_path: Path, data: Any, reason: str, named: str
) -> None:
    from edgespeed.optimize import quantize

    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **data(digits.x_test))
    with pytest.raises(OptimizeError) as caught:
        quantize(digits.onnx, output=tmp_path / "out.onnx", calibration=calibration)
    assert caught.value.reason == reason and named in str(caught.value), str(caught.value)
    assert leftovers(tmp_path) == ["calibration.npz"]


def test_an_empty_file_and_models_that_cannot_be_quantised_are_typed_errors(
    digits: DigitsModel, tmp_path: Path
) -> None:
    from edgespeed.optimize import quantize
    from edgespeed.testing import identity_onnx

    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(OptimizeError) as caught:
        quantize(digits.onnx, output=tmp_path / "out.onnx", calibration=tmp_path / "empty.npz")
    assert caught.value.reason == "empty_data" and "empty.npz" in str(caught.value)

    (tmp_path / "garbage.onnx").write_bytes(b"not a model at all")
    with pytest.raises(OptimizeError) as caught:
        quantize(tmp_path / "garbage.onnx", output=tmp_path / "out.onnx")
    assert caught.value.reason == "bad_model" and "not an ONNX model" in str(caught.value)

    echo = identity_onnx(tmp_path / "echo.onnx")  # uint8 in, uint8 out: nothing to quantise
    with pytest.raises(OptimizeError) as caught:
        quantize(echo, output=tmp_path / "out.onnx", calibration={"x": np.zeros((4, 3), np.uint8)})
    assert caught.value.reason == "bad_model" and "nothing to quantise" in str(caught.value)
    with pytest.raises(OptimizeError) as caught:
        quantize(echo, precision="fp16", output=tmp_path / "out.onnx")
    assert caught.value.reason == "bad_model"
    with pytest.raises(OptimizeError) as caught:
        quantize(digits.onnx, precision="int4", output=tmp_path / "out.onnx")  # type: ignore[arg-type]
    assert caught.value.reason == "unsupported"
    assert leftovers(tmp_path) == ["echo.onnx", "empty.npz", "garbage.onnx"]


# -- variants and the device's choice ---------------------------------------------------------------


def test_variants_are_made_from_one_model_and_say_their_precision(digits: DigitsModel, tmp_path: Path) -> None:
    from edgespeed.optimize import make_variants, precision_of

    variants = make_variants(digits.onnx, ["int8", "fp16"], tmp_path, calibration={"x": digits.x_test[:64]})
    assert [(p, precision_of(path)) for path, p, _ in variants] == [
        ("fp32", "fp32"),
        ("int8", "int8"),
        ("fp16", "fp16"),
    ]
    assert variants[0][0] == digits.onnx and variants[0][2] is None
    with pytest.raises(OptimizeError):
        make_variants(digits.onnx, ["int4"], tmp_path)
    assert precision_of(digits.safetensors) == "fp32"


def test_an_agent_runs_the_precision_it_prefers(tmp_path: Path) -> None:
    from edgespeed.agent.config import AgentConfig
    from edgespeed.agent.installer import Installer, _runs_label
    from edgespeed.protocol.messages import BlobInfo, ModelManifest

    shards = tuple(BlobInfo(f"m-{i}.onnx", 10, bytes(32), 1024) for i in range(3))
    variants = (
        {"shard": "m-0.onnx", "format": "onnx", "precision": "fp32"},
        {"shard": "m-1.onnx", "format": "onnx", "precision": "int8"},
        {"shard": "m-2.onnx", "format": "onnx", "precision": "fp16"},
    )
    manifest = ModelManifest("m", 1, "onnx", shards, variants=variants)

    def chosen(precisions: tuple[str, ...]) -> tuple[dict[str, Any], str]:
        config = AgentConfig(
            "dev-a", "f", "mqtt://127.0.0.1:1883", tmp_path, tmp_path, backends=("onnx",), precisions=precisions
        )
        installer = Installer(config, *([None] * 5))  # type: ignore[arg-type]
        return installer._choose(manifest)

    assert chosen(("int8", "fp32"))[0]["precision"] == "int8"
    assert chosen(("fp16",))[0]["precision"] == "fp16"
    assert chosen(("fp32",))[0]["precision"] == "fp32"
    assert chosen(())[0]["precision"] == "fp32"  # no preference at all: the manifest's order
    variant, backend = chosen(("int8",))
    assert _runs_label(backend, variant, manifest) == "onnx:int8"
    single = ModelManifest("m", 1, "onnx", shards[:1], variants=variants[:1])
    assert _runs_label("onnx", variants[0], single) == "onnx"  # no choice offered: the backend alone
    with pytest.raises(ConfigError):
        AgentConfig("dev-a", "f", "mqtt://127.0.0.1:1883", tmp_path, tmp_path, precisions=("int4",))


def test_the_hardware_says_which_precision_it_prefers() -> None:
    from edgespeed.hardware.detect import device_card, int8_dot_product, preferred_precisions

    assert int8_dot_product("flags\t\t: fpu sse avx2 avx512_vnni\n") == ("avx512_vnni",)
    assert int8_dot_product("Features\t: fp asimd asimddp i8mm\n") == ("asimddp", "i8mm")
    assert int8_dot_product("flags\t\t: fpu sse avx2\n") == ()
    assert preferred_precisions(("cpu",), ("avx512_vnni",))[0] == "int8"
    assert preferred_precisions(("cpu",), ())[0] == "fp32"
    assert preferred_precisions(("cpu", "cuda:0 NVIDIA Orin (8 GiB)"), ("asimddp",))[0] == "fp16"
    card = device_card("dev-a")
    assert card.extra["precisions"].split(",")[0] in ("int8", "fp32")


def test_profiles_set_the_precision_preference(tmp_path: Path) -> None:
    from edgespeed.agent.config import AgentConfig

    root = Path(__file__).resolve().parents[2] / "devices"
    for profile, first in [("jetson-cuda.toml", "fp16"), ("ascend-npu.toml", "fp16"), ("android-termux.toml", "int8")]:
        agent = tmp_path / f"{profile}.agent.toml"
        agent.write_text(
            f'device_id = "dev-a"\nfleet = "f"\nbroker = "mqtt://127.0.0.1:1883"\npki_dir = "."\n'
            f'state_dir = "."\nprofile = "{root / "profiles" / profile}"\n'
        )
        assert AgentConfig.from_toml(agent).precisions[0] == first
    agent.write_text(agent.read_text() + 'precisions = ["fp32"]\n')
    assert AgentConfig.from_toml(agent).precisions == ("fp32",)


# -- the command line -------------------------------------------------------------------------------


def test_the_cli_quantises_and_reports_and_refuses_bad_data(digits: DigitsModel, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgespeed.cli.main import app

    runner = CliRunner()
    out = tmp_path / "h.onnx"
    result = runner.invoke(app, ["optimize", "quantize", str(digits.onnx), "--fp16", "-o", str(out), "--no-latency"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "fp16" in result.output and "size" in result.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=digits.x_test.astype(np.float64))
    result = runner.invoke(
        app,
        ["optimize", "quantize", str(digits.onnx), "--int8", "--calibration", str(bad), "-o", str(tmp_path / "i.onnx")],
    )
    assert result.exit_code == 1 and "float64" in result.output
    assert not (tmp_path / "i.onnx").exists()


def test_publish_optimize_makes_the_variants_to_publish(digits: DigitsModel, tmp_path: Path) -> None:
    from edgespeed.cli.coordinator import _variant_name, _with_variants
    from edgespeed.optimize import precision_of

    files = _with_variants([digits.onnx, digits.safetensors], "int8,fp16", None, "", tmp_path)
    assert files[0] == digits.onnx and files[-1] == digits.safetensors
    assert [precision_of(f) for f in files] == ["fp32", "int8", "fp16", "fp32"]
    with pytest.raises(ConfigError):
        _with_variants([digits.onnx], "int8", None, "auto", tmp_path)  # not with --split (yet)
    with pytest.raises(ConfigError):
        _with_variants([digits.safetensors], "int8", None, "", tmp_path)  # no .onnx to make them from
    assert _variant_name({"format": "onnx", "precision": "int8"}) == "onnx int8"
    assert _variant_name({"format": "tflite"}) == "tflite"


def test_a_tensor_with_no_finite_range_stays_float(tmp_path: Path) -> None:
    """An attention-style mask of -inf gives a tensor no finite range: the nodes around it stay float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgespeed.optimize import quantize
    from edgespeed.optimize.report import session

    rng = np.random.default_rng(0)
    mask = np.zeros((1, 16), np.float32)
    mask[0, 12:] = -np.inf
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "mask"], ["masked"], name="add_mask"),
            helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2"),
        ],
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [
            numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.3, "w1"),
            numpy_helper.from_array(mask, "mask"),
            numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w2"),
        ],
    )
    source = tmp_path / "masked.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(source))
    x = rng.standard_normal((256, 32)).astype(np.float32)
    report = quantize(source, output=tmp_path / "q.onnx", calibration={"x": x}, evaluation={"x": x}, latency=False)
    assert "softmax" in report.kept_fp32 and len(report.kept_fp32) == 2  # and what makes the mask: mm1+add
    y = session(report.output).run(None, {"x": x})[0]
    assert np.all(np.isfinite(y))
    assert report.error_max is not None and report.error_max < 0.2, report.error_max
