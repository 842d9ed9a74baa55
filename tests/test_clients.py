"""HTTP clients for HMS-API and HMS-OMS against contract sections 1 and 2 (pytest-httpx).

No test sleeps: `asyncio.sleep` is replaced by a recorder, so retry waits are observed, not
spent, and the attempt counts are deterministic.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hms_sync.clients import base
from hms_sync.clients.api import ApiClient
from hms_sync.clients.base import HttpOptions, JsonClient, parse_retry_after
from hms_sync.clients.oms import OmsClient
from hms_sync.errors import (
    BadResponse,
    NetworkError,
    NotFound,
    PermanentError,
    RateLimited,
    ServerError,
    SystemError_,
    TransientError,
    Unauthorized,
    ValidationFailed,
    is_transient,
)
from hms_sync.models import ApiOrder, OmsOrder, parse_iso

API = "http://api.test"
OMS = "http://oms.test"
TOKEN = "tok-S3CRET-e41f09a2"
KEY = "key-S3CRET-93bd5c70"
FAST = HttpOptions(deadline=5.0, max_attempts=4, backoff_initial=0.01, backoff_max=0.02)

API_ORDER: dict[str, Any] = {
    "id": 12345, "title": "Ward 3 linen", "user_id": 42, "status": "pending",
    "items": [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}],
    "oms_order_code": None,
    "created_at": "2026-12-04T19:00:00.000000Z", "updated_at": "2026-12-04T19:00:00.000000Z",
}
OMS_ORDER: dict[str, Any] = {
    "code": "ORD-000123", "ext_code": "12345", "order_type_code": "api_order",
    "state": "to_execute", "user_id": 7,
    "data": {"title": "Ward 3 linen", "items": [], "dock": "B"},
    "created_at": "2026-12-04T19:00:00.123Z", "updated_at": "2026-12-04T19:00:00.123Z",
}
T0 = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch) -> list[float]:
    """Every retry wait, recorded instead of slept."""
    calls: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        calls.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return calls


@dataclass(frozen=True)
class System:
    name: str
    base: str
    secret: str
    auth: str
    envelope: str  # the key wrapping one order
    order: dict[str, Any]
    get_path: str
    key_field: str  # a field every order must have

    def make(self, options: HttpOptions = FAST, **kw: Any) -> JsonClient:
        cls = ApiClient if self.name == "api" else OmsClient
        return cls(self.base, self.secret, options=options, **kw)

    def get(self, client: Any) -> Awaitable[Any]:
        return client.get_order(12345 if self.name == "api" else "ORD-000123")

    def wrap(self, order: dict[str, Any]) -> dict[str, Any]:
        return {self.envelope: order}


SYS_API = System(
    "api", API, TOKEN, f"Bearer {TOKEN}", "data", API_ORDER, "/api/orders/12345", "id"
)
SYS_OMS = System(
    "oms", OMS, KEY, f'Token token="{KEY}"', "order", OMS_ORDER, "/api/v1/orders/ORD-000123",
    "code",
)
BOTH = pytest.mark.parametrize("sys", [SYS_API, SYS_OMS], ids=["api", "oms"])


def run(sys: System, fn: Callable[[Any], Awaitable[Any]], options: HttpOptions = FAST,
        **kw: Any) -> Any:
    async def main() -> Any:
        async with sys.make(options, **kw) as client:
            return await fn(client)

    return asyncio.run(main())


def assert_no_secret(exc: BaseException) -> None:
    texts = [str(exc), repr(exc), str(exc.args)]
    if isinstance(exc, SystemError_):
        texts.append(exc.detail)
    if isinstance(exc, ValidationFailed):
        texts.append(json.dumps(exc.errors))
    for text in texts:
        assert TOKEN not in text and KEY not in text, f"credential leaked: {text!r}"


def fails(exc_type: type[BaseException], sys: System, fn: Callable[[Any], Awaitable[Any]],
          options: HttpOptions = FAST) -> Any:
    with pytest.raises(exc_type) as info:
        run(sys, fn, options)
    assert_no_secret(info.value)
    return info.value


def sent(httpx_mock) -> list[httpx.Request]:
    return httpx_mock.get_requests()


# --- auth and parsing ------------------------------------------------------------------------


@BOTH
def test_auth_header_is_exactly_the_contracts(httpx_mock, sys):
    httpx_mock.add_response(url=sys.base + sys.get_path, json=sys.wrap(sys.order))
    run(sys, sys.get)
    (req,) = sent(httpx_mock)
    assert req.headers["Authorization"] == sys.auth
    assert req.headers.get_list("Authorization") == [sys.auth]
    assert "json" in req.headers["Accept"]


def test_api_get_parses(httpx_mock):
    httpx_mock.add_response(url=f"{API}/api/orders/12345", method="GET",
                            json={"data": API_ORDER})
    order = run(SYS_API, lambda c: c.get_order(12345))
    assert isinstance(order, ApiOrder)
    assert (order.id, order.title, order.user_id, order.status) == (
        12345, "Ward 3 linen", 42, "pending"
    )
    assert order.items == API_ORDER["items"]
    assert order.oms_order_code is None
    assert order.updated_at == T0 and order.created_at == T0


def test_oms_get_parses_and_keeps_foreign_data_keys(httpx_mock):
    httpx_mock.add_response(url=f"{OMS}/api/v1/orders/ORD-000123", method="GET",
                            json={"order": OMS_ORDER})
    order = run(SYS_OMS, lambda c: c.get_order("ORD-000123"))
    assert isinstance(order, OmsOrder)
    assert (order.code, order.ext_code, order.state, order.user_id) == (
        "ORD-000123", "12345", "to_execute", 7
    )
    assert order.data == {"title": "Ward 3 linen", "items": [], "dock": "B"}
    assert order.updated_at == T0 + timedelta(milliseconds=123)
    assert order.is_ours("api_order") and not order.is_ours("other")


def test_oms_code_is_opaque_and_escaped_in_the_path(httpx_mock):
    httpx_mock.add_response(json={"order": {**OMS_ORDER, "code": "A/B 1?"}})
    order = run(SYS_OMS, lambda c: c.get_order("A/B 1?"))
    assert order.code == "A/B 1?"
    (req,) = sent(httpx_mock)
    assert req.url.raw_path == b"/api/v1/orders/A%2FB%201%3F"


def test_api_update_sends_only_given_fields(httpx_mock):
    done = {**API_ORDER, "status": "completed", "oms_order_code": "ORD-000123"}
    httpx_mock.add_response(method="PATCH", url=f"{API}/api/orders/12345",
                            match_json={"status": "completed"}, json={"data": done})
    httpx_mock.add_response(method="PATCH", url=f"{API}/api/orders/12345",
                            match_json={"oms_order_code": "ORD-000123"}, json={"data": done})

    async def both(c: ApiClient) -> tuple[ApiOrder, ApiOrder]:
        return (await c.update_order(12345, status="completed"),
                await c.update_order(12345, oms_order_code="ORD-000123"))

    a, b = run(SYS_API, both)
    assert a.status == "completed" and b.oms_order_code == "ORD-000123"


def test_api_create_and_list_parse(httpx_mock):
    httpx_mock.add_response(
        method="POST", url=f"{API}/api/orders", status_code=201,
        match_json={"title": "T", "user_id": 1, "items": []},
        json={"data": {**API_ORDER, "id": 7, "title": "T", "user_id": 1, "items": []}},
    )
    httpx_mock.add_response(
        method="GET",
        json={"data": [API_ORDER, {**API_ORDER, "id": 12346}], "per_page": 2,
              "next_cursor": "eyJpZCI6MTIzNDZ9", "next_page_url": "x", "prev_cursor": None,
              "prev_page_url": None},
    )

    async def go(c: ApiClient) -> Any:
        created = await c.create_order("T", 1, [])
        return created, await c.list_page(updated_since=T0, per_page=2)

    created, (rows, cursor) = run(SYS_API, go)
    assert created.id == 7 and created.status == "pending"
    assert [r.id for r in rows] == [12345, 12346]
    assert cursor == "eyJpZCI6MTIzNDZ9"
    listed = sent(httpx_mock)[1]
    assert listed.url.path == "/api/orders"
    assert dict(listed.url.params) == {
        "updated_since": "2026-12-04T19:00:00.000000Z", "per_page": "2",
    }


def test_oms_create_update_list_parse(httpx_mock):
    new = {"ext_code": "12345", "order_type_code": "api_order", "state": "to_execute",
           "user_id": 7, "data": {"title": "Ward 3 linen", "items": []}}
    httpx_mock.add_response(method="POST", url=f"{OMS}/api/v1/orders", status_code=201,
                            match_json={"order": new}, json={"order": OMS_ORDER})
    httpx_mock.add_response(method="PATCH", url=f"{OMS}/api/v1/orders/ORD-000123",
                            match_json={"order": {"state": "done"}},
                            json={"order": {**OMS_ORDER, "state": "done"}})
    httpx_mock.add_response(method="GET", json={
        "orders": [OMS_ORDER], "meta": {"current_page": 1, "next_page": 2, "prev_page": None,
                                        "total_pages": 2, "total_count": 2}})

    async def go(c: OmsClient) -> Any:
        return (await c.create_order(new), await c.update_order("ORD-000123", {"state": "done"}),
                await c.list_page(order_type_code="api_order", page=1, per_page=1))

    created, updated, (rows, next_page) = run(SYS_OMS, go)
    assert created.code == "ORD-000123"
    assert updated.state == "done" and updated.data["dock"] == "B"
    assert [r.code for r in rows] == ["ORD-000123"] and next_page == 2
    assert dict(sent(httpx_mock)[2].url.params) == {
        "order_type_code": "api_order", "page": "1", "per_page": "1",
    }


@BOTH
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-04T19:00:00.000000Z", T0),  # Laravel
        ("2026-12-04T19:00:00.123456Z", T0 + timedelta(microseconds=123456)),
        ("2026-12-04T19:00:00.123Z", T0 + timedelta(milliseconds=123)),  # Rails
        ("2026-12-04T21:00:00.123+02:00", T0 + timedelta(milliseconds=123)),
        ("2026-12-04T19:00:00", T0),  # naive: taken as UTC
    ],
)
def test_timestamps_parse_to_aware_utc(httpx_mock, sys, text, expected):
    httpx_mock.add_response(json=sys.wrap({**sys.order, "created_at": text, "updated_at": text}))
    order = run(sys, sys.get)
    for ts in (order.updated_at, order.created_at):
        assert ts == expected
        assert ts.utcoffset() == timedelta(0)
        assert ts.tzinfo is UTC


@BOTH
def test_unknown_fields_are_tolerated(httpx_mock, sys):
    order = {**sys.order, "priority": "high", "links": {"self": "/x"}, "tags": [1, 2]}
    httpx_mock.add_response(json={sys.envelope: order, "meta": {"v": 2}, "extra": True})
    got = run(sys, sys.get)
    assert getattr(got, sys.key_field) == sys.order[sys.key_field]


def test_oms_null_data_and_missing_optional_fields(httpx_mock):
    minimal = {"code": "ORD-9", "state": "done", "data": None,
               "updated_at": "2026-12-04T19:00:00.123Z"}
    httpx_mock.add_response(json={"order": minimal})
    got = run(SYS_OMS, lambda c: c.get_order("ORD-9"))
    assert got.data == {} and got.ext_code is None and not got.is_ours("api_order")


# --- errors that are not retried -------------------------------------------------------------


@BOTH
def test_404_is_not_found_and_not_retried(httpx_mock, sys):
    body = {"message": "No query results."} if sys.name == "api" else {"error": "Not found"}
    httpx_mock.add_response(status_code=404, json=body)
    exc = fails(NotFound, sys, sys.get)
    assert exc.status_code == 404 and not is_transient(exc)
    assert sys.get_path in str(exc)
    assert len(sent(httpx_mock)) == 1


def test_api_422_is_validation_failed_with_errors(httpx_mock):
    httpx_mock.add_response(status_code=422, json={
        "message": "The selected status is invalid.",
        "errors": {"status": ["The selected status is invalid."]}})
    exc = fails(ValidationFailed, SYS_API, lambda c: c.update_order(12345, status="lost"))
    assert exc.errors == {"status": ["The selected status is invalid."]}
    assert exc.has_error("status", "invalid") and not exc.has_error("status", "taken")
    assert exc.status_code == 422 and not is_transient(exc)
    assert len(sent(httpx_mock)) == 1


def test_oms_422_ext_code_taken(httpx_mock):
    httpx_mock.add_response(method="POST", status_code=422,
                            json={"errors": {"ext_code": ["has already been taken"]}})
    exc = fails(ValidationFailed, SYS_OMS, lambda c: c.create_order({"ext_code": "12345"}))
    assert exc.has_error("ext_code", "taken")
    assert not exc.has_error("state", "taken")
    assert "ext_code" in str(exc)
    assert len(sent(httpx_mock)) == 1


def test_oms_422_bad_transition(httpx_mock):
    httpx_mock.add_response(method="PATCH", status_code=422, json={
        "errors": {"state": ["cannot transition from done to in_progress"]}})
    exc = fails(ValidationFailed, SYS_OMS,
                lambda c: c.update_order("ORD-000123", {"state": "in_progress"}))
    assert exc.has_error("state", "cannot transition")
    assert len(sent(httpx_mock)) == 1


@BOTH
def test_401_trips_the_breaker(httpx_mock, sys):
    body = {"message": "Unauthenticated."} if sys.name == "api" else {"error": "Unauthorized"}
    httpx_mock.add_response(status_code=401, json=body)
    caught: list[BaseException] = []

    async def twice(c: JsonClient) -> None:
        for _ in range(2):
            try:
                await sys.get(c)
            except Unauthorized as exc:
                caught.append(exc)
        try:
            await c.ping()  # a different call is stopped as well
        except Unauthorized as exc:
            caught.append(exc)
        assert c.unauthorized is not None
        assert c.requests_sent == 1

    run(sys, twice)
    assert len(caught) == 3
    for exc in caught:
        assert isinstance(exc, Unauthorized) and not is_transient(exc)
        assert_no_secret(exc)
    assert len(sent(httpx_mock)) == 1  # the second and third call sent nothing


@BOTH
def test_unexpected_status_is_permanent_and_not_retried(httpx_mock, sys):
    httpx_mock.add_response(status_code=418, json={"message": "I'm a teapot"})
    exc = fails(PermanentError, sys, sys.get)
    assert exc.status_code == 418
    assert len(sent(httpx_mock)) == 1


# --- retries ---------------------------------------------------------------------------------


@BOTH
def test_429_with_retry_after_is_retried(httpx_mock, sys, sleeps):
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "0"})
    httpx_mock.add_response(json=sys.wrap(sys.order))
    run(sys, sys.get)
    assert len(sent(httpx_mock)) == 2
    assert sleeps == [0.0]


@BOTH
def test_429_waits_as_long_as_retry_after_says(httpx_mock, sys, sleeps):
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "2"})
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "3"})
    httpx_mock.add_response(json=sys.wrap(sys.order))
    run(sys, sys.get)
    assert len(sent(httpx_mock)) == 3
    assert sleeps == [2.0, 3.0]  # the server's word, not the (0.02 s) backoff


def test_429_without_retry_after_uses_backoff(httpx_mock, sleeps):
    httpx_mock.add_response(status_code=429)
    httpx_mock.add_response(json={"data": API_ORDER})
    run(SYS_API, SYS_API.get)
    assert len(sleeps) == 1 and 0 < sleeps[0] <= FAST.backoff_max


@BOTH
def test_429_until_the_attempt_limit_is_rate_limited(httpx_mock, sys, sleeps):
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "0"}, is_reusable=True)
    exc = fails(RateLimited, sys, sys.get)
    assert exc.retry_after == 0.0 and exc.status_code == 429 and is_transient(exc)
    assert len(sent(httpx_mock)) == FAST.max_attempts
    assert len(sleeps) == FAST.max_attempts - 1


def test_retry_after_longer_than_the_deadline_gives_up_without_retrying_early(
    httpx_mock, sleeps
):
    options = HttpOptions(deadline=0.5, max_attempts=4, backoff_initial=0.01, backoff_max=0.02)
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "1"}, is_reusable=True)
    with pytest.raises(RateLimited) as info:
        run(SYS_API, SYS_API.get, options)
    assert info.value.retry_after == 1.0
    assert all(s >= 1.0 for s in sleeps), f"retried after {sleeps} s, before Retry-After 1 s"
    assert len(sent(httpx_mock)) == 1


@BOTH
@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_then_succeeds(httpx_mock, sys, sleeps, status):
    httpx_mock.add_response(status_code=status, text="<html>oops</html>")
    httpx_mock.add_response(status_code=status, json={"message": "Server Error"})
    httpx_mock.add_response(json=sys.wrap(sys.order))
    got = run(sys, sys.get)
    assert getattr(got, sys.key_field) == sys.order[sys.key_field]
    assert len(sent(httpx_mock)) == 3
    assert len(sleeps) == 2 and all(0 < s <= FAST.backoff_max for s in sleeps)


@BOTH
def test_5xx_until_the_attempt_limit_is_server_error(httpx_mock, sys):
    httpx_mock.add_response(status_code=503, is_reusable=True)
    exc = fails(ServerError, sys, sys.get)
    assert exc.status_code == 503 and is_transient(exc)
    assert len(sent(httpx_mock)) == FAST.max_attempts


def test_5xx_on_an_update_is_not_resent_blindly(httpx_mock):
    # A retry sent later could undo a change someone made meanwhile; the engine retries the
    # whole reconcile (fresh reads) instead. The error is transient so that it does.
    httpx_mock.add_response(method="PATCH", status_code=500)
    exc = fails(ServerError, SYS_OMS, lambda c: c.update_order("ORD-000123", {"state": "done"}))
    assert is_transient(exc)
    assert len(sent(httpx_mock)) == 1


@BOTH
def test_timeout_is_network_error_and_retried(httpx_mock, sys):
    httpx_mock.add_exception(httpx.ReadTimeout("read timed out"))
    httpx_mock.add_exception(httpx.ConnectTimeout("connect timed out"))
    httpx_mock.add_response(json=sys.wrap(sys.order))
    run(sys, sys.get)
    assert len(sent(httpx_mock)) == 3


@BOTH
def test_timeout_until_the_attempt_limit_is_network_error(httpx_mock, sys):
    httpx_mock.add_exception(httpx.ReadTimeout("read timed out"), is_reusable=True)
    exc = fails(NetworkError, sys, sys.get)
    assert "timed out" in str(exc) and is_transient(exc)
    assert len(sent(httpx_mock)) == FAST.max_attempts


@BOTH
@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("connection refused"), httpx.RemoteProtocolError("reset"),
     httpx.ReadError("connection reset by peer")],
    ids=["connect", "protocol", "read"],
)
def test_connection_error_is_network_error_and_retried(httpx_mock, sys, error):
    httpx_mock.add_exception(error, is_reusable=True)
    exc = fails(NetworkError, sys, sys.get)
    assert exc.status_code is None and is_transient(exc)
    assert len(sent(httpx_mock)) == FAST.max_attempts


def test_connection_error_then_success(httpx_mock):
    httpx_mock.add_exception(httpx.ConnectError("connection refused"))
    httpx_mock.add_response(json={"data": API_ORDER})
    assert run(SYS_API, SYS_API.get).id == 12345
    assert len(sent(httpx_mock)) == 2


# --- answers outside the contract ------------------------------------------------------------


@BOTH
def test_200_with_html_is_bad_response(httpx_mock, sys):
    httpx_mock.add_response(html="<html><body>Welcome to nginx!</body></html>")
    exc = fails(BadResponse, sys, sys.get)
    assert "JSON" in str(exc)
    assert len(sent(httpx_mock)) == 1


@BOTH
@pytest.mark.parametrize("body", [b'{"data": {"id": 1', b"", b"\xff\xfe{}", b"nul"])
def test_malformed_json_is_bad_response(httpx_mock, sys, body):
    httpx_mock.add_response(content=body, headers={"Content-Type": "application/json"})
    exc = fails(BadResponse, sys, sys.get)
    assert "JSON" in str(exc)
    assert len(sent(httpx_mock)) == 1


@BOTH
@pytest.mark.parametrize("field", ["updated_at", "state_or_status", "key"])
def test_missing_field_in_an_order_is_bad_response_naming_it(httpx_mock, sys, field):
    name = {"state_or_status": "status" if sys.name == "api" else "state",
            "key": sys.key_field}.get(field, field)
    order = {k: v for k, v in sys.order.items() if k != name}
    httpx_mock.add_response(json=sys.wrap(order))
    exc = fails(BadResponse, sys, sys.get)
    assert repr(name) in str(exc)


@BOTH
def test_wrong_envelope_is_bad_response_naming_it(httpx_mock, sys):
    other = "order" if sys.envelope == "data" else "data"
    httpx_mock.add_response(json={other: sys.order})
    exc = fails(BadResponse, sys, sys.get)
    assert repr(sys.envelope) in str(exc)


@BOTH
def test_bad_row_in_a_list_is_bad_response(httpx_mock, sys):
    bad = {k: v for k, v in sys.order.items() if k != "updated_at"}
    if sys.name == "api":
        httpx_mock.add_response(json={"data": [sys.order, bad], "next_cursor": None})
    else:
        httpx_mock.add_response(json={"orders": [sys.order, bad], "meta": {"next_page": None}})
    exc = fails(BadResponse, sys, lambda c: c.list_page())
    assert "updated_at" in str(exc)


def test_api_non_string_cursor_is_bad_response(httpx_mock):
    httpx_mock.add_response(json={"data": [], "next_cursor": 5})
    fails(BadResponse, SYS_API, lambda c: c.list_page())


@pytest.mark.parametrize("meta", [{"next_page": "2"}, None, []])
def test_oms_bad_meta_is_bad_response(httpx_mock, meta):
    httpx_mock.add_response(json={"orders": [], "meta": meta})
    fails(BadResponse, SYS_OMS, lambda c: c.list_page())


@BOTH
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_bad_response_and_not_followed(httpx_mock, sys, status):
    httpx_mock.add_response(status_code=status,
                            headers={"Location": "http://elsewhere.test/login"})
    exc = fails(BadResponse, sys, sys.get)
    assert exc.status_code == status
    assert "redirect" in str(exc)
    (req,) = sent(httpx_mock)  # elsewhere.test was never asked
    assert req.url.host == httpx.URL(sys.base).host


def test_on_request_hook_sees_every_attempt(httpx_mock):
    seen: list[tuple[str, str, int | None]] = []
    httpx_mock.add_response(status_code=503)
    httpx_mock.add_response(json={"data": API_ORDER})
    run(SYS_API, SYS_API.get, on_request=lambda *a: seen.append(a))
    assert seen == [("HMS-API", "GET", 503), ("HMS-API", "GET", 200)]


def test_error_tree():
    assert issubclass(BadResponse, TransientError) and issubclass(NetworkError, TransientError)
    for cls in (NotFound, ValidationFailed, Unauthorized):
        assert issubclass(cls, PermanentError)
    assert not is_transient(ValueError("x"))


# --- secrets in errors -----------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize(
    "scenario",
    ["401", "404", "422", "418", "429", "500", "timeout", "connect", "html", "badjson",
     "missing", "redirect"],
)
def test_no_error_ever_shows_the_credential(httpx_mock, sys, scenario):
    kinds: dict[str, tuple[type[Exception], Callable[[], None]]] = {
        "401": (Unauthorized, lambda: httpx_mock.add_response(status_code=401)),
        "404": (NotFound, lambda: httpx_mock.add_response(status_code=404, json={})),
        "422": (ValidationFailed, lambda: httpx_mock.add_response(
            status_code=422, json={"errors": {"x": ["bad"]}})),
        "418": (PermanentError, lambda: httpx_mock.add_response(status_code=418)),
        "429": (RateLimited, lambda: httpx_mock.add_response(status_code=429,
                                                              is_reusable=True)),
        "500": (ServerError, lambda: httpx_mock.add_response(status_code=500, is_reusable=True)),
        "timeout": (NetworkError, lambda: httpx_mock.add_exception(
            httpx.ReadTimeout("t"), is_reusable=True)),
        "connect": (NetworkError, lambda: httpx_mock.add_exception(
            httpx.ConnectError("c"), is_reusable=True)),
        "html": (BadResponse, lambda: httpx_mock.add_response(html="<p>hi</p>")),
        "badjson": (BadResponse, lambda: httpx_mock.add_response(
            content=b"{", headers={"Content-Type": "application/json"})),
        "missing": (BadResponse, lambda: httpx_mock.add_response(json=sys.wrap({}))),
        "redirect": (BadResponse, lambda: httpx_mock.add_response(
            status_code=302, headers={"Location": "http://elsewhere.test/"})),
    }
    exc_type, arrange = kinds[scenario]
    arrange()
    exc = fails(exc_type, sys, sys.get)  # fails() checks str, repr, args and detail

    async def repr_client(c: JsonClient) -> str:
        return repr(c) + repr(vars(c).get("options")) + str(c.unauthorized)

    assert sys.secret not in run(sys, repr_client)
    assert isinstance(exc, SystemError_)


def _echo_auth(status: int) -> Callable[[httpx.Request], httpx.Response]:
    """A verbose server that quotes the request's credential back in its error body."""

    def respond(request: httpx.Request) -> httpx.Response:
        auth = request.headers["Authorization"]
        return httpx.Response(status, json={
            "message": f"rejected request with Authorization: {auth}",
            "errors": {"authorization": [f"{auth} is not allowed here"]},
        })

    return respond


