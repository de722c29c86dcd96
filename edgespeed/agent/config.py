"""The device agent's configuration, read from TOML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgespeed._config import build_config, read_toml
from edgespeed.errors import ConfigError, TopicError
from edgespeed.protocol.topics import validate_id
from edgespeed.transport.base import Will
from edgespeed.transport.config import MqttConfig, TlsConfig, parse_broker_url

__all__ = ["AgentConfig"]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything a device agent needs.

    Attributes:
        device_id: this device's id (its certificate's common name).
        fleet: the fleet id.
        broker: broker URL (``mqtts://`` in production).
        pki_dir: ``ca.crt``, this device's certificate and keys, and the
            certificates of the peers it talks to (the coordinator's at least).
        state_dir: the model cache, the outbox and the replay window.
        coordinator: the coordinator's id.
        backends: backend preference; empty: every available one, in the order onnx, tflite, npu, torch.
        precisions: which model variant to run where a manifest offers several (``fp32``, ``fp16``,
            ``int8``), best first; empty: the hardware's preference (fp16 with a GPU or NPU, int8 on a
            CPU with int8 dot-product instructions, else fp32; see `edgespeed.hardware.detect`).
        heartbeat_s: mean seconds between heartbeats (jittered by 20%).
        queue_size: tasks waiting at most; more are refused with ``queue_full``.
        max_batch, max_wait_ms: micro-batching of compatible tasks.
        concurrency: batches run at once.
        cache_bytes: disk budget of the model cache; least recently used models go first.
        threads: intra-op threads per backend (None: the runtime's default).
        fetch_timeout: seconds a model download may take.
        max_message_bytes: largest MQTT packet this agent sends (the broker's limit may be lower);
            a larger result becomes a ``result_too_large`` error.
        uplink_bytes_per_s: pace what the agent sends as a link of this speed would (0: no limit);
            for trying split models over slow links.
        mqtt_protocol: ``auto`` (MQTT 5 where the broker speaks it, else 3.1.1), ``5`` or ``3.1.1``
            (saves the probe, up to 2 s a connection, with a broker that speaks only 3.1.1).
        data_key_file: an absolute path to the data key (32 raw bytes or 64 hex digits, mode 0600) that
            encrypts the outbox; keep it off the data disk. Empty: the systemd credential
            ``edgespeed-data-key`` if given, else ``data.key`` made in ``state_dir``.
    """

    device_id: str
    fleet: str
    broker: str
    pki_dir: Path
    state_dir: Path
    coordinator: str = "coord"
    backends: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    heartbeat_s: float = 10.0
    queue_size: int = 64
    max_batch: int = 8
    max_wait_ms: float = 5.0
    concurrency: int = 1
    cache_bytes: int = 1 << 30
    threads: int | None = None
    fetch_timeout: float = 600.0
    max_message_bytes: int = 8 * 1024 * 1024
    uplink_bytes_per_s: float = 0.0
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = "auto"
    data_key_file: str = ""

    def __post_init__(self) -> None:
        try:
            validate_id(self.device_id, "device_id")
            validate_id(self.fleet, "fleet")
            validate_id(self.coordinator, "coordinator")
        except TopicError as exc:
            raise ConfigError(str(exc)) from exc
        parse_broker_url(self.broker)
        for name in ("queue_size", "max_batch", "concurrency", "cache_bytes", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        unknown = [p for p in self.precisions if p not in ("fp32", "fp16", "int8")]
        if unknown:
            raise ConfigError(f"precisions are fp32, fp16 and int8, not {', '.join(map(repr, unknown))}")
        if self.mqtt_protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"mqtt_protocol is auto, 5 or 3.1.1, not {self.mqtt_protocol!r}")
        if self.data_key_file and not Path(self.data_key_file).is_absolute():
            raise ConfigError(f"data_key_file must be an absolute path, not {self.data_key_file!r}")
        if self.heartbeat_s <= 0 or self.max_wait_ms < 0 or self.fetch_timeout <= 0:
            raise ConfigError("heartbeat_s and fetch_timeout must be positive, max_wait_ms not negative")

    @classmethod
    def from_toml(cls, path: Path) -> AgentConfig:
        """Read a TOML file; relative paths are relative to the file's folder.

        A ``profile = "profiles/jetson-cuda.toml"`` key reads that file first;
        the settings of this file override the profile's.

        Raises:
            ConfigError: unreadable, unknown keys, or invalid values.
        """
        path = Path(path)
        data = read_toml(path)
        if "profile" in data:
            profile_path = path.parent / str(data.pop("profile"))
            data = {**read_toml(profile_path), **data}
        return build_config(cls, data, path)

    def mqtt(self, will: Will) -> MqttConfig:
        """The transport configuration: mutual TLS from ``pki_dir`` when the URL says TLS."""
        tls = None
        if parse_broker_url(self.broker).tls:
            tls = TlsConfig(
                self.pki_dir / "ca.crt", self.pki_dir / f"{self.device_id}.crt", self.pki_dir / f"{self.device_id}.key"
            )
        # Reconnects resume the session, so tasks sent while the link was down still arrive.
        return MqttConfig(
            self.broker,
            self.device_id,
            tls=tls,
            will=will,
            clean_start=False,
            queue_size=max(self.queue_size, 16),
            max_packet_size=self.max_message_bytes,
            uplink_bytes_per_s=self.uplink_bytes_per_s,
            protocol=self.mqtt_protocol,
        )
