"""The webhook receiver: `POST /webhooks/hms-api`, `POST /webhooks/oms`, `GET /healthz`,
`GET /metrics` (contract sections 3, 4.8 and 5).

A webhook is a hint that an order changed, never the truth about it: the receiver only
checks that the hint is authentic and well formed, records it durably together with the
order it names (`Store.accept_delivery`, one transaction) and wakes the workers. The answer
is sent after the write, so a 2xx for a handled event always means "durably recorded".

Order of checks, each answered without changing anything when it fails:
size (413, Content-Length first, then counting while reading; 408 when the body is too
slow) -> signature over the exact raw bytes (401) -> JSON envelope (400) -> event type
(unknown: 202 ignored) -> which order (400, or 202 ignored for OMS orders that are not ours)
-> stale hint (200 stale, deduplicated but not enqueued) -> accept (202) or duplicate (200).
The store unreachable -> 503, so the sender retries.

Decisions where the contract is silent:
- The delivery id is the body `id` (it is covered by the signature); `X-Hms-Delivery` and
  `webhook-id`, when present, must equal it byte for byte (else 400). Ids longer than 256
  characters are refused (400). Ids are not namespaced by source.
- Stale means the delivered `updated_at` is <= the link's (equal counts as stale).
- Unknown events are ignored before `data.order` is required, so a future event with another
  shape is not retried forever by its sender.
- OMS orders that are not ours are not recorded at all: nothing would be done for them, and
  recording them would grow the deliveries table with other teams' traffic.
- The `hms` scheme keys HMAC with the secret's UTF-8 bytes as given; the `standard` scheme
  decodes a `whsec_` secret's base64 rest. A source with no secret refuses everything (401).
- Results beyond the documented ones: `timeout` (408), `aborted` (client went away),
  `error` (500, a bug).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import sqlite3
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import StoreError
from .mapping import Mapper
from .metrics import Metrics
from .models import parse_iso
from .store import Store

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)

MAX_BODY = 1_048_576
MAX_DELIVERY_ID = 256
MAX_API_ID = 2**63 - 1  # SQLite INTEGER; anything larger cannot be an HMS-API id
SCHEMES = ("hms", "standard", "both")
EVENTS: dict[str, frozenset[str]] = {
    "hms-api": frozenset({"order.created", "order.updated"}),
    "oms": frozenset({"order.fulfilled", "order.status_changed"}),
}
# Which remembered timestamp of a link a delivery from each source is compared with.
LINK_SIDE = {"hms-api": "api_updated_at", "oms": "oms_updated_at"}


@dataclass
class SourceConfig:
    """How one sender signs: the current secret first, then old ones still accepted."""

    secrets: list[str] = field(default_factory=list, repr=False)
    scheme: str = "hms"
    tolerance: float = 300.0


def sources_from_settings(settings: Settings) -> dict[str, SourceConfig]:
    """The receiver's view of the webhook settings (HMS_API_/OMS_WEBHOOK_SECRET + old)."""

    def secrets(current: Any, old: list[Any]) -> list[str]:
        out: list[str] = []
        for s in (current, *old):
            value = s.get_secret_value() if s is not None else ""
            if value and value not in out:
                out.append(value)
        return out

    return {
        "hms-api": SourceConfig(
            secrets(settings.hms_api_webhook_secret, settings.hms_api_webhook_secrets_old),
            settings.hms_api_webhook_scheme,
            settings.webhook_tolerance,
        ),
        "oms": SourceConfig(
            secrets(settings.oms_webhook_secret, settings.oms_webhook_secrets_old),
            settings.oms_webhook_scheme,
            settings.webhook_tolerance,
        ),
    }


class _Reject(Exception):
    """An answer other than success; carries the metrics result."""

    def __init__(self, status: int, result: str, error: str, *, close: bool = False) -> None:
        super().__init__(error)
        self.status, self.result, self.error, self.close = status, result, error, close


def _json(status: int, payload: Mapping[str, Any], headers: dict[str, str] | None = None
          ) -> Response:
    body = json.dumps(payload, default=str).encode()
    return Response(body, status, headers=headers, media_type="application/json")