@BOTH
@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(404, NotFound), (422, ValidationFailed), (409, PermanentError)],
)
def test_server_echoing_the_credential_does_not_leak_it(httpx_mock, sys, status, exc_type):
    httpx_mock.add_callback(_echo_auth(status))
    fails(exc_type, sys, sys.get)


# --- pagination ------------------------------------------------------------------------------


def test_api_iter_pages_follows_next_cursor_until_null(httpx_mock):
    def page(ids: list[int], cursor: str | None) -> dict[str, Any]:
        return {"data": [{**API_ORDER, "id": i} for i in ids], "per_page": 2,
                "next_cursor": cursor, "next_page_url": None, "prev_cursor": None,
                "prev_page_url": None}

    httpx_mock.add_response(json=page([1, 2], "c-1"))
    httpx_mock.add_response(json=page([3, 4], "c-2"))
    httpx_mock.add_response(json=page([5], None))

    async def walk(c: ApiClient) -> list[list[int]]:
        return [[o.id for o in rows] async for rows in c.iter_pages(updated_since=T0,
                                                                    per_page=2)]

    assert run(SYS_API, walk) == [[1, 2], [3, 4], [5]]
    params = [dict(r.url.params) for r in sent(httpx_mock)]
    since = "2026-12-04T19:00:00.000000Z"
    assert params == [
        {"updated_since": since, "per_page": "2"},
        {"updated_since": since, "per_page": "2", "cursor": "c-1"},
        {"updated_since": since, "per_page": "2", "cursor": "c-2"},
    ]


