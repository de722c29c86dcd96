"""The end-to-end demo: a whole fleet on one machine, each part its own process.

It creates a fleet CA and identities; starts the zero-setup broker (Mosquitto
with the production configuration, mutual TLS and the fleet ACL, when
installed; else amqtt without TLS); starts ``edgespeed coordinator run`` and two
``edgespeed device run`` agents as separate processes; trains a small network
on scikit-learn's digits and exports it to ONNX; publishes it (encrypted once,
the key wrapped for each device, the manifest signed); and sends held-out
digit images through the fleet as sealed tasks with the `Coordinator` API,
checking every answer against the same network computed here. The fleet is
built with `edgespeed.testing`, the harness the tests and benchmarks use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgespeed.coordinator import Coordinator, RolloutReport
from edgespeed.errors import EdgeSpeedError, MissingDependencyError, TaskError
from edgespeed.testing import Fleet, make_pki, start_broker
from edgespeed.transport import find_mosquitto

__all__ = ["DemoReport", "run_demo", "train_digits_mlp"]

FLEET = "demo"
DEVICES = ("dev-1", "dev-2")
Array = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo did and measured."""

    broker: str
    tls: bool
    tasks: int
    ok: int
    correct: int
    latencies_ms: tuple[float, ...]
    seconds: float
    per_device: dict[str, int]
    rollout: RolloutReport

    @property
    def accuracy(self) -> float:
        return self.correct / self.tasks if self.tasks else float("nan")

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99_ms(self) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass(frozen=True, slots=True)
class Mlp:
    """A 64-32-10 network trained on digits, and the held-out images."""

    w1: Array
    b1: Array
    w2: Array
    b2: Array
    x_test: Array
    y_test: Array

    def __call__(self, x: Array) -> Array:
        h = np.maximum(x.reshape(len(x), -1) @ self.w1 + self.b1, 0)
        return (h @ self.w2 + self.b2).astype(np.float32)  # type: ignore[no-any-return]