class _Verifier:
    """Checks one source's signatures against every configured secret, in constant time."""

    def __init__(self, source: str, cfg: SourceConfig, *, configured: bool = True) -> None:
        if cfg.scheme not in SCHEMES:
            raise ValueError(f"webhook source {source!r}: unknown scheme {cfg.scheme!r}")
        if cfg.tolerance <= 0:
            raise ValueError(f"webhook source {source!r}: tolerance must be positive")
        self.scheme, self.tolerance = cfg.scheme, cfg.tolerance
        secrets = [s for s in cfg.secrets if s]
        self.hms_keys = [s.encode() for s in secrets]
        self.std_keys: list[bytes] = []
        for n, secret in enumerate(secrets, 1):
            if secret.startswith("whsec_"):
                try:
                    self.std_keys.append(base64.b64decode(secret[6:], validate=True))
                except (binascii.Error, ValueError):
                    if cfg.scheme != "hms":
                        raise ValueError(
                            f"webhook source {source!r}: secret #{n} starts with whsec_ "
                            "but the rest is not base64"
                        ) from None
            else:
                self.std_keys.append(secret.encode())
        if not secrets and configured:
            log.warning("webhook source %s has no secret: its deliveries will be refused",
                        source)

    def verify(self, headers: Headers, body: bytes) -> bool:
        if self.scheme in ("hms", "both") and self._hms(headers, body):
            return True
        return self.scheme in ("standard", "both") and self._standard(headers, body)

    def _hms(self, headers: Headers, body: bytes) -> bool:
        given = [
            v.strip()[7:].lower().encode("latin-1")
            for v in headers.getlist("x-hms-signature")
            if v.strip().startswith("sha256=")
        ]
        ok = False
        for key in self.hms_keys:
            want = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
            for sig in given:
                ok |= hmac.compare_digest(want, sig)
        return ok

    def _standard(self, headers: Headers, body: bytes) -> bool:
        msg_id = headers.get("webhook-id")
        stamp = headers.get("webhook-timestamp", "").strip()
        sigs = headers.get("webhook-signature")
        if not msg_id or not sigs or not stamp.isascii() or not stamp.isdigit():
            return False
        if len(stamp) > 12 or abs(time.time() - int(stamp)) > self.tolerance:
            return False
        given = [
            part[3:].encode("latin-1") for part in sigs.split() if part.startswith("v1,")
        ]
        signed = msg_id.encode("latin-1") + b"." + stamp.encode() + b"." + body
        ok = False
        for key in self.std_keys:
            want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
            for sig in given:
                ok |= hmac.compare_digest(want, sig)
        return ok


def _when(value: Any) -> datetime | None:
    """A delivered `updated_at`, or None when it is missing or unparsable (unknown)."""
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        return parse_iso(value)
    except (ValueError, TypeError, OverflowError):
        return None


