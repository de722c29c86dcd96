"""Encryption at rest: where the data key comes from, values bound to what they are, and the ledger and the
outbox on real files (and the real PostgreSQL server of this machine) holding ciphertext only."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import uuid
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgespeed.agent.outbox import Outbox
from edgespeed.coordinator import PostgresLedger, SqliteLedger
from edgespeed.coordinator.ledger import now_ms
from edgespeed.errors import AtRestError, ConfigError, SealError, SecurityError
from edgespeed.protocol.messages import Error
from edgespeed.security import DataKey, configured_key, load_data_key
from edgespeed.security.atrest import CREDENTIAL, private_database, private_dir
from tests.conftest import PG_DSN, postgres_or_skip

MARKER = b"AT-REST-MARKER-7f3a9c"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _key_file(path: Path, raw: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(raw)
    path.chmod(mode)
    return path


def _raw(folder: Path, name: str) -> bytes:
    """Every byte SQLite keeps for a database: the file, its WAL and its shared memory."""
    return b"".join(p.read_bytes() for p in folder.glob(name + "*") if p.is_file())


# -- where the key comes from ------------------------------------------------------


def test_key_sources_in_order_file_then_credential_then_generated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    state, other_disk, creds = tmp_path / "state", tmp_path / "other", tmp_path / "creds"
    other_disk.mkdir()
    creds.mkdir()
    file_key, cred_key = os.urandom(32), os.urandom(32)
    key_file = _key_file(other_disk / "data.key", file_key)
    (creds / CREDENTIAL).write_bytes(cred_key)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    # 1. the operator's file wins over the credential, and nothing is made in the state folder
    chosen = load_data_key(state, str(key_file))
    assert chosen.key_id == DataKey(file_key).key_id and "data_key_file" in chosen.source
    assert not (state / "data.key").exists()
    # 2. no file named: the systemd credential
    chosen = load_data_key(state, "")
    assert chosen.key_id == DataKey(cred_key).key_id and CREDENTIAL in chosen.source
    assert not (state / "data.key").exists()
    # a credentials folder without our credential does not count
    (creds / CREDENTIAL).unlink()
    assert configured_key("") is None
    # 3. neither: a key made in the state folder, 0600 in a 0700 folder, the same on every later start
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with caplog.at_level(logging.WARNING, logger="edgespeed.security.atrest"):
        made = load_data_key(state)
    assert (state / "data.key").read_bytes() != file_key and len((state / "data.key").read_bytes()) == 32
    assert _mode(state / "data.key") == 0o600 and _mode(state) == 0o700
    assert load_data_key(state).key_id == made.key_id
    assert "beside the data it protects" in caplog.text
    assert sorted(p.name for p in state.iterdir()) == ["data.key"]  # no temporary file left behind


def test_a_named_key_file_must_exist_be_private_and_hold_a_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match="cannot be read"):
        load_data_key(state, str(tmp_path / "missing.key"))
    assert not (state / "data.key").exists()  # never a silent new key in its place
    raw = os.urandom(32)
    with pytest.raises(SecurityError, match="readable by others"):
        load_data_key(state, str(_key_file(tmp_path / "open.key", raw, 0o644)))
    with pytest.raises(ConfigError, match="32 raw bytes or 64 hex digits"):
        load_data_key(state, str(_key_file(tmp_path / "short.key", raw[:31])))
    # 64 hex digits (what `openssl rand -hex 32` prints) are the same key as the 32 bytes
    as_hex = _key_file(tmp_path / "hex.key", raw.hex().encode() + b"\n")
    assert load_data_key(state, str(as_hex)).key_id == DataKey(raw).key_id


def test_a_damaged_generated_key_is_never_replaced(tmp_path: Path) -> None:
    _key_file(tmp_path / "data.key", b"short")
    with pytest.raises(ConfigError, match="not a data key"):
        load_data_key(tmp_path)
    assert (tmp_path / "data.key").read_bytes() == b"short"


# -- values bound to what they are ----------------------------------------------------


def test_values_open_only_with_their_key_and_their_associated_data() -> None:
    key = DataKey.generate()
    sealed = key.seal(MARKER, "es_tasks", "inputs", "t-1")
    assert MARKER not in sealed and len(sealed) == len(MARKER) + 32
    assert key.open(sealed, "es_tasks", "inputs", "t-1") == MARKER
    for context in (("es_tasks", "inputs", "t-2"), ("es_tasks", "outputs", "t-1"), ("xx_tasks", "inputs", "t-1")):
        with pytest.raises(AtRestError):
            key.open(sealed, *context)
    # the parts are length-prefixed: moving a separator is another context
    joined = key.seal(b"v", "a|b", "c")
    with pytest.raises(AtRestError):
        key.open(joined, "a", "b|c")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(AtRestError):
        key.open(bytes(flipped), "es_tasks", "inputs", "t-1")
    with pytest.raises(AtRestError, match="not sealed"):
        key.open(msgpack.packb([MARKER]), "es_tasks", "inputs", "t-1")
    text = key.seal_text("bad input: AT-REST-MARKER", "es_tasks", "error_message", "t-1")
    assert "MARKER" not in text and key.open_text(text, "es_tasks", "error_message", "t-1").endswith("MARKER")


def test_a_wrong_key_fails_clearly() -> None:
    right, wrong = DataKey.generate(source="the right one"), DataKey.generate(source="the wrong one")
    sealed = right.seal(MARKER, "outbox", "coord")
    with pytest.raises(AtRestError) as caught:
        wrong.open(sealed, "outbox", "coord")
    assert isinstance(caught.value, SealError) and caught.value.reason == "wrong_key"
    assert wrong.key_id in str(caught.value) and "the wrong one" in str(caught.value)
    assert right.key_id not in repr(wrong) and "DataKey(id=" in repr(right)  # no key bytes in the repr
    with pytest.raises(ConfigError):
        DataKey(b"\0" * 16)


# -- the ledger --------------------------------------------------------------------------


def _fill(ledger: SqliteLedger | PostgresLedger) -> None:
    deadline = now_ms() + 60_000
    ledger.add("t-1", "m", [MARKER + b"-in-1"], deadline)
    ledger.add("t-2", "m", [MARKER + b"-in-2"], deadline)
    assert ledger.claim("t-1", "dev-a", lease_ms=60_000) == 1
    assert ledger.complete("t-1", 1, "dev-a", [MARKER + b"-out-1"])
    assert ledger.claim("t-2", "dev-a", lease_ms=60_000) == 1
    assert ledger.fail("t-2", 1, "dev-a", "bad_input", "cannot reshape " + MARKER.decode())


def test_the_sqlite_ledger_keeps_ciphertext_only_in_private_files(tmp_path: Path) -> None:
    key = DataKey.generate()
    ledger = SqliteLedger(tmp_path / "db" / "ledger.db", key=key)
    _fill(ledger)
    assert MARKER not in _raw(tmp_path / "db", "ledger.db")  # file, WAL and shared memory
    assert {p.name: _mode(p) for p in (tmp_path / "db").iterdir()} == {
        "ledger.db": 0o600,
        "ledger.db-wal": 0o600,
        "ledger.db-shm": 0o600,
    }
    assert _mode(tmp_path / "db") == 0o700
    done, failed = ledger.get("t-1"), ledger.get("t-2")
    assert done is not None and done.outputs == (MARKER + b"-out-1",) and done.inputs == (MARKER + b"-in-1",)
    assert failed is not None and failed.error_message == "cannot reshape " + MARKER.decode()
    ledger.close()


def test_swapping_two_rows_ciphertexts_fails(tmp_path: Path) -> None:
    key = DataKey.generate()
    ledger = SqliteLedger(tmp_path / "ledger.db", key=key)
    _fill(ledger)
    raw = sqlite3.connect(tmp_path / "ledger.db")
    (one,), (two,) = raw.execute("SELECT inputs FROM es_tasks ORDER BY task_id").fetchall()
    raw.execute("UPDATE es_tasks SET inputs = ? WHERE task_id = 't-1'", (two,))
    raw.execute("UPDATE es_tasks SET inputs = ? WHERE task_id = 't-2'", (one,))
    raw.commit()
    with pytest.raises(AtRestError):
        ledger.get("t-1")
    # a value moved to another column of the same row does not open either
    raw.execute("UPDATE es_tasks SET inputs = outputs WHERE task_id = 't-1'")
    raw.commit()
    with pytest.raises(AtRestError):
        ledger.get("t-1")
    raw.close()
    ledger.close()


def test_a_ledger_refuses_a_key_that_is_not_its_own(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.db"
    SqliteLedger(path, key=DataKey.generate()).close()
    with pytest.raises(AtRestError, match="sealed under another data key"):
        SqliteLedger(path, key=DataKey.generate())
    # the copy of a state folder whose key lived elsewhere: a new data.key is made beside it, and refused
    with pytest.raises(AtRestError):
        SqliteLedger(path)


def test_given_no_key_a_sqlite_ledger_uses_the_key_beside_it(tmp_path: Path) -> None:
    first = SqliteLedger(tmp_path / "ledger.db")
    _fill(first)
    first.close()
    assert _mode(tmp_path / "data.key") == 0o600
    again = SqliteLedger(tmp_path / "ledger.db", key=load_data_key(tmp_path))
    assert again.get("t-1").outputs == (MARKER + b"-out-1",)  # type: ignore[union-attr]
    again.close()


def test_rows_an_older_version_wrote_in_clear_are_sealed_on_open(tmp_path: Path) -> None:
    key = DataKey.generate()
    SqliteLedger(tmp_path / "ledger.db", key=key).close()
    raw = sqlite3.connect(tmp_path / "ledger.db")
    raw.execute("DELETE FROM es_keys")  # as before encryption: no key check, clear rows
    raw.execute(
        "INSERT INTO es_tasks (task_id, model_id, inputs, deadline_ms, state, attempt, lease_until_ms, outputs, "
        "error_code, error_message, created_ms, updated_ms) "
        "VALUES ('old', 'm', ?, ?, 'done', 1, 0, ?, 'bad_input', 'said AT-REST-MARKER-7f3a9c', 0, 0)",
        (msgpack.packb([MARKER]), now_ms() + 60_000, msgpack.packb([MARKER + b"-out"])),
    )
    for i in range(300):  # more than one batch of the migration
        raw.execute(
            "INSERT INTO es_tasks (task_id, model_id, inputs, deadline_ms, state, attempt, lease_until_ms, "
            "created_ms, updated_ms) VALUES (?, 'm', ?, 0, 'pending', 0, 0, 0, 0)",
            (f"old-{i:03}", msgpack.packb([MARKER + str(i).encode()])),
        )
    raw.commit()
    raw.close()
    ledger = SqliteLedger(tmp_path / "ledger.db", key=key)
    assert ledger.get("old-299").inputs == (MARKER + b"299",)  # type: ignore[union-attr]
    everything = sqlite3.connect(tmp_path / "ledger.db").execute("SELECT inputs FROM es_tasks").fetchall()
    assert len(everything) == 301 and not any(MARKER in row[0] for row in everything)
    record = ledger.get("old")
    assert record is not None and record.inputs == (MARKER,) and record.outputs == (MARKER + b"-out",)
    assert record.error_message == "said " + MARKER.decode()
    stored = sqlite3.connect(tmp_path / "ledger.db").execute("SELECT inputs, outputs, error_message FROM es_tasks")
    inputs, outputs, message = stored.fetchone()
    assert MARKER not in inputs and MARKER not in outputs and MARKER.decode() not in message
    ledger.close()


def test_the_postgres_ledger_keeps_ciphertext_and_refuses_other_keys() -> None:
    postgres_or_skip()
    import psycopg

    prefix = f"t_{uuid.uuid4().hex[:10]}"
    key = DataKey.generate()
    ledger = PostgresLedger(PG_DSN, prefix=prefix, key=key)
    try:
        _fill(ledger)
        with psycopg.connect(PG_DSN) as db:
            rows = db.execute(f"SELECT inputs, outputs, error_message FROM {prefix}_tasks").fetchall()
            names = [r[0] for r in db.execute(f"SELECT name FROM {prefix}_keys").fetchall()]
        assert len(rows) == 2 and not any(MARKER in bytes(i) or (o and MARKER in bytes(o)) for i, o, _ in rows)
        assert not any(m and MARKER.decode() in m for _, _, m in rows)
        assert names == ["check"]  # an operator's key is never written to the database
        peer = PostgresLedger(PG_DSN, prefix=prefix, key=key)  # another coordinator with the same key
        assert peer.get("t-1").outputs == (MARKER + b"-out-1",)  # type: ignore[union-attr]
        peer.close()
        with pytest.raises(AtRestError):
            PostgresLedger(PG_DSN, prefix=prefix, key=DataKey.generate())
        with pytest.raises(AtRestError):  # one given no key when the others have one
            PostgresLedger(PG_DSN, prefix=prefix)
    finally:
        ledger.drop()
        ledger.close()


def test_postgres_ledgers_given_no_key_share_the_one_kept_in_the_database() -> None:
    postgres_or_skip()
    prefix = f"t_{uuid.uuid4().hex[:10]}"
    one, two = PostgresLedger(PG_DSN, prefix=prefix), PostgresLedger(PG_DSN, prefix=prefix)
    try:
        _fill(one)
        assert two.get("t-1").outputs == (MARKER + b"-out-1",)  # type: ignore[union-attr]
    finally:
        two.close()
        one.drop()
        one.close()


# -- the outbox and private files ------------------------------------------------------------


def test_the_outbox_keeps_ciphertext_under_the_data_key(tmp_path: Path) -> None:
    key = DataKey.generate()
    outbox = Outbox(tmp_path / "state", key=key)
    outbox.put("coord", "f/coord/x", Error("bad_input", MARKER.decode(), task_id="t-1"))
    outbox.close()
    assert MARKER not in _raw(tmp_path / "state", "outbox.db")
    assert sorted(p.name for p in (tmp_path / "state").iterdir() if "outbox.db" not in p.name) == []  # no key beside
    assert all(_mode(p) == 0o600 for p in (tmp_path / "state").iterdir())
    with pytest.raises(AtRestError):
        Outbox(tmp_path / "state", key=DataKey.generate()).pending()
    again = Outbox(tmp_path / "state", key=key)
    ((_, recipient, _, message),) = again.pending()
    assert recipient == "coord" and isinstance(message, Error) and message.message == MARKER.decode()
    again.close()


def test_an_older_outbox_is_sealed_again_under_the_data_key(tmp_path: Path) -> None:
    """Rows the previous version wrote (AES-GCM under outbox.key beside them) are kept, the old key removed."""
    from edgespeed.protocol._body import encode_body

    old_key = os.urandom(32)
    (tmp_path / "outbox.key").write_bytes(old_key)
    db = sqlite3.connect(tmp_path / "outbox.db")
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, "
        "topic TEXT NOT NULL, kind INTEGER NOT NULL, nonce BLOB NOT NULL, body BLOB NOT NULL)"
    )
    message = Error("bad_input", "answer", task_id="t-1")
    from edgespeed.protocol.messages import kind_of

    kind = int(kind_of(message))
    nonce = os.urandom(12)
    body = AESGCM(old_key).encrypt(nonce, encode_body(message), f"coord|f/t|{kind}".encode())
    db.execute(
        "INSERT INTO outbox (recipient, topic, kind, nonce, body) VALUES ('coord', 'f/t', ?, ?, ?)", (kind, nonce, body)
    )
    db.commit()
    db.close()
    key = DataKey.generate()
    outbox = Outbox(tmp_path, key=key)
    assert not (tmp_path / "outbox.key").exists()
    assert [m for _, _, _, m in outbox.pending()] == [message]
    outbox.close()


def test_private_folders_and_files(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    private_dir(loose / "a" / "b")
    assert [_mode(p) for p in (loose, loose / "a", loose / "a" / "b")] == [0o755, 0o700, 0o700]
    private_dir(loose)  # an existing folder is tightened
    assert _mode(loose) == 0o700
    (loose / "x.db").write_bytes(b"")
    (loose / "x.db-wal").write_bytes(b"")
    (loose / "x.db").chmod(0o644)
    (loose / "x.db-wal").chmod(0o644)
    private_database(loose / "x.db")
    assert _mode(loose / "x.db") == 0o600 and _mode(loose / "x.db-wal") == 0o600