def train_digits_mlp(*, epochs: int = 600, seed: int = 0) -> Mlp:
    """Train a small network on scikit-learn's digits (1500 images) with full-batch gradient descent."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingDependencyError("scikit-learn", "demo") from exc
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 64)
    y = digits.target.astype(np.int64)
    x_train, y_train = x[:1500], y[:1500]
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 32)) * np.sqrt(2 / 64)).astype(np.float32)
    w2 = (rng.standard_normal((32, 10)) * np.sqrt(2 / 32)).astype(np.float32)
    b1, b2 = np.zeros(32, np.float32), np.zeros(10, np.float32)
    onehot = np.eye(10, dtype=np.float32)[y_train]
    lr = 0.5
    for _ in range(epochs):
        h = np.maximum(x_train @ w1 + b1, 0)
        logits = h @ w2 + b2
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(x_train)
        gh = (g @ w2.T) * (h > 0)
        w2 -= lr * h.T @ g
        b2 -= lr * g.sum(axis=0)
        w1 -= lr * x_train.T @ gh
        b1 -= lr * gh.sum(axis=0)
    return Mlp(w1, b1, w2, b2, x[1500:].reshape(-1, 1, 8, 8), y[1500:])


def export_onnx(model: Mlp, path: Path) -> Path:
    """The network as an ONNX graph: input ``x`` (N, 1, 8, 8) float32, output ``logits`` (N, 10)."""
    try:
        from onnx import TensorProto, helper, numpy_helper, save
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx") from exc
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w1", "b1"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["hidden"]),
            helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"]),
        ],
        "digits-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(getattr(model, k), k) for k in ("w1", "b1", "w2", "b2")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


async def run_demo(
    *,
    tasks: int = 200,
    broker_backend: Literal["auto", "mosquitto", "amqtt"] = "auto",
    workdir: Path | None = None,
    concurrency: int = 8,
    on_step: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoReport:
    """Run the demo and report what happened.

    Raises:
        EdgeSpeedError: a part failed to start (its log is quoted), or the fleet misbehaved.
    """
    with contextlib.ExitStack() as stack:
        base = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgespeed-demo-")))
        pki = make_pki(base / "pki", FLEET, devices=DEVICES, coordinators=["coord"])
        on_step("fleet CA created; certificates and payload keys for broker, coord, " + ", ".join(DEVICES))

        # Trained before the broker and the processes start: training holds this process's CPU (and its
        # GIL), and amqtt, when it is the broker, runs in this process and must answer connections at once.
        started = time.perf_counter()
        model = await asyncio.to_thread(train_digits_mlp)
        onnx_path = export_onnx(model, base / "digits.onnx")
        train_accuracy = float((model(model.x_test).argmax(axis=1) == model.y_test).mean())
        on_step(
            f"digits network trained here in {time.perf_counter() - started:.1f} s "
            f"({train_accuracy:.1%} on held-out images) and exported to ONNX"
        )

        use_tls = broker_backend != "amqtt" and find_mosquitto() is not None
        async with start_broker(pki, base, production=use_tls, backend=broker_backend, persistence=use_tls) as broker:
            url = broker.tls_url if use_tls else broker.url
            how = "mutual TLS, fleet ACL" if use_tls else "no TLS: install Mosquitto for mutual TLS"
            on_step(f"broker up: {broker.backend} at {url} ({how})")
            # Agents as `edgespeed device run` processes, the coordinator as `edgespeed coordinator run`.
            async with Fleet(
                base,
                pki,
                broker,
                backends=["onnx"],
                in_process=False,
                cli=True,
                test_timings=False,
                agent_settings={"heartbeat_s": 1.0, "threads": 1},
                coordinator_settings={"heartbeat_s": 1.0, "lease_s": 10.0},
            ) as fleet:
                fleet.start_coordinator_process()
                await fleet.start_agents()
                on_step("coordinator and two device agents started as separate processes (logs in " + f"{fleet.logs})")

                async with fleet.coordinator(client_id="coord-demo") as c:
                    try:
                        await fleet.wait_devices(c, len(DEVICES), timeout=90)  # a part that exits says why, at once
                    except TimeoutError:
                        raise EdgeSpeedError("the device agents did not join within 90 s") from None
                    joined = ", ".join(f"{d.device_id} ({d.card.arch})" for d in c.registry.online())
                    on_step(f"devices joined: {joined}")
                    rollout = await c.publish_model([onnx_path], name="digits", timeout=90)
                    if not rollout.ok:
                        raise EdgeSpeedError(f"the model did not reach every device: {rollout}")
                    size = onnx_path.stat().st_size
                    on_step(
                        f"model published: {size / 1024:.0f} KiB, encrypted once, key wrapped for "
                        f"{len(rollout.ready)} devices, manifest signed; ready on "
                        + ", ".join(f"{d} ({b})" for d, b in sorted(rollout.ready.items()))
                    )
                    return await _batch(
                        c, model, tasks, concurrency, broker.backend, use_tls, rollout, on_step, on_progress
                    )
    raise AssertionError("unreachable")


async def _batch(
    c: Coordinator,
    model: Mlp,
    tasks: int,
    concurrency: int,
    broker: str,
    tls: bool,
    rollout: RolloutReport,
    on_step: Callable[[str], None],
    on_progress: Callable[[int, int], None] | None,
) -> DemoReport:
    images = model.x_test[np.arange(tasks) % len(model.x_test)]
    labels = model.y_test[np.arange(tasks) % len(model.y_test)]
    expected = model(images)
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ok = correct = 0
    ids: list[str] = []

    async def one(i: int) -> None:
        nonlocal ok, correct
        async with slots:
            sent = time.perf_counter()
            try:
                handle = await c.submit("digits", images[i : i + 1], deadline=30)
                ids.append(handle.task_id)
                [logits] = await handle.result()
            except TaskError as exc:
                on_step(f"task {i} failed: {exc}")
                return
            latencies.append((time.perf_counter() - sent) * 1000)
            if np.allclose(logits, expected[i : i + 1], rtol=1e-4, atol=1e-4):
                ok += 1
                correct += int(logits.argmax() == labels[i])
            if on_progress is not None:
                on_progress(len(latencies), tasks)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(tasks)))
    seconds = time.perf_counter() - started
    records = [await asyncio.to_thread(c.ledger.get, task_id) for task_id in ids]
    per_device = Counter(r.device_id for r in records if r is not None and r.device_id)
    on_step(f"{tasks} digit images sent as sealed tasks (AES-256-GCM end to end), {concurrency} in flight")
    return DemoReport(broker, tls, tasks, ok, correct, tuple(latencies), seconds, dict(per_device), rollout)
