"""The ledger's rows as the coordinator sees them, and their payloads as the database keeps them.

Task inputs, outputs and error messages are sealed under the coordinator's data key
(`edgespeed.security.atrest`), bound to the table, the column and the task id: the database (and a
copy of its disk) holds ciphertext, and a value moved to another task or column does not open.
Ids, states, times, device ids and error codes stay in clear: the ledger's queries need them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from edgespeed.errors import AtRestError
from edgespeed.security.atrest import DataKey, is_sealed

__all__ = ["Payloads", "TaskRecord", "TaskState", "now_ms"]

_CHECK = b"edgespeed ledger key check"


def now_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class TaskState(enum.Enum):
    """Where a task is."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as the ledger holds it."""

    task_id: str
    model_id: str
    inputs: tuple[bytes, ...]
    deadline_ms: int
    state: TaskState
    attempt: int
    device_id: str | None
    lease_until_ms: int
    outputs: tuple[bytes, ...] | None
    error_code: str | None
    error_message: str | None
    created_ms: int
    pin: str | None = None  # the only device it may run on (``device=`` at submission)


class Payloads:
    """Seals and opens one tasks table's payload columns.

    Args:
        key: the data key.
        table: the tasks table's name (bound into every value, so fleets sharing a database
            cannot swap values either).
    """

    def __init__(self, key: DataKey, table: str) -> None:
        self.key = key
        self._table = table

    def seal(self, task_id: str, column: str, items: Sequence[bytes]) -> bytes:
        """A list of byte strings (inputs or outputs), packed and sealed."""
        packed = msgpack.packb([bytes(i) for i in items], use_bin_type=True)
        return self.key.seal(packed, self._table, column, task_id)

    def open(self, task_id: str, column: str, blob: bytes | memoryview | None) -> tuple[bytes, ...] | None:
        """What `seal` sealed (None stays None).

        Raises:
            AtRestError: another key, another task's or column's value, or altered.
        """
        if blob is None:
            return None
        return tuple(msgpack.unpackb(self.key.open(blob, self._table, column, task_id), raw=False))

    def seal_message(self, task_id: str, message: str) -> str:
        """An error message, sealed (a device's message may quote what it was given)."""
        return self.key.seal_text(message, self._table, "error_message", task_id)

    def open_message(self, task_id: str, message: str | None) -> str | None:
        """An error message; the ledger's own fixed texts (a deadline) are kept in clear and read as they are."""
        if message is None or not is_sealed(message):
            return message
        return self.key.open_text(message, self._table, "error_message", task_id)

    def check_value(self) -> bytes:
        """A known value sealed under the key: a ledger keeps one, and a key that cannot open it is refused."""
        return self.key.seal(_CHECK, self._table, "key check")

    def check(self, sealed: bytes | memoryview) -> None:
        """Raises AtRestError unless ``sealed`` is `check_value` under this key."""
        try:
            self.key.open(sealed, self._table, "key check")
        except AtRestError as exc:
            raise AtRestError(
                f"the ledger ({self._table}) was sealed under another data key than {self.key.key_id} "
                f"({self.key.source}): {exc}. Give every coordinator sharing it the same data_key_file or "
                "systemd credential",
                reason="wrong_key",
            ) from None

    def legacy(self, row: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """(inputs, outputs, error_message, task_id) sealed, for a (task_id, inputs, outputs, error_message) row
        written in clear by a version before encryption; None if it holds nothing in clear."""
        task_id, inputs, outputs, message = str(row[0]), row[1], row[2], row[3]
        if is_sealed(inputs) and (outputs is None or is_sealed(outputs)) and (message is None or is_sealed(message)):
            return None
        if not is_sealed(inputs):
            inputs = self.key.seal(bytes(inputs), self._table, "inputs", task_id)
        if outputs is not None and not is_sealed(outputs):
            outputs = self.key.seal(bytes(outputs), self._table, "outputs", task_id)
        if message is not None and not is_sealed(message):
            message = self.seal_message(task_id, str(message))
        return inputs, outputs, message, task_id

    def record(self, row: tuple[Any, ...]) -> TaskRecord:
        """A task from a row of the ledger's columns, its payloads opened.

        Raises:
            AtRestError: a payload does not open under the key.
        """
        task_id = str(row[0])
        return TaskRecord(
            task_id=task_id,
            model_id=str(row[1]),
            inputs=self.open(task_id, "inputs", row[2]) or (),
            deadline_ms=int(row[3]),
            state=TaskState(row[4]),
            attempt=int(row[5]),
            device_id=row[6],
            lease_until_ms=int(row[7]),
            outputs=self.open(task_id, "outputs", row[8]),
            error_code=row[9],
            error_message=self.open_message(task_id, row[10]),
            created_ms=int(row[11]),
            pin=row[12],
        )
