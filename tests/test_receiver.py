"""The webhook receiver, against a real uvicorn server (and the bare ASGI app for fuzzing)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from hms_sync.config import load_settings
from hms_sync.metrics import Metrics
from hms_sync.receiver import MAX_BODY, SourceConfig, create_app, sources_from_settings
from hms_sync.store import Link, Store

API_SECRET = "api-current-secret-7Qx"
API_OLD = "api-old-secret-3Lm"
OMS_SECRET = "oms-current-secret-9Zk"
STD_KEY = b"standard-webhooks-key-bytes!"
WHSEC = "whsec_" + base64.b64encode(STD_KEY).decode()
ALL_SECRETS = (API_SECRET, API_OLD, OMS_SECRET, WHSEC, base64.b64encode(STD_KEY).decode())
TYPE = "api_order"
T0 = "2026-12-04T19:00:00.000000Z"


def hms_sig(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def std_headers(key: bytes, msg_id: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": stamp,
            "webhook-signature": "v1,bm90LXRoaXMtb25l v1," + base64.b64encode(mac).decode()}


def api_env(api_id: Any = 42, *, did: str = "d-1", event: str = "order.updated",
            updated_at: Any = T0) -> dict[str, Any]:
    order = {"id": api_id, "title": "Linen", "user_id": 1, "status": "pending", "items": [],
             "updated_at": updated_at}
    return {"id": did, "event": event, "occurred_at": T0, "data": {"order": order}}


def oms_env(ext: Any = "42", *, did: str = "o-1", type_code: Any = TYPE,
            event: str = "order.status_changed", updated_at: Any = T0) -> dict[str, Any]:
    order = {"code": "ORD-1", "ext_code": ext, "order_type_code": type_code, "state": "done",
             "data": {}, "updated_at": updated_at}
    return {"id": did, "event": event, "occurred_at": T0, "data": {"order": order}}


@dataclass
class Harness:
    store: Store
    metrics: Metrics
    app: Starlette
    url: str = ""
    wakes: list[float] = field(default_factory=list)
    healthy: list[bool] = field(default_factory=lambda: [True])

    def post(self, path: str, doc: Any, secret: str | None = API_SECRET, *,
             raw: bytes | None = None, headers: dict[str, Any] | None = None) -> httpx.Response:
        body = raw if raw is not None else json.dumps(doc).encode()
        hdrs: dict[str, Any] = {"Content-Type": "application/json"}
        if secret is not None:
            hdrs["X-Hms-Signature"] = hms_sig(secret, body)
        hdrs.update(headers or {})
        with httpx.Client(base_url=self.url, timeout=10) as client:
            return client.post(path, content=body, headers=hdrs)

    def queue(self) -> list[dict[str, Any]]:
        return self.store.queue_items()

    def deliveries(self) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM deliveries ORDER BY id"))


def build(tmp: Path, sources: dict[str, SourceConfig] | None = None,
          **kwargs: Any) -> Harness:
    store = Store(tmp / "s.db")
    metrics = Metrics()
    wakes: list[float] = []
    healthy = [True]
    sources = sources if sources is not None else {
        "hms-api": SourceConfig([API_SECRET, API_OLD]), "oms": SourceConfig([OMS_SECRET])}
    kwargs.setdefault("wake", lambda: wakes.append(time.monotonic()))
    app = create_app(
        store=store, metrics=metrics, sources=sources, order_type_code=TYPE,
        health=lambda: (healthy[0], {"queue": store.queue_counts()}), **kwargs,
    )
    return Harness(store, metrics, app, wakes=wakes, healthy=healthy)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """Run `app` on a real uvicorn server at a free port, in a thread with its own loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()

    def accepting() -> bool:
        assert thread.is_alive(), "uvicorn stopped during start-up"
        if not server.started:
            return False
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_for(accepting, what="uvicorn to accept")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    with_servers: list[Any] = []

    def factory(**kwargs: Any) -> Harness:
        where = tmp_path / f"app{len(with_servers)}"
        where.mkdir()
        h = build(where, **kwargs)
        cm = serving(h.app)
        h.url = cm.__enter__()
        with_servers.append((cm, h))
        return h

    yield factory
    for cm, h in reversed(with_servers):
        cm.__exit__(None, None, None)
        h.store.close()