def test_api_iter_pages_stops_on_an_empty_page(httpx_mock):
    httpx_mock.add_response(json={"data": [], "next_cursor": "c-1"})

    async def walk(c: ApiClient) -> list[Any]:
        return [rows async for rows in c.iter_pages()]

    assert run(SYS_API, walk) == []
    assert len(sent(httpx_mock)) == 1


def rails(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def oms_row(code: str, ms: int) -> dict[str, Any]:
    return {**OMS_ORDER, "code": code, "ext_code": code.removeprefix("ORD-"),
            "updated_at": rails(T0 + timedelta(milliseconds=ms))}


def oms_page(rows: list[dict[str, Any]], next_page: int | None) -> dict[str, Any]:
    return {"orders": rows, "meta": {"current_page": 1, "next_page": next_page,
                                     "prev_page": None, "total_pages": 9, "total_count": 99}}


async def walk_oms(c: OmsClient, **kw: Any) -> list[list[str]]:
    return [[o.code for o in rows] async for rows in c.iter_pages(**kw)]


def test_oms_iter_pages_seeks_by_updated_since(httpx_mock):
    # ts in ms: A=1 B=2 C=3 D=3 E=3 F=3 G=4; three per page.
    httpx_mock.add_response(json=oms_page(
        [oms_row("A", 1), oms_row("B", 2), oms_row("C", 3)], 2))
    # Seek from C's timestamp: C again (already given), then D and E, all at ts 3.
    httpx_mock.add_response(json=oms_page(
        [oms_row("C", 3), oms_row("D", 3), oms_row("E", 3)], 2))
    # The whole page shared ts 3, so it steps to page 2 of the same seek.
    httpx_mock.add_response(json=oms_page([oms_row("F", 3), oms_row("G", 4)], None))
    # Stepping pages can drift, so the ts-3 run is walked once more; nothing new is found.
    httpx_mock.add_response(json=oms_page(
        [oms_row("C", 3), oms_row("D", 3), oms_row("E", 3)], 2))
    httpx_mock.add_response(json=oms_page([oms_row("F", 3), oms_row("G", 4)], None))

    pages = run(SYS_OMS, lambda c: walk_oms(c, updated_since=T0, order_type_code="api_order",
                                            per_page=3))
    assert pages == [["A", "B", "C"], ["D", "E"], ["F", "G"]]
    params = [dict(r.url.params) for r in sent(httpx_mock)]
    ts3 = "2026-12-04T19:00:00.003000Z"
    common = {"order_type_code": "api_order", "per_page": "3"}
    assert params == [
        {**common, "updated_since": "2026-12-04T19:00:00.000000Z", "page": "1"},
        {**common, "updated_since": ts3, "page": "1"},
        {**common, "updated_since": ts3, "page": "2"},
        {**common, "updated_since": ts3, "page": "1"},
        {**common, "updated_since": ts3, "page": "2"},
    ]


def test_oms_iter_pages_never_yields_a_boundary_row_twice(httpx_mock):
    httpx_mock.add_response(json=oms_page([oms_row("A", 1), oms_row("B", 5)], 2))
    httpx_mock.add_response(json=oms_page([oms_row("B", 5), oms_row("C", 5)], 2))
    httpx_mock.add_response(json=oms_page([oms_row("D", 6)], None))
    # The stepped run at ts 5 is walked once more (drift check) and yields nothing new.
    httpx_mock.add_response(json=oms_page([oms_row("B", 5), oms_row("C", 5)], 2))
    httpx_mock.add_response(json=oms_page([oms_row("D", 6)], None))
    pages = run(SYS_OMS, lambda c: walk_oms(c, per_page=2))
    flat = [code for page in pages for code in page]
    assert flat == ["A", "B", "C", "D"]
    assert "updated_since" not in sent(httpx_mock)[0].url.params
    assert [r.url.params["page"] for r in sent(httpx_mock)] == ["1", "1", "2", "1", "2"]


class FakeOmsList:
    """HMS-OMS's list endpoint as the contract describes it (Kaminari, (updated_at, code))."""

    def __init__(self, orders: dict[str, int], on_request: Callable[[int], None] | None = None):
        self.orders = dict(orders)  # code -> updated_at in ms after T0
        self.calls = 0
        self.on_request = on_request

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.on_request is not None:
            self.on_request(self.calls)
        self.calls += 1
        p = request.url.params
        since = parse_iso(p["updated_since"]) if "updated_since" in p else None
        rows = sorted(
            (ms, code) for code, ms in self.orders.items()
            if since is None or T0 + timedelta(milliseconds=ms) >= since
        )
        page, per = int(p.get("page", "1")), min(int(p.get("per_page", "50")), 200)
        total_pages = max(1, math.ceil(len(rows) / per))
        chunk = rows[(page - 1) * per: page * per]
        return httpx.Response(200, json={
            "orders": [oms_row(code, ms) for ms, code in chunk],
            "meta": {"current_page": page, "next_page": page + 1 if page < total_pages else None,
                     "prev_page": page - 1 if page > 1 else None, "total_pages": total_pages,
                     "total_count": len(rows)},
        })


def walk_fake(fake: FakeOmsList, **kw: Any) -> list[str]:
    client = OmsClient(OMS, KEY, options=FAST, transport=httpx.MockTransport(fake))

    async def main() -> list[str]:
        async with client:
            return [code for page in await walk_oms(client, **kw) for code in page]

    return asyncio.run(main())


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stamps=st.lists(st.integers(0, 4), max_size=14),
    per_page=st.integers(1, 4),
    since_ms=st.none() | st.integers(0, 4),
)
def test_oms_iter_pages_yields_every_order_once_in_order(stamps, per_page, since_ms):
    orders = {f"ORD-{i:03d}": ms for i, ms in enumerate(stamps)}
    since = None if since_ms is None else T0 + timedelta(milliseconds=since_ms)
    got = walk_fake(FakeOmsList(orders), updated_since=since, per_page=per_page)
    expected = [code for ms, code in sorted((ms, c) for c, ms in orders.items())
                if since_ms is None or ms >= since_ms]
    assert got == expected


