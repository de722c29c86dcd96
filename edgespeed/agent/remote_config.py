"""Remote configuration: settings a coordinator signs and sends to its devices.

`RemoteConfig` owns the live settings (``heartbeat_s``, ``max_batch``,
``max_wait_ms``, ``log_level``) and the version of the configuration last
applied. A configuration is applied only if it is meant for this device,
signed by a coordinator, newer than the last one, and every setting in it is
known and in range; it is then kept in ``remote-config.json`` in the state
folder, so a restarted agent starts with it and still refuses older ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from edgespeed.agent.config import AgentConfig
from edgespeed.errors import SecurityError
from edgespeed.protocol.messages import DeviceConfig
from edgespeed.security import KeyDirectory
from edgespeed.security.signing import verify_signed

__all__ = ["RemoteConfig"]

log = logging.getLogger(__name__)

_SETTINGS: dict[str, Callable[[Any], bool]] = {
    "heartbeat_s": lambda v: isinstance(v, int | float) and 0.05 <= v <= 3600,
    "max_batch": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096,
    "max_wait_ms": lambda v: isinstance(v, int | float) and 0 <= v <= 10_000,
    "log_level": lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
}


class RemoteConfig:
    """The live settings of an agent: its configuration's, then the last signed remote one's.

    Attributes:
        settings: the settings in force; the runner and the heartbeat read them at each use.
        version: the version of the remote configuration applied, None if none was.
    """

    def __init__(self, config: AgentConfig) -> None:
        self._device_id = config.device_id
        self._path = config.state_dir / "remote-config.json"
        self.settings: dict[str, Any] = {
            "heartbeat_s": config.heartbeat_s,
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "log_level": logging.getLevelName(logging.getLogger("edgespeed").getEffectiveLevel()),
        }
        self.version: int | None = None

    def load(self) -> None:
        """Take up the configuration applied before a restart, if any.

        Raises:
            SecurityError: a saved setting is unknown or out of range.
        """
        if self._path.exists():
            saved = json.loads(self._path.read_text())
            self.settings.update(_check_settings(saved["settings"]))
            self.version = int(saved["version"])

    def apply(self, remote: DeviceConfig, keys: KeyDirectory) -> None:
        """Apply a signed configuration meant for us and newer than the last one.

        Raises:
            SecurityError: unsigned, forged, not newer, or a setting out of range (nothing is applied).
        """
        if remote.targets and self._device_id not in remote.targets:
            return
        if remote.version == self.version:
            return  # a retained configuration seen again
        verify_signed(remote, keys, installed_version=self.version)
        settings = _check_settings(remote.settings)
        self.settings.update(settings)
        if "log_level" in settings:
            logging.getLogger("edgespeed").setLevel(settings["log_level"])
        self.version = remote.version
        self._path.write_text(json.dumps({"version": remote.version, "settings": self.settings}))
        log.info("applied remote configuration v%d: %s", remote.version, settings)


def _check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    for key, value in settings.items():
        check = _SETTINGS.get(key)
        if check is None or not check(value):
            raise SecurityError(f"remote setting {key}={value!r} is unknown or out of range", reason="bad_config")
    return dict(settings)
