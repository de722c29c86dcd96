"""Encrypted at rest, end to end: a coordinator and an agent on Mosquitto (production config), a real model
published and run, then the raw bytes of what they left on disk (SQLite files, PostgreSQL columns, the model
store, a copied state folder) searched for the task's inputs, its outputs, the content key and the data keys."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgespeed.agent import Device
from edgespeed.agent.outbox import Outbox
from edgespeed.coordinator import Coordinator, PostgresLedger, SqliteLedger
from edgespeed.coordinator.store import ModelStore
from edgespeed.errors import AtRestError
from edgespeed.protocol.messages import Error
from edgespeed.security import DataKey, load_data_key
from edgespeed.testing import agent_config, coordinator_config, identity_onnx, wait_ready
from edgespeed.transport import EmbeddedBroker
from tests.conftest import PG_DSN, Pki, postgres_or_skip

pytestmark = pytest.mark.mosquitto

# The agent's files this module owns (the model cache, remote configuration and revocation list are written
# by their own modules, inside the 0700 state folder).
OWN = ("outbox.db", "replay.db", "data.key")
# What the task sends; the echo model answers with the same bytes, so they are the outputs too.
MARKER = b"AT-REST-MARKER-0123456789-abcdefghijklmnop-END"


@dataclass
class Run:
    coord_state: Path
    agent_state: Path
    task_id: str
    content_key: bytes
    live: dict[str, bytes]  # the SQLite files of both state folders while they ran (their WALs with them)
    live_modes: dict[str, int]  # the mode of everything in both state folders while they ran


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file())


def _everything(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in _files(folder))


def _key_file(path: Path) -> Path:
    """An operator's key file on "another disk" (a folder outside the state folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


async def _run(broker: EmbeddedBroker, pki: Pki, base: Path, **coordinator: Any) -> Run:
    """Publish the echo model to dev-a and run one task with the marker; both processes closed after."""
    agent_settings = {"data_key_file": coordinator.pop("agent_key")} if "agent_key" in coordinator else {}
    a = agent_config(broker, pki, "dev-a", base / "agent", backends=("onnx",), **agent_settings)
    c_config = coordinator_config(broker, pki, base / "coord", **coordinator)
    (base / "src").mkdir(parents=True)
    model = identity_onnx(base / "src" / "echo.onnx")
    async with Device(a) as dev, Coordinator(c_config) as c:
        await dev.wait_coordinator(10)
        report = await c.publish_model([model], name="echo", timeout=30)
        assert report.ok, report
        await wait_ready(c, "echo", 1)
        x = np.frombuffer(MARKER, np.uint8).reshape(1, -1)
        handle = await c.submit("echo", x, deadline=20)
        (y,) = await handle.result(timeout=20)  # end to end: the result comes back through the ledger
        np.testing.assert_array_equal(y, x)
        stored = c.store.load("echo", 1)
        assert stored is not None
        folders = (base / "coord", base / "agent")
        live = {str(p): p.read_bytes() for f in folders for p in f.glob("*.db*")}
        modes = {str(p): _mode(p) for f in folders for p in [f, *f.rglob("*")]}
        return Run(base / "coord", base / "agent", handle.task_id, stored.key, live, modes)