def test_oms_iter_pages_does_not_skip_when_a_seen_order_moves_to_the_end():
    orders = {f"ORD-{i:03d}": i for i in range(1, 10)}  # distinct timestamps
    fake = FakeOmsList(orders)

    def touch(call: int) -> None:
        if call == 1:  # after page one was served, someone updates ORD-002
            fake.orders["ORD-002"] = 100

    fake.on_request = touch
    got = walk_fake(fake, per_page=3)
    assert set(got) == set(orders)  # page-number walking would have skipped ORD-004
    assert got[-1] == "ORD-002"
    assert len(got) == len(set(got)) + 1  # only the moved order comes twice


def test_oms_iter_pages_does_not_skip_when_an_order_inside_a_tie_moves():
    orders = {"A": 5, "B": 5, "C": 5, "D": 5, "E": 6}
    fake = FakeOmsList(orders)

    def touch(call: int) -> None:
        if call == 2:  # the walk is inside the ts-5 run when A is updated
            fake.orders["A"] = 50

    fake.on_request = touch
    got = walk_fake(fake, per_page=2)
    assert set(got) == set(orders), f"skipped {set(orders) - set(got)}"


def test_oms_find_by_ext_code_filters_by_ext_code(httpx_mock):
    httpx_mock.add_response(json=oms_page(
        [{**OMS_ORDER, "code": "ORD-1", "ext_code": "12345"},
         {**OMS_ORDER, "code": "ORD-2", "ext_code": "123456"}], 2))
    httpx_mock.add_response(json=oms_page([{**OMS_ORDER, "code": "ORD-3", "ext_code": "1"}],
                                          None))
    found = run(SYS_OMS, lambda c: c.find_by_ext_code("12345", "api_order"))
    assert [o.code for o in found] == ["ORD-1"]
    params = [dict(r.url.params) for r in sent(httpx_mock)]
    assert [p["page"] for p in params] == ["1", "2"]
    for p in params:
        assert p["ext_code"] == "12345" and p["order_type_code"] == "api_order"


