"""Replay protection: a sliding window of sequence numbers per sender, kept across restarts."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from edgespeed.errors import ReplayError

__all__ = ["ReplayGuard"]

WINDOW = 64
_MASK = (1 << WINDOW) - 1


class ReplayGuard:
    """Accepts each (sender, sequence) once.

    Sequences may arrive out of order within a window of 64 below the highest
    seen; older ones are refused. The top 8 bits of a sequence name a lane
    (one per process sealing under a shared identity); each lane has its own
    window. State lives in SQLite (WAL), written on every
    accepted message, so a restarted receiver still refuses what it took before.

    Args:
        path: the database file; None keeps the window in memory only (tests).
    """

    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            # u64 sequences do not fit SQLite's signed integers: both are stored as bytes.
            "CREATE TABLE IF NOT EXISTS replay (sender TEXT PRIMARY KEY, high BLOB NOT NULL, seen BLOB NOT NULL)"
        )
        self._db.commit()
        self._cache: dict[str, tuple[int, int]] = {
            sender: (int.from_bytes(high, "big"), int.from_bytes(seen, "big"))
            for sender, high, seen in self._db.execute("SELECT sender, high, seen FROM replay")
        }

    def check(self, sender: str, sequence: int) -> None:
        """Record ``sequence`` from ``sender``.

        Raises:
            ReplayError: seen before, or too far below the highest seen.
        """
        lane = sequence >> 56
        if lane:
            sender, sequence = f"{sender}#{lane}", sequence & ((1 << 56) - 1)
        with self._lock:
            high, seen = self._cache.get(sender, (-1, 0))
            if sequence > high:
                shift = sequence - high
                seen = ((seen << shift) | 1) & _MASK if shift < WINDOW else 1
                high = sequence
            elif high - sequence >= WINDOW:
                raise ReplayError(f"sequence {sequence} from {sender!r} is below the window", reason="too_old")
            elif seen >> (high - sequence) & 1:
                raise ReplayError(f"sequence {sequence} from {sender!r} was already seen", reason="replay")
            else:
                seen |= 1 << (high - sequence)
            self._cache[sender] = (high, seen)
            self._db.execute(
                "INSERT INTO replay (sender, high, seen) VALUES (?, ?, ?) "
                "ON CONFLICT(sender) DO UPDATE SET high = excluded.high, seen = excluded.seen",
                (sender, high.to_bytes(8, "big"), seen.to_bytes(WINDOW // 8, "big")),
            )
            self._db.commit()

    def close(self) -> None:
        """Close the database."""
        self._db.close()
