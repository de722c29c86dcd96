"""A broker for a harness: Mosquitto (or amqtt) on free loopback ports, stopped on the way out."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from edgespeed.errors import BrokerError, ConfigError
from edgespeed.testing.pki import FleetPki
from edgespeed.transport import BrokerSettings, BrokerTls, EmbeddedBroker, find_mosquitto
from edgespeed.transport.broker import production_settings

__all__ = ["broker_settings", "broker_url", "start_broker"]

BrokerBackend = Literal["auto", "mosquitto", "amqtt"]


def broker_settings(
    pki: FleetPki | None,
    folder: Path,
    *,
    production: bool = True,
    backend: BrokerBackend = "auto",
    plain: bool = True,
    persistence: bool = True,
    max_packet_size: int | None = None,
) -> BrokerSettings:
    """The settings `start_broker` runs; ports are 0 (free ones are picked at start).

    Production: Mosquitto with the rendered production configuration, mutual TLS
    only and the fleet ACL of ``pki`` (its coordinators read and write the
    fleet, its auditors read everything), the ACL written under ``folder/broker``.
    Development: a plain listener (unless ``plain`` is false) and, when ``pki`` is
    given and the broker is Mosquitto, a mutual-TLS listener; anonymous clients and
    no ACL. amqtt (``backend="amqtt"``, or ``auto`` without Mosquitto) serves the
    plain listener only. Persistence, when on, lives in ``folder/broker/data``
    (amqtt keeps nothing).

    Raises:
        BrokerError: production without Mosquitto installed.
        ConfigError: production without a PKI, or a broker with no listener at all.
    """
    folder = Path(folder)
    data_dir = folder / "broker" / "data" if persistence else None
    mosquitto = find_mosquitto() is not None
    if production:
        if pki is None:
            raise ConfigError("a production broker needs the fleet PKI (its certificate, CA and ACL)")
        if backend == "amqtt" or not mosquitto:
            raise BrokerError(
                "the production broker (mutual TLS and the fleet ACL) needs Mosquitto, "
                + ("which amqtt cannot replace" if mosquitto else "which is not installed")
                + " (Debian/Ubuntu: apt-get install mosquitto); or use production=False for a development broker"
            )
        settings = production_settings(
            pki.directory,
            fleet=pki.fleet,
            coordinators=pki.coordinator_ids,
            auditors=pki.auditor_ids,
            broker_name=pki.broker.name,
            out_dir=folder / "broker",
            host="127.0.0.1",
            tls_port=0,
            data_dir=data_dir,
        )
        if not persistence:
            settings = dataclasses.replace(settings, data_dir=None)
    else:
        tls_listener = pki is not None and backend != "amqtt" and mosquitto
        if not plain and not tls_listener:
            raise ConfigError("a development broker without its plain listener needs a PKI and Mosquitto for TLS")
        tls = None
        if tls_listener:
            assert pki is not None
            tls = BrokerTls(pki.ca.cert_file, pki.broker.cert_file, pki.broker.key_file)
        settings = BrokerSettings(
            host="127.0.0.1",
            port=0 if plain else None,
            tls=tls,
            data_dir=data_dir,
            backend=backend,
        )
    if max_packet_size is not None:
        settings = dataclasses.replace(settings, max_packet_size=max_packet_size)
    return settings


@contextlib.asynccontextmanager
async def start_broker(
    pki: FleetPki | None,
    folder: Path,
    *,
    production: bool = True,
    backend: BrokerBackend = "auto",
    plain: bool = True,
    persistence: bool = True,
    max_packet_size: int | None = None,
) -> AsyncIterator[EmbeddedBroker]:
    """Run a broker on free loopback ports for the body of an ``async with``; it is stopped on the way out.

    The settings are `broker_settings`'s (production: mutual TLS and the fleet ACL,
    Mosquitto required; development: plain and TLS listeners). Connect to
    ``broker.tls_url`` (production, or development with a PKI) or ``broker.url``.
    It listens before the body starts (10 s at most).

    Raises:
        BrokerError: production without Mosquitto, or the broker did not start.
    """
    settings = broker_settings(
        pki,
        folder,
        production=production,
        backend=backend,
        plain=plain,
        persistence=persistence,
        max_packet_size=max_packet_size,
    )
    async with EmbeddedBroker(settings) as broker:
        yield broker


def broker_url(broker: EmbeddedBroker | str) -> str:
    """The URL clients use: the TLS listener when the broker has one, else the plain one."""
    if isinstance(broker, str):
        return broker
    return broker.tls_url if broker.settings.tls is not None else broker.url
