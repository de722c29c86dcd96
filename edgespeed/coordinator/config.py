"""The coordinator's configuration, read from TOML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgespeed._config import build_config, read_toml
from edgespeed.errors import ConfigError, TopicError
from edgespeed.protocol.topics import validate_id
from edgespeed.transport.base import Will
from edgespeed.transport.config import MqttConfig, TlsConfig, parse_broker_url

__all__ = ["POLICIES", "CoordinatorConfig"]

POLICIES = ("least-loaded", "round-robin")


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything a coordinator needs.

    Attributes:
        fleet: the fleet id.
        broker: broker URL (``mqtts://`` in production).
        pki_dir: ``ca.crt``, the coordinator's certificate and keys, and the devices' certificates.
        state_dir: the ledger (unless ``ledger`` names PostgreSQL), the replay window and the model store.
        coordinator_id: the coordinator's id (its certificate's common name).
        ledger: empty for SQLite in ``state_dir``; a PostgreSQL connection string
            (``postgresql://...`` or ``host=... dbname=...``) for a ledger shared by several coordinators.
        ledger_prefix: table name prefix in the ledger.
        policy: placement among capable devices: ``least-loaded`` or ``round-robin``.
        heartbeat_s: the heartbeat interval the devices use; a device silent for
            2.5 intervals is suspect (no new work), for 5 lost (its work goes elsewhere).
        lease_s: seconds a device holds a task before it is given to another.
        deadline_s: default deadline of a task.
        max_attempts: dispatches of one task before it fails.
        max_inflight: tasks outstanding on one device at most; more wait in the ledger.
        shared_group: an MQTT shared-subscription group name: coordinators in
            the same group split the device answers between them (they must share a
            PostgreSQL ledger). Empty: every coordinator hears everything.
        presence: publish the retained online state (and its offline will).
        split_objective: what the split planner optimises: ``throughput`` or ``latency``.
        max_message_bytes: largest MQTT packet the coordinator sends (the broker's limit may be
            lower); a task whose inputs do not fit fails with ``input_too_large``.
        max_result_bytes: the most one output of a result may hold once decoded; a device that
            answers with more (or with anything the model does not declare) gets no more work.
        mqtt_protocol: ``auto`` (MQTT 5 where the broker speaks it, else 3.1.1), ``5`` or ``3.1.1``
            (saves the probe, up to 2 s a connection, with a broker that speaks only 3.1.1).
        data_key_file: an absolute path to the data key (32 raw bytes or 64 hex digits, mode 0600) that
            encrypts the ledger's task inputs, outputs and error messages and the model store's content keys;
            keep it off the data disk. Empty: the systemd credential ``edgespeed-data-key`` if given, else
            ``data.key`` made in ``state_dir`` (for a PostgreSQL ledger: a key kept in the ledger's tables).
            Coordinators sharing a PostgreSQL ledger need the same key (the same file or credential on each).
    """

    fleet: str
    broker: str
    pki_dir: Path
    state_dir: Path
    coordinator_id: str = "coord"
    ledger: str = ""
    ledger_prefix: str = "es"
    policy: str = "least-loaded"
    heartbeat_s: float = 10.0
    lease_s: float = 30.0
    deadline_s: float = 30.0
    max_attempts: int = 5
    max_inflight: int = 32
    shared_group: str = ""
    presence: bool = True
    max_message_bytes: int = 8 * 1024 * 1024
    split_objective: str = "throughput"
    max_result_bytes: int = 256 * 1024 * 1024
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = "auto"
    data_key_file: str = ""

    def __post_init__(self) -> None:
        try:
            validate_id(self.fleet, "fleet")
            validate_id(self.coordinator_id, "coordinator_id")
            if self.shared_group:
                validate_id(self.shared_group, "shared_group")
        except TopicError as exc:
            raise ConfigError(str(exc)) from exc
        parse_broker_url(self.broker)
        if self.split_objective not in ("throughput", "latency"):
            raise ConfigError("split_objective is throughput or latency")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if min(self.heartbeat_s, self.lease_s, self.deadline_s) <= 0:
            raise ConfigError("heartbeat_s, lease_s and deadline_s must be positive")
        if self.max_attempts < 1 or self.max_inflight < 1 or self.max_message_bytes < 1024:
            raise ConfigError("max_attempts and max_inflight must be at least 1, max_message_bytes 1024")
        if self.mqtt_protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"mqtt_protocol is auto, 5 or 3.1.1, not {self.mqtt_protocol!r}")
        if self.max_result_bytes < 1:
            raise ConfigError("max_result_bytes must be at least 1")
        if self.data_key_file and not Path(self.data_key_file).is_absolute():
            raise ConfigError(f"data_key_file must be an absolute path, not {self.data_key_file!r}")
        if self.shared_group and not self.ledger:
            raise ConfigError("shared_group needs a ledger the coordinators share (a PostgreSQL connection string)")

    @classmethod
    def from_toml(cls, path: Path) -> CoordinatorConfig:
        """Read a TOML file; relative paths are relative to the file's folder.

        Raises:
            ConfigError: unreadable, unknown keys, or invalid values.
        """
        path = Path(path)
        return build_config(cls, read_toml(path), path)

    def mqtt(self, client_id: str, *, will: Will | None, persistent: bool) -> MqttConfig:
        """The transport configuration: mutual TLS from ``pki_dir`` when the URL says TLS.

        A persistent session (the long-running coordinator) keeps what devices
        send while it is away; short-lived clients (the CLI) leave nothing behind.
        """
        tls = None
        if parse_broker_url(self.broker).tls:
            name = self.coordinator_id
            tls = TlsConfig(self.pki_dir / "ca.crt", self.pki_dir / f"{name}.crt", self.pki_dir / f"{name}.key")
        return MqttConfig(
            self.broker,
            client_id,
            tls=tls,
            will=will,
            clean_start=not persistent,
            session_expiry=3600 if persistent else 0,
            queue_size=1024,
            max_packet_size=self.max_message_bytes,
            protocol=self.mqtt_protocol,
        )
