"""`hms-sync run` over real sockets: the sandbox in a thread, the daemon as a subprocess.

Contract sections 3-5 and issue 4. Webhook tests use a 60 s poll interval, so only webhooks
can explain a change arriving within seconds. Every wait is a condition with a deadline.
One sandbox serves the module; each test resets it and points its webhooks at a fresh port,
and every daemon log of every test is checked for secrets at teardown.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import DaemonProcess, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from hms_sync.sandbox.server import Sandbox, SandboxConfig
from hms_sync.sandbox.webhooks import sign

# Distinctive credentials, so a leak into any log is unmistakable.
CREDENTIALS = {
    "api_token": "tok-DAEMON-S3CRET-7f3a19",
    "oms_api_key": "key-DAEMON-S3CRET-91bd04",
    "api_webhook_secret": "whapi-DAEMON-S3CRET-5c2e77",
    "oms_webhook_secret": "whoms-DAEMON-S3CRET-e04f32",
}
SECRETS = tuple(CREDENTIALS.values())
API_SECRET = CREDENTIALS["api_webhook_secret"]
OMS_SECRET = CREDENTIALS["oms_webhook_secret"]

WEBHOOK_DEADLINE = 5.0  # generous for CI; polling alone would take 60 s
LONG_POLL = "60"  # seconds: only webhooks can explain a change arriving sooner
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
SOURCE_PATH = {"api": "hms-api", "oms": "oms"}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon_sandbox() -> Iterator[Sandbox]:
    config = SandboxConfig(
        api_token=CREDENTIALS["api_token"], oms_api_key=CREDENTIALS["oms_api_key"],
        api_webhook_secret=API_SECRET, oms_webhook_secret=OMS_SECRET,
    )
    with Sandbox(config) as sb:
        yield sb


class World:
    """The module's sandbox, reset, with its webhooks aimed at `port`; daemons on `port`."""

    def __init__(self, sb: Sandbox, tmp_path: Path, port: int) -> None:
        self.sb = sb
        self.tmp_path = tmp_path
        self.port = port
        self.daemons: list[DaemonProcess] = []
        self.outputs: list[str] = []  # output of daemons run outside DaemonProcess

    @property
    def db(self) -> Path:
        return self.tmp_path / "daemon.db"

    def hook_url(self, system: str) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/{SOURCE_PATH[system]}"

    def webhooks(self, enabled: bool, *systems: str) -> None:
        for system in systems or ("api", "oms"):
            self.sb.configure_webhooks(system, self.hook_url(system), enabled=enabled)

    def daemon(self, *, start: bool = True, drop: tuple[str, ...] = (), **env: str
               ) -> DaemonProcess:
        d = DaemonProcess.for_sandbox(self.sb, self.tmp_path, self.port, **env)
        for name in drop:
            d.env.pop(name, None)
        self.daemons.append(d)
        return d.start() if start else d

    def run_once(self, *, drop: tuple[str, ...] = (), timeout: float = 30.0, **env: str
                 ) -> subprocess.CompletedProcess[str]:
        """`hms-sync run` expected to exit by itself; stdout and stderr kept apart."""
        d = self.daemon(start=False, drop=drop, **env)
        done = subprocess.run(
            [sys.executable, "-m", "hms_sync", "run"], env=d.env, capture_output=True,
            text=True, timeout=timeout,
        )
        self.outputs += [done.stdout, done.stderr]
        return done

    def log(self) -> str:
        seen = {d.log_path for d in self.daemons}
        return "".join(p.read_text(errors="replace") for p in seen if p.exists())

    # -- reading both systems --

    def linked(self, api_id: int) -> dict[str, Any] | None:
        """The OMS order once it exists and its code is written back to the API order."""
        code = self.sb.get_api_order(api_id)["oms_order_code"]
        if not code:
            return None
        oms = self.sb.get_oms_order(code)
        return oms if oms["ext_code"] == str(api_id) else None

    def oms_orders_for(self, api_id: int) -> list[dict[str, Any]]:
        return [o for o in self.sb.list_oms_orders()
                if o["ext_code"] == str(api_id) and o["order_type_code"] == "api_order"]

    def api_status(self, api_id: int, status: str) -> bool:
        return self.sb.get_api_order(api_id)["status"] == status

    def oms_state(self, code: str, state: str) -> bool:
        return self.sb.get_oms_order(code)["state"] == state

    def requests(self) -> dict[str, dict[str, int]]:
        return {s: self.sb.stats(s)["requests"] for s in ("api", "oms")}

    def writes(self) -> dict[str, int]:
        r = self.requests()
        return {"api_update": r["api"]["update"], "oms_create": r["oms"]["create"],
                "oms_update": r["oms"]["update"]}

    def quiet(self, d: DaemonProcess, timeout: float = 15.0, window: float = 0.3) -> None:
        """Wait until no webhook is pending, the daemon's queue is empty and neither system
        saw a request for `window` seconds."""

        def snapshot() -> str:
            return json.dumps([self.sb.stats("api"), self.sb.stats("oms"), queue(d)])

        def settled() -> bool:
            if any(self.sb.stats(s)["webhooks"]["pending"] for s in ("api", "oms")):
                return False
            if queue(d)["pending"]:
                return False
            before = snapshot()
            time.sleep(window)
            return before == snapshot()

        wait_until(settled, timeout, 0.05, what="daemon and sandbox quiet")