@pytest.fixture
def h(make: Callable[..., Harness]) -> Harness:
    return make()


def assert_untouched(h: Harness) -> None:
    assert h.queue() == []
    assert h.deliveries() == []
    assert h.wakes == []


# -- accepting -----------------------------------------------------------------------------

def test_valid_signature_is_recorded_queued_and_wakes(h: Harness) -> None:
    r = h.post("/webhooks/hms-api", api_env(42, did="d-ok"))
    assert (r.status_code, r.json()) == (202, {"status": "accepted"})
    assert [q["api_id"] for q in h.queue()] == [42]
    assert [(d["id"], d["source"], d["api_id"]) for d in h.deliveries()] == [
        ("d-ok", "hms-api", 42)]
    assert len(h.wakes) == 1


def test_duplicate_delivery_answers_2xx_and_does_nothing(h: Harness) -> None:
    assert h.post("/webhooks/hms-api", api_env(7, did="dup")).status_code == 202
    before = h.queue()
    r = h.post("/webhooks/hms-api", api_env(7, did="dup"))
    assert (r.status_code, r.json()) == (200, {"status": "duplicate"})
    assert h.queue() == before and before[0]["generation"] == 0
    assert len(h.deliveries()) == 1 and len(h.wakes) == 1


def test_old_secret_still_accepted_for_rotation(h: Harness) -> None:
    assert h.post("/webhooks/hms-api", api_env(5, did="old"), API_OLD).status_code == 202
    assert [q["api_id"] for q in h.queue()] == [5]


def test_body_of_exactly_one_mib_is_accepted(h: Harness) -> None:
    body = json.dumps(api_env(9, did="big")).encode()
    body += b" " * (MAX_BODY - len(body))
    assert len(body) == MAX_BODY
    assert h.post("/webhooks/hms-api", None, raw=body).status_code == 202


def test_oms_delivery_for_our_order_queues_its_api_id(h: Harness) -> None:
    r = h.post("/webhooks/oms", oms_env("123", event="order.fulfilled"), OMS_SECRET)
    assert (r.status_code, r.json()) == (202, {"status": "accepted"})
    assert [q["api_id"] for q in h.queue()] == [123]


def test_wake_failure_does_not_lose_the_answer(make: Callable[..., Harness]) -> None:
    def boom() -> None:
        raise RuntimeError("dispatcher gone")

    h = make(wake=boom)
    assert h.post("/webhooks/hms-api", api_env(3)).status_code == 202
    assert len(h.queue()) == 1


# -- refusing --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["garbage", "missing", "wrong-secret", "reserialised",
                                  "other-source-secret", "uppercase-prefix"])
def test_bad_signatures_are_401_and_record_nothing(h: Harness, case: str) -> None:
    doc = api_env(42)
    body = json.dumps(doc).encode()
    headers: dict[str, str] = {}
    if case == "garbage":
        headers["X-Hms-Signature"] = "sha256=" + "0" * 64
    elif case == "wrong-secret":
        headers["X-Hms-Signature"] = hms_sig("not-the-secret", body)
    elif case == "other-source-secret":
        headers["X-Hms-Signature"] = hms_sig(OMS_SECRET, body)
    elif case == "reserialised":
        headers["X-Hms-Signature"] = hms_sig(API_SECRET, json.dumps(doc, indent=1).encode())
    elif case == "uppercase-prefix":
        headers["X-Hms-Signature"] = "SHA256=" + hms_sig(API_SECRET, body)[7:]
    r = h.post("/webhooks/hms-api", None, None, raw=body, headers=headers)
    assert (r.status_code, r.json()) == (401, {"error": "invalid signature"})
    assert_untouched(h)


