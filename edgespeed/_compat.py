"""Differences between the Python versions we support (3.10+)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
    from typing import Self
else:  # pragma: no cover - exercised on 3.10 only
    from async_timeout import timeout
    from typing_extensions import Self

__all__ = ["Self", "timeout"]