@pytest.fixture
def world(daemon_sandbox: Sandbox, tmp_path: Path) -> Iterator[World]:
    sb = daemon_sandbox
    w = World(sb, tmp_path, free_port())
    sb.reset()
    w.webhooks(True)
    try:
        yield w
    finally:
        for d in w.daemons:
            d.stop()
        sb.set_faults("both")
        text = w.log() + "".join(w.outputs)
        leaked = [name for name, s in CREDENTIALS.items() if s in text]
        assert not leaked, f"secrets in the daemon's output: {leaked}"


# -- helpers ----------------------------------------------------------------------------------


def health(d: DaemonProcess) -> dict[str, Any]:
    response = httpx.get(f"{d.url}/healthz", timeout=5)
    body: dict[str, Any] = response.json()
    body["http_status"] = response.status_code
    return body


def queue(d: DaemonProcess) -> dict[str, int]:
    return dict(health(d)["queue"])


def envelope(event: str, order: dict[str, Any], delivery_id: str | None = None
             ) -> tuple[bytes, dict[str, str]]:
    """A delivery as contract section 3 shapes it (unsigned)."""
    did = delivery_id or str(uuid.uuid4())
    body = json.dumps({
        "id": did, "event": event, "occurred_at": datetime.now(UTC).isoformat(),
        "data": {"order": order},
    }, separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json", "X-Hms-Event": event,
                  "X-Hms-Delivery": did}


def post(d: DaemonProcess, source: str, body: bytes, headers: dict[str, str],
         secret: str | None = None) -> httpx.Response:
    """POST a delivery to the daemon, signed with `secret` unless it is None."""
    headers = dict(headers)
    if secret is not None:
        headers["X-Hms-Signature"] = sign(secret, body)
    return httpx.post(f"{d.url}/webhooks/{source}", content=body, headers=headers, timeout=10)


def store_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's store read-only, as an operator would, while it runs."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def new_order(sb: Sandbox, title: str = "Ward 3 linen", user_id: int = 42) -> int:
    return int(sb.create_api_order(title, user_id, ITEMS)["id"])


def timed(predicate: Any, timeout: float, what: str) -> float:
    start = time.perf_counter()
    wait_until(predicate, timeout, 0.005, what=what)
    return time.perf_counter() - start


# -- propagation ------------------------------------------------------------------------------


def test_webhooks_carry_each_seed_flow_within_seconds_and_cause_no_echo(world: World) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    world.quiet(d)

    api_id = new_order(sb)
    timed(lambda: world.linked(api_id), WEBHOOK_DEADLINE,
          "the OMS order created and its code written back")
    oms = world.oms_orders_for(api_id)
    assert len(oms) == 1
    oms_order = oms[0]
    assert oms_order["state"] == "to_execute"
    assert oms_order["user_id"] == 42
    assert oms_order["data"]["title"] == "Ward 3 linen"
    assert oms_order["data"]["items"] == ITEMS
    code = oms_order["code"]

    sb.update_oms_order(code, state="in_progress")
    timed(lambda: world.api_status(api_id, "processing"), WEBHOOK_DEADLINE,
          "OMS in_progress -> API processing")
    sb.update_oms_order(code, state="done")
    timed(lambda: world.api_status(api_id, "completed"), WEBHOOK_DEADLINE,
          "OMS done -> API completed (fulfilment)")

    other = new_order(sb, "Ward 5 towels", 7)
    other_code = wait_until(lambda: world.linked(other), WEBHOOK_DEADLINE,
                            what="second order linked")["code"]
    sb.update_api_order(other, status="processing")
    timed(lambda: world.oms_state(other_code, "in_progress"), WEBHOOK_DEADLINE,
          "API processing -> OMS in_progress")

    # One change costs one write on the other side; a new order one create + one write-back.
    world.quiet(d)
    assert world.writes() == {"oms_create": 2, "api_update": 2 + 2, "oms_update": 1}
    assert sb.get_api_order(api_id)["status"] == "completed"
    assert sb.get_oms_order(other_code)["state"] == "in_progress"