def test_oms_find_by_ext_code_none(httpx_mock):
    httpx_mock.add_response(json=oms_page([], None))
    assert run(SYS_OMS, lambda c: c.find_by_ext_code("999", "api_order")) == []


@BOTH
def test_ping_is_one_cheap_authenticated_call(httpx_mock, sys):
    if sys.name == "api":
        httpx_mock.add_response(json={"data": [], "next_cursor": None})
    else:
        httpx_mock.add_response(json=oms_page([], None))
    run(sys, lambda c: c.ping())
    (req,) = sent(httpx_mock)
    assert req.url.params["per_page"] == "1"
    assert req.headers["Authorization"] == sys.auth


# --- Retry-After -----------------------------------------------------------------------------


@pytest.fixture
def frozen_now(monkeypatch) -> datetime:
    now = datetime(2026, 12, 4, 19, 0, 0, tzinfo=UTC)
    monkeypatch.setattr(base, "time", types.SimpleNamespace(time=now.timestamp))
    return now


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), ("0", 0.0), (" 7 ", 7.0), ("120", 120.0), ("1.5", 1.5), ("-3", 0.0)],
)
def test_parse_retry_after_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date(frozen_now):
    later = email.utils.format_datetime(frozen_now + timedelta(seconds=90), usegmt=True)
    assert later.endswith("GMT")
    assert parse_retry_after(later) == pytest.approx(90.0)
    earlier = email.utils.format_datetime(frozen_now - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(earlier) == 0.0
    # A numeric zone instead of GMT.
    assert parse_retry_after("Fri, 04 Dec 2026 19:01:00 +0000") == pytest.approx(60.0)


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "12abc", "Fri, 99 Foo 2026 25:61:00 GMT", "in 5 seconds"],
)
def test_parse_retry_after_garbage_is_none(value):
    assert parse_retry_after(value) is None


@pytest.mark.parametrize("value", ["inf", "nan", "Infinity"])
def test_parse_retry_after_non_finite_is_garbage(value):
    assert parse_retry_after(value) is None


def test_retry_after_http_date_is_honoured_by_the_client(httpx_mock, sleeps, frozen_now):
    later = email.utils.format_datetime(frozen_now + timedelta(seconds=4), usegmt=True)
    httpx_mock.add_response(status_code=429, headers={"Retry-After": later})
    httpx_mock.add_response(json={"data": API_ORDER})
    run(SYS_API, SYS_API.get)
    assert sleeps == [pytest.approx(4.0)]
