"""The shipped device configurations load, and `edgespeed device run` serves a fleet."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from edgespeed.agent import AgentConfig
from edgespeed.errors import ConfigError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message
from edgespeed.protocol.messages import Birth, Death
from edgespeed.security import create_ca, issue_certificate
from edgespeed.transport import EmbeddedBroker, MqttConfig, MqttTransport
from tests.conftest import ROOT, take

DEVICES = ROOT / "devices"


@pytest.mark.parametrize("profile", sorted((DEVICES / "profiles").glob("*.toml")), ids=lambda p: p.stem)
def test_example_config_with_each_profile_loads(profile: Path, tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / profile.name).write_text(profile.read_text())
    example = (DEVICES / "agent.example.toml").read_text()
    merged = tmp_path / "agent.toml"
    merged.write_text(example.replace("profiles/generic-x86.toml", f"profiles/{profile.name}"))
    config = AgentConfig.from_toml(merged)
    assert config.device_id == "gw-001" and config.pki_dir == (tmp_path / "pki").resolve()
    expected = tomllib.loads(profile.read_text())
    assert config.backends == tuple(expected["backends"])  # from the profile
    assert config.heartbeat_s == 10.0  # the file's own setting wins


def test_bad_configs_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    base = 'device_id = "gw-1"\nfleet = "f"\nbroker = "mqtt://127.0.0.1:1"\npki_dir = "p"\nstate_dir = "s"\n'
    for text in (
        base + 'colour = "blue"\n',
        base + "queue_size = 0\n",
        base.replace('"gw-1"', '"GW/1"'),
        base + 'profile = "missing.toml"\n',
    ):
        path.write_text(text)
        with pytest.raises(ConfigError):
            AgentConfig.from_toml(path)
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigError):
        AgentConfig.from_toml(path)


def test_systemd_unit_runs_the_agent() -> None:
    unit = (DEVICES / "edgespeed-agent.service").read_text()
    assert "ExecStart=/opt/edgespeed/venv/bin/edgespeed-agent --config" in unit
    assert tomllib  # the profiles are TOML; parsed above


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    "command", [["-m", "edgespeed", "device", "run"], ["-m", "edgespeed.agent"]], ids=["device-run", "edgespeed-agent"]
)
async def test_device_run_joins_and_leaves_cleanly(command: list[str], tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "pki", fleet="cli")
    issue_certificate(ca, "gw-1")
    issue_certificate(ca, "coord", role="coordinator")
    async with EmbeddedBroker() as broker:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'device_id = "gw-1"\nfleet = "cli"\nbroker = "{broker.url}"\npki_dir = "pki"\n'
            f'state_dir = "state"\nbackends = ["onnx"]\n'
        )
        async with MqttTransport(MqttConfig(broker.url, "watcher")) as watcher:
            await watcher.subscribe(topics.birth("cli", "gw-1"), topics.death("cli", "gw-1"))
            proc = subprocess.Popen(
                [sys.executable, *command, "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                (birth,) = await take(watcher, 1, timeout=60)
                _, card = open_message(birth.payload)
                assert isinstance(card, Birth) and card.card.backends == ("onnx",)
            finally:
                proc.terminate()  # SIGTERM: drain and leave
                out = await asyncio.to_thread(proc.communicate, timeout=30)
            (death,) = await take(watcher, 1)
            _, bye = open_message(death.payload)
            assert isinstance(bye, Death) and bye.reason == "shutdown"
    assert proc.returncode == 0, out


async def test_an_agent_that_cannot_join_fails_clearly_and_closes_what_it_opened(tmp_path: Path) -> None:
    import sqlite3

    from edgespeed.agent import Device
    from edgespeed.errors import ConnectError
    from edgespeed.transport.broker import free_port

    ca = create_ca(tmp_path / "pki", fleet="cli")
    issue_certificate(ca, "gw-1")
    config = AgentConfig(
        device_id="gw-1",
        fleet="cli",
        broker=f"mqtt://127.0.0.1:{free_port()}",
        pki_dir=ca.directory,
        state_dir=tmp_path / "state",
    )
    device = Device(config)
    with pytest.raises(ConnectError):
        await device.__aenter__()
    with pytest.raises(sqlite3.ProgrammingError):
        device._outbox.pending()  # closed


def test_the_agent_daemon_refuses_a_bad_configuration_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('device_id = "GW 1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "edgespeed.agent", "--config", str(tmp_path / "agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_the_example_coordinator_config_loads() -> None:
    from edgespeed.coordinator import CoordinatorConfig

    path = ROOT / "examples" / "coordinator.toml"
    config = CoordinatorConfig.from_toml(path)
    assert config.fleet == "plant" and config.state_dir == (path.parent / "state").resolve()
    assert config.policy == "least-loaded" and config.ledger == ""
