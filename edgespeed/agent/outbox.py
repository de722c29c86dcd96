"""Messages a device must send, kept on disk until the broker has them.

Rows are encrypted under a key of the device's own (``outbox.key``, mode 0600),
so a copied disk reveals no results. Messages are sealed for their recipient
only when sent, so one that waited out a long disconnect is not stale.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgespeed.protocol._body import decode_body, encode_body
from edgespeed.protocol.messages import Message, kind_of, message_class

__all__ = ["Outbox"]


def _local_key(path: Path) -> bytes:
    if path.exists():
        key = path.read_bytes()
        if len(key) == 32:
            return key
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class Outbox:
    """A durable, encrypted queue of (recipient, topic, message)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._aead = AESGCM(_local_key(directory / "outbox.key"))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(directory / "outbox.db"), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, "
            "topic TEXT NOT NULL, kind INTEGER NOT NULL, nonce BLOB NOT NULL, body BLOB NOT NULL)"
        )
        self._db.commit()

    def put(self, recipient: str, topic: str, message: Message) -> int:
        """Store a message; returns its row id."""
        nonce = os.urandom(12)
        kind = int(kind_of(message))
        body = self._aead.encrypt(nonce, encode_body(message), f"{recipient}|{topic}|{kind}".encode())
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO outbox (recipient, topic, kind, nonce, body) VALUES (?, ?, ?, ?, ?)",
                (recipient, topic, kind, nonce, body),
            )
            self._db.commit()
            return int(cursor.lastrowid or 0)

    def pending(self, limit: int = 256) -> list[tuple[int, str, str, Message]]:
        """The oldest stored messages."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, recipient, topic, kind, nonce, body FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        out = []
        for row_id, recipient, topic, kind, nonce, body in rows:
            plain = self._aead.decrypt(nonce, body, f"{recipient}|{topic}|{kind}".encode())
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
