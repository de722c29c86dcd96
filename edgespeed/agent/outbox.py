"""Messages a device must send, kept on disk until the broker has them.

Rows are sealed under the agent's data key (`edgespeed.security.atrest`: ``data_key_file``, the
systemd credential, else ``data.key`` in the state folder), bound to their recipient, topic and kind,
so a copied disk without the key reveals no results. ``outbox.db`` (and its -wal, -shm) is mode 0600.
Messages are sealed for their recipient only when sent, so one that waited out a long disconnect is
not stale.

Rows an older version encrypted under ``outbox.key`` (a key kept beside them) are sealed again under
the data key when the outbox opens, and ``outbox.key`` is removed.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgespeed.protocol._body import decode_body, encode_body
from edgespeed.protocol.messages import Message, kind_of, message_class
from edgespeed.security.atrest import DataKey, private_database, private_dir

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


class Outbox:
    """A durable, encrypted queue of (recipient, topic, message).

    Args:
        directory: the agent's state folder (made mode 0700).
        key: the agent's data key.
    """

    def __init__(self, directory: Path, *, key: DataKey) -> None:
        private_dir(directory)
        self._key = key
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(private_database(directory / "outbox.db")), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, "
            "topic TEXT NOT NULL, kind INTEGER NOT NULL, nonce BLOB NOT NULL, body BLOB NOT NULL)"
        )
        self._db.commit()
        self._reseal(directory / "outbox.key")

    def _reseal(self, old_key: Path) -> None:
        """Seal rows of the older format (their own nonce, under ``outbox.key``) under the data key."""
        if not old_key.exists():
            return
        raw = old_key.read_bytes()
        aead = AESGCM(raw) if len(raw) == 32 else None
        with self._lock:
            rows = self._db.execute("SELECT id, recipient, topic, kind, nonce, body FROM outbox").fetchall()
            for row_id, recipient, topic, kind, nonce, body in rows:
                if len(nonce) != 12:
                    continue  # sealed under the data key already
                plain = None
                if aead is not None:
                    with contextlib.suppress(InvalidTag):
                        plain = aead.decrypt(nonce, body, f"{recipient}|{topic}|{kind}".encode())
                if plain is None:
                    log.warning(
                        "outbox row %d does not open under %s (the old version could not send it): dropped",
                        row_id,
                        old_key,
                    )
                    self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                    continue
                sealed = self._key.seal(plain, "outbox", recipient, topic, str(kind))
                self._db.execute("UPDATE outbox SET nonce = ?, body = ? WHERE id = ?", (b"", sealed, row_id))
            self._db.commit()
        old_key.unlink()

    def put(self, recipient: str, topic: str, message: Message) -> int:
        """Store a message; returns its row id."""
        kind = int(kind_of(message))
        body = self._key.seal(encode_body(message), "outbox", recipient, topic, str(kind))
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO outbox (recipient, topic, kind, nonce, body) VALUES (?, ?, ?, ?, ?)",
                (recipient, topic, kind, b"", body),
            )
            self._db.commit()
            return int(cursor.lastrowid or 0)

    def pending(self, limit: int = 256) -> list[tuple[int, str, str, Message]]:
        """The oldest stored messages.

        Raises:
            AtRestError: a row does not open under the data key.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT id, recipient, topic, kind, body FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        out = []
        for row_id, recipient, topic, kind, body in rows:
            plain = self._key.open(body, "outbox", recipient, topic, str(kind))
            out.append((int(row_id), str(recipient), str(topic), decode_body(message_class(kind), plain)))
        return out

    def remove(self, row_id: int) -> None:
        """Forget a message the broker has acknowledged."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()
