"""What both sandbox systems share: state base class, the contract-endpoint guard
(auth, latency, injected 429/5xx, counters) and the ``/_sandbox/`` admin routes.

The admin routes are not part of the contract and hms-sync never calls them; they exist
so tests, the demo and benchmarks can seed data, inject faults, freeze the clock and read
counters. They need no auth and are never subject to faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hms_sync.sandbox.common import (
    BadRequest,
    Clock,
    Faults,
    Stats,
    format_micros,
    parse_iso,
    read_json,
)
from hms_sync.sandbox.webhooks import WebhookSender

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

MAX_BODY_SIZE = 8 * 1024 * 1024


class SystemState:
    """In-memory state of one system. Subclasses hold the orders and their indexes.

    Everything runs on the server's event loop; handlers never await between reading and
    writing an order, so no lock is needed.
    """

    name = "system"

    def __init__(self, webhooks: WebhookSender, faults: Faults | None = None) -> None:
        self.webhooks = webhooks
        self.clock = Clock()
        self.stats = Stats()
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)

    # Subclass hooks ----------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        raise NotImplementedError

    def error(self, status: int, message: str) -> JSONResponse:
        """A body in this system's error style for 401/404/429/5xx."""
        raise NotImplementedError

    def clear_orders(self) -> None:
        raise NotImplementedError

    # Shared behaviour --------------------------------------------------------------------

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)

    def reset(self) -> None:
        """Back to a fresh system: no orders, zero counters, no faults, real clock.

        The webhook target is kept; queued deliveries are dropped.
        """
        self.clear_orders()
        self.webhooks.clear()
        self.stats.reset()
        self.webhooks.reset_stats()
        self.set_faults(Faults())
        self.clock.frozen_us = None

    def stats_json(self) -> dict[str, Any]:
        out = self.stats.to_json()
        out["webhooks"] = self.webhooks.stats_json()
        return out


def guarded(state: SystemState, kind: str, handler: Handler, *, write: bool = False) -> Handler:
    """Wrap a contract endpoint: count it, add latency, check auth, inject faults."""

    async def endpoint(request: Request) -> Response:
        response = await _guard(request)
        state.stats.statuses[response.status_code] += 1
        return response

    async def _guard(request: Request) -> Response:
        stats, faults, rng = state.stats, state.faults, state.rng
        stats.requests[kind] += 1
        low, high = faults.latency_ms
        if high > 0:
            await asyncio.sleep(rng.uniform(low, high) / 1000)
        if not state.authorized(request):
            stats.unauthorized += 1
            return state.error(401, "")
        if faults.rate_limit_rate and rng.random() < faults.rate_limit_rate:
            stats.injected["429"] += 1
            response = state.error(429, "Too Many Attempts.")
            response.headers["Retry-After"] = str(faults.retry_after)
            return response
        if faults.error_rate and rng.random() < faults.error_rate:
            stats.injected["5xx"] += 1
            if write and faults.apply_before_error and rng.random() < faults.apply_before_error:
                with contextlib.suppress(BadRequest):
                    await handler(request)
            return state.error(500, "")
        return await handler(request)

    return endpoint


def _admin_error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def admin_routes(state: SystemState) -> list[BaseRoute]:
    """The ``/_sandbox/`` routes common to both systems."""

    async def get_faults(request: Request) -> Response:
        return JSONResponse(state.faults.to_json())

    async def set_faults(request: Request) -> Response:
        try:
            state.set_faults(Faults.from_json(await read_json(request)))
        except (ValueError, BadRequest) as exc:
            return _admin_error(str(exc))
        logger.info("%s faults set: %s", state.name, state.faults)
        return JSONResponse(state.faults.to_json())

    async def get_stats(request: Request) -> Response:
        return JSONResponse(state.stats_json())

    async def reset_stats(request: Request) -> Response:
        state.stats.reset()
        state.webhooks.reset_stats()
        return JSONResponse(state.stats_json())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    async def clock(request: Request) -> Response:
        if request.method == "POST":
            try:
                body = await read_json(request)
                if not isinstance(body, dict) or "frozen" not in body:
                    raise ValueError('expected {"frozen": ISO or null}')
                frozen = body["frozen"]
                if frozen is not None and not isinstance(frozen, str):
                    raise ValueError("frozen must be an ISO timestamp string or null")
                state.clock.frozen_us = None if frozen is None else parse_iso(frozen)
            except (ValueError, BadRequest) as exc:
                return _admin_error(str(exc))
        frozen_us = state.clock.frozen_us
        return JSONResponse(
            {
                "frozen": None if frozen_us is None else format_micros(frozen_us),
                "now": format_micros(state.clock.now_us()),
            }
        )

    async def webhooks(request: Request) -> Response:
        sender = state.webhooks
        if request.method == "POST":
            try:
                body = await read_json(request)
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                url = body.get("url", sender.url)
                secret = body.get("secret")
                enabled = body.get("enabled")
                attempts = body.get("max_attempts")
                if url is not None and not isinstance(url, str):
                    raise ValueError("url must be a string or null")
                if secret is not None and not isinstance(secret, str):
                    raise ValueError("secret must be a string")
                if enabled is not None and not isinstance(enabled, bool):
                    raise ValueError("enabled must be a boolean")
                if attempts is not None and (not isinstance(attempts, int) or attempts < 1):
                    raise ValueError("max_attempts must be a positive integer")
            except (ValueError, BadRequest) as exc:
                return _admin_error(str(exc))
            sender.configure(url=url, secret=secret, enabled=enabled, max_attempts=attempts)
        return JSONResponse(sender.config_json())

    return [
        Route("/_sandbox/faults", get_faults, methods=["GET"]),
        Route("/_sandbox/faults", set_faults, methods=["POST"]),
        Route("/_sandbox/stats", get_stats, methods=["GET"]),
        Route("/_sandbox/stats/reset", reset_stats, methods=["POST"]),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/clock", clock, methods=["GET", "POST"]),
        Route("/_sandbox/webhooks", webhooks, methods=["GET", "POST"]),
    ]


def build_app(state: SystemState, routes: list[BaseRoute]) -> Starlette:
    """A Starlette app whose lifespan runs the webhook sender and whose errors are JSON."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.webhooks.start()
        try:
            yield
        finally:
            await state.webhooks.stop()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return state.error(exc.status_code, str(exc.detail))

    async def bad_request(request: Request, exc: Exception) -> Response:
        return state.error(400, str(exc))

    app = Starlette(
        routes=routes + admin_routes(state),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, BadRequest: bad_request},
        max_body_size=MAX_BODY_SIZE,
    )
    app.state.sandbox = state
    return app
