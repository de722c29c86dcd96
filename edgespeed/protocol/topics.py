"""The versioned MQTT topic namespace of a fleet.

Every topic starts with ``es/1/<fleet>/``. Ids (fleet, device, channel) match
``^[a-z0-9][a-z0-9-]{0,62}$``, so no id can inject ``+``, ``#``, ``/`` or NUL.
Each writer writes only below its own id, which lets a broker ACL pin a client
to its topics and lets a receiver tell the sender from the topic alone::

    es/1/<fleet>/dev/<device>/in       device inbox (coordinator and peers write)
    es/1/<fleet>/dev/<device>/birth    retained birth (device card)
    es/1/<fleet>/dev/<device>/death    death, also the device's MQTT will
    es/1/<fleet>/dev/<device>/hb       heartbeats
    es/1/<fleet>/coord/in/<sender>     coordinator inbox, one sub-topic per sender
    es/1/<fleet>/coord/state           retained coordinator online/offline state
    es/1/<fleet>/coord/probe/<lane>    a coordinator's link probe to itself (bytes only)
    es/1/<fleet>/bcast/<channel>       broadcast to the whole fleet
    es/1/<fleet>/bcast/models/<model>  retained signed manifest of one model
    es/1/<fleet>/bcast/crl             retained revocation list (signed by the fleet CA)
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from edgespeed.errors import TopicError

__all__ = [
    "ID_PATTERN",
    "PREFIX",
    "TopicKind",
    "TopicName",
    "birth",
    "broadcast",
    "coordinator_inbox",
    "coordinator_inbox_filter",
    "coordinator_probe",
    "coordinator_state",
    "crl",
    "death",
    "device_filter",
    "device_inbox",
    "fleet_root",
    "heartbeat",
    "model_filter",
    "model_manifest",
    "parse_topic",
    "validate_id",
]

PREFIX = "es/1"
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class TopicKind(enum.Enum):
    """What a topic of the namespace carries."""

    DEVICE_INBOX = "in"
    BIRTH = "birth"
    DEATH = "death"
    HEARTBEAT = "hb"
    COORDINATOR_INBOX = "coord-in"
    COORDINATOR_STATE = "coord-state"
    COORDINATOR_PROBE = "coord-probe"
    BROADCAST = "bcast"
    MODEL = "model"


@dataclass(frozen=True, slots=True)
class TopicName:
    """A parsed topic: its kind, fleet and the id it names (device, sender or channel)."""

    kind: TopicKind
    fleet: str
    id: str | None = None


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet, device or channel id.

    Raises:
        TopicError: not a string, empty, too long, or with characters outside
            ``[a-z0-9-]`` (this rejects ``+``, ``#``, ``/`` and NUL).
    """
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise TopicError(f"invalid {what} {value!r}: must match {ID_PATTERN.pattern}", reason="bad_id")
    return value


def _device(fleet: str, device: str, leaf: str) -> str:
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/dev/{validate_id(device, 'device id')}/{leaf}"


def device_inbox(fleet: str, device: str) -> str:
    """Topic a device reads its tasks, chunks and forwarded activations from."""
    return _device(fleet, device, "in")


def birth(fleet: str, device: str) -> str:
    """Retained topic of a device's birth message."""
    return _device(fleet, device, "birth")


def death(fleet: str, device: str) -> str:
    """Topic of a device's death message and MQTT will."""
    return _device(fleet, device, "death")


def heartbeat(fleet: str, device: str) -> str:
    """Topic of a device's heartbeats."""
    return _device(fleet, device, "hb")


def coordinator_inbox(fleet: str, sender: str) -> str:
    """Topic ``sender`` writes to reach the coordinator."""
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/coord/in/{validate_id(sender, 'sender id')}"


def coordinator_inbox_filter(fleet: str, *, shared_group: str = "") -> str:
    """Subscription filter for every sender's coordinator inbox; with ``shared_group``, an MQTT shared
    subscription, so the broker splits the inboxes' traffic among the coordinators of that group."""
    inbox = f"{PREFIX}/{validate_id(fleet, 'fleet')}/coord/in/+"
    return f"$share/{validate_id(shared_group, 'shared group')}/{inbox}" if shared_group else inbox


def coordinator_probe(fleet: str, lane: int) -> str:
    """Topic a coordinator sends its link probes to itself on (``lane``: its replay lane, 0-255)."""
    if not isinstance(lane, int) or not 0 <= lane <= 255:
        raise TopicError(f"invalid probe lane {lane!r}: 0-255", reason="bad_id")
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/coord/probe/{lane}"


def fleet_root(fleet: str) -> str:
    """The prefix of every topic of a fleet (for ACLs and bridges)."""
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}"


def coordinator_state(fleet: str) -> str:
    """Retained topic of the coordinator's online/offline state."""
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/coord/state"


def broadcast(fleet: str, channel: str) -> str:
    """Topic of a fleet-wide broadcast channel (models, config, ...)."""
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/bcast/{validate_id(channel, 'channel')}"


def crl(fleet: str) -> str:
    """Retained topic of the fleet's revocation list (only coordinators write it)."""
    return broadcast(fleet, "crl")


def model_manifest(fleet: str, model_id: str) -> str:
    """Retained topic of one model's signed manifest (one topic per model, so each stays retained)."""
    return f"{broadcast(fleet, 'models')}/{validate_id(model_id, 'model id')}"


def model_filter(fleet: str) -> str:
    """Subscription filter for every model's manifest."""
    return f"{broadcast(fleet, 'models')}/+"


def device_filter(fleet: str, leaf: str) -> str:
    """Subscription filter for one leaf of every device, e.g. all births."""
    if leaf not in {"in", "birth", "death", "hb"}:
        raise TopicError(f"unknown device topic leaf {leaf!r}", reason="unknown_topic")
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/dev/+/{leaf}"


_DEVICE_LEAVES = {
    "in": TopicKind.DEVICE_INBOX,
    "birth": TopicKind.BIRTH,
    "death": TopicKind.DEATH,
    "hb": TopicKind.HEARTBEAT,
}


def parse_topic(topic: str) -> TopicName:
    """Parse a topic of the namespace.

    Raises:
        TopicError: the topic is not part of the EdgeSpeed namespace, or an id
            in it is invalid.
    """
    if not isinstance(topic, str) or len(topic) > 512:
        raise TopicError("topic must be a string of at most 512 characters", reason="unknown_topic")
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        raise TopicError(f"not an EdgeSpeed v1 topic: {topic!r}", reason="unknown_topic")
    fleet = validate_id(parts[2], "fleet")
    rest = parts[3:]
    match rest:
        case ["dev", device, leaf] if leaf in _DEVICE_LEAVES:
            return TopicName(_DEVICE_LEAVES[leaf], fleet, validate_id(device, "device id"))
        case ["coord", "in", sender]:
            return TopicName(TopicKind.COORDINATOR_INBOX, fleet, validate_id(sender, "sender id"))
        case ["coord", "state"]:
            return TopicName(TopicKind.COORDINATOR_STATE, fleet)
        case ["coord", "probe", lane] if lane.isdigit() and int(lane) <= 255:
            return TopicName(TopicKind.COORDINATOR_PROBE, fleet, lane)
        case ["bcast", "models", model]:
            return TopicName(TopicKind.MODEL, fleet, validate_id(model, "model id"))
        case ["bcast", channel]:
            return TopicName(TopicKind.BROADCAST, fleet, validate_id(channel, "channel"))
    raise TopicError(f"unknown EdgeSpeed topic: {topic!r}", reason="unknown_topic")
