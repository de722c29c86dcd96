"""A fleet PKI for a harness: a CA and every identity, in the one folder the agent and coordinator read.

`make_pki` writes what ``edgespeed certs`` would: ``ca.crt`` and ``ca.key``, the
broker's server certificate, and for every coordinator, device and auditor
``<id>.crt``, ``<id>.key`` (TLS) and the payload keys ``<id>.x25519.key``
(sealing) and ``<id>.ed25519.key`` (signing). That folder is the ``pki_dir`` of
every `AgentConfig` and `CoordinatorConfig` of the fleet: each member finds its
own keys and its peers' certificates there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgespeed.errors import ConfigError
from edgespeed.security import FleetCA, Identity, create_ca, issue_certificate
from edgespeed.transport import TlsConfig

__all__ = ["FleetPki", "make_pki"]


@dataclass(frozen=True)
class FleetPki:
    """A fleet CA and the identities it issued, all in ``ca.directory``.

    Attributes:
        fleet: the fleet id (topics, ACL).
        ca: the fleet CA.
        broker: the broker's server identity.
        identities: every client identity by id: coordinators, devices and auditors.
        device_ids, coordinator_ids, auditor_ids: the ids of each kind, in the order given.
            Auditors hold device certificates; the fleet ACL lets them read everything.
    """

    fleet: str
    ca: FleetCA
    broker: Identity
    identities: Mapping[str, Identity]
    device_ids: tuple[str, ...]
    coordinator_ids: tuple[str, ...]
    auditor_ids: tuple[str, ...]

    @property
    def directory(self) -> Path:
        """The ``pki_dir`` of every member: the CA certificate, each identity's certificate and keys."""
        return self.ca.directory

    @property
    def coordinator(self) -> str:
        """The first coordinator's id: the one agents answer to and configurations name.

        Raises:
            ConfigError: the PKI has no coordinator.
        """
        if not self.coordinator_ids:
            raise ConfigError("this fleet PKI has no coordinator identity")
        return self.coordinator_ids[0]

    def identity(self, name: str) -> Identity:
        """The identity ``name`` (a client, or the broker).

        Raises:
            ConfigError: no such identity in this PKI.
        """
        if name == self.broker.name:
            return self.broker
        try:
            return self.identities[name]
        except KeyError:
            raise ConfigError(f"no identity {name!r} in the fleet PKI at {self.directory}") from None

    def tls(self, name: str) -> TlsConfig:
        """Mutual TLS settings for a client connecting as ``name``."""
        ident = self.identity(name)
        return TlsConfig(self.ca.cert_file, ident.cert_file, ident.key_file)


def make_pki(
    folder: Path,
    fleet: str,
    *,
    devices: Iterable[str] = (),
    coordinators: Iterable[str] = ("coord",),
    auditors: Iterable[str] = (),
    clients: Iterable[str] = (),
    broker: str = "broker",
    broker_hosts: Iterable[str] = (),
    days: float = 30,
) -> FleetPki:
    """Create a fleet CA in ``folder`` and issue the broker's, coordinators', devices' and auditors' identities.

    Args:
        folder: where everything is written (created if needed); becomes ``pki_dir``.
        fleet: the fleet id.
        devices, coordinators, auditors: identity ids of each kind; an id may appear once only.
        clients: further device certificates for clients that are neither agents nor auditors
            (raw MQTT peers, a rogue device); they are in ``identities`` only.
        broker: the broker's identity (its certificate is for ``broker_hosts``, by default
            ``localhost`` and ``127.0.0.1``).
        days: validity of the issued certificates.

    Raises:
        ConfigError: a CA already exists in ``folder``, an id is given twice, or an id is invalid.
    """
    device_ids, coordinator_ids, auditor_ids = tuple(devices), tuple(coordinators), tuple(auditors)
    client_ids = tuple(clients)
    names = [broker, *coordinator_ids, *device_ids, *auditor_ids, *client_ids]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"identity ids given more than once: {', '.join(twice)}")
    ca = create_ca(Path(folder), fleet=fleet)
    broker_identity = issue_certificate(ca, broker, role="broker", hosts=tuple(broker_hosts), days=days)
    identities: dict[str, Identity] = {}
    for name in coordinator_ids:
        identities[name] = issue_certificate(ca, name, role="coordinator", days=days)
    for name in (*device_ids, *auditor_ids, *client_ids):
        identities[name] = issue_certificate(ca, name, role="device", days=days)
    return FleetPki(fleet, ca, broker_identity, identities, device_ids, coordinator_ids, auditor_ids)
