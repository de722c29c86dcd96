"""The coordinator's ledger, on SQLite and on the real PostgreSQL server of this machine."""

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgespeed.coordinator import Ledger, PostgresLedger, SqliteLedger, TaskState
from edgespeed.coordinator.ledger import now_ms
from edgespeed.errors import ConfigError
from edgespeed.security import DataKey
from tests.conftest import PG_DSN, postgres_or_skip


@pytest.fixture(params=["sqlite", "postgres"])
def open_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Ledger]]:
    """A factory: every call opens a new connection to the same ledger, as a restart or a peer would."""
    opened: list[Ledger] = []
    key = DataKey.generate()  # the coordinators' data key (tests/unit/test_atrest.py: what it protects)
    if request.param == "postgres":
        postgres_or_skip()
        prefix = f"t_{uuid.uuid4().hex[:10]}"

        def make() -> Ledger:
            opened.append(PostgresLedger(PG_DSN, prefix=prefix, key=key))
            return opened[-1]
    else:

        def make() -> Ledger:
            opened.append(SqliteLedger(tmp_path / "ledger.db", key=key))
            return opened[-1]

    yield make
    for ledger in opened:
        ledger.close()
    if request.param == "postgres":
        cleaner = PostgresLedger(PG_DSN, prefix=prefix, key=key)
        cleaner.drop()
        cleaner.close()


