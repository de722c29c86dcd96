"""Split inference: shards that are valid models, the planner, and pipelines across agents on Mosquitto."""

import numpy as np
import onnxruntime as ort
import pytest

from edgespeed.errors import ConfigError
from edgespeed.optimize import Link, boundaries, plan, profile_onnx, split_onnx, split_torch
from edgespeed.optimize.split import Segment
from edgespeed.protocol.messages import Hop, Task
from edgespeed.protocol.tensor import decode_tensor, encode_with_codec
from tests.models import DigitsModel


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
