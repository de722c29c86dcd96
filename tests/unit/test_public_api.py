"""Each package declares its public surface in a sorted __all__ whose names exist."""

import importlib

import pytest

PACKAGES = [
    "edgespeed",
    "edgespeed.errors",
    "edgespeed.protocol",
    "edgespeed.protocol.topics",
    "edgespeed.protocol.messages",
    "edgespeed.protocol.envelope",
    "edgespeed.protocol.tensor",
    "edgespeed.protocol.blob",
    "edgespeed.transfer",
    "edgespeed.security",
    "edgespeed.transport",
    "edgespeed.engine",
    "edgespeed.engine.registry",
    "edgespeed.hardware",
    "edgespeed.pipeline",
    "edgespeed.coordinator",
    "edgespeed.coordinator.policies",
    "edgespeed.optimize",
    "edgespeed.bench.suite",
    "edgespeed.testing",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names missing {item}"


def test_every_error_derives_from_the_root() -> None:
    from edgespeed import errors

    for item in errors.__all__:
        assert issubclass(getattr(errors, item), errors.EdgeSpeedError)
