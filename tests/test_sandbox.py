"""Conformance of the sandbox servers to contract sections 1-3, over real sockets.

One sandbox runs for the whole module; every test starts from a reset (no orders, no
faults, real clock, no webhook target). Waits poll a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from hms_sync.sandbox import Sandbox, SandboxConfig, SandboxError

API_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
OMS_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
T1 = "2026-12-04T19:00:00.000000Z"
T2 = "2026-12-04T19:00:05.000000Z"


def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig()) as sb:
        yield sb


@pytest.fixture(autouse=True)
def clean(sandbox: Sandbox) -> Iterator[None]:
    sandbox.reset()
    yield
    for system in ("api", "oms"):
        sandbox.configure_webhooks(system, None, max_attempts=8)
    sandbox.reset()


@pytest.fixture(scope="module")
def api(sandbox: Sandbox) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {sandbox.config.api_token}"}
    with httpx.Client(base_url=sandbox.api_url, headers=headers, timeout=5) as client:
        yield client


@pytest.fixture(scope="module")
def oms(sandbox: Sandbox) -> Iterator[httpx.Client]:
    headers = {"Authorization": f'Token token="{sandbox.config.oms_api_key}"'}
    with httpx.Client(base_url=sandbox.oms_url, headers=headers, timeout=5) as client:
        yield client


class Receiver:
    """A webhook endpoint on a free port that answers with a scripted list of statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.received.append((dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else (
                        receiver.statuses[0]
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def events(self) -> list[str]:
        with self.lock:
            return [json.loads(body)["event"] for _, body in self.received]

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def bare() -> Iterator[httpx.Client]:
    """A client without credentials."""
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[list[int]], Receiver]]:
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def api_create(api: httpx.Client, title: str = "Ward 3 linen") -> dict[str, Any]:
    response = api.post("/api/orders", json={"title": title, "user_id": 42, "items": ITEMS})
    assert response.status_code == 201, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


def oms_body(ext_code: str, state: str = "to_execute", order_type: str = "api_order",
             **data: Any) -> dict[str, Any]:
    return {"order": {"ext_code": ext_code, "order_type_code": order_type, "state": state,
                      "user_id": 7, "data": {"title": "Ward 3 linen", "items": ITEMS, **data}}}


def oms_create(oms: httpx.Client, ext_code: str, state: str = "to_execute",
               order_type: str = "api_order", **data: Any) -> dict[str, Any]:
    response = oms.post("/api/v1/orders", json=oms_body(ext_code, state, order_type, **data))
    assert response.status_code == 201, response.text
    return response.json()["order"]  # type: ignore[no-any-return]


def walk_api(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    response = api.get("/api/orders", params=params)
    while True:
        assert response.status_code == 200, response.text
        page = response.json()
        seen += page["data"]
        if page["next_cursor"] is None:
            assert page["next_page_url"] is None
            return seen
        response = api.get(page["next_page_url"])


# -- 1. HMS-API ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Token token=\"sandbox-api-token\"",
                                    "sandbox-api-token"])
@pytest.mark.parametrize("method,path", [("GET", "/api/orders"), ("GET", "/api/orders/1"),
                                         ("POST", "/api/orders"), ("PATCH", "/api/orders/1")])
def test_api_rejects_missing_or_wrong_token(sandbox: Sandbox, bare: httpx.Client,
                                             header: str | None, method: str, path: str) -> None:
    headers = {"Authorization": header} if header else {}
    response = bare.request(method, sandbox.api_url + path, headers=headers, json={})
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthenticated."}


def test_api_order_shape_and_timestamps(api: httpx.Client) -> None:
    first, second = api_create(api), api_create(api, "Second")
    assert (first["id"], second["id"]) == (1, 2)
    assert set(first) >= {"id", "title", "user_id", "status", "items", "oms_order_code",
                          "created_at", "updated_at"}
    assert first["status"] == "pending" and first["oms_order_code"] is None
    assert first["items"] == ITEMS and first["user_id"] == 42
    assert API_TS.match(first["created_at"]) and API_TS.match(first["updated_at"])
    assert api.get("/api/orders/1").json() == {"data": first}


