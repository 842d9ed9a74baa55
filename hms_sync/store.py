"""What hms-sync remembers, in SQLite: links, cursors, pending work, deliveries, audit.

The two systems are the truth; the store remembers only what is needed so that nothing is
lost or done twice across restarts. The engine talks to it through the operations below,
never through SQL, so that another backend (PostgreSQL, for several daemons) can stand in.

Durability: WAL with synchronous=NORMAL. A committed transaction survives the process being
killed (SIGKILL included); a power cut may lose the last few, which polling then recovers
because cursors roll back together with the rest. Every write transaction starts with
BEGIN IMMEDIATE, so it takes the write lock up front and cannot fail half-way on SQLITE_BUSY.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StoreError

if TYPE_CHECKING:
    from sqlite_utils import Database
from .models import iso, parse_iso

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

# Numbered migrations; PRAGMA user_version holds how many have run. Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE links (
        api_id INTEGER PRIMARY KEY,
        oms_code TEXT UNIQUE,
        api_status TEXT,
        oms_state TEXT,
        api_updated_at TEXT,
        oms_updated_at TEXT,
        synced_status TEXT,
        synced_state TEXT,
        sync_state TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT,
        error_key TEXT,
        last_sync_at TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX links_sync_state ON links (sync_state);
    CREATE TABLE cursors (
        system TEXT PRIMARY KEY,
        position TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE queue (
        api_id INTEGER PRIMARY KEY,
        reason TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        dead INTEGER NOT NULL DEFAULT 0,
        died_at REAL,
        enqueued_at REAL NOT NULL
    );
    CREATE INDEX queue_due ON queue (dead, next_attempt_at);
    CREATE TABLE locks (
        api_id INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        event TEXT NOT NULL,
        api_id INTEGER,
        received_at REAL NOT NULL
    );
    CREATE INDEX deliveries_received ON deliveries (received_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        system TEXT NOT NULL,
        api_id INTEGER,
        oms_code TEXT,
        action TEXT NOT NULL,
        changes TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX audit_api_id ON audit (api_id);
    """,
)


def now_iso() -> str:
    return iso(datetime.now(UTC))


@dataclass
class Link:
    api_id: int
    oms_code: str | None = None
    api_status: str | None = None
    oms_state: str | None = None
    api_updated_at: datetime | None = None
    oms_updated_at: datetime | None = None
    synced_status: str | None = None
    synced_state: str | None = None
    sync_state: str = "pending"  # ok | pending | error
    last_error: str | None = None
    error_key: str | None = None
    last_sync_at: str | None = None
    created_at: str = field(default_factory=now_iso)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Link:
        row = dict(row)
        for key in ("api_updated_at", "oms_updated_at"):
            row[key] = parse_iso(row[key]) if row[key] else None
        return cls(**row)

    def to_row(self) -> dict[str, Any]:
        row = dict(self.__dict__)
        for key in ("api_updated_at", "oms_updated_at"):
            row[key] = iso(row[key]) if row[key] else None
        return row


@dataclass(frozen=True)
class WorkItem:
    api_id: int
    generation: int
    attempts: int
    reason: str


