"""Configurations of a harness fleet's members, as objects and as the TOML files the processes read."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgespeed.errors import ConfigError
from edgespeed.testing.broker import broker_url
from edgespeed.testing.pki import FleetPki
from edgespeed.transport import EmbeddedBroker

if TYPE_CHECKING:  # imported where used: importing the harness does not load the agent or the coordinator
    from edgespeed.agent import AgentConfig
    from edgespeed.coordinator import Coordinator, CoordinatorConfig

__all__ = [
    "TEST_AGENT_SETTINGS",
    "TEST_COORDINATOR_SETTINGS",
    "agent_config",
    "agent_toml",
    "coordinator_config",
    "coordinator_toml",
    "wait_ready",
    "write_agent_toml",
    "write_coordinator_toml",
]

#: What ``test_timings`` adds to an agent's settings: heartbeats every 0.3 s, a 20 ms batching window.
TEST_AGENT_SETTINGS: Mapping[str, Any] = {"heartbeat_s": 0.3, "max_wait_ms": 20.0}
#: What ``test_timings`` adds to a coordinator's: the devices' 0.3 s heartbeats, 10 s leases, 30 s deadlines.
TEST_COORDINATOR_SETTINGS: Mapping[str, Any] = {"heartbeat_s": 0.3, "lease_s": 10.0, "deadline_s": 30.0}


def _pki_dir(pki: FleetPki | Path) -> Path:
    return pki.directory if isinstance(pki, FleetPki) else Path(pki)


def _fleet(pki: FleetPki | Path, settings: dict[str, Any]) -> str:
    fleet = settings.pop("fleet", None)
    if fleet is None:
        if not isinstance(pki, FleetPki):
            raise ConfigError("give fleet= when the PKI is a folder rather than a FleetPki")
        fleet = pki.fleet
    return str(fleet)


def _protocol_for(broker: EmbeddedBroker | str) -> dict[str, Any]:
    """amqtt speaks MQTT 3.1.1 only: say so, rather than have every client probe for MQTT 5 first."""
    return {"mqtt_protocol": "3.1.1"} if getattr(broker, "backend", "") == "amqtt" else {}


def agent_config(
    broker: EmbeddedBroker | str,
    pki: FleetPki | Path,
    device: str,
    state_dir: Path,
    *,
    test_timings: bool = True,
    **settings: Any,
) -> AgentConfig:
    """The configuration of agent ``device`` of the fleet: the broker's TLS URL (plain when it has no TLS
    listener), ``pki_dir`` the PKI's folder, the fleet and coordinator ids the PKI's.

    Args:
        broker: the broker, or the URL to use.
        pki: the fleet PKI (or its folder; then ``fleet=`` is needed).
        device: the device id.
        state_dir: its model cache, outbox and replay window.
        test_timings: start from `TEST_AGENT_SETTINGS` (fast heartbeats); false: the agent's own defaults.
        settings: any other `AgentConfig` field (``backends=("onnx",)``, ``threads=1``, ...).

    Raises:
        ConfigError: an invalid or unknown setting.
    """
    from edgespeed.agent import AgentConfig

    values = {**(TEST_AGENT_SETTINGS if test_timings else {}), **_protocol_for(broker), **settings}
    fleet = _fleet(pki, values)
    if isinstance(pki, FleetPki) and pki.coordinator_ids:
        values.setdefault("coordinator", pki.coordinator)
    if "backends" in values:
        values["backends"] = tuple(values["backends"])
    try:
        return AgentConfig(
            device_id=device,
            fleet=fleet,
            broker=broker_url(broker),
            pki_dir=_pki_dir(pki),
            state_dir=Path(state_dir),
            **values,
        )
    except TypeError as exc:
        raise ConfigError(f"agent {device}: {exc}") from exc


def coordinator_config(
    broker: EmbeddedBroker | str,
    pki: FleetPki | Path,
    state_dir: Path,
    *,
    test_timings: bool = True,
    **settings: Any,
) -> CoordinatorConfig:
    """The coordinator's configuration: like `agent_config`, its id the PKI's first coordinator.

    Args:
        test_timings: start from `TEST_COORDINATOR_SETTINGS`; false: the coordinator's own defaults.
        settings: any other `CoordinatorConfig` field (``max_inflight=4``, ``coordinator_id=...``).

    Raises:
        ConfigError: an invalid or unknown setting.
    """
    from edgespeed.coordinator import CoordinatorConfig

    values = {**(TEST_COORDINATOR_SETTINGS if test_timings else {}), **_protocol_for(broker), **settings}
    fleet = _fleet(pki, values)
    if isinstance(pki, FleetPki) and pki.coordinator_ids:
        values.setdefault("coordinator_id", pki.coordinator)
    try:
        return CoordinatorConfig(
            fleet=fleet, broker=broker_url(broker), pki_dir=_pki_dir(pki), state_dir=Path(state_dir), **values
        )
    except TypeError as exc:
        raise ConfigError(f"coordinator: {exc}") from exc


def _toml(config: AgentConfig | CoordinatorConfig) -> str:
    """The fields that differ from their defaults (and the required ones), one ``key = value`` a line."""
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        has_default = field.default is not dataclasses.MISSING
        if value is None or (has_default and value == field.default):
            continue
        if isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, tuple | list):
            value = [str(v) for v in value]
        lines.append(f"{field.name} = {json.dumps(value)}")  # a JSON string, number, bool or list is TOML too
    return "\n".join(lines) + "\n"


def agent_toml(config: AgentConfig) -> str:
    """``config`` as the TOML file ``edgespeed-agent --config`` reads (paths absolute)."""
    return _toml(config)


def coordinator_toml(config: CoordinatorConfig) -> str:
    """``config`` as the TOML file ``edgespeed coordinator run --config`` reads (paths absolute)."""
    return _toml(config)


def write_agent_toml(config: AgentConfig, path: Path | None = None) -> Path:
    """Write `agent_toml` to ``path`` (by default ``agent.toml`` in the agent's state folder); returns the path."""
    path = Path(path) if path is not None else config.state_dir / "agent.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(agent_toml(config))
    return path


def write_coordinator_toml(config: CoordinatorConfig, path: Path | None = None) -> Path:
    """Write `coordinator_toml` to ``path`` (by default ``coordinator.toml`` in its state folder)."""
    path = Path(path) if path is not None else config.state_dir / "coordinator.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(coordinator_toml(config))
    return path


async def wait_ready(coordinator: Coordinator, model: str, n: int, timeout: float = 30.0) -> list[str]:
    """Wait until ``n`` devices are online and run ``model``; returns their ids.

    Raises:
        TimeoutError: not within ``timeout`` seconds.
    """
    return await coordinator.wait_for_devices(n, model=model, timeout=timeout)
