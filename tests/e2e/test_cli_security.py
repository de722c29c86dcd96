"""The certs and broker-config commands, used the way an operator would, against a real Mosquitto."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from edgespeed.errors import ConnectError
from edgespeed.transport import MqttConfig, MqttTransport, TlsConfig
from edgespeed.transport.broker import find_mosquitto, free_port
from tests.conftest import mqtt_config

EDGESPEED = [sys.executable, "-m", "edgespeed"]


def es(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGESPEED, *args], capture_output=True, text=True, timeout=60)


async def heartbeat_once(config: MqttConfig) -> None:
    """Connect as a fleet device once the broker process listens (up to 10 s), and publish a heartbeat."""
    for _ in range(100):
        try:
            async with MqttTransport(config) as t:
                await t.publish("es/1/plant/dev/dev-1/hb", b"alive")
            return
        except ConnectError as exc:
            last = exc
            await asyncio.sleep(0.1)
    pytest.fail(f"the broker did not accept {config.client_id}: {last}")


def test_certs_lifecycle(tmp_path: Path) -> None:
    pki = str(tmp_path / "pki")
    assert es("certs", "init", "--dir", pki, "--fleet", "plant").returncode == 0
    assert es("certs", "init", "--dir", pki).returncode == 1  # never overwrites a CA
    for name, role in (("broker", "broker"), ("coord", "coordinator"), ("dev-1", "device")):
        assert es("certs", "issue", name, "--role", role, "--dir", pki).returncode == 0
    assert es("certs", "renew", "dev-1", "--dir", pki, "--days", "60").returncode == 0
    assert es("certs", "revoke", "dev-1", "--dir", pki).returncode == 0
    listing = es("certs", "list", "--dir", pki).stdout
    assert "coordinator" in listing and "revoked" in listing
    bad = es("certs", "issue", "bad/id", "--dir", pki)
    assert bad.returncode == 1 and "[a-z0-9]" in bad.stdout
    assert es("certs", "issue", "x", "--role", "king", "--dir", pki).returncode == 1


@pytest.mark.mosquitto
async def test_rendered_production_config_runs_under_stock_mosquitto(tmp_path: Path) -> None:
    mosquitto = find_mosquitto()
    if mosquitto is None:
        pytest.skip("mosquitto is not installed")
    pki = tmp_path / "pki"
    es("certs", "init", "--dir", str(pki), "--fleet", "plant")
    for name, role in (("broker", "broker"), ("coord", "coordinator"), ("dev-1", "device"), ("dev-2", "device")):
        es("certs", "issue", name, "--role", role, "--dir", str(pki))
    es("certs", "revoke", "dev-2", "--dir", str(pki))
    port = free_port()
    out = tmp_path / "conf"
    result = es(
        "broker",
        "config",
        "--pki",
        str(pki),
        "--out",
        str(out),
        "--fleet",
        "plant",
        "--host",
        "127.0.0.1",
        "--tls-port",
        str(port),
    )
    assert result.returncode == 0, result.stdout
    conf = (out / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "crlfile" in conf and "allow_anonymous false" in conf
    proc = subprocess.Popen([mosquitto, "-c", str(out / "mosquitto.conf")], stderr=subprocess.PIPE)
    try:
        url = f"mqtts://127.0.0.1:{port}"

        def tls(name: str) -> TlsConfig:
            return TlsConfig(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")

        await heartbeat_once(mqtt_config(url, "dev-1", tls=tls("dev-1")))
        with pytest.raises(ConnectError):
            async with MqttTransport(mqtt_config(url, "dev-2", tls=tls("dev-2"))):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.mosquitto
async def test_broker_run_with_the_fleet_pki(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    import signal

    pki = tmp_path / "pki"
    es("certs", "init", "--dir", str(pki), "--fleet", "plant")
    for name, role in (("broker", "broker"), ("dev-1", "device")):
        es("certs", "issue", name, "--role", role, "--dir", str(pki))
    port = free_port()
    proc = subprocess.Popen(
        [
            *EDGESPEED,
            "broker",
            "run",
            "--pki",
            str(pki),
            "--fleet",
            "plant",
            "--host",
            "127.0.0.1",
            "--tls-port",
            str(port),
            "--data-dir",
            str(tmp_path / "b"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"mqtts://127.0.0.1:{port}"
        tls = TlsConfig(pki / "ca.crt", pki / "dev-1.crt", pki / "dev-1.key")
        await heartbeat_once(mqtt_config(url, "dev-1", tls=tls))
        with pytest.raises(ConnectError):  # no certificate, no entry
            async with MqttTransport(mqtt_config(url, "dev-1", tls=TlsConfig(pki / "ca.crt"))):
                pass
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert f"TLS:   mqtts://127.0.0.1:{port}" in out