async def test_the_sqlite_ledger_holds_no_input_or_output_in_clear(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    run = await _run(secure_broker, pki, tmp_path)
    running = {name: raw for name, raw in run.live.items() if Path(name).name.startswith("ledger.db")}
    assert sorted(Path(n).name for n in running) == ["ledger.db", "ledger.db-shm", "ledger.db-wal"]
    assert MARKER not in b"".join(running.values())  # while it ran: the file, its WAL, its shared memory
    closed = b"".join(p.read_bytes() for p in run.coord_state.glob("ledger.db*"))  # after the last checkpoint
    assert b"SQLite format 3" in closed and MARKER not in closed
    ledger = SqliteLedger(run.coord_state / "ledger.db")  # the coordinator's key, data.key in its state folder
    record = ledger.get(run.task_id)
    assert record is not None and record.outputs is not None and MARKER in record.outputs[0]
    ledger.close()


async def test_the_postgres_ledger_holds_no_input_or_output_in_clear(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    postgres_or_skip()
    import psycopg

    prefix = f"t_{uuid.uuid4().hex[:10]}"
    key_file = _key_file(tmp_path / "keydisk" / "coord.key")
    try:
        run = await _run(secure_broker, pki, tmp_path, ledger=PG_DSN, ledger_prefix=prefix, data_key_file=str(key_file))
        with psycopg.connect(PG_DSN) as db:
            rows = db.execute(f"SELECT task_id, inputs, outputs, error_message FROM {prefix}_tasks").fetchall()
            names = sorted(r[0] for r in db.execute(f"SELECT name FROM {prefix}_keys").fetchall())
        assert [r[0] for r in rows] == [run.task_id]
        assert all(MARKER not in bytes(r[1]) and MARKER not in bytes(r[2]) for r in rows)
        assert names == ["check"]  # the key given by file is not in the database
        assert key_file.read_bytes() not in b"".join(bytes(r[1]) + bytes(r[2]) for r in rows)
    finally:
        cleaner = PostgresLedger(PG_DSN, prefix=prefix, key=load_data_key(tmp_path, str(key_file)))
        cleaner.drop()
        cleaner.close()


async def test_state_folders_are_0700_and_their_files_0600(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    run = await _run(secure_broker, pki, tmp_path)
    coord = run.coord_state
    running = {
        Path(p).relative_to(coord).as_posix(): m for p, m in run.live_modes.items() if Path(p).is_relative_to(coord)
    }
    assert {"ledger.db", "ledger.db-wal", "ledger.db-shm", "replay.db", "replay.db-wal", "data.key"} <= set(running)
    assert any(name.startswith("models/echo/1/") for name in running)
    # the coordinator's state, while it ran and after: every folder 0700, every file 0600 (ledger and its WAL,
    # replay window, key, model store)
    for name, mode in running.items():
        assert mode == (0o700 if (coord / name).is_dir() else 0o600), (name, oct(mode))
    for path in [coord, *sorted(coord.rglob("*"))]:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    # the agent's state folder is 0700; the files of its outbox, its replay window and its key 0600
    agent = run.agent_state
    assert _mode(agent) == 0o700 and run.live_modes[str(agent)] == 0o700
    own = {n: m for n, m in run.live_modes.items() if Path(n).parent == agent and Path(n).name.startswith(OWN)}
    assert {Path(n).name for n in own} >= {"outbox.db", "outbox.db-wal", "replay.db", "replay.db-wal", "data.key"}
    assert all(m == 0o600 for m in own.values()), {n: oct(m) for n, m in own.items()}


async def test_the_model_store_holds_no_clear_content_key(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    run = await _run(secure_broker, pki, tmp_path)
    models = run.coord_state / "models"
    assert not [p for p in _files(models) if p.name == "content.key"]
    assert run.content_key not in _everything(run.coord_state)
    # a clear content.key an older version left is sealed the first time it is loaded, then removed
    folder = models / "echo" / "1"
    (folder / "content.key.sealed").unlink()
    (folder / "content.key").write_bytes(run.content_key)
    (folder / "content.key").chmod(0o600)
    store = ModelStore(models, key=load_data_key(run.coord_state))
    stored = store.load("echo", 1)
    assert stored is not None and stored.key == run.content_key
    assert not (folder / "content.key").exists() and run.content_key not in _everything(run.coord_state)
    assert store.load("echo", 1).key == run.content_key  # type: ignore[union-attr]


async def test_a_copied_state_folder_without_the_key_reveals_nothing(
    secure_broker: EmbeddedBroker, pki: Pki, tmp_path: Path
) -> None:
    """The keys live on "another disk"; the state folders are copied (as a stolen disk would be) and searched."""
    coord_key, agent_key = _key_file(tmp_path / "keydisk" / "coord.key"), _key_file(tmp_path / "keydisk" / "agent.key")
    run = await _run(secure_broker, pki, tmp_path / "disk", data_key_file=str(coord_key), agent_key=str(agent_key))
    # an answer still waiting in the agent's outbox (the broker was away when it was produced)
    outbox = Outbox(run.agent_state, key=load_data_key(run.agent_state, str(agent_key)))
    outbox.put("coord", "sec/coord/answers", Error("late", MARKER.decode(), task_id=run.task_id))
    outbox.close()

    copy = tmp_path / "copy"
    shutil.copytree(run.coord_state, copy / "coord")
    shutil.copytree(run.agent_state, copy / "agent")
    everything = _everything(copy)
    assert MARKER not in everything  # no inputs, outputs or outbox answers
    assert run.content_key not in everything  # no model content key: the shards stay ciphertext
    assert coord_key.read_bytes() not in everything and agent_key.read_bytes() not in everything
    names = {p.name for p in _files(copy)}
    assert not names & {"data.key", "content.key", "outbox.key"}, names

    # what the copy holds does not open without the keys...
    with pytest.raises(AtRestError):
        SqliteLedger(copy / "coord" / "ledger.db")  # a new key made beside it is refused at once
    with pytest.raises(AtRestError):
        ModelStore(copy / "coord" / "models", key=DataKey.generate()).load("echo", 1)
    with pytest.raises(AtRestError):
        Outbox(copy / "agent", key=DataKey.generate()).pending()
    # ...and with them, it does: the data is there, encrypted
    ledger = SqliteLedger(copy / "coord" / "ledger.db", key=load_data_key(copy, str(coord_key)))
    record = ledger.get(run.task_id)
    assert record is not None and record.inputs and MARKER in record.inputs[0]
    ledger.close()
    store = ModelStore(copy / "coord" / "models", key=load_data_key(copy, str(coord_key)))
    assert store.load("echo", 1).key == run.content_key  # type: ignore[union-attr]
