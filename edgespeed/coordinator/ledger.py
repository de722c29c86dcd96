"""The coordinator's durable ledger of tasks, attempts, results and rollouts.

SQLite (WAL) by default; PostgreSQL when several coordinators share a fleet.
Every state change is one conditional ``UPDATE ... RETURNING``, so two
coordinators cannot both claim a task or both complete it, and a restarted
coordinator finds its unfinished tasks where it left them.

A task is ``pending`` until a device is given it (``dispatched``, with a lease
and an attempt number), then ``done`` with the first result that arrives or
``failed`` with a reason (``deadline``, or what the device said). A dispatched
task whose lease runs out is due again. Results are accepted only for an
attempt that was given to the device that answers.

Task inputs, outputs and error messages are sealed under the coordinator's data key (see
`ledger_rows.Payloads`); the ledger keeps a value sealed under it and refuses a key that cannot open it,
so coordinators sharing a PostgreSQL ledger must share the key (the same ``data_key_file`` or systemd
credential on each). Given no key, a SQLite ledger uses ``data.key`` beside its file and a PostgreSQL
ledger one it keeps in its own tables: the weakest choices, logged as such.

The API is synchronous (a call is a short transaction); async callers use
``asyncio.to_thread`` so the event loop never waits on the database.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgespeed.coordinator.ledger_rows import Payloads, TaskRecord, TaskState, now_ms
from edgespeed.errors import ConfigError, MissingDependencyError
from edgespeed.security.atrest import (
    DataKey,
    configured_key,
    load_data_key,
    private_database,
    private_dir,
    stored_key,
)

if TYPE_CHECKING:
    from edgespeed.coordinator.config import CoordinatorConfig

__all__ = [
    "Ledger",
    "PostgresLedger",
    "SqliteLedger",
    "TaskRecord",
    "TaskState",
    "ledger_caller",
    "now_ms",
    "open_ledger",
]

_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,30}")
_OPEN = ("pending", "dispatched")


class Ledger(abc.ABC):
    """Tasks, attempts, results and rollouts, durably. Subclasses supply the connection."""

    _blob = "BLOB"
    _columns = (
        "task_id, model_id, inputs, deadline_ms, state, attempt, device_id, lease_until_ms, outputs, "
        "error_code, error_message, created_ms, pin"
    )

    def __init__(self, prefix: str) -> None:
        if _PREFIX.fullmatch(prefix) is None:
            raise ConfigError(f"ledger table prefix must match {_PREFIX.pattern}")
        self._t = f"{prefix}_tasks"
        self._a = f"{prefix}_attempts"
        self._r = f"{prefix}_rollouts"
        self._s = f"{prefix}_splits"
        self._k = f"{prefix}_keys"
        # Reentrant: a transaction holds it while its statements run.
        self._lock = threading.RLock()

    @abc.abstractmethod
    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Execute one statement (in its own transaction unless inside `_transaction`) and return its rows."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """Run the statements inside as one transaction: all or none."""

    def _schema(self, key: DataKey | None) -> None:
        b = self._blob
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self._t} (task_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, "
            f"inputs {b} NOT NULL, deadline_ms BIGINT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, "
            f"device_id TEXT, lease_until_ms BIGINT NOT NULL, outputs {b}, error_code TEXT, error_message TEXT, "
            "created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL)"
        )
        self._run(f"CREATE INDEX IF NOT EXISTS {self._t}_due ON {self._t} (state, lease_until_ms)")
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self._a} (task_id TEXT NOT NULL, attempt INTEGER NOT NULL, "
            "device_id TEXT NOT NULL, given_ms BIGINT NOT NULL, PRIMARY KEY (task_id, attempt))"
        )
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self._r} (model_id TEXT NOT NULL, version BIGINT NOT NULL, "
            "device_id TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL, updated_ms BIGINT NOT NULL, "
            "PRIMARY KEY (model_id, version, device_id))"
        )
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self._s} (name TEXT NOT NULL, version BIGINT NOT NULL, "
            "spec TEXT NOT NULL, updated_ms BIGINT NOT NULL, PRIMARY KEY (name, version))"
        )
        self._run(f"CREATE TABLE IF NOT EXISTS {self._k} (name TEXT PRIMARY KEY, value {b} NOT NULL)")
        self._add_column(self._t, "pin", "TEXT")
        self._p = self._open_key(key)

    def _open_key(self, key: DataKey | None) -> Payloads:
        """The payloads' sealer, its key checked against the ledger's; the first open seals older clear rows.

        Raises:
            AtRestError: the ledger's values were sealed under another key.
        """
        with self._transaction():
            if key is None:  # a database keeping its own key (PostgreSQL given none)
                raw = secrets.token_bytes(32)
                self._run(
                    f"INSERT INTO {self._k} (name, value) VALUES ('key', ?) ON CONFLICT (name) DO NOTHING", (raw,)
                )
                stored = self._run(f"SELECT value FROM {self._k} WHERE name = 'key'")[0][0]
                key = stored_key(bytes(stored), f"the ledger's table {self._k}")
            payloads = Payloads(key, self._t)
            if self._run(
                f"INSERT INTO {self._k} (name, value) VALUES ('check', ?) ON CONFLICT (name) DO NOTHING RETURNING name",
                (payloads.check_value(),),
            ):
                last, select = "", f"SELECT task_id, inputs, outputs, error_message FROM {self._t} WHERE task_id > ?"
                while rows := self._run(select + " ORDER BY task_id LIMIT 256", (last,)):  # a few rows at a time
                    for row in rows:
                        if (sealed := payloads.legacy(row)) is not None:
                            sql = f"UPDATE {self._t} SET inputs = ?, outputs = ?, error_message = ? WHERE task_id = ?"
                            self._run(sql, sealed)
                    last = str(rows[-1][0])
            else:
                payloads.check(self._run(f"SELECT value FROM {self._k} WHERE name = 'check'")[0][0])
        return payloads

    @abc.abstractmethod
    def _add_column(self, table: str, column: str, kind: str) -> None:
        """Add a column to a table made by an older version, if it lacks it."""

    # -- tasks ---------------------------------------------------------------

    def add(
        self, task_id: str, model_id: str, inputs: Sequence[bytes], deadline_ms: int, *, pin: str | None = None
    ) -> bool:
        """Record a new pending task; False if the id is already known (submitting twice is harmless).

        ``pin``: the only device the task may run on; kept with the task, so a restarted coordinator
        or a peer sharing the ledger honours it too.
        """
        now = now_ms()
        rows = self._run(
            f"INSERT INTO {self._t} (task_id, model_id, inputs, deadline_ms, state, attempt, lease_until_ms, "
            "created_ms, updated_ms, pin) VALUES (?, ?, ?, ?, 'pending', 0, 0, ?, ?, ?) "
            "ON CONFLICT (task_id) DO NOTHING RETURNING task_id",
            (task_id, model_id, self._p.seal(task_id, "inputs", inputs), deadline_ms, now, now, pin),
        )
        return bool(rows)

    def add_claimed(
        self,
        task_id: str,
        model_id: str,
        inputs: Sequence[bytes],
        deadline_ms: int,
        device_id: str,
        *,
        lease_ms: int,
        pin: str | None = None,
    ) -> bool:
        """Record a new task already given to ``device_id`` (attempt 1): `add` and `claim` in one transaction.

        False, and nothing changes, if the id is already known.
        """
        now, sealed = now_ms(), self._p.seal(task_id, "inputs", inputs)
        with self._transaction():
            rows = self._run(
                f"INSERT INTO {self._t} (task_id, model_id, inputs, deadline_ms, state, attempt, device_id, "
                "lease_until_ms, created_ms, updated_ms, pin) VALUES (?, ?, ?, ?, 'dispatched', 1, ?, ?, ?, ?, ?) "
                "ON CONFLICT (task_id) DO NOTHING RETURNING task_id",
                (task_id, model_id, sealed, deadline_ms, device_id, now + lease_ms, now, now, pin),
            )
            if not rows:
                return False
            self._run(
                f"INSERT INTO {self._a} (task_id, attempt, device_id, given_ms) VALUES (?, 1, ?, ?)",
                (task_id, device_id, now),
            )
        return True

    def claim(self, task_id: str, device_id: str, *, lease_ms: int, now: int | None = None) -> int | None:
        """Give a due task to ``device_id``; returns the new attempt number, or None if not due."""
        now = now_ms() if now is None else now
        with self._transaction():
            return self._claim(task_id, device_id, lease_ms, now)

    def _claim(self, task_id: str, device_id: str, lease_ms: int, now: int) -> int | None:
        # The task's new attempt and the record of who was given it land together, or neither does.
        rows = self._run(
            f"UPDATE {self._t} SET state = 'dispatched', attempt = attempt + 1, device_id = ?, "
            "lease_until_ms = ?, updated_ms = ? WHERE task_id = ? AND deadline_ms > ? "
            "AND (state = 'pending' OR (state = 'dispatched' AND lease_until_ms <= ?)) RETURNING attempt",
            (device_id, now + lease_ms, now, task_id, now, now),
        )
        if not rows:
            return None
        attempt = int(rows[0][0])
        self._run(
            f"INSERT INTO {self._a} (task_id, attempt, device_id, given_ms) VALUES (?, ?, ?, ?)",
            (task_id, attempt, device_id, now),
        )
        return attempt

    def release(self, task_id: str, attempt: int, device_id: str | None = None) -> bool:
        """Make a dispatched task due again at once (its device was lost, or said "not now").

        With ``device_id``, only if that attempt was given to that device: nobody else can give it back.
        """
        if device_id is not None and not self._was_given(task_id, attempt, device_id):
            return False
        rows = self._run(
            f"UPDATE {self._t} SET state = 'pending', lease_until_ms = 0, updated_ms = ? "
            "WHERE task_id = ? AND attempt = ? AND state = 'dispatched' RETURNING task_id",
            (now_ms(), task_id, attempt),
        )
        return bool(rows)

    def release_device(self, device_id: str) -> list[str]:
        """Make every task dispatched to ``device_id`` due again (the device was lost); returns their ids."""
        rows = self._run(
            f"UPDATE {self._t} SET state = 'pending', lease_until_ms = 0, updated_ms = ? "
            "WHERE device_id = ? AND state = 'dispatched' RETURNING task_id",
            (now_ms(), device_id),
        )
        return sorted(str(r[0]) for r in rows)

    def abort(self, task_id: str, code: str, message: str) -> bool:
        """End an unfinished task with an error no device reported (no capable device, too many attempts)."""
        rows = self._run(
            f"UPDATE {self._t} SET state = 'failed', error_code = ?, error_message = ?, updated_ms = ? "
            "WHERE task_id = ? AND state IN ('pending', 'dispatched') RETURNING task_id",
            (code, self._p.seal_message(task_id, message), now_ms(), task_id),
        )
        return bool(rows)

    def _was_given(self, task_id: str, attempt: int, device_id: str) -> bool:
        rows = self._run(
            f"SELECT 1 FROM {self._a} WHERE task_id = ? AND attempt = ? AND device_id = ?",
            (task_id, attempt, device_id),
        )
        return bool(rows)

    def complete(
        self, task_id: str, attempt: int, device_id: str, outputs: Sequence[bytes], *, now: int | None = None
    ) -> bool:
        """Record a result. True only for the first result, in time, of an attempt given to that device.

        A result after the deadline is refused: the task fails with ``deadline`` (see `expire`).
        """
        if not self._was_given(task_id, attempt, device_id):
            return False  # a task or attempt this device was never given
        now = now_ms() if now is None else now
        rows = self._run(
            f"UPDATE {self._t} SET state = 'done', outputs = ?, device_id = ?, updated_ms = ? "
            "WHERE task_id = ? AND state IN ('pending', 'dispatched') AND deadline_ms >= ? RETURNING task_id",
            (self._p.seal(task_id, "outputs", outputs), device_id, now, task_id, now),
        )
        return bool(rows)

    def fail(self, task_id: str, attempt: int, device_id: str, code: str, message: str) -> bool:
        """Record a device's error for a task. True if it ended the task."""
        if not self._was_given(task_id, attempt, device_id):
            return False
        rows = self._run(
            f"UPDATE {self._t} SET state = 'failed', error_code = ?, error_message = ?, updated_ms = ? "
            "WHERE task_id = ? AND state IN ('pending', 'dispatched') RETURNING task_id",
            (code, self._p.seal_message(task_id, message), now_ms(), task_id),
        )
        return bool(rows)

    def expire(self, *, now: int | None = None) -> list[str]:
        """Fail every unfinished task whose deadline has passed; returns their ids."""
        now = now_ms() if now is None else now
        rows = self._run(
            f"UPDATE {self._t} SET state = 'failed', error_code = 'deadline', "
            "error_message = 'the deadline passed before a result came', updated_ms = ? "
            "WHERE state IN ('pending', 'dispatched') AND deadline_ms <= ? RETURNING task_id",
            (now, now),
        )
        return sorted(str(r[0]) for r in rows)

    def due(self, *, now: int | None = None, limit: int = 100) -> list[TaskRecord]:
        """Unfinished tasks that need a device: pending, or dispatched with their lease run out."""
        now = now_ms() if now is None else now
        rows = self._run(
            f"SELECT {self._columns} FROM {self._t} WHERE deadline_ms > ? AND "
            "(state = 'pending' OR (state = 'dispatched' AND lease_until_ms <= ?)) ORDER BY created_ms LIMIT ?",
            (now, now, limit),
        )
        return [self._p.record(r) for r in rows]

    def get(self, task_id: str) -> TaskRecord | None:
        """A task by id."""
        rows = self._run(f"SELECT {self._columns} FROM {self._t} WHERE task_id = ?", (task_id,))
        return self._p.record(rows[0]) if rows else None

    def ended(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The tasks among ``task_ids`` that have ended (done or failed), by whoever ended them."""
        out: list[TaskRecord] = []
        ids = list(task_ids)
        for start in range(0, len(ids), 500):  # SQLite allows 999 parameters a statement
            part = ids[start : start + 500]
            marks = ", ".join("?" * len(part))
            rows = self._run(
                f"SELECT {self._columns} FROM {self._t} WHERE task_id IN ({marks}) AND state IN ('done', 'failed')",
                part,
            )
            out += [self._p.record(r) for r in rows]
        return out

    def counts(self) -> dict[str, int]:
        """How many tasks are in each state."""
        found = {str(s): int(n) for s, n in self._run(f"SELECT state, COUNT(*) FROM {self._t} GROUP BY state")}
        return {state.value: found.get(state.value, 0) for state in TaskState}

    # -- rollouts ------------------------------------------------------------

    def set_rollout(self, model_id: str, version: int, device_id: str, state: str, reason: str = "") -> None:
        """Record a device's report on a model version."""
        self._run(
            f"INSERT INTO {self._r} (model_id, version, device_id, state, reason, updated_ms) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model_id, version, device_id) DO UPDATE SET "
            "state = excluded.state, reason = excluded.reason, updated_ms = excluded.updated_ms",
            (model_id, version, device_id, state, reason, now_ms()),
        )

    def rollouts(self, model_id: str, version: int) -> dict[str, tuple[str, str]]:
        """Each device's state and reason for a model version."""
        rows = self._run(
            f"SELECT device_id, state, reason FROM {self._r} WHERE model_id = ? AND version = ?", (model_id, version)
        )
        return {str(d): (str(s), str(r)) for d, s, r in rows}

    # -- split models ----------------------------------------------------------

    def put_split(self, name: str, version: int, spec: str) -> None:
        """Record a split model's description (JSON), so every coordinator sharing the ledger can place it."""
        self._run(
            f"INSERT INTO {self._s} (name, version, spec, updated_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, version) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
            (name, version, spec, now_ms()),
        )

    def splits(self) -> dict[str, tuple[int, str]]:
        """The newest version of every split model: name -> (version, description)."""
        rows = self._run(f"SELECT name, version, spec FROM {self._s} ORDER BY name, version")
        return {str(n): (int(v), str(s)) for n, v, s in rows}

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""


class SqliteLedger(Ledger):
    """The ledger in a SQLite file (WAL mode), for one coordinator.

    Args:
        path: the database file (made mode 0600, its -wal and -shm too, in a folder made 0700).
        prefix: table name prefix.
        key: the data key; None: the one in ``data.key`` beside the file (made on first use).
    """

    def __init__(self, path: Path, *, prefix: str = "es", key: DataKey | None = None) -> None:
        super().__init__(prefix)
        private_dir(Path(path).parent)
        key = key or load_data_key(Path(path).parent)
        self._db = sqlite3.connect(str(private_database(Path(path))), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._schema(key)

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _add_column(self, table: str, column: str, kind: str) -> None:
        if column not in {str(row[1]) for row in self._run(f"PRAGMA table_info({table})")}:
            self._run(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()


class PostgresLedger(Ledger):
    """The ledger in PostgreSQL, shared by several coordinators.

    Args:
        dsn: a libpq connection string, e.g. ``host=db dbname=edgespeed user=coord``.
        prefix: table name prefix (several fleets may share a database).
        connect_timeout: seconds.
        key: the data key, the same for every coordinator sharing the ledger; None: one the ledger keeps
            in its own tables (made by the first coordinator), so a copy of the database reveals everything.
    """

    _blob = "BYTEA"

    def __init__(self, dsn: str, *, prefix: str = "es", connect_timeout: int = 10, key: DataKey | None = None) -> None:
        super().__init__(prefix)
        try:
            import psycopg
        except ImportError as exc:
            raise MissingDependencyError("psycopg", "postgres") from exc
        self._db = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout)
        self._schema(key)

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            cursor = self._db.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
            return list(cursor.fetchall()) if cursor.description else []

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock, self._db.transaction():
            yield

    def _add_column(self, table: str, column: str, kind: str) -> None:
        self._run(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    def drop(self) -> None:
        """Remove this ledger's tables (tests, decommissioning)."""
        for table in (self._t, self._a, self._r, self._s, self._k):
            self._run(f"DROP TABLE IF EXISTS {table}")

    def close(self) -> None:
        self._db.close()


def open_ledger(config: CoordinatorConfig) -> Ledger:
    """The ledger the configuration names: PostgreSQL for a connection string, else SQLite in ``state_dir``;
    its data key from ``data_key_file`` or the systemd credential, else the weakest choice (see the classes)."""
    if config.ledger:
        return PostgresLedger(config.ledger, prefix=config.ledger_prefix, key=configured_key(config.data_key_file))
    key = load_data_key(config.state_dir, config.data_key_file)
    return SqliteLedger(config.state_dir / "ledger.db", prefix=config.ledger_prefix, key=key)


T = TypeVar("T")


def ledger_caller(ledger: Ledger) -> Callable[..., Awaitable[Any]]:
    """How async code calls this ledger: inline for SQLite (one short local transaction, tens of
    microseconds in WAL mode, cheaper than the hop to a thread), in a thread for a server round trip."""
    if isinstance(ledger, SqliteLedger):
        return _inline
    return _threaded


async def _inline(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


async def _threaded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)