def test_polling_alone_propagates_within_a_couple_of_intervals(world: World) -> None:
    sb = world.sb
    for system in ("api", "oms"):
        sb.configure_webhooks(system, None, enabled=False)
    interval = 1.0
    deadline = 2 * interval + 2.0
    d = world.daemon(HMS_SYNC_WEBHOOKS="false", HMS_SYNC_POLL_INTERVAL=str(interval),
                     drop=("HMS_API_WEBHOOK_SECRET", "OMS_WEBHOOK_SECRET"))

    api_id = new_order(sb)
    code = wait_until(lambda: world.linked(api_id), deadline, what="linked by polling")["code"]
    sb.update_oms_order(code, state="in_progress")
    wait_until(lambda: world.api_status(api_id, "processing"), deadline,
               what="OMS in_progress -> API processing by polling")
    sb.update_api_order(api_id, status="completed")
    wait_until(lambda: world.oms_state(code, "done"), deadline,
               what="API completed -> OMS done by polling")
    assert all(sb.stats(s)["webhooks"]["sent"] == 0 for s in ("api", "oms"))

    # With the receiver switched off, nothing is accepted, however well signed.
    body, headers = envelope("order.updated", sb.get_api_order(api_id))
    assert post(d, "hms-api", body, headers, API_SECRET).status_code == 401


def test_propagation_oms_to_api_under_a_second(world: World,
                                               record_property: Any) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    ids = [new_order(sb, f"Speed {n}") for n in range(10)]
    codes = [wait_until(partial(world.linked, i), WEBHOOK_DEADLINE, what=f"order {i}")["code"]
             for i in ids]
    world.quiet(d)

    lags: list[float] = []
    for api_id, code in zip(ids, codes, strict=True):
        for state, status in (("in_progress", "processing"), ("done", "completed")):
            start = time.perf_counter()
            sb.update_oms_order(code, state=state)
            wait_until(partial(world.api_status, api_id, status), WEBHOOK_DEADLINE,
                       0.005, what=f"OMS {state} -> API {status}")
            lags.append(time.perf_counter() - start)

    lags_ms = sorted(round(x * 1000, 1) for x in lags)
    summary = (f"OMS->API propagation over {len(lags)} changes: max {lags_ms[-1]} ms, "
               f"median {lags_ms[len(lags_ms) // 2]} ms, all {lags_ms}")
    print("\n" + summary)
    record_property("oms_to_api_propagation_ms", json.dumps(lags_ms))
    # The target is < 1 s; 2 s keeps a loaded CI machine from making this flaky.
    assert max(lags) < 2.0, summary


# -- receiver answers -------------------------------------------------------------------------


