"""A long outage of HMS-OMS with the daemon running (issue 6, item 5).

Every HMS-OMS contract call answers 500 while `hms-sync run` keeps going:

- the queue grows in the store, not in memory: RSS after 3N queued orders is within a
  loose bound of RSS after N;
- backoff is capped: no queued item is ever scheduled further out than backoff_max (plus
  scheduling slack), read from the store's queue table while the outage lasts;
- items go dead after max_attempts, and `hms-sync status --json` says why each died;
- the side that still works keeps working: polls of HMS-API advance its cursor and enqueue
  the new orders, HMS-API webhooks are accepted, /healthz stays 200;
- when HMS-OMS returns, what is pending drains by itself; `hms-sync retry ID` and
  `hms-sync retry --all` requeue the dead ones, and everything ends linked exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from harness import DaemonProcess, free_port, wait_until

from hms_sync.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
MAX_ATTEMPTS = 4
BACKOFF_MAX = 0.5
SLACK = 0.25  # the time between a row's scheduling and our reading it, and clock steps
CONFIG = f"""
[sync]
backoff_initial = 0.05
backoff_max = {BACKOFF_MAX}
[http]
request_deadline = 0.3
"""
N = 1000  # orders queued at the first memory sample; 3N at the second
RSS_GROWTH_LIMIT_KB = 30 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/<pid>/status")


class Queue:
    """The daemon's store, read the way an operator would while it runs."""

    def __init__(self, db: Path) -> None:
        self.db = db

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        rows = self.query("SELECT dead, count(*) FROM queue GROUP BY dead")
        out = {"pending": 0, "dead": 0}
        out.update({("dead" if dead else "pending"): n for dead, n in rows})
        return out

    def attempts(self) -> int:
        return int(self.query("SELECT coalesce(sum(attempts), 0) FROM queue")[0][0])

    def furthest_wait(self) -> float:
        """How far in the future the latest pending item is scheduled, in seconds."""
        (latest,) = self.query("SELECT max(next_attempt_at) FROM queue WHERE dead = 0")[0]
        return 0.0 if latest is None else latest - time.time()

    def cursor(self, system: str) -> str | None:
        rows = self.query("SELECT position FROM cursors WHERE system = ?", system)
        return rows[0][0] if rows else None


def cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hms_sync", *args], env=daemon.env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def outage_daemon(sb: Sandbox, tmp_path: Path) -> DaemonProcess:
    """A daemon with webhooks from both systems, small backoff, 4 attempts; HMS-OMS down."""
    port = free_port()
    for system, path in (("api", "hms-api"), ("oms", "oms")):
        sb.configure_webhooks(system, f"http://127.0.0.1:{port}/webhooks/{path}")
    config = tmp_path / "outage.toml"
    config.write_text(CONFIG)
    sb.set_faults("oms", error_rate=1.0)
    return DaemonProcess.for_sandbox(
        sb, tmp_path, port, HMS_SYNC_CONFIG=str(config), HMS_SYNC_CONCURRENCY="8",
        HMS_SYNC_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
    )


def test_during_an_oms_outage_the_queue_grows_in_the_store_and_the_api_side_goes_on(
    sb: Sandbox, tmp_path: Path
) -> None:
    daemon = outage_daemon(sb, tmp_path)
    queue = Queue(tmp_path / "daemon.db")
    furthest: list[float] = []

    def sampled(value: Any) -> Any:
        furthest.append(queue.furthest_wait())
        return value

    daemon.start()
    try:
        assert daemon.proc is not None
        hooked = [sb.create_api_order(f"outage {i}", 1, ITEMS)["id"] for i in range(5)]
        wait_until(lambda: sampled(queue.attempts()) >= 10, 30, 0.05,
                   what="the first failed attempts")
        cursor_before = queue.cursor("HMS-API")
        samples: list[int] = []
        cursors: list[str | None] = []
        for total in (N, 3 * N):
            sb.seed_api_orders(total - (N if samples else 0))
            wait_until(lambda t=total: sampled(queue.counts()["pending"]) >= t, 60, 0.1,
                       what=f"{total} orders queued by the HMS-API poll")
            churn = queue.attempts() + 100
            wait_until(lambda c=churn: sampled(queue.attempts()) >= c, 60, 0.1,
                       what="100 more failed attempts")
            samples.append(rss_kb(daemon.proc.pid))
            cursors.append(queue.cursor("HMS-API"))
        health = httpx.get(f"{daemon.url}/healthz", timeout=5)
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    growth = samples[1] - samples[0]
    print(f"RSS with {N} queued: {samples[0]} kB; with {3 * N}: {samples[1]} kB")
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew {growth} kB for {2 * N} more orders"
    assert max(furthest) <= BACKOFF_MAX + SLACK, f"an item waited {max(furthest):.2f}s"
    # The side that works goes on: the HMS-API cursor moved with every batch, its webhooks
    # were accepted (2xx), and health stayed good (HMS-OMS unreachable is not unhealthy).
    assert cursor_before is not None and cursors[0] is not None and cursors[1] is not None
    assert cursor_before < cursors[0] < cursors[1], (cursor_before, cursors)
    hooks = sb.stats("api")["webhooks"]
    assert hooks["delivered"] >= len(hooked) and hooks["given_up"] == 0, hooks
    assert health.status_code == 200, health.text
    assert sb.list_oms_orders() == []
    assert "Traceback" not in daemon.log()


