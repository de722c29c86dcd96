"""The command line, run as a user runs it: in a subprocess."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgespeed.transport.broker import find_mosquitto, free_port

EDGESPEED = [sys.executable, "-m", "edgespeed"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGESPEED, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "120"}
    )


def test_help_lists_the_command_groups() -> None:
    result = run("--help")
    assert result.returncode == 0
    for group in ("broker", "demo", "coordinator", "model", "task", "status", "device", "certs"):
        assert group in result.stdout
    assert "Usage" in result.stdout
    broker_help = run("broker", "run", "--help").stdout
    assert "--port" in broker_help and "--ca" in broker_help


def test_version() -> None:
    from edgespeed import __version__

    assert run("--version").stdout.strip() == f"edgespeed {__version__}"


@pytest.mark.parametrize("backend", ["mosquitto", "amqtt"])
def test_broker_run_serves_the_stock_mosquitto_clients(backend: str, tmp_path: Path) -> None:
    if backend == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto-clients are not installed (make test installs them)")
    port = free_port()
    proc = subprocess.Popen(
        [*EDGESPEED, "broker", "run", "--port", str(port), "--backend", backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert f"mqtt://127.0.0.1:{port}" in banner, banner
        topic = f"cli/{uuid.uuid4().hex}"
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(port), "-t", topic, "-C", "1", "-W", "20"], stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.5)  # let the subscription land before publishing
        pub = subprocess.run(
            ["mosquitto_pub", "-p", str(port), "-t", topic, "-m", "hello edge", "-q", "1"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert pub.returncode == 0, pub.stderr
        out, _ = sub.communicate(timeout=25)
        assert out.strip() == "hello edge"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_broker_run_refuses_half_a_tls_setup() -> None:
    result = run("broker", "run", "--ca", "/nonexistent")
    assert result.returncode != 0
    assert "--ca, --cert and --key go together" in result.stdout + result.stderr


@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_demo_runs_and_every_task_is_correct(broker: str) -> None:
    result = run("demo", "--tasks", "16", "--broker", broker, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo: 16/16 tasks ok" in result.stdout
    out = " ".join(result.stdout.split())  # the console wraps long lines
    assert "manifest signed; ready on dev-1 (onnx), dev-2 (onnx)" in out
    assert "separate processes" in out and "accuracy" in out
    if broker == "auto" and find_mosquitto() is not None:
        assert "mutual TLS, fleet ACL" in out
    assert "Traceback" not in result.stdout + result.stderr
