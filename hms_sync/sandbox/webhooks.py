"""Outgoing webhooks of one sandbox system (contract section 3).

Every change is turned into a signed delivery at once (so the body and signature are fixed
and a retry resends exactly the same bytes), then delivered in the background by one
worker task per order: deliveries for one order go out in order, different orders are
delivered concurrently. A non-2xx answer or a connection error is retried with backoff
until ``max_attempts``; then the delivery is dropped and counted as given up.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)

DEFAULT_BACKOFF: tuple[float, ...] = (0.05, 0.2, 1.0, 2.0, 5.0, 10.0)


def sign(secret: str, body: bytes) -> str:
    """The ``X-Hms-Signature`` value: ``sha256=`` + lowercase hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Delivery:
    id: str
    event: str
    url: str
    body: bytes
    headers: dict[str, str]
    attempts: int = 0


class WebhookSender:
    """Queues and delivers webhooks for one system; ``start``/``stop`` follow the app lifespan."""

    def __init__(
        self,
        name: str,
        *,
        url: str | None = None,
        secret: str = "",
        enabled: bool = True,
        max_attempts: int = 8,
        backoff: tuple[float, ...] = DEFAULT_BACKOFF,
        timeout: float = 5.0,
        concurrency: int = 32,
    ) -> None:
        self.name = name
        self.url = url
        self.secret = secret
        self.enabled = enabled
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.timeout = timeout
        self.concurrency = concurrency
        self.counters: Counter[str] = Counter()
        self._pending: dict[Any, deque[Delivery]] = {}
        self._workers: dict[Any, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    # -- configuration -------------------------------------------------------------------

    def configure(
        self,
        *,
        url: str | None = None,
        secret: str | None = None,
        enabled: bool | None = None,
        max_attempts: int | None = None,
    ) -> None:
        """Set the target URL (``None`` disables) and optionally the rest.

        Deliveries already queued keep the URL and signature they were made with.
        """
        self.url = url
        if secret is not None:
            self.secret = secret
        if enabled is not None:
            self.enabled = enabled
        if max_attempts is not None:
            self.max_attempts = max_attempts

    def config_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "enabled": self.enabled,
            "max_attempts": self.max_attempts,
            "secret_set": bool(self.secret),
        }

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.url)

    # -- producing -----------------------------------------------------------------------

    def emit(self, key: Any, event: str, order: dict[str, Any], occurred_at: str) -> None:
        """Queue one delivery for ``order`` (non-blocking; no-op when no target is set)."""
        if not self.active:
            self.counters["skipped"] += 1
            return
        assert self.url is not None
        delivery_id = str(uuid.uuid4())
        payload = {
            "id": delivery_id,
            "event": event,
            "occurred_at": occurred_at,
            "data": {"order": order},
        }
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Hms-Event": event,
            "X-Hms-Delivery": delivery_id,
            "X-Hms-Signature": sign(self.secret, body),
        }
        self._pending.setdefault(key, deque()).append(
            Delivery(delivery_id, event, self.url, body, headers)
        )
        self.counters["enqueued"] += 1
        self._spawn(key)

    def _spawn(self, key: Any) -> None:
        if self._client is None or key in self._workers:
            return
        self._workers[key] = asyncio.get_running_loop().create_task(
            self._work(key), name=f"webhook-{self.name}-{key}"
        )

    # -- delivering ----------------------------------------------------------------------

    async def _work(self, key: Any) -> None:
        try:
            queue = self._pending.get(key)
            while queue:
                await self._deliver(queue[0])
                queue.popleft()
        finally:
            # After a clear() a newer worker may own this key: leave its entries alone.
            if self._workers.get(key) is asyncio.current_task():
                del self._workers[key]
            if not self._pending.get(key):
                self._pending.pop(key, None)

    async def _deliver(self, delivery: Delivery) -> None:
        assert self._client is not None and self._slots is not None
        while True:
            delivery.attempts += 1
            self.counters["sent"] += 1
            try:
                async with self._slots:
                    response = await self._client.post(
                        delivery.url, content=delivery.body, headers=delivery.headers
                    )
                ok = 200 <= response.status_code < 300
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                ok = False
                reason = type(exc).__name__
            if ok:
                self.counters["delivered"] += 1
                return
            self.counters["failed_attempts"] += 1
            if delivery.attempts >= self.max_attempts:
                self.counters["given_up"] += 1
                logger.warning(
                    "%s webhook %s (%s) given up after %d attempts: %s",
                    self.name, delivery.id, delivery.event, delivery.attempts, reason,
                )
                return
            delay = self.backoff[min(delivery.attempts - 1, len(self.backoff) - 1)]
            logger.debug(
                "%s webhook %s attempt %d failed (%s); retrying in %.2fs",
                self.name, delivery.id, delivery.attempts, reason, delay,
            )
            await asyncio.sleep(delay)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.timeout,
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
        )
        self._slots = asyncio.Semaphore(self.concurrency)
        for key in list(self._pending):
            self._spawn(key)

    async def stop(self) -> None:
        """Cancel deliveries in flight (they are dropped) and close the HTTP client."""
        tasks = list(self._workers.values())
        dropped = self.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        if dropped:
            logger.info("%s webhooks: dropped %d undelivered on shutdown", self.name, dropped)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def clear(self) -> int:
        """Drop every queued delivery (used by reset and shutdown); returns how many."""
        dropped = sum(len(q) for q in self._pending.values())
        for task in self._workers.values():
            task.cancel()
        self._workers.clear()
        self._pending.clear()
        self.counters["dropped"] += dropped
        return dropped

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def stats_json(self) -> dict[str, int]:
        names = ("enqueued", "sent", "delivered", "failed_attempts", "given_up", "dropped")
        out = {name: self.counters[name] for name in names}
        out["skipped"] = self.counters["skipped"]
        out["pending"] = self.pending
        return out

    def reset_stats(self) -> None:
        self.counters.clear()