def test_a_task_from_submission_to_its_first_result(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    deadline = now_ms() + 60_000
    assert ledger.add("t-1", "digits", [b"in"], deadline)
    assert not ledger.add("t-1", "digits", [b"other"], deadline)  # submitting twice is harmless
    assert [t.task_id for t in ledger.due()] == ["t-1"]
    assert ledger.claim("t-1", "dev-a", lease_ms=5000) == 1
    assert ledger.claim("t-1", "dev-b", lease_ms=5000) is None  # leased to dev-a
    assert ledger.due() == []
    assert not ledger.complete("t-1", 1, "dev-b", [b"out"])  # never given to dev-b
    assert not ledger.complete("t-1", 2, "dev-a", [b"out"])  # an attempt that does not exist
    assert ledger.complete("t-1", 1, "dev-a", [b"out"])
    assert not ledger.complete("t-1", 1, "dev-a", [b"again"])  # duplicates are ignored
    record = ledger.get("t-1")
    assert record is not None and record.state is TaskState.DONE and record.outputs == (b"out",)
    assert record.inputs == (b"in",)
    assert ledger.counts() == {"pending": 0, "dispatched": 0, "done": 1, "failed": 0}


def test_leases_redispatch_and_the_first_result_wins(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    now = now_ms()
    ledger.add("t-1", "digits", [b"in"], now + 60_000)
    assert ledger.claim("t-1", "dev-a", lease_ms=1000, now=now) == 1
    assert [t.task_id for t in ledger.due(now=now + 1500)] == ["t-1"]  # dev-a's lease ran out
    assert ledger.claim("t-1", "dev-b", lease_ms=1000, now=now + 1500) == 2
    assert ledger.complete("t-1", 1, "dev-a", [b"late but first"])  # the first result wins
    assert not ledger.complete("t-1", 2, "dev-b", [b"second"])
    assert ledger.get("t-1").outputs == (b"late but first",)  # type: ignore[union-attr]
    ledger.add("t-2", "digits", [b"in"], now + 60_000)
    assert ledger.claim("t-2", "dev-a", lease_ms=60_000) == 1
    assert ledger.release("t-2", 1)  # dev-a died: due again at once
    assert ledger.claim("t-2", "dev-b", lease_ms=60_000) == 2
    assert ledger.fail("t-2", 2, "dev-b", "bad_input", "wrong shape")
    failed = ledger.get("t-2")
    assert failed is not None and failed.state is TaskState.FAILED and failed.error_code == "bad_input"


def test_deadlines_end_tasks(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    now = now_ms()
    ledger.add("soon", "m", [], now + 1000)
    ledger.add("later", "m", [], now + 60_000)
    ledger.claim("soon", "dev-a", lease_ms=60_000, now=now)
    assert ledger.claim("later", "dev-a", lease_ms=1, now=now + 70_000) is None  # past its deadline
    assert ledger.expire(now=now + 2000) == ["soon"]
    assert ledger.get("soon").error_code == "deadline"  # type: ignore[union-attr]
    assert [t.task_id for t in ledger.due(now=now + 2000)] == ["later"]


def test_a_restarted_coordinator_finds_its_unfinished_tasks(open_ledger: Callable[[], Ledger]) -> None:
    first = open_ledger()
    deadline = now_ms() + 60_000
    for i in range(5):
        first.add(f"t-{i}", "digits", [b"x"], deadline)
    first.claim("t-0", "dev-a", lease_ms=60_000)
    first.complete("t-0", 1, "dev-a", [b"y"])
    first.claim("t-1", "dev-a", lease_ms=60_000)
    first.set_rollout("digits", 3, "dev-a", "ready")
    first.set_rollout("digits", 3, "dev-b", "failed", "no_backend")
    first.close()
    again = open_ledger()
    assert [t.task_id for t in again.due()] == ["t-2", "t-3", "t-4"]  # t-1 is still leased
    assert again.counts() == {"pending": 3, "dispatched": 1, "done": 1, "failed": 0}
    assert again.rollouts("digits", 3) == {"dev-a": ("ready", ""), "dev-b": ("failed", "no_backend")}


def test_two_coordinators_never_claim_the_same_task(open_ledger: Callable[[], Ledger]) -> None:
    ledgers = [open_ledger() for _ in range(4)]
    deadline = now_ms() + 60_000
    for i in range(50):
        ledgers[0].add(f"t-{i}", "m", [], deadline)
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()

    def coordinator(ledger: Ledger, name: str) -> None:
        for i in range(50):
            if ledger.claim(f"t-{i}", name, lease_ms=60_000) is not None:
                with lock:
                    claims.append((f"t-{i}", 1))

    threads = [threading.Thread(target=coordinator, args=(ledger, f"c-{n}")) for n, ledger in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(task for task, _ in claims) == sorted(f"t-{i}" for i in range(50))  # each exactly once


def test_table_prefix_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SqliteLedger(tmp_path / "x.db", prefix="es; DROP TABLE x")


def test_a_claim_that_fails_half_way_leaves_the_task_due(open_ledger: Callable[[], Ledger]) -> None:
    """Break the second statement of a claim for real: the first must be rolled back with it."""
    ledger = open_ledger()
    ledger.add("t-1", "m", [], now_ms() + 60_000)
    attempts = ledger._a
    ledger._run(f"ALTER TABLE {attempts} RENAME TO {attempts}_away")
    with pytest.raises(Exception, match=r"(?i)attempts"):
        ledger.claim("t-1", "dev-a", lease_ms=60_000)
    ledger._run(f"ALTER TABLE {attempts}_away RENAME TO {attempts}")
    record = ledger.get("t-1")
    assert record is not None and record.state is TaskState.PENDING and record.attempt == 0
    assert ledger.claim("t-1", "dev-a", lease_ms=60_000) == 1
    assert ledger.complete("t-1", 1, "dev-a", [b"ok"])  # the attempt row exists: the result is accepted


def test_a_lost_device_gives_back_its_tasks_and_aborted_tasks_end(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    deadline = now_ms() + 60_000
    for i in range(4):
        ledger.add(f"t-{i}", "digits", [b"in"], deadline)
    for i, device in enumerate(["dev-a", "dev-a", "dev-b"]):
        assert ledger.claim(f"t-{i}", device, lease_ms=60_000) == 1
    assert ledger.release_device("dev-a") == ["t-0", "t-1"]
    assert ledger.release_device("dev-a") == []
    assert sorted(t.task_id for t in ledger.due()) == ["t-0", "t-1", "t-3"]
    assert ledger.claim("t-0", "dev-b", lease_ms=60_000) == 2
    assert not ledger.complete("t-0", 1, "dev-b", [b"x"])  # attempt 1 was dev-a's
    assert ledger.abort("t-3", "no_capable_device", "nothing runs tflite")
    assert not ledger.abort("t-3", "again", "already ended")
    record = ledger.get("t-3")
    assert record is not None and record.state is TaskState.FAILED and record.error_code == "no_capable_device"


def test_a_task_recorded_and_claimed_in_one_transaction(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    deadline = now_ms() + 60_000
    assert ledger.add_claimed("t-1", "digits", [b"in"], deadline, "dev-a", lease_ms=60_000)
    assert not ledger.add_claimed("t-1", "digits", [b"in"], deadline, "dev-b", lease_ms=60_000)  # known id
    record = ledger.get("t-1")
    assert record is not None and record.state is TaskState.DISPATCHED and record.attempt == 1
    assert record.device_id == "dev-a" and record.inputs == (b"in",)
    assert ledger.due() == []
    assert not ledger.complete("t-1", 1, "dev-b", [b"x"])  # attempt 1 is dev-a's
    assert ledger.complete("t-1", 1, "dev-a", [b"out"])


def test_a_result_after_the_deadline_is_refused(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    now = now_ms()
    ledger.add("t-1", "digits", [b"in"], now + 1000)
    assert ledger.claim("t-1", "dev-a", lease_ms=60_000, now=now) == 1
    assert not ledger.complete("t-1", 1, "dev-a", [b"late"], now=now + 1001)
    assert ledger.expire(now=now + 1001) == ["t-1"]
    record = ledger.get("t-1")
    assert record is not None and record.state is TaskState.FAILED and record.error_code == "deadline"