def test_refused_deliveries_change_nothing(world: World) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    api_id = new_order(sb)
    code = wait_until(lambda: world.linked(api_id), WEBHOOK_DEADLINE, what="linked")["code"]
    world.quiet(d)

    # Deliveries that would each make the daemon reconcile the order if they were accepted.
    oms_fresh = dict(sb.get_oms_order(code), state="done", updated_at=None)
    api_fresh = dict(sb.get_api_order(api_id), status="completed", updated_at=None)
    oms_body, oms_headers = envelope("order.fulfilled", oms_fresh)
    api_body, api_headers = envelope("order.updated", api_fresh)
    malformed = b'{"id": "x", "event": '
    huge = json.dumps({"id": str(uuid.uuid4()), "event": "order.updated",
                       "data": {"order": api_fresh}, "pad": "x" * 1_048_576}).encode()
    unknown, unknown_headers = envelope("order.deleted", api_fresh)
    cases = [
        ("bad signature", "oms", oms_body,
         {**oms_headers, "X-Hms-Signature": "sha256=" + "0" * 64}, None, 401),
        ("missing signature", "oms", oms_body, oms_headers, None, 401),
        ("signed with the other source's secret", "hms-api", api_body, api_headers,
         OMS_SECRET, 401),
        ("body changed after signing", "hms-api", api_body.replace(b"completed", b"cancelled"),
         {**api_headers, "X-Hms-Signature": sign(API_SECRET, api_body)}, None, 401),
        ("malformed JSON, validly signed", "hms-api", malformed, api_headers, API_SECRET, 400),
        ("over 1 MiB, validly signed", "hms-api", huge, api_headers, API_SECRET, 413),
        ("unknown event, validly signed", "hms-api", unknown, unknown_headers, API_SECRET, 202),
    ]

    def state() -> Any:
        return (world.requests(), queue(d),
                store_rows(world.db, "SELECT count(*) FROM deliveries"),
                store_rows(world.db, "SELECT count(*) FROM queue"),
                sb.get_api_order(api_id), sb.get_oms_order(code))

    before = state()
    for what, source, body, headers, secret, expected in cases:
        response = post(d, source, body, headers, secret)
        assert response.status_code == expected, (what, response.text)
        world.quiet(d)
        assert state() == before, f"{what} changed something"

    # Control: the same OMS hint, validly signed, is accepted and makes the daemon look
    # (so the checks above would have seen a reconcile), yet the hint moves nothing.
    response = post(d, "oms", oms_body, oms_headers, OMS_SECRET)
    assert response.status_code == 202, response.text
    wait_until(lambda: world.requests()["oms"]["get"] > before[0]["oms"]["get"],
               WEBHOOK_DEADLINE, what="the accepted hint reconciled")
    world.quiet(d)
    assert sb.get_oms_order(code)["state"] == "to_execute"
    assert sb.get_api_order(api_id)["status"] == "pending"
    assert world.writes() == {"oms_create": 1, "api_update": 1, "oms_update": 0}


def test_duplicate_and_replayed_deliveries_write_nothing(world: World) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    api_id = new_order(sb)
    code = wait_until(lambda: world.linked(api_id), WEBHOOK_DEADLINE, what="linked")["code"]
    world.quiet(d)
    old_api = sb.get_api_order(api_id)  # pending, linked
    old_oms = sb.get_oms_order(code)  # to_execute

    # A customer's change whose webhook we deliver ourselves, twice.
    world.webhooks(False, "api")
    sb.update_api_order(api_id, status="processing")
    body, headers = envelope("order.updated", sb.get_api_order(api_id))
    first = post(d, "hms-api", body, headers, API_SECRET)
    assert first.status_code == 202 and first.json()["status"] == "accepted", first.text
    wait_until(lambda: world.oms_state(code, "in_progress"), WEBHOOK_DEADLINE,
               what="the delivery propagated")
    world.quiet(d)
    writes = world.writes()
    assert writes == {"oms_create": 1, "api_update": 1, "oms_update": 1}
    requests = world.requests()

    again = post(d, "hms-api", body, headers, API_SECRET)
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    world.quiet(d)
    assert world.requests() == requests, "a duplicate delivery made the daemon look again"

    # The order moves on (OMS finishes it), then old states arrive under new delivery ids.
    world.webhooks(True, "api")
    sb.update_oms_order(code, state="done")
    wait_until(lambda: world.api_status(api_id, "completed"), WEBHOOK_DEADLINE,
               what="OMS done -> API completed")
    world.quiet(d)
    writes = world.writes()
    gets_before = world.requests()["api"]["get"]

    unknown_age = {k: v for k, v in old_api.items() if k != "updated_at"}
    replays = [
        ("hms-api", *envelope("order.updated", old_api), API_SECRET),
        ("hms-api", *envelope("order.created", old_api), API_SECRET),
        ("oms", *envelope("order.status_changed", old_oms), OMS_SECRET),
        # No updated_at: the receiver cannot tell it is old, so it must queue it; the
        # reconcile then reads the truth and finds nothing to do.
        ("hms-api", *envelope("order.updated", unknown_age), API_SECRET),
    ]
    for source, replay_body, replay_headers, secret in replays:
        response = post(d, source, replay_body, replay_headers, secret)
        assert 200 <= response.status_code < 300, response.text
    wait_until(lambda: world.requests()["api"]["get"] > gets_before, WEBHOOK_DEADLINE,
               what="the undated replay reconciled")
    world.quiet(d)
    assert world.writes() == writes, "a replayed delivery caused a write"
    assert sb.get_api_order(api_id)["status"] == "completed"
    assert sb.get_oms_order(code)["state"] == "done"


# -- stopping and crashing --------------------------------------------------------------------


