"""Benchmark `backend`: EdgeSpeed's ONNX Runtime backend against bare onnxruntime, same model, batch 1.

The model is the digits CNN of the zoo, exported to ONNX here. Both sides run
the same session options (one intra-op thread); calls alternate in blocks so
noise hits both alike, and the median latency of each is compared. The ratio
is ours / baseline latency, lower is better; the goal is <= 1.05.

Run: python -m edgespeed.bench.backend [--calls N] [--json PATH]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edgespeed.bench._fleet import emit, entry
from edgespeed.engine.onnx import OnnxBackend
from edgespeed.engine.zoo import DigitsCNN


def export(path: Path) -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # optional-operator notices, not ours
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DigitsCNN().eval(),
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            input_names=["x"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )


def run(calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.onnx"
        export(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        bare = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        ours = OnnxBackend(threads=1).load(path)
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        np.testing.assert_allclose(ours.run([x])[0], bare.run(None, {"x": x})[0], rtol=1e-6)
        sides: dict[str, Callable[[], Any]] = {
            "ours": lambda: ours.run([x]),
            "baseline": lambda: bare.run(None, {"x": x}),
        }
        times: dict[str, list[float]] = {"ours": [], "baseline": []}
        for _ in range(calls // 100):
            for name, fn in sides.items():
                for _ in range(100):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    p50 = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    p99 = {k: float(np.percentile(v, 99)) * 1e6 for k, v in times.items()}
    return entry(
        "backend",
        p50["ours"],
        p50["baseline"],
        "us (p50)",
        "<= 1.05",
        higher_is_better=False,
        ours_p99=round(p99["ours"], 2),
        baseline_p99=round(p99["baseline"], 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit([run(args.calls)], args.json)


if __name__ == "__main__":
    main()
