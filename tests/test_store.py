"""Store: what hms-sync remembers across restarts (links, cursors, queue, locks, deliveries).

Each test names the property it proves; the last one kills a writer with SIGKILL and checks
that every transaction it reported committed is still there (guarantee 3).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hms_sync.errors import StoreError
from hms_sync.store import MIGRATIONS, Link, Store, WorkItem, Write

T1 = datetime(2026, 12, 4, 19, 0, 0, 123456, tzinfo=UTC)
T2 = datetime(2026, 12, 4, 19, 0, 5, 123000, tzinfo=UTC)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as s:
        yield s


def queue_row(store: Store, api_id: int) -> dict:
    rows = [r for r in store.queue_items(limit=10_000) if r["api_id"] == api_id]
    assert len(rows) <= 1
    return rows[0] if rows else {}


# -- opening ---------------------------------------------------------------------------------


def test_migrations_set_user_version(store: Store) -> None:
    assert store.schema_version == len(MIGRATIONS)


def test_reopening_is_idempotent_and_keeps_data(db_path: Path) -> None:
    with Store(db_path) as first:
        first.save_link(Link(api_id=1, oms_code="ORD-1"))
    with Store(db_path) as again:
        assert again.schema_version == len(MIGRATIONS)
        assert again.get_link(1) is not None
    with Store(db_path, create=False) as third:
        assert third.get_link(1) is not None


def test_a_store_newer_than_the_code_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this hms-sync knows"):
        Store(db_path)


def test_a_corrupted_file_is_refused_and_left_untouched(db_path: Path) -> None:
    garbage = random.Random(1).randbytes(8192)
    db_path.write_bytes(garbage)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(db_path)
    assert db_path.read_bytes() == garbage


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "dir" / "hms-sync.db")
    assert not (tmp_path / "no").exists()


def test_create_false_refuses_a_missing_file(db_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(db_path, create=False)
    assert not db_path.exists()


# -- links -----------------------------------------------------------------------------------


def test_link_roundtrip_keeps_every_field_and_aware_datetimes(store: Store) -> None:
    link = Link(
        api_id=12345, oms_code="ORD-000123", api_status="processing", oms_state="in_progress",
        api_updated_at=T1, oms_updated_at=T2, synced_status="processing",
        synced_state="in_progress", sync_state="ok", last_error=None, error_key=None,
        last_sync_at="2026-12-04T19:00:06.000000Z",
    )
    store.save_link(link)
    back = store.get_link(12345)
    assert back == link
    assert back is not None and back.api_updated_at is not None
    assert back.api_updated_at.tzinfo is not None
    assert back.api_updated_at == T1  # microseconds survive


def test_save_link_upserts_and_records_writes_in_the_audit_log(store: Store) -> None:
    store.save_link(Link(api_id=1, oms_code="ORD-1", sync_state="pending"))
    store.save_link(
        Link(api_id=1, oms_code="ORD-1", sync_state="ok"),
        [Write("HMS-API", 1, "ORD-1", "write-back", {"oms_order_code": "ORD-1"}, "new")],
    )
    assert [link.sync_state for link in store.list_links()] == ["ok"]
    assert store.count_writes() == {"HMS-API write-back": 1}
    assert store.audit_log(1)[0]["reason"] == "new"


def test_a_code_moving_to_another_order_never_blocks_the_correct_link(store: Store) -> None:
    store.save_link(Link(api_id=1, oms_code="ORD-1"))
    store.save_link(Link(api_id=2, oms_code="ORD-1"))
    assert store.get_link(2).oms_code == "ORD-1"  # type: ignore[union-attr]
    assert store.get_link(1).oms_code is None  # type: ignore[union-attr]


def test_list_links_filters_errors_and_limits(store: Store) -> None:
    for i in range(1, 6):
        store.save_link(Link(api_id=i, sync_state="error" if i % 2 else "ok"))
    assert [link.api_id for link in store.list_links(errors_only=True)] == [1, 3, 5]
    assert [link.api_id for link in store.list_links(limit=2)] == [1, 2]
    assert store.link_counts() == {"ok": 2, "pending": 0, "error": 3}


# -- the queue -------------------------------------------------------------------------------


def test_enqueue_keeps_one_row_per_order_and_bumps_its_generation(store: Store) -> None:
    store.enqueue([5], "poll")
    store.enqueue([5, 5], "webhook")
    rows = store.queue_items()
    assert [r["api_id"] for r in rows] == [5]
    assert rows[0]["generation"] == 2
    assert rows[0]["reason"] == "webhook"


def test_complete_removes_the_item(store: Store) -> None:
    store.enqueue([5], "poll")
    [item] = store.due(10)
    assert store.complete(item) is True
    assert store.queue_items() == []


def test_complete_with_a_stale_generation_keeps_the_newer_trigger(store: Store) -> None:
    store.enqueue([5], "poll")
    [item] = store.due(10)
    store.enqueue([5], "webhook")  # arrives while item 5 is being reconciled
    assert store.complete(item) is False
    [again] = store.due(10)
    assert again.api_id == 5 and again.generation == item.generation + 1


def test_fail_backs_off_then_dies_at_max_attempts(store: Store) -> None:
    store.enqueue([5], "poll")
    [item] = store.due(10)
    assert store.fail(item, "HMS-OMS 500", delay=60, max_attempts=3) is False
    row = queue_row(store, 5)
    assert row["attempts"] == 1 and row["last_error"] == "HMS-OMS 500"
    assert row["next_attempt_at"] > time.time() + 50
    assert store.due(10) == []  # waiting out the backoff
    assert store.next_due_in() is not None and store.next_due_in() > 50  # type: ignore[operator]

    store.enqueue([5], "webhook")  # a new trigger cannot defeat the backoff
    assert store.due(10) == []

    last = WorkItem(api_id=5, generation=item.generation, attempts=2, reason="poll")
    assert store.fail(last, "HMS-OMS 500", delay=60, max_attempts=3) is True
    assert queue_row(store, 5)["dead"] == 1
    assert store.queue_counts() == {"pending": 0, "dead": 1}


def test_fail_without_a_delay_is_dead_at_once(store: Store) -> None:
    store.enqueue([5], "poll")
    [item] = store.due(10)
    assert store.fail(item, "422", delay=None, max_attempts=100) is True
    assert queue_row(store, 5)["dead"] == 1
    assert store.due(10) == []


def test_a_permanent_failure_does_not_kill_a_trigger_that_came_while_it_ran(
    store: Store,
) -> None:
    # The attempt read old versions and failed for good (say a 422); meanwhile a webhook
    # said the order changed again. Killing the row would lose that change for good: polls
    # have already moved past it.
    store.enqueue([5], "poll")
    [item] = store.due(10)
    store.enqueue([5], "webhook")  # arrives while the attempt runs
    assert store.fail(item, "422", delay=None, max_attempts=100) is False
    row = queue_row(store, 5)
    assert row["dead"] == 0 and row["attempts"] == 0 and row["last_error"] == "422"
    [again] = store.due(10)
    assert again.api_id == 5


def test_a_new_trigger_revives_a_dead_item(store: Store) -> None:
    store.enqueue([5], "poll")
    [item] = store.due(10)
    store.fail(item, "422", delay=None, max_attempts=100)
    store.enqueue([5], "webhook")
    [again] = store.due(10)
    assert again.attempts == 0


def test_requeue_dead_gives_dead_items_a_fresh_start(store: Store) -> None:
    store.enqueue([5, 6, 7], "poll")
    for item in store.due(10):
        if item.api_id != 7:
            store.fail(item, "422", delay=None, max_attempts=1)
    store.save_link(Link(api_id=5, sync_state="error", error_key="k", last_error="422"))
    assert store.requeue_dead([5]) == 1
    assert store.get_link(5).error_key is None  # type: ignore[union-attr]
    assert {i.api_id for i in store.due(10)} == {5, 7}
    assert store.requeue_dead() == 1  # the rest: only 6 was still dead
    assert {i.api_id for i in store.due(10)} == {5, 6, 7}
    assert store.queue_counts()["dead"] == 0


def test_accept_delivery_records_once_and_enqueues_once(store: Store) -> None:
    assert store.accept_delivery("d-1", "HMS-API", "order.updated", 5) is True
    assert store.accept_delivery("d-1", "HMS-API", "order.updated", 5) is False
    rows = store.queue_items()
    assert [(r["api_id"], r["generation"]) for r in rows] == [(5, 0)]


def test_advance_moves_the_cursor_and_enqueues_together(store: Store) -> None:
    assert store.get_cursor("HMS-API") is None
    assert store.advance("HMS-API", T1, [1, 2], "poll") == 2
    assert store.get_cursor("HMS-API") == T1
    assert {i.api_id for i in store.due(10)} == {1, 2}


def test_advance_is_one_transaction(store: Store) -> None:
    store.advance("HMS-API", T1, [1], "poll")

    def ids_then_crash() -> Iterator[int]:
        yield 2
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        store.advance("HMS-API", T2, ids_then_crash(), "poll")
    assert store.get_cursor("HMS-API") == T1  # the cursor did not move without its work
    assert {i.api_id for i in store.due(10)} == {1}


# -- locks -----------------------------------------------------------------------------------


def test_try_lock_excludes_another_owner_until_released(store: Store, db_path: Path) -> None:
    with Store(db_path) as other:
        other.owner = "other-host:4242"
        assert store.try_lock(9) is True
        assert store.try_lock(9) is True  # re-entrant for the same owner
        assert other.try_lock(9) is False
        assert [i.api_id for i in other.due(10)] == []
        store.unlock(9)
        assert other.try_lock(9) is True


def test_due_skips_orders_another_process_holds(store: Store, db_path: Path) -> None:
    store.enqueue([1, 2], "poll")
    with Store(db_path) as other:
        other.owner = "other-host:4242"
        assert other.try_lock(1)
        assert [i.api_id for i in store.due(10)] == [2]


def test_an_expired_lock_can_be_taken(store: Store, db_path: Path) -> None:
    with Store(db_path) as other:
        other.owner = "other-host:4242"
        assert other.try_lock(9, ttl=-1) is True  # already expired
        assert store.try_lock(9) is True


def test_release_stale_locks_drops_locks_of_dead_processes_only(
    store: Store, db_path: Path
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    owners = {
        1: f"{host}:{gone.pid}",  # this host, process gone: stale
        2: f"{host}:1",  # this host, process alive (init): kept
        3: "other-host:4242",  # another host: cannot tell, kept
    }
    with Store(db_path) as other:
        for api_id, owner in owners.items():
            other.owner = owner
            assert other.try_lock(api_id)
    assert store.release_stale_locks() == 1
    with Store(db_path) as other:
        other.owner = "someone-else:1"
        assert other.try_lock(1) is True
        assert other.try_lock(2) is False
        assert other.try_lock(3) is False


# -- durability ------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from hms_sync.store import Link, Store

    store = Store(sys.argv[1])
    i = 0
    while True:
        i += 1
        store.save_link(Link(api_id=i, oms_code=f"ORD-{i}", api_status="pending",
                             api_updated_at=datetime.now(UTC), sync_state="ok"))
        store.advance("HMS-API", datetime.now(UTC), [i], "poll")
        print(i, flush=True)
    """
)


def test_committed_data_survives_sigkill(db_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    printed: list[int] = []
    try:
        for line in proc.stdout:  # each line is printed only after its commit
            printed.append(int(line))
            if len(printed) >= 200:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(printed) >= 200, "the writer died before committing enough"
    with Store(db_path) as store:
        links = store.get_links(printed)
        assert sorted(links) == printed
        assert all(links[i].oms_code == f"ORD-{i}" for i in printed)
        queued = {i.api_id for i in store.due(100_000)}
        assert set(printed) <= queued
        assert store.get_cursor("HMS-API") is not None