def test_source_without_secret_refuses_everything(make: Callable[..., Harness]) -> None:
    h = make(sources={"hms-api": SourceConfig([API_SECRET])})
    assert h.post("/webhooks/oms", oms_env(), "").status_code == 401
    assert h.post("/webhooks/oms", oms_env(), OMS_SECRET).status_code == 401
    assert_untouched(h)


@pytest.mark.parametrize("raw, needle", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"", "not valid JSON"),
])
def test_malformed_json_is_400(h: Harness, raw: bytes, needle: str) -> None:
    r = h.post("/webhooks/hms-api", None, raw=raw)
    assert r.status_code == 400 and needle in r.json()["error"]
    assert_untouched(h)


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[p]
        del doc[last]
    return edit


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[p]
        doc[last] = value
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_drop("id"), "'id'"), (_set("id", 5), "'id'"), (_set("id", ""), "'id'"),
    (_drop("event"), "'event'"), (_set("event", ["order.updated"]), "'event'"),
    (_drop("data"), "'data.order'"), (_set("data", []), "'data.order'"),
    (_set("data.order", "42"), "'data.order'"), (_drop("data.order.id"), "data.order.id"),
    (_set("data.order.id", "42"), "data.order.id"), (_set("data.order.id", 0), "data.order.id"),
    (_set("data.order.id", -3), "data.order.id"), (_set("data.order.id", True), "data.order.id"),
    (_set("data.order.id", 2**64), "data.order.id"), (_set("id", "x" * 300), "'id'"),
    (_set("id", "\ud800"), "'id'"),
])
def test_envelope_errors_are_400_naming_the_field(
    h: Harness, edit: Callable[[dict[str, Any]], None], needle: str
) -> None:
    doc = api_env(42)
    edit(doc)
    r = h.post("/webhooks/hms-api", doc)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert_untouched(h)


def test_delivery_header_disagreeing_with_body_id_is_400(h: Harness) -> None:
    r = h.post("/webhooks/hms-api", api_env(did="a"), headers={"X-Hms-Delivery": "b"})
    assert r.status_code == 400 and "X-Hms-Delivery".lower() in r.json()["error"]
    assert h.post("/webhooks/hms-api", api_env(did="a"),
                  headers={"X-Hms-Delivery": "a"}).status_code == 202
    # A header carries bytes: a non-ASCII id matches when sent as its UTF-8.
    assert h.post("/webhooks/hms-api", api_env(did="d\u00e9"),
                  headers={"X-Hms-Delivery": "d\u00e9".encode()}).status_code == 202


def test_body_over_limit_with_honest_content_length_is_413(h: Harness) -> None:
    r = h.post("/webhooks/hms-api", None, raw=b" " * (MAX_BODY + 1))
    assert (r.status_code, r.json()) == (413, {"error": "body over 1 MiB"})
    assert_untouched(h)


