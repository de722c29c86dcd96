"""The end-to-end demo: a whole fleet on one machine, each part its own process.

It creates a fleet CA and identities; starts the zero-setup broker (Mosquitto
with the production configuration, mutual TLS and the fleet ACL, when
installed; else amqtt without TLS); starts ``edgespeed coordinator run`` and two
``edgespeed device run`` agents as separate processes; trains a small network
on scikit-learn's digits and exports it to ONNX; publishes it (encrypted once,
the key wrapped for each device, the manifest signed); and sends held-out
digit images through the fleet as sealed tasks with the `Coordinator` API,
checking every answer against the same network computed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgespeed.coordinator import Coordinator, CoordinatorConfig, RolloutReport
from edgespeed.errors import EdgeSpeedError, MissingDependencyError, TaskError
from edgespeed.security import create_ca, issue_certificate
from edgespeed.transport import BrokerSettings, EmbeddedBroker, find_mosquitto
from edgespeed.transport.broker import production_settings

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


def _toml(path: Path, values: dict[str, Any]) -> Path:
    lines = []
    for key, value in values.items():
        if isinstance(value, str | Path):
            lines.append(f"{key} = {json.dumps(str(value))}")
        elif isinstance(value, list | tuple):
            lines.append(f"{key} = {json.dumps([str(v) for v in value])}")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def _processes() -> AsyncIterator[list[tuple[str, subprocess.Popen[bytes], Path]]]:
    """Processes started inside are stopped on the way out: SIGTERM, then SIGKILL after 10 s.

    The waiting happens off the event loop: an in-process broker must keep
    serving the processes while they say goodbye.
    """
    running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        yield running
    finally:
        for _, proc, _ in running:
            proc.terminate()
        for _, proc, _ in running:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


def _start(name: str, args: list[str], logs: Path) -> tuple[str, subprocess.Popen[bytes], Path]:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgespeed", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return name, proc, log


def _check_alive(running: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    for name, proc, log in running:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise EdgeSpeedError(f"{name} exited with status {proc.returncode}; its log ends:\n{tail}")


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
        logs = base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pki = base / "pki"
        ca = create_ca(pki, fleet=FLEET)
        issue_certificate(ca, "broker", role="broker")
        issue_certificate(ca, "coord", role="coordinator")
        for device in DEVICES:
            issue_certificate(ca, device, role="device")
        on_step("fleet CA created; certificates and payload keys for broker, coord, " + ", ".join(DEVICES))

        use_tls = broker_backend != "amqtt" and find_mosquitto() is not None
        if use_tls:
            settings = production_settings(
                pki, fleet=FLEET, coordinators=["coord"], out_dir=base / "broker", host="127.0.0.1", tls_port=0
            )
        else:
            settings = BrokerSettings(backend=broker_backend)
        async with EmbeddedBroker(settings) as broker:
            url = broker.tls_url if use_tls else broker.url
            how = "mutual TLS, fleet ACL" if use_tls else "no TLS: install Mosquitto for mutual TLS"
            on_step(f"broker up: {broker.backend} at {url} ({how})")
            common = {"fleet": FLEET, "broker": url, "pki_dir": pki}
            coord_toml = _toml(
                base / "coordinator.toml", {**common, "state_dir": base / "coord", "heartbeat_s": 1.0, "lease_s": 10.0}
            )
            async with _processes() as running:
                running.append(_start("coordinator", ["coordinator", "run", "--config", str(coord_toml)], logs))
                for device in DEVICES:
                    device_toml = _toml(
                        base / f"{device}.toml",
                        {
                            **common,
                            "device_id": device,
                            "state_dir": base / device,
                            "heartbeat_s": 1.0,
                            "backends": ["onnx"],
                            "threads": 1,
                        },
                    )
                    running.append(_start(device, ["device", "run", "--config", str(device_toml)], logs))
                on_step("coordinator and two device agents started as separate processes (logs in " + f"{logs})")

                started = time.perf_counter()
                model = await asyncio.to_thread(train_digits_mlp)
                onnx_path = export_onnx(model, base / "digits.onnx")
                train_accuracy = float((model(model.x_test).argmax(axis=1) == model.y_test).mean())
                on_step(
                    f"digits network trained here in {time.perf_counter() - started:.1f} s "
                    f"({train_accuracy:.1%} on held-out images) and exported to ONNX"
                )

                config = CoordinatorConfig.from_toml(coord_toml)
                async with Coordinator(config, client_id="coord-demo") as c:
                    for _ in range(90):
                        _check_alive(running)  # a part that exits says why, at once
                        with contextlib.suppress(TimeoutError):
                            await c.wait_for_devices(len(DEVICES), timeout=1.0)
                            break
                    else:
                        raise EdgeSpeedError("the device agents did not join within 90 s")
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