@pytest.mark.parametrize("body,field", [
    ({"user_id": 1, "items": ITEMS}, "title"),
    ({"title": "", "user_id": 1, "items": ITEMS}, "title"),
    ({"title": "x", "user_id": "1", "items": ITEMS}, "user_id"),
    ({"title": "x", "user_id": 1, "items": "many"}, "items"),
    ({"title": "x", "user_id": 1}, "items"),
])
def test_api_create_validation_is_422(api: httpx.Client, body: dict[str, Any],
                                      field: str) -> None:
    response = api.post("/api/orders", json=body)
    assert response.status_code == 422
    assert isinstance(response.json()["message"], str)
    assert list(response.json()["errors"]) == [field]


@pytest.mark.parametrize("status", ["pending", "processing", "completed", "cancelled"])
def test_api_update_accepts_any_status_change(api: httpx.Client, status: str) -> None:
    api_create(api)
    api.patch("/api/orders/1", json={"status": "completed" if status != "completed" else "pending"})
    response = api.patch("/api/orders/1", json={"status": status, "unknown": "ignored"})
    assert response.status_code == 200
    assert response.json()["data"]["status"] == status
    assert "unknown" not in response.json()["data"]


def test_api_update_rejects_unknown_status_and_sets_oms_code(api: httpx.Client) -> None:
    api_create(api)
    response = api.patch("/api/orders/1", json={"status": "shipped"})
    assert response.status_code == 422
    assert set(response.json()) == {"message", "errors"} and "status" in response.json()["errors"]
    response = api.patch("/api/orders/1", json={"oms_order_code": "ORD-000009"})
    assert response.json()["data"]["oms_order_code"] == "ORD-000009"


