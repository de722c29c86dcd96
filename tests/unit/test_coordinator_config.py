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


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('queue_size = "64"', "queue_size = '64': must be a whole number"),
        ("backends = 'onnx'", "backends = 'onnx': must be a list"),
        ("backends = [1]", "item 1 must be a string"),
        ('mqtt_protocol = "4"', "mqtt_protocol = '4': must be one of"),
        ("heartbeat_s = true", "heartbeat_s = True: must be a number"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_key(tmp_path: Path, line: str, named: str) -> None:
    """Before: `queue_size = "64"` failed deep inside with "'<' not supported between 'str' and 'int'"."""
    from edgespeed.agent import AgentConfig

    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "gw-1"\nfleet = "f"\nbroker = "mqtts://b:8883"\npki_dir = "pki"\nstate_dir = "s"\n{line}\n'
    )
    with pytest.raises(ConfigError) as caught:
        AgentConfig.from_toml(path)
    assert named in str(caught.value) and str(path) in str(caught.value)