def test_after_an_oms_outage_dead_items_say_why_and_everything_drains_on_retry(
    sb: Sandbox, tmp_path: Path
) -> None:
    daemon = outage_daemon(sb, tmp_path)
    queue = Queue(tmp_path / "daemon.db")
    daemon.start()
    try:
        # Orders placed during the outage are retried with capped backoff, then die.
        first = [sb.create_api_order(f"outage {i}", 1, ITEMS)["id"] for i in range(10)]
        marks = ",".join("?" * len(first))
        wait_until(lambda: queue.query(
            f"SELECT count(*) FROM queue WHERE dead = 1 AND api_id IN ({marks})", *first
        )[0][0] == len(first), 30, 0.05, what="the first orders to go dead")
        status = cli(daemon, "status", "--json")
        assert status.returncode == 0, status.stderr
        dead = {d["api_id"]: d for d in json.loads(status.stdout)["dead"]}
        assert set(dead) == set(first), dead
        for api_id in first:
            assert dead[api_id]["attempts"] == MAX_ATTEMPTS, dead[api_id]
            reason = dead[api_id]["last_error"]
            assert reason.startswith("HMS-OMS ") and "server error 500" in reason, reason
        # Still dead three polls later: re-reading the last order at the poll cursor is
        # not a new change (it used to revive that order at every poll, forever).
        polls: set[str] = set()

        def api_polls() -> int:
            doc = httpx.get(f"{daemon.url}/healthz", timeout=5).json()
            polls.add(doc["last_successful_poll"]["HMS-API"])
            return len(polls)

        wait_until(lambda: api_polls() >= 4, 15, 0.1, what="three more polls of HMS-API")
        assert queue.counts() == {"pending": 0, "dead": len(first)}

        # More orders while still down: these stay pending (within their attempts).
        later = [sb.create_api_order(f"later {i}", 1, ITEMS)["id"] for i in range(20)]
        wait_until(lambda: queue.counts()["pending"] >= len(later), 20, 0.05)

        # HMS-OMS returns: pending items drain by themselves; dead ones wait for retry.
        sb.set_faults("oms")
        wait_until(lambda: queue.counts()["pending"] == 0, 60, 0.1,
                   what="the pending queue to drain")
        assert queue.counts()["dead"] == len(first), "a dead item came back without a retry"
        for api_id in later:
            assert sb.get_api_order(api_id)["oms_order_code"]

        one = cli(daemon, "retry", str(first[0]))
        assert one.returncode == 0 and "requeued 1 order" in one.stdout, one.stdout + one.stderr
        wait_until(lambda: sb.get_api_order(first[0])["oms_order_code"], 20, 0.05,
                   what="the retried order to be linked")
        rest = cli(daemon, "retry", "--all")
        assert rest.returncode == 0, rest.stderr
        assert f"requeued {len(first) - 1} order" in rest.stdout, rest.stdout
        wait_until(lambda: queue.counts() == {"pending": 0, "dead": 0}, 30, 0.1,
                   what="every item to drain after retry --all")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()

    api_orders = sb.list_api_orders()
    assert len(api_orders) == len(first) + len(later)
    ours = [o for o in sb.list_oms_orders() if o["order_type_code"] == "api_order"]
    assert Counter(o["ext_code"] for o in ours) == Counter(
        str(o["id"]) for o in api_orders), "a duplicate or missing OMS order"
    code_of = {o["ext_code"]: o["code"] for o in ours}
    for order in api_orders:
        assert order["oms_order_code"] == code_of[str(order["id"])], order
    final = cli(daemon, "status", "--json")
    doc = json.loads(final.stdout)
    assert doc["queue"] == {"pending": 0, "dead": 0} and doc["dead"] == []
    assert "Traceback" not in daemon.log()


def test_queue_backoff_doubles_with_jitter_is_capped_and_honours_retry_after() -> None:
    """The per-order delay the daemon schedules after a transient failure (pure function):
    exponential from backoff_initial with jitter in [d/2, d], never above backoff_max, and
    never shorter than a Retry-After the system gave (honoured past backoff_max: the server
    knows when it will take us back; but cut at an hour so a silly value cannot park an
    order forever)."""
    from hms_sync.daemon import backoff_delay

    for attempts in range(0, 40):
        base = min(300.0, 1.0 * 2**attempts)
        for _ in range(50):
            d = backoff_delay(attempts, 1.0, 300.0, None)
            assert base / 2 <= d <= base <= 300.0
    for _ in range(50):
        assert 7.0 <= backoff_delay(0, 1.0, 300.0, 7.0) <= 7.0  # Retry-After over the jitter
        assert backoff_delay(0, 1.0, 300.0, 0.1) >= 0.5  # ...but never below the backoff
        assert backoff_delay(0, 1.0, 30.0, 600.0) == 600.0  # honoured past the cap
        assert backoff_delay(0, 1.0, 30.0, 1e9) == 3600.0  # but not beyond an hour
