"""Store faults (issue 6, item 4): what hms-sync does when its SQLite file is not well.

- locked by another process: a write waits (busy timeout), then succeeds; past the timeout
  it is one clear StoreError, and the same write succeeds once the lock is gone;
- a missing directory, a path under a regular file, a read-only directory and a corrupted
  file: `status`, `run` and the other commands exit 2 with one clear line, send no request,
  and leave the file byte for byte as it was;
- two `hms-sync sync-all` processes at once on one store: no duplicate OMS order, every
  order linked, and the audit log holds each OMS create once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

import hms_sync.store as store_module
from hms_sync.errors import StoreError
from hms_sync.sandbox import Sandbox
from hms_sync.store import Link, Store

ROOT = Path(__file__).resolve().parent.parent

# A second process that takes the write lock, says so, holds it, then commits.
HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO cursors (system, position, updated_at) VALUES ('x', NULL, 'y')")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
    print("released", flush=True)
    """
)


def hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"  # blocks until the lock is held
    return proc


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli_env(sb: Sandbox, db: Path | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMS_", "OMS_"))}
    env.update(sb.env())
    env["HMS_SYNC_DB"] = str(db)
    env.update(extra)
    return env


def hms_sync(env: dict[str, str], *args: str, timeout: float = 60,
             wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hms_sync", *args]
    return subprocess.run((wrap or []) + cmd, env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_one_clear_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def no_requests(sb: Sandbox) -> bool:
    return all(
        sum(sb.stats(s)["requests"].values()) == 0 and sb.stats(s)["unauthorized"] == 0
        for s in ("api", "oms")
    )


# Every command that opens the store; `run` with a free port so a bind never interferes.
COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "status-json": ["status", "--json"],
    "run": ["run", "--port", "0"],
    "sync-all": ["sync-all"],
    "import": ["import", "1"],
    "retry": ["retry", "--all"],
}


# -- locked by another process ---------------------------------------------------------------


def test_a_write_waits_for_another_process_lock_then_succeeds(db_path: Path) -> None:
    with Store(db_path) as store:
        holder = hold_lock(db_path, 1.0)
        try:
            started = time.monotonic()
            assert store.enqueue([7], "webhook") == 1
            waited = time.monotonic() - started
        finally:
            holder.wait(10)
        assert holder.returncode == 0
        assert waited >= 0.5, f"the write did not wait for the lock ({waited:.2f}s)"
        assert [i.api_id for i in store.due(10)] == [7]
        assert store.cursors().get("x", "missing") is None  # the holder's commit kept too


def test_a_lock_held_past_the_busy_timeout_is_a_clear_error_then_recovers(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    with Store(db_path) as store:
        holder = hold_lock(db_path, 1.5)
        try:
            with pytest.raises(StoreError, match="database is locked") as caught:
                store.save_link(Link(api_id=3, oms_code="ORD-3"))
            assert str(db_path) in str(caught.value)
            assert store.get_link(3) is None  # nothing half-written
        finally:
            holder.wait(10)
        store.save_link(Link(api_id=3, oms_code="ORD-3"))  # the same write, once free
        link = store.get_link(3)
        assert link is not None and link.oms_code == "ORD-3"


# The CLI with a short busy timeout, so a lock can outlast it within a test.
SHORT_WAIT_CLI = textwrap.dedent(
    """
    import sys
    import hms_sync.store
    hms_sync.store.BUSY_TIMEOUT_MS = 200
    from hms_sync.cli import main
    sys.argv = ["hms-sync", *sys.argv[1:]]
    main()
    """
)


def test_retry_facing_a_lock_past_the_busy_timeout_is_exit_2_with_one_line(
    sb: Sandbox, db_path: Path
) -> None:
    with Store(db_path) as store:
        store.enqueue([7], "poll")
    holder = hold_lock(db_path, 3.0)
    try:
        proc = subprocess.run([sys.executable, "-c", SHORT_WAIT_CLI, "retry", "--all"],
                              env=cli_env(sb, db_path), capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
    finally:
        holder.wait(10)
    assert_one_clear_line(proc, str(db_path), "locked")


# -- unusable places and files: exit 2, one line, nothing sent, nothing overwritten -----------


@pytest.mark.parametrize("command", ["status", "run", "sync-all", "import"])
def test_a_missing_directory_is_exit_2_naming_it(
    sb: Sandbox, tmp_path: Path, command: str
) -> None:
    db = tmp_path / "no" / "such" / "hms-sync.db"
    proc = hms_sync(cli_env(sb, db, HMS_SYNC_WEBHOOKS="false"), *COMMANDS[command])
    assert_one_clear_line(proc, str(db.parent), "does not exist")
    assert not (tmp_path / "no").exists()
    assert no_requests(sb)


@pytest.mark.parametrize("command", ["status", "run"])
def test_a_path_under_a_regular_file_is_exit_2(sb: Sandbox, tmp_path: Path,
                                               command: str) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"an ordinary file where a directory should be\n")
    before = digest(blocker)
    db = blocker / "hms-sync.db"
    proc = hms_sync(cli_env(sb, db, HMS_SYNC_WEBHOOKS="false"), *COMMANDS[command])
    assert_one_clear_line(proc, str(db))
    assert digest(blocker) == before
    assert no_requests(sb)


def _read_only_wrapper(directory: Path) -> list[str] | None:
    """How to run a command that sees `directory` read-only, or None if this host cannot.

    As a normal user, chmod does it. Root ignores permissions, so there the directory is
    bind-mounted read-only in a private mount namespace (needs CAP_SYS_ADMIN and unshare).
    """
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    d = str(directory)
    script = f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && exec "$@"'
    wrap = ["unshare", "-m", "sh", "-c", script, "sh"]
    probe = subprocess.run(wrap + ["sh", "-c", f'! touch "{d}/probe" 2>/dev/null'],
                           capture_output=True, timeout=10)
    if probe.returncode != 0 or (directory / "probe").exists():
        return None
    return wrap


@pytest.mark.parametrize("command", ["status", "run", "retry"])
def test_a_read_only_directory_is_exit_2_and_the_store_is_untouched(
    sb: Sandbox, tmp_path: Path, command: str
) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    db = directory / "hms-sync.db"
    with Store(db) as store:
        store.save_link(Link(api_id=1, oms_code="ORD-1", sync_state="ok"))
        store.enqueue([2], "poll")
    before = digest(db)
    names = sorted(p.name for p in directory.iterdir())
    wrap = _read_only_wrapper(directory)
    if wrap is None:
        pytest.skip("running as root without a way to make a read-only mount (unshare -m)")
    try:
        proc = hms_sync(cli_env(sb, db, HMS_SYNC_WEBHOOKS="false"), *COMMANDS[command],
                        wrap=wrap)
    finally:
        directory.chmod(0o755)
    assert_one_clear_line(proc, str(db))
    assert digest(db) == before
    assert sorted(p.name for p in directory.iterdir()) == names  # no -wal/-shm left behind
    assert no_requests(sb)


def _random_bytes(db: Path) -> None:
    db.write_bytes(os.urandom(16384))


def _garbage_after_the_header(db: Path) -> None:
    """A real store whose schema page is overwritten: the SQLite header still says 3."""
    _real_store(db)
    raw = bytearray(db.read_bytes())
    raw[100:4096] = os.urandom(3996)
    db.write_bytes(bytes(raw))


def _garbage_in_the_data(db: Path) -> None:
    """A real store whose schema reads fine but whose table pages are garbage."""
    _real_store(db)
    raw = bytearray(db.read_bytes())
    raw[8192:] = os.urandom(len(raw) - 8192)
    db.write_bytes(bytes(raw))


def _real_store(db: Path) -> None:
    with Store(db) as store:
        for i in range(1, 400):
            store.save_link(Link(api_id=i, oms_code=f"ORD-{i}", sync_state="ok",
                                 last_error="x" * 40))
        store.enqueue(range(1, 400), "poll")
    assert db.stat().st_size > 16384


CORRUPTIONS = {
    "random-bytes": _random_bytes,
    "schema-page": _garbage_after_the_header,
    "data-pages": _garbage_in_the_data,
}


@pytest.mark.parametrize(
    ("how", "command"),
    [(how, command) for how in CORRUPTIONS for command in ("status", "run")]
    + [("data-pages", command) for command in ("status-json", "sync-all", "retry")],
)
def test_a_corrupted_file_is_exit_2_and_never_overwritten(
    sb: Sandbox, tmp_path: Path, how: str, command: str
) -> None:
    db = tmp_path / "hms-sync.db"
    CORRUPTIONS[how](db)
    before = digest(db)
    proc = hms_sync(cli_env(sb, db, HMS_SYNC_WEBHOOKS="false"), *COMMANDS[command])
    assert_one_clear_line(proc, str(db))
    assert digest(db) == before
    assert no_requests(sb)  # refused at open (quick_check), before any request


# -- two processes on one store --------------------------------------------------------------


OPENER = textwrap.dedent(
    """
    import sys, time
    from hms_sync.store import Store
    while time.time() < float(sys.argv[2]):  # start together
        pass
    with Store(sys.argv[1]) as store:
        store.enqueue([int(sys.argv[3])], "poll")
        print(store.schema_version)
    """
)


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    start = time.time() + 1.0
    procs = [
        subprocess.Popen([sys.executable, "-c", OPENER, str(db), str(start), str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for i in range(6)
    ]
    results = [p.communicate(timeout=30) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err  # was: "table links already exists"
        assert out.strip() == str(len(store_module.MIGRATIONS))
    with Store(db) as store:
        assert sorted(i.api_id for i in store.due(10)) == list(range(6))



def test_two_sync_all_processes_on_one_store_create_each_order_once(
    sb: Sandbox, tmp_path: Path
) -> None:
    first, last = sb.seed_api_orders(200)
    ids = list(range(first, last + 1))
    db = tmp_path / "shared.db"  # does not exist yet: both create it at once
    env = cli_env(sb, db, HMS_SYNC_CONCURRENCY="8")
    cmd = [sys.executable, "-m", "hms_sync", "sync-all", "--json"]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        # 1 only when the other process held an order at that moment (queued for retry)
        assert proc.returncode in (0, 1), err
        assert "Traceback" not in err
        if proc.returncode == 1:
            assert "being synced by another process" in out, out

    oms = [o for o in sb.list_oms_orders() if o["order_type_code"] == "api_order"]
    per_ext = Counter(o["ext_code"] for o in oms)
    assert per_ext == Counter({str(i): 1 for i in ids}), "a duplicate or a missing OMS order"
    codes = {o["ext_code"]: o["code"] for o in oms}
    for order in sb.list_api_orders():
        assert order["oms_order_code"] == codes[str(order["id"])], order

    conn = sqlite3.connect(db)
    try:
        creates = Counter(api_id for (api_id,) in conn.execute(
            "SELECT api_id FROM audit WHERE system = 'HMS-OMS' AND action = 'create'"))
    finally:
        conn.close()
    assert creates == Counter({i: 1 for i in ids}), "the audit log shows a create twice"