def test_body_over_limit_sent_chunked_is_413(h: Harness) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 65_536 + 1):
            yield b" " * 65_536

    with httpx.Client(base_url=h.url, timeout=10) as client:
        r = client.post("/webhooks/hms-api", content=chunks(),
                        headers={"X-Hms-Signature": "sha256=00"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert_untouched(h)


# -- ignoring --------------------------------------------------------------------------------

def test_unknown_event_is_ignored_and_not_recorded(h: Harness) -> None:
    r = h.post("/webhooks/hms-api", {"id": "p", "event": "ping", "data": {}})
    assert (r.status_code, r.json()) == (202, {"status": "ignored"})
    r = h.post("/webhooks/oms", oms_env(event="order.created"), OMS_SECRET)
    assert (r.status_code, r.json()) == (202, {"status": "ignored"})
    assert_untouched(h)


@pytest.mark.parametrize("ext, type_code", [
    ("42", "other_type"), ("42", None), ("", TYPE), (None, TYPE), ("ORD-42", TYPE),
    ("042", TYPE), ("0", TYPE), (42, TYPE), ("9" * 5000, TYPE), ("99999999999999999999", TYPE),
])
def test_oms_order_not_ours_is_ignored(h: Harness, ext: Any, type_code: Any) -> None:
    r = h.post("/webhooks/oms", oms_env(ext, type_code=type_code), OMS_SECRET)
    assert (r.status_code, r.json()) == (202, {"status": "ignored", "reason": "not ours"})
    assert_untouched(h)


def test_stale_delivery_is_deduplicated_but_not_queued(h: Harness) -> None:
    newer = datetime(2026, 12, 5, tzinfo=UTC)
    h.store.save_link(Link(api_id=42, api_updated_at=newer))
    for did, when in (("s-old", T0), ("s-same", "2026-12-05T00:00:00.000Z")):
        r = h.post("/webhooks/hms-api", api_env(42, did=did, updated_at=when))
        assert (r.status_code, r.json()) == (200, {"status": "stale"})
    assert h.queue() == [] and h.wakes == []
    assert {(d["id"], d["api_id"]) for d in h.deliveries()} == {("s-old", None), ("s-same", None)}
    assert h.post("/webhooks/hms-api", api_env(42, did="s-old")).json() == {
        "status": "duplicate"}
    # Newer than the link, unparsable, or missing: enqueue.
    fresh: list[tuple[str, str | None]] = [
        ("n1", "2026-12-06T00:00:00Z"), ("n2", "yesterday"), ("n3", None)]
    for fid, fwhen in fresh:
        assert h.post("/webhooks/hms-api", api_env(42, did=fid, updated_at=fwhen)).json() == {
            "status": "accepted"}
    # The OMS side compares with oms_updated_at, which this link does not know yet.
    assert h.post("/webhooks/oms", oms_env("42", updated_at=T0), OMS_SECRET).status_code == 202


def test_store_unavailable_is_503_so_the_sender_retries(h: Harness) -> None:
    h.store.close()
    r = h.post("/webhooks/hms-api", api_env(1))
    assert r.status_code == 503 and r.headers["retry-after"]
    assert h.wakes == []


# -- Standard Webhooks -----------------------------------------------------------------------

def test_standard_webhooks_scheme(make: Callable[..., Harness]) -> None:
    h = make(sources={"hms-api": SourceConfig([WHSEC], scheme="standard", tolerance=60),
                      "oms": SourceConfig(["plain-key", OMS_SECRET], scheme="both")})
    body = json.dumps(api_env(11, did="m1")).encode()
    assert h.post("/webhooks/hms-api", None, None, raw=body,
                  headers=std_headers(STD_KEY, "m1", body)).status_code == 202
    old = std_headers(STD_KEY, "m1", body, ts=int(time.time()) - 120)
    future = std_headers(STD_KEY, "m1", body, ts=int(time.time()) + 120)
    wrong_key = std_headers(WHSEC.encode(), "m1", body)
    other_id = {**std_headers(STD_KEY, "m2", body), "webhook-id": "m1"}  # id is signed too
    for headers in (old, future, wrong_key, other_id, {"X-Hms-Signature": hms_sig(WHSEC, body)}):
        r = h.post("/webhooks/hms-api", None, None, raw=body, headers=headers)
        assert (r.status_code, r.json()) == (401, {"error": "invalid signature"})
    # "both": the hms header or a Standard Webhooks signature with a raw (non-whsec_) key.
    ob = json.dumps(oms_env("12", did="m3")).encode()
    assert h.post("/webhooks/oms", None, None, raw=ob,
                  headers=std_headers(b"plain-key", "m3", ob)).status_code == 202
    ob2 = json.dumps(oms_env("13", did="m4")).encode()
    assert h.post("/webhooks/oms", None, OMS_SECRET, raw=ob2).status_code == 202
    assert [q["api_id"] for q in h.queue()] == [11, 12, 13]


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scheme"):
        build(tmp_path, {"oms": SourceConfig(["x"], scheme="svix")})
    with pytest.raises(ValueError, match="not base64") as info:
        build(tmp_path, {"oms": SourceConfig(["whsec_!!!"], scheme="standard")})
    assert "!!!" not in str(info.value)
    with pytest.raises(ValueError, match="unknown webhook source"):
        build(tmp_path, {"shopify": SourceConfig(["x"])})


def test_sources_from_settings(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[hms_api]\nwebhook_secrets_old = ["old-one-secret", "cur-secret-x"]\n'
                    '[oms]\nwebhook_scheme = "both"\n[receiver]\ntolerance = 30\n')
    env = {"HMS_API_WEBHOOK_SECRET": "cur-secret-x", "OMS_WEBHOOK_SECRET": "oms-secret-y"}
    s = load_settings(config_file=toml, env=env, require_credentials=False)
    src = sources_from_settings(s)
    assert src["hms-api"].secrets == ["cur-secret-x", "old-one-secret"]
    assert (src["hms-api"].scheme, src["hms-api"].tolerance) == ("hms", 30)
    assert (src["oms"].secrets, src["oms"].scheme) == (["oms-secret-y"], "both")
    assert "secret" not in repr(src)


# -- operator endpoints ----------------------------------------------------------------------

def test_healthz(h: Harness) -> None:
    r = httpx.get(h.url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and "queue" in r.json()
    h.healthy[0] = False
    r = httpx.get(h.url + "/healthz")
    assert (r.status_code, r.json()["status"]) == (503, "unhealthy")


def test_metrics_served_directly_and_count_results(h: Harness) -> None:
    h.post("/webhooks/hms-api", api_env(1))
    h.post("/webhooks/hms-api", api_env(1), "wrong")
    r = httpx.get(h.url + "/metrics", follow_redirects=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'hms_sync_webhooks_total{result="accepted",source="hms-api"} 1.0' in r.text
    assert 'hms_sync_webhooks_total{result="unauthorized",source="hms-api"} 1.0' in r.text
    assert httpx.get(h.url + "/webhooks/oms").status_code == 405


def test_no_secret_or_signature_in_logs(make: Callable[..., Harness],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = make(sources={"hms-api": SourceConfig([API_SECRET, API_OLD]),
                      "oms": SourceConfig([WHSEC], scheme="standard")})
    body = json.dumps(api_env(1)).encode()
    sigs = [hms_sig(API_SECRET, body), hms_sig("guess", body)]
    for sig in sigs:
        h.post("/webhooks/hms-api", None, None, raw=body, headers={"X-Hms-Signature": sig})
    ob = json.dumps(oms_env()).encode()
    std = std_headers(STD_KEY, "o-1", ob)
    h.post("/webhooks/oms", None, None, raw=ob, headers=std)
    h.post("/webhooks/hms-api", None, raw=b"{bad")
    h.store.close()
    h.post("/webhooks/hms-api", api_env(2, did="x"))
    assert "unauthorized" in h.metrics.render()[0].decode()
    text = caplog.text
    assert text  # the receiver did log
    for secret in (*ALL_SECRETS, *sigs, std["webhook-signature"]):
        assert secret not in text
        assert secret.removeprefix("sha256=") not in text


# -- slow clients ----------------------------------------------------------------------------

def test_slow_body_gets_408_and_does_not_block_others(make: Callable[..., Harness]) -> None:
    h = make(body_timeout=0.5)
    port = int(h.url.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    stall = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        head = b"POST /webhooks/hms-api HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
        started = time.monotonic()
        slow.sendall(head)
        stall.sendall(head)
        # A normal request meanwhile is served at once.
        t = time.monotonic()
        assert h.post("/webhooks/hms-api", api_env(8)).status_code == 202
        assert time.monotonic() - t < 0.4
        # The trickling client keeps sending a byte every 50 ms; the deadline is total.
        slow.settimeout(0.05)
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = slow.recv(4096)
            except TimeoutError:
                slow.sendall(b" ")
                continue
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.4 < time.monotonic() - started < 3
        assert stall.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        slow.close()
        stall.close()
    assert [q["api_id"] for q in h.queue()] == [8]


# -- fuzzing the bare ASGI app ---------------------------------------------------------------

HEADER_NAMES = ["x-hms-signature", "x-hms-delivery", "x-hms-event", "webhook-id",
                "webhook-timestamp", "webhook-signature", "content-type", "x-other"]
header_value = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=80),
    st.builds(lambda b: "sha256=" + b.hex(), st.binary(min_size=0, max_size=40)),
    st.builds(lambda b: "v1," + base64.b64encode(b).decode(), st.binary(max_size=40)),
    st.builds(lambda n: str(int(time.time()) + n), st.integers(-10**6, 10**6)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20,
)
order_st = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none(),
                    st.integers(min_value=2**62, max_value=2**70)),
    "ext_code": st.one_of(st.text(st.characters(min_codepoint=48, max_codepoint=57)),
                          st.text(max_size=30), json_values),
    "order_type_code": st.sampled_from([TYPE, "other", None, 7]),
    "updated_at": st.one_of(st.text(max_size=40), json_values,
                            st.datetimes().map(lambda d: d.isoformat())),
})
envelope_st = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=300), json_values),
    "event": st.one_of(st.sampled_from(["order.created", "order.updated", "order.fulfilled",
                                        "order.status_changed", "x"]), json_values),
    "data": st.one_of(st.fixed_dictionaries({"order": st.one_of(order_st, json_values)}),
                      json_values),
})
bodies = st.one_of(
    st.binary(max_size=2048),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelope_st.map(lambda v: json.dumps(v).encode()),
)
FUZZ_SOURCES = {"hms-api": SourceConfig([API_SECRET], scheme="both"),
                "oms": SourceConfig([WHSEC], scheme="both")}