def test_api_update_bumps_updated_at_only_on_change(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.freeze_clock(T1)
    api_create(api)
    sandbox.freeze_clock(T2)
    same = api.patch("/api/orders/1", json={"status": "pending"}).json()["data"]
    assert same["updated_at"] == T1
    changed = api.patch("/api/orders/1", json={"status": "processing"}).json()["data"]
    assert changed["updated_at"] == T2 and changed["created_at"] == T1


@pytest.mark.parametrize("method", ["GET", "PATCH"])
@pytest.mark.parametrize("order_id", ["999", "abc"])
def test_api_unknown_order_is_404_with_message(api: httpx.Client, method: str,
                                               order_id: str) -> None:
    response = api.request(method, f"/api/orders/{order_id}", json={"status": "pending"})
    assert response.status_code == 404
    assert isinstance(response.json()["message"], str)


def test_api_keyset_walk_returns_each_order_once_in_order(sandbox: Sandbox,
                                                          api: httpx.Client) -> None:
    sandbox.seed_api_orders(25)
    first = api.get("/api/orders", params={"per_page": 10}).json()
    assert first["per_page"] == 10 and len(first["data"]) == 10
    assert first["prev_cursor"] is None and first["prev_page_url"] is None
    seen = walk_api(api, per_page=10)
    assert [o["id"] for o in seen] == list(range(1, 26))
    keys = [(o["updated_at"], o["id"]) for o in seen]
    assert keys == sorted(keys)


def test_api_per_page_default_and_bounds(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.seed_api_orders(501)
    page = api.get("/api/orders").json()
    assert page["per_page"] == 100 and len(page["data"]) == 100
    assert len(api.get("/api/orders", params={"per_page": 1}).json()["data"]) == 1
    assert len(api.get("/api/orders", params={"per_page": 500}).json()["data"]) == 500
    for bad in ("0", "501", "abc", "-1", "2.5"):
        response = api.get("/api/orders", params={"per_page": bad})
        assert response.status_code == 422, bad
        assert "per_page" in response.json()["errors"]


def test_api_shared_timestamp_walk_returns_each_once(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.freeze_clock(T1)
    sandbox.seed_api_orders(50)
    seen = walk_api(api, per_page=7, updated_since=T1)
    assert {o["updated_at"] for o in seen} == {T1}
    assert [o["id"] for o in seen] == list(range(1, 51))


@pytest.mark.parametrize("since", [T2, "2026-12-04T19:00:05.000Z", "2026-12-04T19:00:05+00:00",
                                   "2026-12-04T21:00:05+02:00", "2026-12-04T19:00:05Z"])
def test_api_updated_since_is_inclusive_in_every_format(sandbox: Sandbox, api: httpx.Client,
                                                        since: str) -> None:
    sandbox.freeze_clock(T1)
    sandbox.seed_api_orders(3)
    sandbox.freeze_clock(T2)
    sandbox.seed_api_orders(2)
    seen = walk_api(api, updated_since=since)
    assert [o["id"] for o in seen] == [4, 5]


def test_api_bad_updated_since_or_cursor_is_422(api: httpx.Client) -> None:
    response = api.get("/api/orders", params={"updated_since": "yesterday"})
    assert response.status_code == 422 and "updated_since" in response.json()["errors"]
    response = api.get("/api/orders", params={"cursor": "not-a-cursor"})
    assert response.status_code == 422 and "cursor" in response.json()["errors"]


def test_api_order_updated_mid_walk_is_not_skipped(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.freeze_clock(T1)
    sandbox.seed_api_orders(6)
    page1 = api.get("/api/orders", params={"per_page": 2}).json()
    sandbox.freeze_clock(T2)
    api.patch("/api/orders/1", json={"status": "processing"})
    rest = walk_api(api, per_page=2, cursor=page1["next_cursor"])
    assert [o["id"] for o in page1["data"] + rest] == [1, 2, 3, 4, 5, 6, 1]


# -- 2. HMS-OMS ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, 'Token token="wrong"', "Bearer sandbox-oms-key",
                                    "Token sandbox-oms-key"])
@pytest.mark.parametrize("method,path", [("GET", "/api/v1/orders"),
                                         ("GET", "/api/v1/orders/ORD-000001"),
                                         ("POST", "/api/v1/orders"),
                                         ("PATCH", "/api/v1/orders/ORD-000001")])
def test_oms_rejects_missing_or_wrong_key(sandbox: Sandbox, bare: httpx.Client,
                                          header: str | None, method: str, path: str) -> None:
    headers = {"Authorization": header} if header else {}
    response = bare.request(method, sandbox.oms_url + path, headers=headers, json={})
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}


def test_oms_order_shape_and_timestamps(oms: httpx.Client) -> None:
    order = oms_create(oms, "12345", dock="B")
    assert set(order) == {"code", "ext_code", "order_type_code", "state", "user_id", "data",
                          "created_at", "updated_at"}
    assert order["ext_code"] == "12345" and order["state"] == "to_execute"
    assert order["data"] == {"title": "Ward 3 linen", "items": ITEMS, "dock": "B"}
    assert OMS_TS.match(order["created_at"]) and OMS_TS.match(order["updated_at"])
    assert oms.get(f"/api/v1/orders/{order['code']}").json() == {"order": order}


@pytest.mark.parametrize("state", ["to_execute", "in_progress", "done", "canceled"])
def test_oms_create_accepts_any_valid_state(oms: httpx.Client, state: str) -> None:
    assert oms_create(oms, "1", state)["state"] == state


def test_oms_create_rejects_invalid_state(oms: httpx.Client) -> None:
    response = oms.post("/api/v1/orders", json=oms_body("1", state="shipped"))
    assert response.status_code == 422 and "state" in response.json()["errors"]


def test_oms_ext_code_unique_per_order_type(oms: httpx.Client) -> None:
    oms_create(oms, "12345")
    response = oms.post("/api/v1/orders", json=oms_body("12345"))
    assert response.status_code == 422
    assert response.json() == {"errors": {"ext_code": ["has already been taken"]}}
    assert oms_create(oms, "12345", order_type="other")["ext_code"] == "12345"


ALLOWED = {("to_execute", "in_progress"), ("to_execute", "done"), ("in_progress", "done"),
           ("to_execute", "canceled"), ("in_progress", "canceled")}
STATES = ["to_execute", "in_progress", "done", "canceled"]


@pytest.mark.parametrize("old", STATES)
@pytest.mark.parametrize("new", STATES)
def test_oms_state_machine(oms: httpx.Client, old: str, new: str) -> None:
    code = oms_create(oms, "1", old)["code"]
    response = oms.patch(f"/api/v1/orders/{code}", json={"order": {"state": new}})
    if old == new or (old, new) in ALLOWED:
        assert response.status_code == 200
        assert response.json()["order"]["state"] == new
    else:
        assert response.status_code == 422
        message = f"cannot transition from {old} to {new}"
        assert response.json() == {"errors": {"state": [message]}}
        assert oms.get(f"/api/v1/orders/{code}").json()["order"]["state"] == old


def test_oms_update_merges_data_key_by_key(sandbox: Sandbox, oms: httpx.Client) -> None:
    sandbox.freeze_clock(T1)
    code = oms_create(oms, "1", dock="B")["code"]
    sandbox.freeze_clock(T2)
    body = {"order": {"data": {"title": "New title"}, "user_id": 8, "ext_code": "ignored"}}
    order = oms.patch(f"/api/v1/orders/{code}", json=body).json()["order"]
    assert order["data"] == {"title": "New title", "items": ITEMS, "dock": "B"}
    assert order["user_id"] == 8 and order["ext_code"] == "1"
    assert order["updated_at"] == "2026-12-04T19:00:05.000Z"


def test_oms_unchanged_update_keeps_updated_at(sandbox: Sandbox, oms: httpx.Client) -> None:
    sandbox.freeze_clock(T1)
    code = oms_create(oms, "1")["code"]
    sandbox.freeze_clock(T2)
    body = {"order": {"state": "to_execute", "data": {"title": "Ward 3 linen"}}}
    order = oms.patch(f"/api/v1/orders/{code}", json=body).json()["order"]
    assert order["updated_at"] == "2026-12-04T19:00:00.000Z"


@pytest.mark.parametrize("method", ["GET", "PATCH"])
def test_oms_unknown_order_is_404(oms: httpx.Client, method: str) -> None:
    response = oms.request(method, "/api/v1/orders/ORD-999999", json={"order": {}})
    assert response.status_code == 404
    assert response.json() == {"error": "Not found"}


def test_oms_pages_default_cap_and_meta(sandbox: Sandbox, oms: httpx.Client) -> None:
    sandbox.seed_oms_orders([oms_body(str(i))["order"] for i in range(1, 251)])
    page = oms.get("/api/v1/orders").json()
    assert len(page["orders"]) == 50
    assert page["meta"] == {"current_page": 1, "next_page": 2, "prev_page": None,
                            "total_pages": 5, "total_count": 250}
    page = oms.get("/api/v1/orders", params={"per_page": 1000}).json()
    assert len(page["orders"]) == 200 and page["meta"]["total_pages"] == 2
    last = oms.get("/api/v1/orders", params={"per_page": 200, "page": 2}).json()
    assert len(last["orders"]) == 50
    assert last["meta"] == {"current_page": 2, "next_page": None, "prev_page": 1,
                            "total_pages": 2, "total_count": 250}
    codes = [o["code"] for o in page["orders"] + last["orders"]]
    assert len(set(codes)) == 250
    keys = [(o["updated_at"], o["code"]) for o in page["orders"] + last["orders"]]
    assert keys == sorted(keys)


def test_oms_filters_and_inclusive_updated_since(sandbox: Sandbox, oms: httpx.Client) -> None:
    sandbox.freeze_clock(T1)
    oms_create(oms, "1")
    oms_create(oms, "1", order_type="manual")
    sandbox.freeze_clock(T2)
    oms_create(oms, "2")
    oms_create(oms, "3", order_type="manual")

    def codes(**params: Any) -> list[str]:
        return [o["ext_code"] + "/" + o["order_type_code"]
                for o in oms.get("/api/v1/orders", params=params).json()["orders"]]

    assert codes(ext_code="1") == ["1/api_order", "1/manual"]
    assert codes(ext_code="1", order_type_code="manual") == ["1/manual"]
    assert codes(order_type_code="api_order") == ["1/api_order", "2/api_order"]
    for since in ("2026-12-04T19:00:05.000Z", T2, "2026-12-04T19:00:05+00:00"):
        assert codes(updated_since=since) == ["2/api_order", "3/manual"]
    assert codes(updated_since=T2, order_type_code="manual", ext_code="3") == ["3/manual"]
    assert oms.get("/api/v1/orders", params={"updated_since": "soon"}).status_code == 422


def test_oms_page_drift_skips_an_order_moved_to_the_end(sandbox: Sandbox,
                                                        oms: httpx.Client) -> None:
    """Documents the contract's warning: naive page walking can skip orders."""
    sandbox.freeze_clock(T1)
    codes = [oms_create(oms, str(i))["code"] for i in range(1, 7)]
    page1 = oms.get("/api/v1/orders", params={"per_page": 2, "page": 1}).json()["orders"]
    assert [o["code"] for o in page1] == codes[:2]
    sandbox.freeze_clock(T2)
    oms.patch(f"/api/v1/orders/{codes[0]}", json={"order": {"state": "in_progress"}})
    page2 = oms.get("/api/v1/orders", params={"per_page": 2, "page": 2}).json()["orders"]
    assert [o["code"] for o in page2] == [codes[3], codes[4]]  # codes[2] was skipped


# -- faults and stats (sandbox-only knobs) -------------------------------------------------


@pytest.mark.parametrize("system,body", [("api", {"message": "Server Error"}),
                                         ("oms", {"error": "Internal Server Error"})])
def test_injected_5xx_body_and_admin_untouched(sandbox: Sandbox, api: httpx.Client,
                                               oms: httpx.Client, system: str,
                                               body: dict[str, str]) -> None:
    client, path = (api, "/api/orders") if system == "api" else (oms, "/api/v1/orders")
    sandbox.set_faults(system, error_rate=1.0)
    response = client.get(path)
    assert response.status_code == 500 and response.json() == body
    assert sandbox.stats(system)["injected"]["5xx"] == 1
    assert sandbox.stats(system)["requests"]["list"] == 1


@pytest.mark.parametrize("system,key", [("api", "message"), ("oms", "error")])
def test_injected_429_has_retry_after(sandbox: Sandbox, api: httpx.Client, oms: httpx.Client,
                                      system: str, key: str) -> None:
    client, path = (api, "/api/orders") if system == "api" else (oms, "/api/v1/orders")
    sandbox.set_faults(system, rate_limit_rate=1.0, retry_after=3)
    response = client.get(path)
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    assert isinstance(response.json()[key], str)
    assert sandbox.stats(system)["injected"]["429"] == 1


@pytest.mark.parametrize("apply,expected", [(1.0, 1), (0.0, 0)])
def test_5xx_on_write_may_have_applied_it(sandbox: Sandbox, api: httpx.Client, oms: httpx.Client,
                                          apply: float, expected: int) -> None:
    sandbox.set_faults("both", error_rate=1.0, apply_before_error=apply)
    assert api.post("/api/orders", json={"title": "t", "user_id": 1, "items": ITEMS}
                    ).status_code == 500
    assert oms.post("/api/v1/orders", json=oms_body("1")).status_code == 500
    assert len(sandbox.list_api_orders()) == expected
    assert len(sandbox.list_oms_orders()) == expected


def test_latency_and_fault_config_roundtrip(sandbox: Sandbox, api: httpx.Client) -> None:
    knobs = sandbox.set_faults("api", latency_ms=[60, 60], seed=7)
    assert knobs["latency_ms"] == [60, 60] and knobs["error_rate"] == 0.0
    assert api.get("/_sandbox/faults").json() == knobs
    started = time.monotonic()
    assert api.get("/api/orders").status_code == 200
    assert time.monotonic() - started >= 0.055
    with pytest.raises(SandboxError) as excinfo:
        sandbox.set_faults("api", error_rate=2)
    assert excinfo.value.status == 400


def test_stats_count_contract_requests_by_kind(sandbox: Sandbox, api: httpx.Client,
                                               oms: httpx.Client) -> None:
    api_create(api)
    api.get("/api/orders/1")
    api.patch("/api/orders/1", json={"status": "processing"})
    api.get("/api/orders")
    sandbox.list_api_orders()  # admin calls are not counted
    stats = sandbox.stats("api")
    assert stats["requests"] == {"list": 1, "get": 1, "create": 1, "update": 1}
    assert stats["injected"] == {"5xx": 0, "429": 0}
    code = oms_create(oms, "1")["code"]
    oms.get(f"/api/v1/orders/{code}")
    assert sandbox.stats("oms")["requests"] == {"list": 0, "get": 1, "create": 1, "update": 0}
    sandbox.reset_stats()
    assert sandbox.stats("api")["requests"]["create"] == 0


def test_reset_and_seed(sandbox: Sandbox, api: httpx.Client) -> None:
    assert sandbox.seed_api_orders(3, status="processing", user_id=5) == [1, 3]
    assert {(o["status"], o["user_id"]) for o in sandbox.list_api_orders()} == {("processing", 5)}
    sandbox.reset()
    assert sandbox.list_api_orders() == [] and api_create(api)["id"] == 1
    bad = [oms_body("1")["order"], oms_body("1")["order"]]
    with pytest.raises(SandboxError) as excinfo:
        sandbox.seed_oms_orders(bad)
    assert excinfo.value.status == 422 and sandbox.list_oms_orders() == []


def test_harness_helpers_and_env(sandbox: Sandbox) -> None:
    env = sandbox.env()
    assert env["HMS_API_URL"] == sandbox.api_url and env["OMS_API_URL"] == sandbox.oms_url
    assert env["OMS_ORDER_TYPE_CODE"] == "api_order"
    assert set(env) == {"HMS_API_URL", "HMS_API_TOKEN", "HMS_API_WEBHOOK_SECRET", "OMS_API_URL",
                        "OMS_API_KEY", "OMS_ORDER_TYPE_CODE", "OMS_WEBHOOK_SECRET"}
    order = sandbox.create_api_order("t", 1, ITEMS)
    assert sandbox.update_api_order(order["id"], status="completed")["status"] == "completed"
    assert sandbox.get_api_order(order["id"])["status"] == "completed"
    code = sandbox.create_oms_order("1", state="done")["code"]
    with pytest.raises(SandboxError) as excinfo:
        sandbox.update_oms_order(code, state="in_progress")
    message = "cannot transition from done to in_progress"
    assert excinfo.value.body == {"errors": {"state": [message]}}
    assert sandbox.get_oms_order(code)["state"] == "done"


# -- 3. webhooks ---------------------------------------------------------------------------


def _verify(headers: dict[str, str], body: bytes, secret: str) -> dict[str, Any]:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Hms-Signature"], expected)
    payload: dict[str, Any] = json.loads(body)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Hms-Event"] == payload["event"]
    assert headers["X-Hms-Delivery"] == payload["id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
                        payload["id"])
    assert set(payload) == {"id", "event", "occurred_at", "data"}
    return payload


def test_api_webhooks_signed_created_and_updated(sandbox: Sandbox, api: httpx.Client,
                                                 receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([200])
    sandbox.configure_webhooks("api", receiver.url, secret="s3cret")
    created = api_create(api)
    api.patch("/api/orders/1", json={"status": "pending"})  # no change: no webhook
    updated = api.patch("/api/orders/1", json={"status": "processing"}).json()["data"]
    wait_for(lambda: len(receiver.received) >= 2)
    assert sandbox.wait_webhooks_idle()
    payloads = [_verify(h, b, "s3cret") for h, b in receiver.received]
    assert [p["event"] for p in payloads] == ["order.created", "order.updated"]
    assert [p["data"]["order"] for p in payloads] == [created, updated]
    assert API_TS.match(payloads[1]["occurred_at"])


def test_oms_webhooks_fulfilled_only_when_done(sandbox: Sandbox, oms: httpx.Client,
                                               receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([204])
    sandbox.configure_webhooks("oms", receiver.url, secret="oms-secret")
    code = oms_create(oms, "1")["code"]
    oms.patch(f"/api/v1/orders/{code}", json={"order": {"data": {"dock": "B"}}})
    oms.patch(f"/api/v1/orders/{code}", json={"order": {"state": "in_progress"}})
    oms.patch(f"/api/v1/orders/{code}", json={"order": {"state": "done"}})
    oms.patch(f"/api/v1/orders/{code}", json={"order": {"state": "done"}})  # no change
    sandbox.create_oms_order("2")  # admin writes send webhooks too
    wait_for(lambda: len(receiver.received) >= 5)
    assert sandbox.wait_webhooks_idle()
    payloads = [_verify(h, b, "oms-secret") for h, b in receiver.received]
    # one order's deliveries arrive in order; other orders' may interleave with them
    first = [p for p in payloads if p["data"]["order"]["code"] == code]
    assert [p["event"] for p in first] == ["order.status_changed"] * 3 + ["order.fulfilled"]
    assert first[-1]["data"]["order"]["state"] == "done"
    assert OMS_TS.match(first[-1]["occurred_at"])
    others = [p["event"] for p in payloads if p["data"]["order"]["code"] != code]
    assert others == ["order.status_changed"]


def test_webhook_retried_until_2xx_with_same_bytes(sandbox: Sandbox, api: httpx.Client,
                                                   receiver_factory: Callable[..., Receiver]
                                                   ) -> None:
    receiver = receiver_factory([500, 503, 200])
    sandbox.configure_webhooks("api", receiver.url, secret="s")
    api_create(api)
    wait_for(lambda: len(receiver.received) >= 3)
    assert sandbox.wait_webhooks_idle()
    bodies = {body for _, body in receiver.received}
    assert len(bodies) == 1 and len(receiver.received) == 3
    hooks = sandbox.stats("api")["webhooks"]
    assert (hooks["delivered"], hooks["failed_attempts"], hooks["sent"]) == (1, 2, 3)


def test_webhook_gives_up_after_max_attempts(sandbox: Sandbox, oms: httpx.Client,
                                             receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([500])
    sandbox.configure_webhooks("oms", receiver.url, secret="s", max_attempts=2)
    oms_create(oms, "1")
    wait_for(lambda: sandbox.stats("oms")["webhooks"]["given_up"] == 1)
    assert len(receiver.received) == 2 and sandbox.stats("oms")["webhooks"]["delivered"] == 0


def test_webhook_connection_errors_are_retried(sandbox: Sandbox, api: httpx.Client,
                                               receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([200])
    port = receiver.server.server_address[1]
    receiver.close()  # nothing listens there now
    sandbox.configure_webhooks("api", f"http://127.0.0.1:{port}/hook", max_attempts=2)
    api_create(api)
    wait_for(lambda: sandbox.stats("api")["webhooks"]["given_up"] == 1)
    assert sandbox.stats("api")["webhooks"]["failed_attempts"] == 2
