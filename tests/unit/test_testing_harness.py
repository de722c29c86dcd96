"""The fleet harness (`edgespeed.testing`) without a broker: PKI, configurations, TOML files, broker settings."""

import dataclasses
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from edgespeed.agent import AgentConfig
from edgespeed.coordinator import CoordinatorConfig
from edgespeed.errors import BrokerError, ConfigError
from edgespeed.testing import (
    TEST_AGENT_SETTINGS,
    agent_config,
    agent_toml,
    broker_settings,
    coordinator_config,
    fleet,
    make_pki,
    start_broker,
    write_agent_toml,
    write_coordinator_toml,
)
from edgespeed.testing.pki import FleetPki

URL = "mqtts://127.0.0.1:8883"


def default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return make_pki(tmp_path_factory.mktemp("h") / "pki", "f1", devices=["d1", "d2"], auditors=["aud"], clients=["raw"])


def test_the_pki_holds_every_identity_as_agents_and_coordinators_expect(fleet_pki: FleetPki) -> None:
    folder = fleet_pki.directory
    assert (folder / "ca.crt").is_file() and (folder / "ca.key").is_file()
    for name in ("broker", "coord", "d1", "d2", "aud", "raw"):
        for suffix in (".crt", ".key", ".x25519.key", ".ed25519.key"):
            assert (folder / f"{name}{suffix}").is_file(), name + suffix
        assert (folder / f"{name}.key").stat().st_mode & 0o077 == 0
    roles = {}
    for name in ("broker", "coord", "d1", "aud", "raw"):
        cert = x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes())
        roles[name] = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert roles == {"broker": "broker", "coord": "coordinator", "d1": "device", "aud": "device", "raw": "device"}
    assert fleet_pki.device_ids == ("d1", "d2") and fleet_pki.auditor_ids == ("aud",)
    assert fleet_pki.coordinator == "coord" and set(fleet_pki.identities) == {"coord", "d1", "d2", "aud", "raw"}
    tls = fleet_pki.tls("d1")
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (folder / "ca.crt", folder / "d1.crt", folder / "d1.key")
    assert fleet_pki.identity("broker") == fleet_pki.broker
    with pytest.raises(ConfigError, match="no identity"):
        fleet_pki.identity("nobody")


def test_the_pki_refuses_an_id_twice_and_an_existing_ca(tmp_path: Path, fleet_pki: FleetPki) -> None:
    with pytest.raises(ConfigError, match="more than once: d1"):
        make_pki(tmp_path / "p", "f", devices=["d1", "d1"])
    with pytest.raises(ConfigError, match="already exists"):
        make_pki(fleet_pki.directory, "f", devices=["x"])


def test_configurations_name_the_fleet_broker_and_pki(fleet_pki: FleetPki, tmp_path: Path) -> None:
    agent = agent_config(URL, fleet_pki, "d1", tmp_path / "d1", backends=["onnx"])
    assert (agent.fleet, agent.broker, agent.pki_dir, agent.coordinator) == ("f1", URL, fleet_pki.directory, "coord")
    assert agent.backends == ("onnx",) and agent.heartbeat_s == TEST_AGENT_SETTINGS["heartbeat_s"]
    plain = agent_config(URL, fleet_pki, "d1", tmp_path / "d1", test_timings=False)
    assert (plain.heartbeat_s, plain.max_wait_ms) == (
        default(AgentConfig, "heartbeat_s"),
        default(AgentConfig, "max_wait_ms"),
    )
    coordinator = coordinator_config(URL, fleet_pki, tmp_path / "c", max_inflight=4)
    assert (coordinator.fleet, coordinator.coordinator_id, coordinator.max_inflight) == ("f1", "coord", 4)
    assert (coordinator.heartbeat_s, coordinator.lease_s) == (0.3, 10.0)
    assert coordinator_config(URL, fleet_pki, tmp_path / "c", test_timings=False).lease_s == default(
        CoordinatorConfig, "lease_s"
    )
    # A PKI given as a folder needs the fleet named; unknown and invalid settings are ConfigErrors.
    assert agent_config(URL, fleet_pki.directory, "d1", tmp_path, fleet="other").fleet == "other"
    with pytest.raises(ConfigError, match="fleet="):
        agent_config(URL, fleet_pki.directory, "d1", tmp_path)
    with pytest.raises(ConfigError, match="colour"):
        agent_config(URL, fleet_pki, "d1", tmp_path, colour="blue")
    with pytest.raises(ConfigError):
        coordinator_config(URL, fleet_pki, tmp_path, lease_s=0)


def test_toml_files_read_back_as_the_same_configuration(fleet_pki: FleetPki, tmp_path: Path) -> None:
    agent = agent_config(URL, fleet_pki, "d2", tmp_path / "d2", backends=("onnx", "torch"), threads=1, max_wait_ms=0)
    path = write_agent_toml(agent)
    assert path == tmp_path / "d2" / "agent.toml"
    assert AgentConfig.from_toml(path) == agent
    assert "threads = 1" in agent_toml(agent) and "queue_size" not in agent_toml(agent)  # defaults left out
    coordinator = coordinator_config(URL, fleet_pki, tmp_path / "c", presence=False, policy="round-robin")
    assert CoordinatorConfig.from_toml(write_coordinator_toml(coordinator, tmp_path / "c.toml")) == coordinator


def test_broker_settings_production_and_development(
    fleet_pki: FleetPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edgespeed.testing.broker.find_mosquitto", lambda: "/usr/sbin/mosquitto")
    prod = broker_settings(fleet_pki, tmp_path)
    assert prod.backend == "mosquitto" and prod.port is None and prod.tls is not None and not prod.allow_anonymous
    assert prod.acl_file is not None and prod.data_dir == tmp_path / "broker" / "data"
    acl = prod.acl_file.read_text()
    assert "user coord" in acl and "user aud" in acl and "user raw" not in acl and "es/1/f1/" in acl
    dev = broker_settings(fleet_pki, tmp_path, production=False, max_packet_size=1 << 20)
    assert dev.port == 0 and dev.tls is not None and dev.allow_anonymous and dev.acl_file is None
    assert dev.tls.cert_file == fleet_pki.broker.cert_file and dev.max_packet_size == 1 << 20
    tls_only = broker_settings(fleet_pki, tmp_path, production=False, plain=False, persistence=False)
    assert tls_only.port is None and tls_only.tls is not None and tls_only.data_dir is None
    amqtt = broker_settings(fleet_pki, tmp_path, production=False, backend="amqtt")
    assert amqtt.tls is None and amqtt.port == 0  # amqtt serves a plain listener only
    assert broker_settings(None, tmp_path, production=False).tls is None
    with pytest.raises(ConfigError, match="PKI"):
        broker_settings(None, tmp_path)
    with pytest.raises(BrokerError, match="amqtt"):
        broker_settings(fleet_pki, tmp_path, backend="amqtt")


async def test_production_without_mosquitto_is_a_clear_error(
    fleet_pki: FleetPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edgespeed.testing.broker.find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match=r"needs Mosquitto.*not installed.*production=False"):
        async with start_broker(fleet_pki, tmp_path):
            pass
    with pytest.raises(BrokerError, match="not installed"):
        async with fleet(devices=1, folder=tmp_path / "f"):
            pass
