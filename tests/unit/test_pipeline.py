import numpy as np
import pytest

from edgespeed.errors import ConfigError
from edgespeed.pipeline import Argmax, Cast, Normalize, Pipeline, Reshape, Scale, Softmax, TopK, Transpose


def test_each_step() -> None:
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    assert Cast("float16")(x).dtype == np.float16
    np.testing.assert_array_equal(Scale(2.0, 1.0)(x), x * 2 + 1)
    n = Normalize((1.0, 13.0), (2.0, 4.0), axis=1)(x)
    np.testing.assert_allclose(n[0, 0], (x[0, 0] - 1) / 2)
    np.testing.assert_allclose(n[0, 1], (x[0, 1] - 13) / 4)
    assert Normalize((0.5,), (0.25,))(x).shape == x.shape
    assert Transpose((0, 2, 3, 1))(x).shape == (1, 3, 4, 2)
    assert Reshape((-1, 12))(x).shape == (2, 12)
    p = Softmax()(np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 1000.0]]))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)  # stable for large values
    assert Argmax()(np.array([[0.1, 0.7, 0.2]])).tolist() == [1]
    assert TopK(2)(np.array([[0.1, 0.7, 0.2, 0.5]])).tolist() == [[1, 3]]
    assert TopK(9)(np.array([0.3, 0.1])).tolist() == [0, 1]


@pytest.mark.parametrize(
    "spec",
    [
        [{"op": "explode"}],
        [{"factor": 2}],
        [{"op": "scale"}],
        [{"op": "scale", "factor": 1, "bogus": 2}],
        [{"op": "cast", "dtype": "object"}],
        [{"op": "normalize", "mean": [1, 2], "std": [1]}],
        [{"op": "normalize", "mean": [1], "std": [0]}],
        [{"op": "topk", "k": 0}],
    ],
)
def test_bad_specs_are_config_errors(spec: list[dict]) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError):
        Pipeline.from_spec(spec)


def test_steps_refuse_inputs_they_cannot_take() -> None:
    with pytest.raises(ConfigError):
        Transpose((0, 1))(np.zeros((2, 2, 2)))
    with pytest.raises(ConfigError):
        Reshape((5,))(np.zeros(4))
    with pytest.raises(ConfigError):
        Normalize((1.0, 2.0, 3.0), (1.0, 1.0, 1.0))(np.zeros((1, 2, 4)))


def test_spec_round_trip() -> None:
    spec = [
        {"op": "scale", "factor": 0.5, "offset": 0.0},
        {"op": "transpose", "axes": (0, 2, 1)},
        {"op": "topk", "k": 3},
    ]
    assert Pipeline.from_spec(spec).to_spec() == spec
