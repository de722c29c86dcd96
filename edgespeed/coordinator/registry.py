"""The registry of devices, kept from births, deaths and heartbeats.

Each device session has an epoch (its birth's). A death whose epoch is older
than the last birth is stale and ignored (the device came back before its
will arrived); heartbeats of another epoch are ignored too. A device that
misses heartbeats becomes ``suspect``, then ``lost``. Sans I/O: the coordinator
feeds it messages and the clock.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgespeed.errors import ConfigError
from edgespeed.protocol.messages import Birth, Death, DeviceCard, Heartbeat

__all__ = ["DeviceInfo", "DeviceStatus", "Registry"]


class DeviceStatus(enum.Enum):
    """What the coordinator believes of a device."""

    ONLINE = "online"
    SUSPECT = "suspect"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device as the registry knows it."""

    card: DeviceCard
    epoch: int
    status: DeviceStatus
    last_seen: float
    load: float = 0.0
    queue_depth: int = 0
    models: tuple[str, ...] = field(default=())

    @property
    def device_id(self) -> str:
        return self.card.device_id


class Registry:
    """Devices and their state.

    Args:
        heartbeat_s: the heartbeat interval devices use.
        suspect_after: missed intervals before a device is suspect.
        lost_after: missed intervals before it is lost.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        *,
        heartbeat_s: float = 10.0,
        suspect_after: float = 2.5,
        lost_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < suspect_after < lost_after or heartbeat_s <= 0:
            raise ConfigError("need heartbeat_s > 0 and 0 < suspect_after < lost_after")
        self._suspect = heartbeat_s * suspect_after
        self._lost = heartbeat_s * lost_after
        self._clock = clock
        self._devices: dict[str, DeviceInfo] = {}
        self._quarantined: dict[str, str] = {}  # device -> why; kept across its sessions

    def on_birth(self, birth: Birth, *, retained: bool = False) -> DeviceInfo | None:
        """A device (re)joined; returns its entry, or None for a birth not newer than the one known.

        A retained birth (delivered on subscribing) only says the device existed:
        it stays ``suspect`` (no work) until a heartbeat of that session arrives.
        """
        current = self._devices.get(birth.card.device_id)
        if current is not None and birth.epoch <= current.epoch:
            return None
        status = DeviceStatus.SUSPECT if retained else DeviceStatus.ONLINE
        info = DeviceInfo(birth.card, birth.epoch, status, self._clock())
        self._devices[birth.card.device_id] = info
        return info

    def on_death(self, device_id: str, death: Death) -> bool:
        """A device left or vanished; False for a stale death (an older session's will)."""
        current = self._devices.get(device_id)
        if current is None or death.epoch < current.epoch:
            return False
        self._devices[device_id] = replace(current, status=DeviceStatus.LOST)
        return True

    def on_heartbeat(self, device_id: str, beat: Heartbeat) -> bool:
        """Record a heartbeat of the current session; False if ignored (unknown device or other epoch)."""
        current = self._devices.get(device_id)
        if current is None or beat.epoch != current.epoch:
            return False
        self._devices[device_id] = replace(
            current,
            status=DeviceStatus.ONLINE,
            last_seen=self._clock(),
            load=beat.load,
            queue_depth=beat.queue_depth,
            models=beat.models,
        )
        return True

    def sweep(self) -> list[tuple[str, DeviceStatus]]:
        """Mark devices that missed heartbeats; returns the changes."""
        now = self._clock()
        changes = []
        for device_id, info in self._devices.items():
            if info.status is DeviceStatus.LOST:
                continue
            silent = now - info.last_seen
            status = (
                DeviceStatus.LOST
                if silent >= self._lost
                else DeviceStatus.SUSPECT
                if silent >= self._suspect
                else DeviceStatus.ONLINE
            )
            if status is not info.status:
                self._devices[device_id] = replace(info, status=status)
                changes.append((device_id, status))
        return changes

    def get(self, device_id: str) -> DeviceInfo | None:
        """A device's entry."""
        return self._devices.get(device_id)

    def devices(self, *statuses: DeviceStatus) -> list[DeviceInfo]:
        """Devices in the given states (all when none given), by id."""
        return sorted(
            (d for d in self._devices.values() if not statuses or d.status in statuses), key=lambda d: d.device_id
        )

    def online(self) -> list[DeviceInfo]:
        """Devices to place work on: online, and not quarantined."""
        return [d for d in self.devices(DeviceStatus.ONLINE) if d.device_id not in self._quarantined]

    def placeable(self, info: DeviceInfo) -> bool:
        """Whether work may go to this device now: online, and not quarantined."""
        return info.status is DeviceStatus.ONLINE and info.device_id not in self._quarantined

    def quarantine(self, device_id: str, reason: str) -> None:
        """Give a device no more work (it answered with results that do not match the model)."""
        self._quarantined.setdefault(device_id, reason)

    def quarantined(self) -> dict[str, str]:
        """Devices that get no work, and why."""
        return dict(self._quarantined)
