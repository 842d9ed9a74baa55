"""What both clients share: one pooled httpx client, error translation, retries.

`JsonClient.request` is the only place an httpx exception can surface; it becomes one of
`hms_sync.errors`. Transient failures (429, 5xx, timeouts, connection errors) are retried
with exponential backoff and jitter, honouring Retry-After, within a total deadline.
A 401 trips a breaker: later calls to that system fail at once without a request, so a wrong
credential never becomes a retry storm.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from ..errors import (
    BadResponse,
    NetworkError,
    NotFound,
    PermanentError,
    RateLimited,
    ServerError,
    Unauthorized,
    ValidationFailed,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024 * 1024  # a page larger than this is not an answer we trust


@dataclass(frozen=True)
class HttpOptions:
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    deadline: float = 30.0  # total time one call may spend, retries included
    max_attempts: int = 6
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    max_connections: int = 64


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # 'inf' and 'nan' parse as floats but are no answer
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class JsonClient(Generic[M]):
    """A JSON-over-HTTP client for one system, whose orders parse as `model`."""

    system = "?"
    model: type[M]
    envelope = ""  # the key a single order comes wrapped in

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        secret: str = "",
        options: HttpOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_request: Callable[[str, str, int | None], None] | None = None,
    ) -> None:
        self.options = options or HttpOptions()
        o = self.options
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Accept": "application/json", **headers},
            timeout=httpx.Timeout(o.read_timeout, connect=o.connect_timeout),
            limits=httpx.Limits(
                max_connections=o.max_connections, max_keepalive_connections=o.max_connections
            ),
            follow_redirects=False,
            transport=transport,
        )
        # Server text goes into our errors; a server echoing our credential must not leak it.
        self._secret = secret
        self._breaker: Unauthorized | None = None
        self._on_request = on_request
        self.requests_sent = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> JsonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def unauthorized(self) -> Unauthorized | None:
        return self._breaker

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        retry: bool = True,
    ) -> Any:
        """Send one request, retrying transient failures; return the decoded JSON body."""
        # The first attempt goes straight out: building a retry loop for every request
        # cost more CPU than the request itself, and most requests succeed first time.
        try:
            return await self._once(method, path, params, json_body)
        except (RateLimited, ServerError, NetworkError) as exc:
            if not retry:
                raise
            failed: BaseException | None = exc
        async for attempt in self._retrying(method, path):
            with attempt:
                if failed is not None:  # attempt 1 is the one that just failed
                    first, failed = failed, None
                    raise first
                return await self._once(method, path, params, json_body)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrying(self, method: str, path: str) -> AsyncRetrying:
        o = self.options

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, RateLimited) and exc.retry_after is not None:
                return exc.retry_after
            return backoff(state)

        def stop(state: RetryCallState) -> bool:
            # Never retry before the server allows: give up instead, and let the queue's
            # per-order backoff (which honours Retry-After too) take over.
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, RateLimited) and exc.retry_after is not None:
                if (state.seconds_since_start or 0.0) + exc.retry_after > o.deadline:
                    return True
            return bool(limits(state))

        backoff = wait_exponential_jitter(
            multiplier=o.backoff_initial, max=o.backoff_max, jitter=o.backoff_initial
        )
        limits = stop_after_delay(o.deadline) | stop_after_attempt(o.max_attempts)
        return AsyncRetrying(
            retry=retry_if_exception_type((RateLimited, ServerError, NetworkError)),
            stop=stop,
            wait=wait,
            reraise=True,
            before_sleep=lambda s: log.debug(
                "%s %s %s failed (%s); retrying", self.system, method, path,
                s.outcome.exception() if s.outcome else "?",
            ),
        )

    async def _once(
        self, method: str, path: str, params: Mapping[str, Any] | None, json_body: Any
    ) -> Any:
        if self._breaker is not None:
            raise self._breaker
        ctx: dict[str, Any] = {"system": self.system, "method": method, "path": path}
        self.requests_sent += 1
        try:
            req = self._http.build_request(
                method, path, params=_clean(params), json=json_body
            )
            resp = await self._http.send(req, stream=True)
            try:
                body = await _read_capped(resp, MAX_BODY_BYTES)
            finally:
                await resp.aclose()
        except httpx.TimeoutException as exc:
            raise NetworkError(f"timed out ({type(exc).__name__})", **ctx) from None
        except (httpx.TransportError, OSError) as exc:
            raise NetworkError(f"connection failed ({type(exc).__name__})", **ctx) from None
        except _TooLarge:
            raise BadResponse(f"answer larger than {MAX_BODY_BYTES} bytes", **ctx) from None
        except httpx.HTTPError as exc:  # anything else httpx may raise
            raise NetworkError(f"HTTP failure ({type(exc).__name__})", **ctx) from None
        if self._on_request is not None:
            self._on_request(self.system, method, resp.status_code)
        return self._interpret(resp, body, ctx)

    def _interpret(self, resp: httpx.Response, body: bytes, ctx: dict[str, Any]) -> Any:
        code = resp.status_code
        if 200 <= code < 300:
            return _decode(body, resp, ctx)
        if 300 <= code < 400:
            where = httpx.URL(resp.headers.get("location", "")).host or "the same host"
            raise BadResponse(f"unexpected redirect {code} to {where}", status_code=code, **ctx)
        message = self._redact(_error_message(body))
        if code == 401:
            self._breaker = Unauthorized(
                "credential rejected (401); calls to this system are stopped until restart",
                status_code=code,
                **ctx,
            )
            log.error("%s rejected our credential; no further calls will be made", self.system)
            raise self._breaker
        if code == 404:
            raise NotFound(message or "not found", status_code=code, **ctx)
        if code == 422:
            errors = {
                f: [self._redact(m) for m in msgs] for f, msgs in _field_errors(body).items()
            }
            raise ValidationFailed(
                message or _summarise(errors), errors=errors, status_code=code, **ctx
            )
        if code == 429:
            raise RateLimited(
                "rate limited (429)",
                retry_after=parse_retry_after(resp.headers.get("retry-after")),
                status_code=code,
                **ctx,
            )
        if code >= 500:
            raise ServerError(f"server error {code}", status_code=code, **ctx)
        raise PermanentError(f"unexpected status {code}: {message}", status_code=code, **ctx)


    def _order(
        self, doc: Any, method: str, path: str, same: Mapping[str, Any] | None = None
    ) -> M:
        """The order in an answer. `same` names fields it must have as asked: acting on an
        answer about another order would link or write back the wrong one."""
        ctx = {"system": self.system, "method": method, "path": path}
        order = self._parse(expect(doc, self.envelope, dict, ctx), method, path)
        for name, wanted in (same or {}).items():
            got = getattr(order, name)
            if got != wanted:
                raise BadResponse(f"answer has {name} {got!r}, not {wanted!r}",
                                  system=self.system, method=method, path=path)
        return order

    def _parse(self, raw: Any, method: str, path: str) -> M:
        """One order from an answer; BadResponse names the first bad or missing field."""
        try:
            return self.model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise BadResponse(
                f"order has a bad or missing field {field!r}",
                system=self.system, method=method, path=path,
            ) from None

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


class _TooLarge(Exception):
    pass


async def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _clean(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not params:
        return None
    return {k: v for k, v in params.items() if v is not None}


def _decode(body: bytes, resp: httpx.Response, ctx: dict[str, Any]) -> Any:
    ctype = resp.headers.get("content-type", "")
    if "json" not in ctype:
        raise BadResponse(f"answer is not JSON (content-type {ctype or 'missing'})", **ctx)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadResponse("answer is malformed JSON", **ctx) from None


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if isinstance(doc, dict):
        for key in ("message", "error"):
            if isinstance(doc.get(key), str):
                return _text(doc[key])
        if isinstance(doc.get("errors"), dict):
            return _summarise(_field_errors(body))
    return ""


def _field_errors(body: bytes) -> dict[str, list[str]]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, dict):
        return {}
    out: dict[str, list[str]] = {}
    for field, msgs in errors.items():
        if isinstance(msgs, list):
            out[_text(field)] = [_text(m) for m in msgs]
        else:
            out[_text(field)] = [_text(msgs)]
    return out


def _text(value: Any, limit: int = 200) -> str:
    """Server text for our messages: bounded, control characters shown escaped (an ANSI
    sequence in an error answer must not drive the operator's terminal or split a log line)."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _summarise(errors: dict[str, list[str]]) -> str:
    return "; ".join(f"{f} {', '.join(m)}" for f, m in errors.items()) or "validation failed"


def expect(doc: Any, key: str, kind: type, ctx: dict[str, Any]) -> Any:
    """`doc[key]` if it is a `kind`, else BadResponse naming what was missing."""
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise BadResponse(f"answer has no {kind.__name__} {key!r}", **ctx)
    return value
