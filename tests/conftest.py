"""Shared fixtures from the fleet harness (`edgespeed.testing`): a fleet PKI, a real Mosquitto on free ports
with the project's config (development or production), unique topics."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from edgespeed.security import FleetCA, Identity, create_ca, issue_certificate
from edgespeed.testing import FleetPki, make_pki, start_broker
from edgespeed.transport import EmbeddedBroker, Message, MqttConfig, Transport, find_mosquitto
from tests.models import DigitsModel

ROOT = Path(__file__).resolve().parent.parent

# The fuzz targets are the property tests on every decoder. CI runs them with a
# modest budget; a long run selects more: HYPOTHESIS_PROFILE=long make test-fuzz.
settings.register_profile("ci", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, max_examples=200_000, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


SECURE_FLEET = "sec"


@dataclass(frozen=True)
class Pki(FleetPki):
    """The tests' fleet PKI (`edgespeed.testing.make_pki`), and a foreign CA with a ``dev-a`` of its own."""

    foreign_ca: FleetCA
    foreign_device: Identity

    @property
    def devices(self) -> Mapping[str, Identity]:
        """Every client identity by id: dev-a, dev-b, dev-c, coord and the auditor audit."""
        return self.identities


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    fleet = make_pki(
        base / "ca", SECURE_FLEET, devices=["dev-a", "dev-b", "dev-c"], coordinators=["coord"], auditors=["audit"]
    )
    foreign = create_ca(base / "foreign", fleet="evil")
    fields = {f.name: getattr(fleet, f.name) for f in dataclasses.fields(fleet)}
    return Pki(**fields, foreign_ca=foreign, foreign_device=issue_certificate(foreign, "dev-a"))


def _need_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (make test installs it; apt-get install mosquitto)")


@pytest.fixture
async def broker(pki: Pki, tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """A Mosquitto of our own on free ports: plain and mutual-TLS listeners, persistence on."""
    _need_mosquitto()
    async with start_broker(pki, tmp_path, production=False, backend="mosquitto") as b:
        yield b


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    """The digits CNN, trained and exported once per session (skipped without the ML extras)."""
    for module in ("torch", "onnxruntime", "sklearn", "safetensors", "onnxscript"):
        pytest.importorskip(module, reason=f"{module} is needed: pip install 'edgespeed[dev,onnx,torch]'")
    from tests.models import train_digits

    return train_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture
async def secure_broker(pki: Pki, tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """Mosquitto with the rendered production config: mutual TLS only, the fleet ACL, persistence."""
    _need_mosquitto()
    async with start_broker(pki, tmp_path, production=True) as broker:
        yield broker


@pytest.fixture
def client_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def prefix() -> str:
    """A topic prefix unique to the test."""
    return f"test/{uuid.uuid4().hex[:12]}"


async def take(transport: Transport, n: int, timeout: float = 10.0) -> list[Message]:
    """The next ``n`` messages of a transport, or TimeoutError."""
    out: list[Message] = []

    async def run() -> None:
        async for message in transport.messages():
            out.append(message)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


def mqtt_config(url: str, client_id: str, **kw: object) -> MqttConfig:
    """Test defaults: short timeouts and fast reconnects."""
    kw.setdefault("connect_timeout", 5.0)
    kw.setdefault("publish_timeout", 10.0)
    return MqttConfig(url, client_id, **kw)  # type: ignore[arg-type]


PG_DSN = "host=127.0.0.1 dbname=test user=postgres"


def postgres_or_skip() -> None:
    """Skip, with the reason, where this machine has no PostgreSQL (the ledger's shared engine)."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is needed: pip install 'edgespeed[postgres]'")
    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({exc})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers by folder: ``tests/unit`` needs nothing running, ``integration`` a real Mosquitto,
    ``e2e`` processes, the CLI and the demo (marked slow)."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier == "integration":
            item.add_marker(pytest.mark.mosquitto)
        elif tier == "e2e":
            item.add_marker(pytest.mark.slow)
