"""Hostile answers from the systems (issue 6, item 3): malformed JSON, missing fields, wrong
types, huge pages, a 200 with an HTML error page, redirects to another host, timeouts in
the middle of a body, answers about another order.

One system is a tiny Starlette app on a real socket that misbehaves on cue; the other is the
real sandbox. Each answer must become a clear error on that order (reconcile raises a
TransientError naming the system, nothing recorded as synced) or on that poll (HmsSyncError,
the cursor does not move, nothing enqueued), never a crash, and never a write: the other
system receives no POST or PATCH, and nothing is written from a bad answer.
Hostile *webhooks* are tests/test_receiver.py's (fuzzed bodies, signatures, slow and
oversized bodies); client-level translation is tests/test_clients.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import API_TOKEN, OMS_KEY, SECRETS
from harness import DaemonProcess, free_port, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import hms_sync.clients.base as base_module
from hms_sync.clients.api import ApiClient
from hms_sync.clients.base import HttpOptions
from hms_sync.clients.oms import OmsClient
from hms_sync.engine import Engine
from hms_sync.errors import (
    BadResponse,
    HmsSyncError,
    NetworkError,
    TransientError,
)
from hms_sync.mapping import Mapper
from hms_sync.sandbox import Sandbox
from hms_sync.scan import API, OMS, poll_api, poll_oms, sync_all
from hms_sync.store import Store

ROOT = Path(__file__).resolve().parent.parent
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
# Short read timeout and few retries: a stalled body costs about a second, not minutes.
OPTIONS = HttpOptions(connect_timeout=1.0, read_timeout=0.3, deadline=1.0, max_attempts=2,
                      backoff_initial=0.01, backoff_max=0.02)
T = "2026-12-04T19:00:00.000000Z"

Handler = Callable[[Request], Any]


# -- the misbehaving server ------------------------------------------------------------------


@dataclass
class Hostile:
    """A server whose answers the test scripts: {(METHOD, path prefix): handler}."""

    host: str = "127.0.0.1"
    port: int = 0
    script: dict[tuple[str, str], Handler] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)
    stop_stalling: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.seen if m in ("POST", "PATCH", "PUT", "DELETE")]

    async def app(self, request: Request) -> Response:
        self.seen.append((request.method, request.url.path))
        for (method, prefix), handler in self.script.items():
            if request.method == method and request.url.path.startswith(prefix):
                result = handler(request)
                return await result if asyncio.iscoroutine(result) else result
        return Response('{"message": "Not found"}', 404, media_type="application/json")


@contextlib.contextmanager
def serve(hostile: Hostile) -> Iterator[Hostile]:
    async def endpoint(request: Request) -> Response:
        return await hostile.app(request)

    app = Starlette(routes=[Route("/{path:path}", endpoint,
                                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((hostile.host, 0))
    hostile.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off",
                                           timeout_graceful_shutdown=1))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, 0.01, what="hostile server")
    try:
        yield hostile
    finally:
        hostile.stop_stalling.set()
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def _servers() -> Iterator[tuple[Hostile, Hostile]]:
    with serve(Hostile()) as h, serve(Hostile(host="127.0.0.2")) as b:
        yield h, b


def _fresh(server: Hostile) -> Iterator[Hostile]:
    server.script.clear()
    server.seen.clear()
    server.stop_stalling = threading.Event()
    yield server
    server.stop_stalling.set()  # end this test's stalled answers


@pytest.fixture
def hostile(_servers: tuple[Hostile, Hostile]) -> Iterator[Hostile]:
    yield from _fresh(_servers[0])


@pytest.fixture
def bystander(_servers: tuple[Hostile, Hostile]) -> Iterator[Hostile]:
    """Another host (127.0.0.2) that a redirect points at: it must never be asked."""
    yield from _fresh(_servers[1])


# -- answers ---------------------------------------------------------------------------------


def raw(body: bytes | str, status: int = 200, ctype: str = "application/json",
        headers: dict[str, str] | None = None) -> Handler:
    data = body.encode() if isinstance(body, str) else body
    return lambda request: Response(data, status, headers=headers, media_type=ctype)


def doc(value: Any, status: int = 200) -> Handler:
    return raw(json.dumps(value), status)


def stall_after(prefix: bytes, hostile: Hostile) -> Handler:
    """Headers and the start of a body, then nothing (until the test ends)."""

    stop = hostile.stop_stalling

    async def handler(request: Request) -> Response:
        async def body() -> Any:
            yield prefix
            while not stop.is_set():
                await asyncio.sleep(0.05)

        return StreamingResponse(body(), 200, media_type="application/json")

    return handler


def redirect_to(other: Hostile) -> Handler:
    return lambda request: Response(
        b"", 302, headers={"Location": f"{other.url}{request.url.path}"}
    )


def html_error() -> Handler:
    return raw("<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>",
               ctype="text/html")


def api_order(order_id: int = 1, **over: Any) -> dict[str, Any]:
    order = {"id": order_id, "title": "Ward 3 linen", "user_id": 1, "status": "pending",
             "items": ITEMS, "oms_order_code": None, "created_at": T, "updated_at": T}
    order.update(over)
    return {k: v for k, v in order.items() if v is not ...}


def oms_order(ext: str = "1", code: str = "ORD-H1", **over: Any) -> dict[str, Any]:
    order = {"code": code, "ext_code": ext, "order_type_code": "api_order",
             "state": "to_execute", "user_id": 1, "data": {"title": "Ward 3 linen"},
             "created_at": "2026-12-04T19:00:00.000Z", "updated_at": "2026-12-04T19:00:00.000Z"}
    order.update(over)
    return {k: v for k, v in order.items() if v is not ...}


def oms_page(orders: list[dict[str, Any]], next_page: Any = None) -> dict[str, Any]:
    return {"orders": orders, "meta": {"current_page": 1, "next_page": next_page,
                                       "prev_page": None, "total_pages": 1,
                                       "total_count": len(orders)}}


def api_page(rows: list[dict[str, Any]], next_cursor: Any = None) -> dict[str, Any]:
    return {"data": rows, "per_page": 500, "next_cursor": next_cursor, "next_page_url": None,
            "prev_cursor": None, "prev_page_url": None}


# -- wiring ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engine_for(api_url: str, oms_url: str, db: Path) -> Any:
    api = ApiClient(api_url, API_TOKEN, options=OPTIONS)
    oms = OmsClient(oms_url, OMS_KEY, options=OPTIONS)
    store = Store(db)
    try:
        yield Engine(api, oms, store, Mapper())
    finally:
        await api.aclose()
        await oms.aclose()
        store.close()


def sandbox_writes(sb: Sandbox) -> dict[str, int]:
    api, oms = sb.stats("api")["requests"], sb.stats("oms")["requests"]
    return {"api_update": api["update"], "oms_create": oms["create"],
            "oms_update": oms["update"]}


NO_WRITES = {"api_update": 0, "oms_create": 0, "oms_update": 0}


def assert_clear(exc: BaseException, system: str) -> None:
    text = str(exc)
    assert isinstance(exc, TransientError), repr(exc)
    assert text.startswith(system), text
    assert len(text) < 300 and "\n" not in text, text
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def small_cap(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(base_module, "MAX_BODY_BYTES", 64 * 1024)
    return 64 * 1024


# -- HMS-API misbehaves: reconcile of one order ----------------------------------------------


API_ANSWERS: dict[str, tuple[Callable[[Hostile, Hostile], Handler], type, str]] = {
    "malformed-json": (lambda h, b: raw('{"data": {"id": 1, "title": '), BadResponse,
                       "malformed JSON"),
    "not-an-object": (lambda h, b: doc([1, 2, 3]), BadResponse, "no dict 'data'"),
    "missing-status": (lambda h, b: doc({"data": api_order(status=...)}), BadResponse,
                       "'status'"),
    "missing-updated-at": (lambda h, b: doc({"data": api_order(updated_at=...)}),
                           BadResponse, "'updated_at'"),
    "id-wrong-type": (lambda h, b: doc({"data": api_order(id="one")}), BadResponse, "'id'"),
    "items-wrong-type": (lambda h, b: doc({"data": api_order(items="four sheets")}),
                         BadResponse, "'items'"),
    "status-wrong-type": (lambda h, b: doc({"data": api_order(status=["pending"])}),
                          BadResponse, "'status'"),
    "timestamp-garbage": (lambda h, b: doc({"data": api_order(updated_at="yesterday")}),
                          BadResponse, "'updated_at'"),
    "html-200": (lambda h, b: html_error(), BadResponse, "not JSON"),
    "json-wrong-ctype": (lambda h, b: raw(json.dumps({"data": api_order()}),
                                          ctype="text/plain"), BadResponse, "not JSON"),
    "redirect-elsewhere": (lambda h, b: redirect_to(b), BadResponse, "redirect 302 to 127.0.0.2"),
    "stall-mid-body": (lambda h, b: stall_after(b'{"data": {"id": 1, "ti', h), NetworkError,
                       "timed out"),
    "over-the-cap": (lambda h, b: doc({"data": api_order(title="x" * 100_000)}), BadResponse,
                     "larger than"),
    "another-order": (lambda h, b: doc({"data": api_order(2)}), BadResponse, "id 2, not 1"),
}


@pytest.mark.parametrize("case", API_ANSWERS)
def test_hostile_api_answer_to_get_is_a_clear_error_and_writes_nothing(
    case: str, sb: Sandbox, hostile: Hostile, bystander: Hostile, tmp_path: Path,
    small_cap: int, run: Any,
) -> None:
    make, kind, needle = API_ANSWERS[case]
    hostile.script[("GET", "/api/orders")] = make(hostile, bystander)

    async def body() -> None:
        async with engine_for(hostile.url, sb.oms_url, tmp_path / "s.db") as engine:
            with pytest.raises(HmsSyncError) as caught:
                await engine.reconcile(1)
            assert isinstance(caught.value, kind), repr(caught.value)
            assert needle in str(caught.value), str(caught.value)
            assert_clear(caught.value, "HMS-API")
            assert engine.store.get_link(1) is None  # nothing recorded from a bad answer
            assert engine.store.audit_log() == []

    run(body())
    assert sandbox_writes(sb) == NO_WRITES
    assert sb.list_oms_orders() == []
    assert hostile.writes() == []
    assert bystander.seen == [], "a redirect to another host was followed"


# -- HMS-OMS misbehaves: reconcile of one order ----------------------------------------------


OMS_LIST_ANSWERS: dict[str, tuple[Callable[[Hostile, Hostile], Handler], type, str]] = {
    "malformed-json": (lambda h, b: raw('{"orders": [{"code": "ORD'), BadResponse,
                       "malformed JSON"),
    "no-meta": (lambda h, b: doc({"orders": []}), BadResponse, "'meta'"),
    "orders-not-a-list": (lambda h, b: doc({"orders": {"0": oms_order()}, "meta": {}}),
                          BadResponse, "'orders'"),
    "row-missing-code": (lambda h, b: doc(oms_page([oms_order(code=...)])), BadResponse,
                         "'code'"),
    "row-state-wrong-type": (lambda h, b: doc(oms_page([oms_order(state=3)])), BadResponse,
                             "'state'"),
    "next-page-wrong-type": (lambda h, b: doc(oms_page([], next_page="2")), BadResponse,
                             "next_page"),
    "html-200": (lambda h, b: html_error(), BadResponse, "not JSON"),
    "redirect-elsewhere": (lambda h, b: redirect_to(b), BadResponse, "redirect 302"),
    "stall-mid-body": (lambda h, b: stall_after(b'{"orders": [', h), NetworkError, "timed out"),
    "over-the-cap": (lambda h, b: doc(oms_page([oms_order(ext=str(i), code=f"ORD-{i}")
                                                for i in range(2, 2000)])),
                     BadResponse, "larger than"),
}


@pytest.mark.parametrize("case", OMS_LIST_ANSWERS)
def test_hostile_oms_answer_to_find_is_a_clear_error_and_writes_nothing(
    case: str, sb: Sandbox, hostile: Hostile, bystander: Hostile, tmp_path: Path,
    small_cap: int, run: Any,
) -> None:
    api_id = sb.create_api_order("Ward 3 linen", 1, ITEMS)["id"]
    make, kind, needle = OMS_LIST_ANSWERS[case]
    hostile.script[("GET", "/api/v1/orders")] = make(hostile, bystander)

    async def body() -> None:
        async with engine_for(sb.api_url, hostile.url, tmp_path / "s.db") as engine:
            with pytest.raises(HmsSyncError) as caught:
                await engine.reconcile(api_id)
            assert isinstance(caught.value, kind), repr(caught.value)
            assert needle in str(caught.value), str(caught.value)
            assert_clear(caught.value, "HMS-OMS")
            assert engine.store.get_link(api_id) is None

    run(body())
    assert hostile.writes() == [], "created although the search for an existing order failed"
    assert sandbox_writes(sb) == NO_WRITES
    assert sb.get_api_order(api_id)["oms_order_code"] is None
    assert bystander.seen == []


OMS_CREATE_ANSWERS: dict[str, tuple[Callable[[Hostile], Handler], type, str]] = {
    "html-201": (lambda h: raw("<html>Created, probably</html>", 201, "text/html"),
                 BadResponse, "not JSON"),
    "malformed-json": (lambda h: raw('{"order": {"code": "ORD-', 201), BadResponse,
                       "malformed JSON"),
    "no-code": (lambda h: doc({"order": oms_order(code=...)}, 201), BadResponse, "'code'"),
    "empty-object": (lambda h: doc({}, 201), BadResponse, "'order'"),
    "stall-mid-body": (lambda h: stall_after(b'{"order": {"code": "ORD-', h), NetworkError,
                       "timed out"),
    "another-orders-ext-code": (lambda h: doc({"order": oms_order(ext="999")}, 201),
                                BadResponse, "ext_code"),
    "another-order-type": (lambda h: doc({"order": oms_order(order_type_code="other")}, 201),
                           BadResponse, "order_type_code"),
}


@pytest.mark.parametrize("case", OMS_CREATE_ANSWERS)
def test_hostile_oms_answer_to_create_writes_nothing_back(
    case: str, sb: Sandbox, hostile: Hostile, tmp_path: Path, run: Any
) -> None:
    """The create may or may not have happened; no code from a bad answer reaches HMS-API."""
    api_id = sb.create_api_order("Ward 3 linen", 1, ITEMS)["id"]
    make, kind, needle = OMS_CREATE_ANSWERS[case]
    hostile.script[("GET", "/api/v1/orders")] = doc(oms_page([]))
    hostile.script[("POST", "/api/v1/orders")] = make(hostile)

    async def body() -> None:
        async with engine_for(sb.api_url, hostile.url, tmp_path / "s.db") as engine:
            with pytest.raises(HmsSyncError) as caught:
                await engine.reconcile(api_id)
            assert isinstance(caught.value, kind), repr(caught.value)
            assert needle in str(caught.value), str(caught.value)
            assert_clear(caught.value, "HMS-OMS")
            link = engine.store.get_link(api_id)
            assert link is None or link.oms_code is None, link
            assert engine.store.audit_log() == []

    run(body())
    assert sandbox_writes(sb) == NO_WRITES
    assert sb.get_api_order(api_id)["oms_order_code"] is None
    assert {m for m, _ in hostile.writes()} == {"POST"}


def test_hostile_oms_answer_to_update_writes_nothing_to_api(
    sb: Sandbox, hostile: Hostile, tmp_path: Path, run: Any
) -> None:
    """An OMS order to adopt whose title is stale: the plan patches OMS first, then writes
    the code back to HMS-API. The PATCH answer is garbage, so HMS-API gets nothing."""
    api_id = sb.create_api_order("Ward 3 linen", 1, ITEMS)["id"]
    mine = oms_order(ext=str(api_id), code="ORD-H1", data={"title": "Old title"})
    hostile.script[("GET", "/api/v1/orders")] = doc(oms_page([mine]))
    hostile.script[("PATCH", "/api/v1/orders/ORD-H1")] = doc({"order": {"code": "ORD-H1"}})

    async def body() -> None:
        async with engine_for(sb.api_url, hostile.url, tmp_path / "s.db") as engine:
            with pytest.raises(BadResponse, match="HMS-OMS PATCH") as caught:
                await engine.reconcile(api_id)
            assert_clear(caught.value, "HMS-OMS")

    run(body())
    assert [m for m, _ in hostile.writes()] == ["PATCH"]
    assert sandbox_writes(sb) == NO_WRITES
    assert sb.get_api_order(api_id)["oms_order_code"] is None


def test_a_garbage_write_back_answer_then_a_sane_one_creates_once(
    sb: Sandbox, hostile: Hostile, tmp_path: Path, run: Any
) -> None:
    """HMS-API answers the write-back with HTML: the OMS order exists, the link is kept
    as pending, and the retry (once HMS-API behaves) adopts it instead of creating again."""
    hostile.script[("GET", "/api/orders/1")] = doc({"data": api_order(1)})
    hostile.script[("PATCH", "/api/orders/1")] = html_error()

    async def body() -> None:
        async with engine_for(hostile.url, sb.oms_url, tmp_path / "s.db") as engine:
            with pytest.raises(BadResponse, match="HMS-API PATCH"):
                await engine.reconcile(1)
            [created] = sb.list_oms_orders()
            hostile.script[("PATCH", "/api/orders/1")] = doc(
                {"data": api_order(1, oms_order_code=created["code"])})
            result = await engine.reconcile(1)
            assert result.outcome != "error", result
            assert result.oms_code == created["code"]

    run(body())
    assert len(sb.list_oms_orders()) == 1
    assert sb.stats("oms")["requests"]["create"] == 1
    patches = [p for m, p in hostile.seen if m == "PATCH"]
    assert patches == ["/api/orders/1", "/api/orders/1"]


def test_a_hostile_422_text_is_recorded_not_interpreted(
    sb: Sandbox, hostile: Hostile, tmp_path: Path
) -> None:
    """A 422 whose text carries markup and our own key: `import` and `status` print one
    line each, the key masked, the markup literal, no traceback."""
    api_id = sb.create_api_order("Ward 3 linen", 1, ITEMS)["id"]
    text = f"[/red][bold]state[/bold] rejected for {OMS_KEY} \x1b[31mred\x1b[0m"
    hostile.script[("GET", "/api/v1/orders")] = doc(oms_page([]))
    hostile.script[("POST", "/api/v1/orders")] = doc({"errors": {"state": [text]}}, 422)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMS_", "OMS_"))}
    env.update(sb.env())
    env.update({"OMS_API_URL": hostile.url, "HMS_SYNC_DB": str(tmp_path / "s.db")})
    run_cli = [sys.executable, "-m", "hms_sync"]
    imp = subprocess.run(run_cli + ["import", str(api_id)], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    status = subprocess.run(run_cli + ["status"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert imp.returncode == 1, imp.stderr
    assert status.returncode == 0, status.stderr
    for proc in (imp, status):
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out
        assert OMS_KEY not in out
    assert "[/red][bold]state[/bold]" in imp.stderr  # shown literally
    assert "\x1b" not in imp.stderr + status.stdout, "a server can drive the terminal"
    assert len([ln for ln in imp.stderr.splitlines() if ln.strip()]) == 1, imp.stderr
    assert sandbox_writes(sb) == NO_WRITES


# -- polls -----------------------------------------------------------------------------------


def _rows(n: int, bad_at: int | None = None) -> list[dict[str, Any]]:
    rows = [api_order(i, updated_at=f"2026-12-04T19:00:{i % 60:02d}.{i:06d}Z")
            for i in range(1, n + 1)]
    if bad_at is not None:
        rows[bad_at]["status"] = None
    return rows


POLL_ANSWERS: dict[str, tuple[Callable[[Hostile], Handler], str]] = {
    "malformed-json": (lambda h: raw('{"data": ['), "malformed JSON"),
    "data-not-a-list": (lambda h: doc({"data": {"1": api_order()}}), "'data'"),
    "cursor-wrong-type": (lambda h: doc(api_page([api_order()], next_cursor=7)), "next_cursor"),
    "5000-rows-one-bad": (lambda h: doc(api_page(_rows(5000, bad_at=4321))), "'status'"),
    "over-the-cap": (lambda h: doc(api_page(_rows(2000))), "larger than"),
    "html-200": (lambda h: html_error(), "not JSON"),
    "stall-mid-body": (lambda h: stall_after(b'{"data": [{"id": 1', h), "timed out"),
    "cursor-that-never-ends": (lambda h: doc(api_page([api_order()], next_cursor="same")),
                               "cursor"),
}


@pytest.mark.parametrize("case", POLL_ANSWERS)
def test_hostile_api_list_fails_the_poll_and_moves_nothing(
    case: str, sb: Sandbox, hostile: Hostile, tmp_path: Path, run: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, needle = POLL_ANSWERS[case]
    if case == "over-the-cap":
        monkeypatch.setattr(base_module, "MAX_BODY_BYTES", 64 * 1024)
    hostile.script[("GET", "/api/orders")] = make(hostile)

    async def body() -> None:
        async with engine_for(hostile.url, sb.oms_url, tmp_path / "s.db") as engine:
            with pytest.raises(HmsSyncError) as caught:
                async with asyncio.timeout(10):
                    await poll_api(engine)
            assert needle in str(caught.value), str(caught.value)
            assert_clear(caught.value, "HMS-API")
            if case == "cursor-that-never-ends":
                # The pages before the repeat were sound: their work and cursor are kept.
                assert engine.store.get_cursor(API) is not None
                assert engine.store.queue_counts() == {"pending": 1, "dead": 0}
            else:
                assert engine.store.get_cursor(API) is None
                assert engine.store.queue_counts() == {"pending": 0, "dead": 0}
            with pytest.raises(HmsSyncError):  # sync-all refuses the same answer
                async with asyncio.timeout(10):
                    await sync_all(engine)

    run(body())
    if case == "cursor-that-never-ends":  # order 1 came on a sound page: it may be synced
        assert {o["ext_code"] for o in sb.list_oms_orders()} <= {"1"}
        assert sb.stats("oms")["requests"]["create"] <= 1
    else:
        assert sandbox_writes(sb) == NO_WRITES
        assert hostile.writes() == []


def test_hostile_oms_list_fails_the_oms_poll_and_moves_nothing(
    sb: Sandbox, hostile: Hostile, tmp_path: Path, run: Any
) -> None:
    rows = [oms_order(ext=str(i), code=f"ORD-{i}") for i in range(1, 300)]
    rows[250]["updated_at"] = "not a time"
    hostile.script[("GET", "/api/v1/orders")] = doc(oms_page(rows))

    async def body() -> None:
        async with engine_for(sb.api_url, hostile.url, tmp_path / "s.db") as engine:
            with pytest.raises(BadResponse, match="updated_at"):
                await poll_oms(engine)
            assert engine.store.get_cursor(OMS) is None
            assert engine.store.queue_counts() == {"pending": 0, "dead": 0}

    run(body())
    assert hostile.writes() == [] and sandbox_writes(sb) == NO_WRITES


# -- the daemon does not fall over ------------------------------------------------------------


def test_the_daemon_survives_a_hostile_api_and_keeps_serving(
    sb: Sandbox, hostile: Hostile, tmp_path: Path
) -> None:
    """Every HMS-API answer is garbage: the daemon logs each failed poll, stays up, keeps
    answering /healthz, writes nothing anywhere, and stops cleanly."""
    hostile.script[("GET", "/api/orders")] = raw('{"data": [{"id": 1, "title": nul')
    port = free_port()
    daemon = DaemonProcess.for_sandbox(sb, tmp_path, port, HMS_API_URL=hostile.url,
                                       HMS_SYNC_WEBHOOKS="false")
    daemon.start()
    try:
        wait_until(lambda: daemon.log().count("poll of HMS-API failed") >= 3, 20, 0.05,
                   what="three failed polls of HMS-API")
        assert httpx.get(f"{daemon.url}/healthz", timeout=2).status_code == 200
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    log = daemon.log()
    assert "malformed JSON" in log
    assert "Traceback" not in log
    assert hostile.writes() == []
    assert sandbox_writes(sb) == NO_WRITES


def test_an_oms_listing_that_ignores_page_numbers_is_a_clear_error_not_an_endless_walk(
    httpx_mock: Any,
) -> None:
    """Every page of one timestamp with a next page: stepping page numbers would never end."""
    import asyncio

    from hms_sync.clients.oms import OmsClient
    from hms_sync.errors import BadResponse

    row = {"code": "X", "ext_code": "1", "order_type_code": "api_order", "state": "to_execute",
           "user_id": 1, "data": {}, "updated_at": "2026-12-04T19:00:00.000Z"}
    body = {"orders": [row, {**row, "code": "Y"}],
            "meta": {"current_page": 1, "next_page": 2, "prev_page": None, "total_pages": 2,
                     "total_count": 4}}
    httpx_mock.add_response(json=body, is_reusable=True)

    async def walk() -> int:
        n = 0
        async with OmsClient("http://oms.test", "k") as client:
            async for _ in client.iter_pages(per_page=2):
                n += 1
        return n

    with pytest.raises(BadResponse, match="ignores page numbers"):
        asyncio.run(walk())
    assert len(httpx_mock.get_requests()) <= 4
