"""Target selectors: which devices a model is rolled out to.

A selector is a comma-separated list of terms; a device matches when any term
does. A term is ``all`` (or ``*``), a device id, a shell pattern of ids
(``gw-*``), or ``key=value`` with key ``backend`` (the device runs that
backend), ``accelerator`` (an accelerator starting with the value, e.g.
``cuda``), ``arch`` (``x86_64``, ``aarch64``) or ``os``::

    edgespeed model publish digits.onnx --name digits --targets 'backend=onnx,gw-7'
"""

from __future__ import annotations

import fnmatch
import re

from edgespeed.coordinator.registry import DeviceInfo
from edgespeed.errors import ConfigError

__all__ = ["matches", "parse"]

_KEYS = ("backend", "accelerator", "arch", "os")
_PATTERN = re.compile(r"[a-z0-9*?\[\]-]{1,63}")


def parse(selector: str) -> list[tuple[str, str]]:
    """The terms of a selector as (key, value); key "" is an id or id pattern.

    Raises:
        ConfigError: an empty term, an unknown key, or characters outside ids and patterns.
    """
    terms = []
    for raw in selector.split(","):
        term = raw.strip()
        key, sep, value = term.partition("=")
        if not sep:
            key, value = "", term
        elif key not in _KEYS:
            raise ConfigError(f"unknown selector key {key!r}; use {', '.join(_KEYS)}")
        if not value or (not sep and _PATTERN.fullmatch(value) is None) or (sep and len(value) > 128):
            raise ConfigError(f"bad selector term {term!r}")
        terms.append((key, value))
    return terms


def matches(selector: str, device: DeviceInfo) -> bool:
    """Whether ``device`` is selected.

    Raises:
        ConfigError: a malformed selector.
    """
    card = device.card
    for key, value in parse(selector or "all"):
        if (
            (key == "" and (value in ("all", "*") or fnmatch.fnmatchcase(card.device_id, value)))
            or (key == "backend" and value in card.backends)
            or (key == "accelerator" and any(a.startswith(value) for a in card.accelerators))
            or (key == "arch" and card.arch == value)
            or (key == "os" and card.os == value)
        ):
            return True
    return False