def test_delivery_accepted_before_sigkill_is_processed_after_restart(world: World) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    world.quiet(d)
    sb.set_faults("oms", error_rate=1.0)  # the reconcile cannot finish

    api_id = new_order(sb)
    wait_until(lambda: store_rows(world.db, "SELECT reason FROM queue WHERE api_id = ?",
                                  (api_id,)), WEBHOOK_DEADLINE, what="the delivery queued")
    reason = store_rows(world.db, "SELECT reason FROM queue WHERE api_id = ?", (api_id,))[0][0]
    assert "webhook" in reason
    assert store_rows(world.db, "SELECT count(*) FROM deliveries WHERE api_id = ?",
                      (api_id,))[0][0] == 1
    # Answered 2xx, so the sender will never resend it: only the store remembers it.
    wait_until(lambda: sb.stats("api")["webhooks"]["delivered"] == 1, WEBHOOK_DEADLINE,
               what="the delivery answered 2xx")
    d.kill()

    sb.set_faults("oms")
    assert world.oms_orders_for(api_id) == []
    assert sb.stats("api")["webhooks"]["pending"] == 0
    d2 = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    wait_until(lambda: world.linked(api_id), 10, what="the queued order synced after restart")
    world.quiet(d2)
    assert len(world.oms_orders_for(api_id)) == 1
    assert store_rows(world.db, "SELECT count(*) FROM queue")[0][0] == 0
    assert store_rows(world.db, "SELECT count(*) FROM locks")[0][0] == 0


def test_sigterm_with_reconciles_in_flight_loses_nothing(world: World) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    world.quiet(d)
    sb.set_faults("both", latency_ms=[300, 300])
    ids = [new_order(sb, f"Inflight {n}") for n in range(6)]
    wait_until(lambda: world.requests()["oms"]["create"] >= 1, 10, what="reconciles under way")
    assert not all(world.linked(i) for i in ids), "everything finished before the SIGTERM"

    start = time.monotonic()
    assert d.terminate(timeout=30) == 0
    elapsed = time.monotonic() - start
    assert elapsed < 16, f"stop took {elapsed:.1f}s (grace 10 s + server shutdown 5 s)"
    assert "waiting up to" in d.log(), "no reconcile was in flight at SIGTERM"

    sb.set_faults("both")
    d2 = world.daemon(HMS_SYNC_POLL_INTERVAL="1")
    for api_id in ids:
        wait_until(partial(world.linked, api_id), 15, what=f"order {api_id} after restart")
    world.quiet(d2)
    for api_id in ids:
        assert len(world.oms_orders_for(api_id)) == 1, f"duplicate OMS order for {api_id}"
    assert "Traceback" not in world.log()


def test_changes_made_while_stopped_converge_after_restart(world: World) -> None:
    sb = world.sb
    d = world.daemon()
    a, b = new_order(sb, "Before A"), new_order(sb, "Before B")
    code_a = wait_until(lambda: world.linked(a), WEBHOOK_DEADLINE, what="A linked")["code"]
    code_b = wait_until(lambda: world.linked(b), WEBHOOK_DEADLINE, what="B linked")["code"]
    world.quiet(d)
    assert d.terminate() == 0

    # While it is down, and with no webhook to tell it afterwards.
    world.webhooks(False)
    sb.update_oms_order(code_a, state="in_progress")
    sb.update_api_order(b, status="processing")
    c = new_order(sb, "While down")

    d2 = world.daemon()
    wait_until(lambda: world.api_status(a, "processing"), 10, what="OMS change reached API")
    wait_until(lambda: world.oms_state(code_b, "in_progress"), 10, what="API change reached OMS")
    wait_until(lambda: world.linked(c), 10, what="order created while down synced")
    world.quiet(d2)
    assert all(len(world.oms_orders_for(i)) == 1 for i in (a, b, c))


# -- start-up checks --------------------------------------------------------------------------


def test_missing_webhook_secret_is_exit_2_before_any_request(world: World) -> None:
    done = world.run_once(drop=("OMS_WEBHOOK_SECRET",))
    assert done.returncode == 2, done.stderr
    assert "OMS_WEBHOOK_SECRET" in done.stderr
    assert "[receiver] enabled = false" in done.stderr, "the way to poll only is shown whole"
    assert "Traceback" not in done.stderr
    for system in ("api", "oms"):
        stats = world.sb.stats(system)
        assert sum(stats["requests"].values()) == 0 and stats["unauthorized"] == 0