@dataclass(frozen=True)
class Write:
    """One write hms-sync made to a system, for the audit log."""

    system: str
    api_id: int | None
    oms_code: str | None
    action: str
    changes: dict[str, Any]
    reason: str


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Store:
    """The SQLite store. One instance per process; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = str(path)
        self.owner = owner_id()
        self._lock = threading.RLock()
        self._conn = _connect(self.path, create=create)
        self._migrate()

    @property
    def db(self) -> Database:
        """The store as a sqlite-utils Database, for inspection and one-off maintenance.

        The operations below use the connection directly: importing sqlite-utils costs
        40 ms, a seventh of the 0.3 s start-up budget of `hms-sync status`.
        """
        from sqlite_utils import Database

        return Database(self._conn)

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:  # pragma: no cover - closing twice is harmless
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its first statement."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: cannot start a write: {exc}") from None
            try:
                yield self._conn
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"store {self.path}: write failed: {exc}") from None
            except BaseException:
                self._rollback()
                raise
            else:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._rollback()
                    raise StoreError(f"store {self.path}: commit failed: {exc}") from None

    def _rollback(self) -> None:
        # Some errors (disk full, I/O) have already rolled back: never mask the first error.
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                cursor = self._conn.execute(sql, tuple(params))
                names = [d[0] for d in cursor.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: read failed: {exc}") from None

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"store {self.path} has schema version {version}, newer than this "
                    f"hms-sync knows ({len(MIGRATIONS)}); upgrade hms-sync"
                )
            for number in range(version, len(MIGRATIONS)):
                with self._write() as conn:
                    # Another process opening the same new store may have run it while we
                    # waited for the write lock: read the version again under the lock.
                    if conn.execute("PRAGMA user_version").fetchone()[0] > number:
                        continue
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
                log.info("store %s migrated to schema version %d", self.path, number + 1)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        self._read("SELECT 1")

    # -- links ----------------------------------------------------------------------------

    def get_link(self, api_id: int) -> Link | None:
        rows = self._read("SELECT * FROM links WHERE api_id = ?", (api_id,))
        return Link.from_row(rows[0]) if rows else None

    def get_links(self, api_ids: Iterable[int]) -> dict[int, Link]:
        ids = list(api_ids)
        out: dict[int, Link] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._read(f"SELECT * FROM links WHERE api_id IN ({marks})", chunk):
                out[row["api_id"]] = Link.from_row(row)
        return out

    def save_link(
        self, link: Link, writes: Iterable[Write] = (), *, release_lock: bool = False
    ) -> None:
        """Upsert a link and record the writes that led to it, in one transaction;
        `release_lock` also drops this process's lock on the order (see `try_lock`)."""
        row = link.to_row()
        cols = ", ".join(row)
        marks = ", ".join("?" * len(row))
        updates = ", ".join(f"{c} = excluded.{c}" for c in row if c not in ("api_id", "created_at"))
        with self._write() as conn:
            # A code moving to a new API id would break UNIQUE; the contract's ext_code rule
            # makes it impossible, but a stale row must never block a correct one.
            if link.oms_code is not None:
                conn.execute(
                    "UPDATE links SET oms_code = NULL WHERE oms_code = ? AND api_id != ?",
                    (link.oms_code, link.api_id),
                )
            conn.execute(
                f"INSERT INTO links ({cols}) VALUES ({marks}) "
                f"ON CONFLICT(api_id) DO UPDATE SET {updates}",
                tuple(row.values()),
            )
            self._audit(conn, writes)
            if release_lock:
                conn.execute(
                    "DELETE FROM locks WHERE api_id = ? AND owner = ?", (link.api_id, self.owner)
                )

    def record_writes(self, writes: Iterable[Write]) -> None:
        with self._write() as conn:
            self._audit(conn, writes)

    @staticmethod
    def _audit(conn: sqlite3.Connection, writes: Iterable[Write]) -> None:
        at = now_iso()
        conn.executemany(
            "INSERT INTO audit (at, system, api_id, oms_code, action, changes, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (at, w.system, w.api_id, w.oms_code, w.action,
                 json.dumps(w.changes, sort_keys=True, default=str), w.reason)
                for w in writes
            ],
        )

    def list_links(self, *, errors_only: bool = False, limit: int | None = None) -> list[Link]:
        sql = "SELECT * FROM links"
        if errors_only:
            sql += " WHERE sync_state = 'error'"
        sql += " ORDER BY api_id"
        params: tuple[Any, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        return [Link.from_row(r) for r in self._read(sql, params)]

    def link_counts(self) -> dict[str, int]:
        rows = self._read("SELECT sync_state, count(*) AS n FROM links GROUP BY sync_state")
        counts = {"ok": 0, "pending": 0, "error": 0}
        counts.update({r["sync_state"]: r["n"] for r in rows})
        return counts

    def audit_log(self, api_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if api_id is None:
            return self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return self._read(
            "SELECT * FROM audit WHERE api_id = ? ORDER BY id DESC LIMIT ?", (api_id, limit)
        )

    def count_writes(self) -> dict[str, int]:
        rows = self._read(
            "SELECT system || ' ' || action AS k, count(*) AS n FROM audit GROUP BY k"
        )
        return {r["k"]: r["n"] for r in rows}

    # -- cursors --------------------------------------------------------------------------

    def get_cursor(self, system: str) -> datetime | None:
        rows = self._read("SELECT position FROM cursors WHERE system = ?", (system,))
        return parse_iso(rows[0]["position"]) if rows and rows[0]["position"] else None

    def cursors(self) -> dict[str, str | None]:
        return {r["system"]: r["position"] for r in self._read("SELECT * FROM cursors")}

    def advance(
        self, system: str, position: datetime | None, api_ids: Iterable[int], reason: str,
        *, seen: Iterable[int] = (),
    ) -> int:
        """Enqueue work for `api_ids` and move the cursor, in one transaction.

        The cursor only moves together with the work it covers, so a crash between the two
        cannot skip an order. `seen` are orders read again at the cursor's own position
        (the bound is inclusive): a walk before this one already enqueued them, so they are
        added only if no row holds them, and a dead row is not revived by the re-read.
        Returns how many ids were newly enqueued.
        """
        with self._write() as conn:
            n = self._enqueue(conn, api_ids, reason)
            now = time.time()
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO queue (api_id, reason, next_attempt_at, enqueued_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(api_id) DO NOTHING",
                [(int(i), reason, now, now) for i in seen],
            )
            n += conn.total_changes - before
            if position is not None:
                conn.execute(
                    "INSERT INTO cursors (system, position, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(system) DO UPDATE SET position = excluded.position, "
                    "updated_at = excluded.updated_at",
                    (system, iso(position), now_iso()),
                )
        return n

    # -- the work queue -------------------------------------------------------------------

    def enqueue(self, api_ids: Iterable[int], reason: str) -> int:
        with self._write() as conn:
            return self._enqueue(conn, api_ids, reason)

    @staticmethod
    def _enqueue(conn: sqlite3.Connection, api_ids: Iterable[int], reason: str) -> int:
        """One row per order: a new trigger for a queued order bumps its generation (so
        a reconcile already running for it runs again) and revives it if dead; a row
        waiting out a backoff keeps its time, so triggers cannot defeat the backoff."""
        now = time.time()
        before = conn.total_changes
        conn.executemany(
            "INSERT INTO queue (api_id, reason, next_attempt_at, enqueued_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(api_id) DO UPDATE SET generation = generation + 1, "
            "reason = excluded.reason, "
            "attempts = CASE WHEN dead THEN 0 ELSE attempts END, "
            "next_attempt_at = CASE WHEN dead THEN excluded.next_attempt_at "
            "ELSE next_attempt_at END, "
            "dead = 0, died_at = NULL",
            [(int(i), reason, now, now) for i in api_ids],
        )
        return conn.total_changes - before

    def accept_delivery(
        self, delivery_id: str, source: str, event: str, api_id: int | None
    ) -> bool:
        """Record a webhook delivery and enqueue its order, durably, before the 2xx.

        Returns False for a delivery already seen (nothing is enqueued again).
        """
        with self._write() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO deliveries (id, source, event, api_id, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (delivery_id, source, event, api_id, time.time()),
            )
            if cur.rowcount == 0:
                return False
            if api_id is not None:
                self._enqueue(conn, [api_id], f"webhook {source} {event}")
            return True

    def prune_deliveries(self, older_than_seconds: float) -> int:
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM deliveries WHERE received_at < ?", (time.time() - older_than_seconds,)
            )
            return cur.rowcount

    def due(self, limit: int, *, exclude: Iterable[int] = ()) -> list[WorkItem]:
        """Queued orders whose time has come and that no live process holds."""
        skip = set(exclude)
        rows = self._read(
            "SELECT q.api_id, q.generation, q.attempts, q.reason FROM queue q "
            "LEFT JOIN locks l ON l.api_id = q.api_id AND l.expires_at > ? "
            "WHERE q.dead = 0 AND q.next_attempt_at <= ? AND l.api_id IS NULL "
            "ORDER BY q.next_attempt_at LIMIT ?",
            (time.time(), time.time(), limit + len(skip)),
        )
        items = [WorkItem(**r) for r in rows if r["api_id"] not in skip]
        return items[:limit]

    def next_due_in(self, *, exclude: Iterable[int] = ()) -> float | None:
        """Seconds until the next queued order is due (0 if one is due now), or None.

        `exclude`: orders being worked on now, whose rows are still there."""
        skip = [int(i) for i in exclude]
        marks = ",".join("?" * len(skip))
        rows = self._read(
            "SELECT min(next_attempt_at) AS t FROM queue WHERE dead = 0"
            + (f" AND api_id NOT IN ({marks})" if skip else ""),
            skip,
        )
        if not rows or rows[0]["t"] is None:
            return None
        return max(0.0, rows[0]["t"] - time.time())

    def complete(self, item: WorkItem) -> bool:
        """Done with this trigger. If a newer trigger came meanwhile, keep it (due now)."""
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM queue WHERE api_id = ? AND generation = ?",
                (item.api_id, item.generation),
            )
            if cur.rowcount:
                return True
            conn.execute(
                "UPDATE queue SET attempts = 0, next_attempt_at = ?, last_error = NULL "
                "WHERE api_id = ?",
                (time.time(), item.api_id),
            )
            return False

    def fail(self, item: WorkItem, error: str, *, delay: float | None, max_attempts: int) -> bool:
        """Record a failed attempt. `delay` None means permanent: dead at once.

        A permanent failure is about the versions the attempt read. If a newer trigger came
        while it ran (the generation moved), the order changed since: it is tried again at
        once instead of dying, or that change would never be looked at.
        Returns True when the item is now dead.
        """
        now = time.time()
        attempts = item.attempts + 1
        dead = delay is None or attempts >= max_attempts
        with self._write() as conn:
            if delay is None:
                row = conn.execute(
                    "SELECT generation FROM queue WHERE api_id = ?", (item.api_id,)
                ).fetchone()
                if row is not None and row[0] != item.generation:
                    conn.execute(
                        "UPDATE queue SET attempts = 0, last_error = ?, next_attempt_at = ? "
                        "WHERE api_id = ?",
                        (error, now, item.api_id),
                    )
                    return False
            conn.execute(
                "UPDATE queue SET attempts = ?, last_error = ?, next_attempt_at = ?, "
                "dead = ?, died_at = ? WHERE api_id = ?",
                (attempts, error, now + (delay or 0), int(dead), now if dead else None,
                 item.api_id),
            )
        return dead

    def postpone(self, item: WorkItem, delay: float, *, error: str | None = None) -> None:
        """Try again after `delay` without spending an attempt (the order is not at fault)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE queue SET next_attempt_at = ?, last_error = coalesce(?, last_error) "
                "WHERE api_id = ?",
                (time.time() + delay, error, item.api_id),
            )

    def requeue_dead(self, api_ids: Iterable[int] | None = None) -> int:
        """Give dead items (all, or these) a fresh start; their error keys are cleared so
        that a permanent failure is tried again too."""
        now = time.time()
        with self._write() as conn:
            if api_ids is None:
                ids = [r[0] for r in conn.execute("SELECT api_id FROM queue WHERE dead = 1")]
            else:
                ids = [int(i) for i in api_ids]
            for api_id in ids:
                conn.execute("UPDATE links SET error_key = NULL WHERE api_id = ?", (api_id,))
            cur = conn.executemany(
                "INSERT INTO queue (api_id, reason, next_attempt_at, enqueued_at) "
                "VALUES (?, 'retry', ?, ?) ON CONFLICT(api_id) DO UPDATE SET dead = 0, "
                "attempts = 0, next_attempt_at = excluded.next_attempt_at, died_at = NULL, "
                "generation = generation + 1, reason = 'retry'",
                [(i, now, now) for i in ids],
            )
            return cur.rowcount if cur.rowcount >= 0 else len(ids)

    def queue_counts(self) -> dict[str, int]:
        rows = self._read("SELECT dead, count(*) AS n FROM queue GROUP BY dead")
        counts = {"pending": 0, "dead": 0}
        for r in rows:
            counts["dead" if r["dead"] else "pending"] = r["n"]
        return counts

    def queue_items(self, *, dead: bool | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM queue"
        params: list[Any] = []
        if dead is not None:
            sql += " WHERE dead = ?"
            params.append(int(dead))
        sql += " ORDER BY api_id LIMIT ?"
        params.append(limit)
        return self._read(sql, params)

    # -- per-order locks (across processes) -----------------------------------------------

    def try_lock(self, api_id: int, ttl: float = 300.0) -> bool:
        """Hold `api_id` for this process so no other process reconciles it meanwhile."""
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO locks (api_id, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT(api_id) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at WHERE locks.expires_at <= ? "
                "OR locks.owner = excluded.owner",
                (api_id, self.owner, now + ttl, now),
            )
            return cur.rowcount > 0

    def unlock(self, api_id: int) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM locks WHERE api_id = ? AND owner = ?", (api_id, self.owner))

    def release_stale_locks(self) -> int:
        """Drop locks held by processes of this host that no longer run (after a kill)."""
        host = socket.gethostname()
        stale = []
        for row in self._read("SELECT DISTINCT owner FROM locks"):
            name, _, pid = row["owner"].rpartition(":")
            if name == host and pid.isdigit() and not _alive(int(pid)):
                stale.append(row["owner"])
            elif row["owner"] == self.owner:
                stale.append(row["owner"])
        if not stale:
            return 0
        with self._write() as conn:
            n = 0
            for owner in stale:
                n += conn.execute("DELETE FROM locks WHERE owner = ?", (owner,)).rowcount
            return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _connect(path: str, *, create: bool) -> sqlite3.Connection:
    """Open the database with WAL and a busy timeout; StoreError with a clear reason."""
    p = Path(path)
    if path != ":memory:":
        if not p.parent.exists():
            raise StoreError(f"store {path}: directory {p.parent} does not exist")
        if not create and not p.exists():
            raise StoreError(f"store {path} does not exist")
        if p.exists() and not os.access(p, os.R_OK | os.W_OK):
            raise StoreError(f"store {path}: not readable and writable by this user")
        if not os.access(p.parent, os.W_OK):
            # Even an existing store needs it: SQLite keeps its -wal and -shm files there.
            raise StoreError(f"store {path}: directory {p.parent} is not writable")
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and str(mode).lower() != "wal":
            raise StoreError(f"store {path}: cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # Reading the schema proves the file is a database before anything writes to it;
        # quick_check (every page, no index cross-check: ~0.1 s for 50 MB) finds garbage
        # deeper in the file now, not after a first request has been sent.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            conn.close()
            lines = [ln for ln in str(problem).splitlines() if ln.strip() and "***" not in ln]
            raise StoreError(f"store {path} is corrupted ({(lines or [problem])[0]})")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"store {path} is not a usable SQLite database: {exc}") from None
    return conn
