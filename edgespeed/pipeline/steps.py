"""Pre- and post-processing steps, declared in a model manifest and run on the device.

A manifest carries steps as plain maps, e.g. ``{"op": "normalize", "mean": [0.5],
"std": [0.25]}``; `Pipeline.from_spec` validates them into these frozen
dataclasses. Each step maps one array to one array, with numpy only.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgespeed.errors import ConfigError
from edgespeed.protocol.tensor import DTYPES

__all__ = ["Argmax", "Cast", "Normalize", "Pipeline", "Reshape", "Scale", "Softmax", "Step", "TopK", "Transpose"]

Array = np.ndarray[Any, Any]
_DTYPE_NAMES = {str(dt.newbyteorder("=")) for dt in DTYPES.values()} | {"float32", "float16", "float64"}


class Step(abc.ABC):
    """One array-to-array transformation."""

    op: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array: ...


@dataclass(frozen=True, slots=True)
class Cast(Step):
    """Convert to ``dtype`` (a numpy name such as ``float32``)."""

    op: ClassVar[str] = "cast"
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_NAMES:
            raise ConfigError(f"cast: unsupported dtype {self.dtype!r}")

    def __call__(self, x: Array) -> Array:
        return x.astype(self.dtype, copy=False)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Scale(Step):
    """``x * factor + offset``."""

    op: ClassVar[str] = "scale"
    factor: float
    offset: float = 0.0

    def __call__(self, x: Array) -> Array:
        return np.asarray(x * np.asarray(self.factor, dtype=x.dtype) + np.asarray(self.offset, dtype=x.dtype))


@dataclass(frozen=True, slots=True)
class Normalize(Step):
    """``(x - mean) / std`` per channel along ``axis`` (one value: every channel)."""

    op: ClassVar[str] = "normalize"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    axis: int = 1

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError("normalize: mean and std need the same, non-zero length")
        if any(s == 0 for s in self.std):
            raise ConfigError("normalize: std must not be zero")

    def __call__(self, x: Array) -> Array:
        shape = [1] * x.ndim
        if len(self.mean) > 1:
            if not -x.ndim <= self.axis < x.ndim or x.shape[self.axis] != len(self.mean):
                raise ConfigError(f"normalize: {len(self.mean)} channels, input shape {x.shape} axis {self.axis}")
            shape[self.axis] = len(self.mean)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        return ((x - mean) / std).astype(np.result_type(x.dtype, np.float32), copy=False)


@dataclass(frozen=True, slots=True)
class Transpose(Step):
    """Reorder axes, e.g. NHWC → NCHW with ``axes=(0, 3, 1, 2)``."""

    op: ClassVar[str] = "transpose"
    axes: tuple[int, ...]

    def __call__(self, x: Array) -> Array:
        if sorted(self.axes) != list(range(x.ndim)):
            raise ConfigError(f"transpose: axes {self.axes} do not fit {x.ndim} dimensions")
        return np.ascontiguousarray(x.transpose(self.axes))


@dataclass(frozen=True, slots=True)
class Reshape(Step):
    """Reshape; one dimension may be -1."""

    op: ClassVar[str] = "reshape"
    shape: tuple[int, ...]

    def __call__(self, x: Array) -> Array:
        try:
            return x.reshape(self.shape)
        except ValueError as exc:
            raise ConfigError(f"reshape: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Softmax(Step):
    """Softmax along ``axis``, computed stably."""

    op: ClassVar[str] = "softmax"
    axis: int = -1

    def __call__(self, x: Array) -> Array:
        z = x - x.max(axis=self.axis, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=self.axis, keepdims=True)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Argmax(Step):
    """Index of the largest value along ``axis``."""

    op: ClassVar[str] = "argmax"
    axis: int = -1

    def __call__(self, x: Array) -> Array:
        return np.asarray(np.argmax(x, axis=self.axis))


@dataclass(frozen=True, slots=True)
class TopK(Step):
    """Indices of the ``k`` largest values along the last axis, best first."""

    op: ClassVar[str] = "topk"
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError("topk: k must be at least 1")

    def __call__(self, x: Array) -> Array:
        k = min(self.k, x.shape[-1])
        part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
        order = np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1, kind="stable")
        return np.take_along_axis(part, order, axis=-1)


_STEPS: dict[str, type[Step]] = {s.op: s for s in (Cast, Scale, Normalize, Transpose, Reshape, Softmax, Argmax, TopK)}


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Steps run in order."""

    steps: tuple[Step, ...] = ()

    @classmethod
    def from_spec(cls, spec: Iterable[Mapping[str, Any]]) -> Pipeline:
        """Build from manifest maps such as ``{"op": "scale", "factor": 0.0625}``.

        Raises:
            ConfigError: unknown op, unknown or missing parameters, bad values.
        """
        steps = []
        if isinstance(spec, str | bytes | Mapping):
            raise ConfigError(f"a pipeline is a list of steps, not {type(spec).__name__}")
        for i, item in enumerate(spec):
            if not isinstance(item, Mapping):
                raise ConfigError(f"step {i}: expected a map such as {{'op': 'scale', ...}}, got {item!r:.40}")
            params = dict(item)
            op = params.pop("op", None)
            step_cls = _STEPS.get(op) if isinstance(op, str) else None
            if step_cls is None:
                raise ConfigError(f"step {i}: unknown op {op!r}; known: {', '.join(sorted(_STEPS))}")
            fields = {f.name: f for f in dataclasses.fields(step_cls)}  # type: ignore[arg-type]
            unknown = params.keys() - fields.keys()
            if unknown:
                raise ConfigError(f"step {i} ({op}): unknown parameters {sorted(unknown)}")
            for name, value in params.items():
                if isinstance(value, list | tuple):
                    params[name] = tuple(value)
            try:
                steps.append(step_cls(**params))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"step {i} ({op}): {exc}") from exc
        return cls(tuple(steps))

    def to_spec(self) -> list[dict[str, Any]]:
        """The manifest form, the inverse of `from_spec`."""
        return [{"op": s.op, **dataclasses.asdict(s)} for s in self.steps]  # type: ignore[call-overload]

    def __call__(self, x: Array) -> Array:
        for step in self.steps:
            x = step(x)
        return x

    def run_all(self, xs: Sequence[Array]) -> list[Array]:
        """Apply to each array of a list."""
        return [self(x) for x in xs]