def test_wrong_api_token_is_exit_2_naming_hms_api_without_a_retry_storm(world: World) -> None:
    start = time.monotonic()
    done = world.run_once(HMS_API_TOKEN="not-the-token-0000")
    assert done.returncode == 2, done.stderr
    assert "HMS-API" in done.stderr and "401" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 15
    api = world.sb.stats("api")
    assert sum(api["requests"].values()) <= 2 and api["unauthorized"] <= 2
    assert world.sb.stats("oms")["requests"]["create"] == 0


def test_port_in_use_is_exit_2_with_a_clear_message(world: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", world.port))
        taken.listen()
        done = world.run_once()
    assert done.returncode == 2, done.stderr
    assert str(world.port) in done.stderr and "HMS_SYNC_PORT" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    for system in ("api", "oms"):
        assert sum(world.sb.stats(system)["requests"].values()) == 0


# -- operator surface -------------------------------------------------------------------------


def test_health_metrics_json_logs_and_no_secret_in_the_log(world: World) -> None:
    sb = world.sb
    d = world.daemon(HMS_SYNC_LOG_FORMAT="json", HMS_SYNC_LOG_LEVEL="DEBUG",
                     HMS_SYNC_POLL_INTERVAL=LONG_POLL)
    api_id = new_order(sb)
    code = wait_until(lambda: world.linked(api_id), WEBHOOK_DEADLINE, what="linked")["code"]
    sb.update_oms_order(code, state="in_progress")
    wait_until(lambda: world.api_status(api_id, "processing"), WEBHOOK_DEADLINE,
               what="OMS -> API")
    body, headers = envelope("order.updated", sb.get_api_order(api_id))
    assert post(d, "oms", body, headers, "wrong-secret").status_code == 401
    world.quiet(d)

    h = health(d)
    assert h["http_status"] == 200 and h["status"] == "ok", h
    polls = h["last_successful_poll"]
    assert set(polls) == {"HMS-API", "HMS-OMS"}, polls
    for system, when in polls.items():
        assert when, f"no successful poll of {system}"
        assert abs(time.time() - datetime.fromisoformat(when).timestamp()) < 120
    assert h["queue"] == {"pending": 0, "dead": 0}

    response = httpx.get(f"{d.url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("hms_sync_webhooks_total", "hms_sync_writes_total", "hms_sync_queue_depth",
                 "hms_sync_dead_letters", "hms_sync_reconcile_seconds",
                 "hms_sync_propagation_seconds",
                 "hms_sync_last_successful_poll_timestamp_seconds"):
        assert name in text, f"{name} missing from /metrics"
    m = metric_samples(text)
    assert m[("hms_sync_webhooks_total", (("result", "accepted"), ("source", "hms-api")))] >= 1
    assert m[("hms_sync_webhooks_total", (("result", "unauthorized"), ("source", "oms")))] == 1
    assert m[("hms_sync_writes_total", (("kind", "create"), ("system", "HMS-OMS")))] == 1
    assert m[("hms_sync_writes_total", (("kind", "write-back"), ("system", "HMS-API")))] == 1
    assert m[("hms_sync_writes_total", (("kind", "update"), ("system", "HMS-API")))] == 1
    assert m[("hms_sync_reconcile_seconds_count", ())] >= 2
    assert m[("hms_sync_propagation_seconds_count", (("direction", "oms_to_api"),))] == 1
    assert m[("hms_sync_propagation_seconds_count", (("direction", "api_to_oms"),))] >= 1
    assert ("hms_sync_queue_depth", ()) in m and ("hms_sync_dead_letters", ()) in m
    for system in ("HMS-API", "HMS-OMS"):
        stamp = m[("hms_sync_last_successful_poll_timestamp_seconds", (("system", system),))]
        assert abs(time.time() - stamp) < 120

    assert d.terminate() == 0
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert lines
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"log line is not JSON: {line!r}")
    assert all(isinstance(r, dict) and "message" in r and "level" in r for r in records)
    integration = [r for r in records if r["logger"] in ("hms_sync.integration",
                                                         "hms_sync.daemon")]
    assert integration
    unprefixed = [r["message"] for r in integration if not r["message"].startswith("[hms-sync]")]
    assert not unprefixed, unprefixed
    messages = "\n".join(r["message"] for r in records)
    assert f"[hms-sync] created OMS order {code} for API order {api_id}" in messages
    assert "[hms-sync] stopped cleanly" in messages
    leaked = [name for name, s in CREDENTIALS.items() if s in d.log()]
    assert not leaked, f"secrets in the log: {leaked}"