async def _asgi_post(app: Starlette, path: str, body: bytes,
                     headers: list[tuple[bytes, bytes]]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post(path, content=body, headers=headers)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/webhooks/hms-api", "/webhooks/oms"]), body=bodies,
       headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_value), max_size=6))
def test_fuzz_unsigned_never_5xx_and_records_nothing(
    tmp_path: Path, path: str, body: bytes, headers: list[tuple[str, str]]
) -> None:
    h = _fuzz_harness(tmp_path)
    raw = [(k.encode(), v.encode("latin-1")) for k, v in headers]
    r = asyncio.run(_asgi_post(h.app, path, body, raw))
    assert r.status_code < 500, r.text
    assert r.status_code == 401
    assert_untouched(h)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/webhooks/hms-api", "/webhooks/oms"]),
       doc=st.one_of(envelope_st, json_values), standard=st.booleans(),
       extra=st.lists(st.tuples(st.sampled_from(HEADER_NAMES[1:3]), header_value), max_size=2))
def test_fuzz_signed_envelopes_never_5xx(
    tmp_path: Path, path: str, doc: Any, standard: bool, extra: list[tuple[str, str]]
) -> None:
    h = _fuzz_harness(tmp_path)
    body = json.dumps(doc).encode()
    if path.endswith("oms") or standard:
        msg_id = str(doc.get("id")) if isinstance(doc, dict) else ""
        msg_id = msg_id if msg_id and msg_id.isascii() else "m"
        key = STD_KEY if path.endswith("oms") else API_SECRET.encode()
        headers = std_headers(key, msg_id, body)
    else:
        headers = {"x-hms-signature": hms_sig(API_SECRET, body)}
    raw = [(k.encode(), v.encode("latin-1")) for k, v in [*headers.items(), *extra]]
    r = asyncio.run(_asgi_post(h.app, path, body, raw))
    assert r.status_code in (200, 202, 400), (r.status_code, r.text)
    if r.status_code != 202 or r.json() != {"status": "accepted"}:
        assert h.wakes == []


_FUZZ: dict[Path, Harness] = {}


def _fuzz_harness(tmp_path: Path) -> Harness:
    """One store per test function (hypothesis reuses tmp_path across examples)."""
    h = _FUZZ.get(tmp_path)
    if h is None:
        h = _FUZZ[tmp_path] = build(tmp_path, FUZZ_SOURCES)
    h.wakes.clear()
    return h


@pytest.fixture(autouse=True)
def _close_fuzz_stores() -> Iterator[None]:
    yield
    while _FUZZ:
        _FUZZ.popitem()[1].store.close()