def create_app(
    *,
    store: Store,
    metrics: Metrics,
    sources: dict[str, SourceConfig],
    order_type_code: str,
    wake: Callable[[], None],
    health: Callable[[], tuple[bool, dict[str, Any]]],
    body_timeout: float = 10.0,
) -> Starlette:
    """The receiver's ASGI app. Raises ValueError for a bad source configuration."""
    unknown = set(sources) - set(EVENTS)
    if unknown:
        raise ValueError(f"unknown webhook source(s): {', '.join(sorted(unknown))}")
    # A source left out (webhooks disabled) refuses everything, like one without a secret.
    verifiers = {
        name: _Verifier(name, sources.get(name, SourceConfig()), configured=name in sources)
        for name in EVENTS
    }

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise _Reject(400, "malformed", "invalid Content-Length", close=True)
            if int(length) > MAX_BODY:
                raise _Reject(413, "too_large", "body over 1 MiB", close=True)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise _Reject(413, "too_large", "body over 1 MiB", close=True)
                    chunks.append(chunk)
        except TimeoutError:
            raise _Reject(408, "timeout", "request body not received in time",
                          close=True) from None
        except ClientDisconnect:
            raise _Reject(400, "aborted", "client disconnected", close=True) from None
        return b"".join(chunks)

    def envelope(source: str, headers: Headers, body: bytes) -> tuple[str, str, Any]:
        """(delivery id, event, data.order or None for an event we ignore)."""
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise _Reject(400, "malformed", "body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise _Reject(400, "malformed", "body is not a JSON object")
        delivery = doc.get("id")
        if not isinstance(delivery, str) or not delivery.strip():
            raise _Reject(400, "malformed", "envelope 'id' is missing or not a string")
        if len(delivery) > MAX_DELIVERY_ID:
            raise _Reject(400, "malformed", "envelope 'id' is too long")
        try:
            delivery_bytes = delivery.encode()
        except UnicodeEncodeError:  # a lone surrogate: JSON allows it, SQLite text does not
            raise _Reject(400, "malformed", "envelope 'id' is not valid text") from None
        for name in ("x-hms-delivery", "webhook-id"):
            value = headers.get(name)  # decoded as latin-1: back to the bytes that were sent
            if value is not None and value.encode("latin-1") != delivery_bytes:
                raise _Reject(400, "malformed", f"{name} header does not match envelope 'id'")
        event = doc.get("event")
        if not isinstance(event, str) or not event:
            raise _Reject(400, "malformed", "envelope 'event' is missing or not a string")
        if event not in EVENTS[source]:
            return delivery, event, None
        data = doc.get("data")
        order = data.get("order") if isinstance(data, dict) else None
        if not isinstance(order, dict):
            raise _Reject(400, "malformed", "envelope 'data.order' is missing or not an object")
        return delivery, event, order

    def api_id_of(source: str, order: dict[str, Any]) -> int | None:
        """The API id the order names; None for an OMS order that is not ours."""
        if source == "hms-api":
            oid = order.get("id")
            if isinstance(oid, bool) or not isinstance(oid, int) or not 0 < oid <= MAX_API_ID:
                raise _Reject(400, "malformed", "'data.order.id' is not a positive integer")
            return oid
        ext = order.get("ext_code")
        if order.get("order_type_code") != order_type_code or not isinstance(ext, str):
            return None
        if len(ext) > 19:
            return None
        api_id = Mapper.api_id_for(ext)
        return api_id if api_id is not None and api_id <= MAX_API_ID else None

    async def record(source: str, delivery: str, event: str, order: dict[str, Any],
                     api_id: int) -> tuple[str, Response]:
        delivered = _when(order.get("updated_at"))
        try:
            # Straight on the loop, like every other store call of the daemon: the calls
            # take well under a millisecond, while a thread-pool hop cost deliveries up to
            # a second of queueing under load (see BENCHMARKS.md).
            link = store.get_link(api_id) if delivered else None
            known = getattr(link, LINK_SIDE[source]) if link is not None else None
            stale = delivered is not None and known is not None and delivered <= known
            fresh = store.accept_delivery(delivery, source, event, None if stale else api_id)
        except (StoreError, sqlite3.Error) as exc:
            log.error("webhook %s delivery %r: store unavailable: %s", source, delivery, exc)
            raise _Reject(503, "unavailable", "store unavailable, retry later") from None
        if not fresh:
            log.debug("webhook %s delivery %r: duplicate", source, delivery)
            return "duplicate", _json(200, {"status": "duplicate"})
        if stale:
            log.debug("webhook %s delivery %r: order %d already known as new", source,
                      delivery, api_id)
            return "stale", _json(200, {"status": "stale"})
        log.info("[hms-sync] webhook %s %s delivery %r: order %d queued",
                 source, event, delivery, api_id)
        try:
            wake()
        except Exception:  # the delivery is durable; the next poll picks it up anyway
            log.exception("webhook %s: waking the workers failed", source)
        return "accepted", _json(202, {"status": "accepted"})

    async def process(request: Request, source: str) -> tuple[str, Response]:
        body = await read_body(request)
        if not verifiers[source].verify(request.headers, body):
            client = request.client.host if request.client else "?"
            log.warning("[hms-sync] webhook %s from %s: missing or invalid signature",
                        source, client)
            raise _Reject(401, "unauthorized", "invalid signature")
        delivery, event, order = envelope(source, request.headers, body)
        if order is None:
            log.debug("webhook %s delivery %r: event %r ignored", source, delivery, event)
            return "ignored", _json(202, {"status": "ignored"})
        api_id = api_id_of(source, order)
        if api_id is None:
            return "ignored", _json(202, {"status": "ignored", "reason": "not ours"})
        return await record(source, delivery, event, order, api_id)

    def endpoint(source: str) -> Callable[[Request], Any]:
        async def receive_webhook(request: Request) -> Response:
            try:
                result, response = await process(request, source)
            except _Reject as r:
                result = r.result
                response = _json(r.status, {"error": r.error},
                                 {"Connection": "close"} if r.close else None)
                if r.status == 503:
                    response.headers["Retry-After"] = "5"
            except Exception as exc:  # a bug: say which, never the body
                frames = "".join(traceback.format_tb(exc.__traceback__))
                log.error("webhook %s: unexpected %s\n%s", source, type(exc).__name__, frames)
                result, response = "error", _json(500, {"error": "internal error"})
            metrics.webhooks.labels(source, result).inc()
            return response

        return receive_webhook

    async def healthz(request: Request) -> Response:
        try:
            ok, details = await run_in_threadpool(health)
        except Exception as exc:
            log.error("health check failed: %s", type(exc).__name__)
            ok, details = False, {"error": "health check failed"}
        payload: dict[str, Any] = {"status": "ok" if ok else "unhealthy"}
        payload.update({k: v for k, v in details.items() if k != "status"})
        return _json(200 if ok else 503, payload)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, 200, media_type=content_type)

    routes = [
        Route(f"/webhooks/{name}", endpoint(name), methods=["POST"]) for name in EVENTS
    ]
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    return Starlette(routes=routes)
