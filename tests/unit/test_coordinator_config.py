"""The coordinator end to end: real agents, the digits CNN, Mosquitto with the production config (mTLS, ACL)."""

import dataclasses
from pathlib import Path

import pytest

from edgespeed.coordinator import CoordinatorConfig
from edgespeed.errors import ConfigError
from tests.conftest import SECURE_FLEET

pytestmark = pytest.mark.mosquitto
FLEET = SECURE_FLEET
FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_configuration_errors_are_clear(tmp_path: Path) -> None:
    base = {"fleet": "f", "broker": "mqtt://127.0.0.1:1883", "pki_dir": tmp_path, "state_dir": tmp_path}
    with pytest.raises(ConfigError, match="policy"):
        CoordinatorConfig(**base, policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shared_group"):
        CoordinatorConfig(**base, shared_group="g")  # type: ignore[arg-type]
    path = tmp_path / "c.toml"
    path.write_text('fleet = "f"\nbroker = "mqtt://127.0.0.1:1883"\npki_dir = "."\nstate_dir = "s"\nspeed = 1\n')
    with pytest.raises(ConfigError, match="speed"):
        CoordinatorConfig.from_toml(path)
    path.write_text('fleet = "f"\nbroker = "mqtt://127.0.0.1:1883"\npki_dir = "."\nstate_dir = "s"\n')
    assert CoordinatorConfig.from_toml(path).state_dir == (tmp_path / "s").resolve()
    assert dataclasses.replace(CoordinatorConfig.from_toml(path), presence=False).presence is False
