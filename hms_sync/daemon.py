"""`hms-sync run`: one process, one event loop.

    uvicorn ── receiver (webhooks, /healthz, /metrics) ──┐
    APScheduler ── poll HMS-API, poll HMS-OMS,            ├─> durable queue ─> workers ─> reconcile
                   full rescan, housekeeping ────────────┘

Webhooks and polls only put order ids in the durable queue (the store); workers take due
items, never the same order twice at once, and reconcile them. A failed item goes back with
per-order exponential backoff and jitter (capped, honouring Retry-After) and dies after
`max_attempts`, or at once when the failure is permanent. SIGTERM/SIGINT: stop accepting,
let in-flight reconciles finish for a grace period, hand the rest back to the queue (their
rows were never removed), close the store, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import uvicorn

from .config import Settings, setting_name
from .engine import Busy, Engine
from .errors import ConfigError, HmsSyncError, StoreError, TransientError, Unauthorized
from .logs import configure_logging
from .metrics import Metrics
from .runtime import runtime
from .scan import API, OMS, poll_api, poll_oms
from .serving import QuietServer, bind_tcp
from .store import Store, WorkItem

log = logging.getLogger("hms_sync.daemon")

SHUTDOWN_GRACE = 10.0  # seconds in-flight reconciles get to finish on SIGTERM
RECONCILE_TIMEOUT = 120.0  # no reconcile may run longer than this
POLL_TIMEOUT = 300.0  # a poll walk is cut here; its committed pages are kept
HOUSEKEEPING_INTERVAL = 5.0
DELIVERY_RETENTION = 7 * 24 * 3600.0
MAX_RETRY_AFTER = 3600.0


def backoff_delay(attempts: int, initial: float, cap: float, retry_after: float | None) -> float:
    """Per-order exponential backoff with jitter in [d/2, d], capped at `cap`.

    A server's Retry-After is honoured even past the cap (it knows when it will take us
    back), up to an hour, so a silly value cannot park an order forever.
    """
    base = min(cap, initial * (2 ** max(0, attempts)))
    delay = random.uniform(base / 2, base)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def check_startup(settings: Settings) -> None:
    """Settings the daemon needs beyond the common ones; ConfigError names the setting."""
    if not settings.webhooks_enabled:
        return
    for field in ("hms_api_webhook_secret", "oms_webhook_secret"):
        secret = getattr(settings, field)
        if secret is None or not secret.get_secret_value():
            raise ConfigError(
                f"{setting_name(field)} is missing; the webhook receiver needs it "
                "(or set [receiver] enabled = false to poll only)"
            )


def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit code (0 clean stop, 2 bad config)."""
    from rich.markup import escape

    from .cli import err

    configure_logging(settings.log_level, settings.log_format)
    try:
        check_startup(settings)
        store = Store(settings.db)
    except (ConfigError, StoreError) as exc:
        err.print(f"[red]error:[/red] configuration: {escape(str(exc))}", markup=True)
        return 2
    try:
        return asyncio.run(Daemon(settings, store).serve())
    except (ConfigError, Unauthorized) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", markup=True)
        return 2
    finally:
        store.close()


class Daemon:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.engine: Engine | None = None
        self.metrics = Metrics()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._scheduler: Any = None
        self.last_poll: dict[str, float | None] = {API: None, OMS: None}
        self.started = time.time()

    # -- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        # Bound before anything else, so a port in use is a configuration error (exit 2)
        # reported before any request is sent, not uvicorn's sys.exit deep in the loop.
        sock = _listen_socket(s.host, s.port)
        try:
            return await self._serve(sock)
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> int:
        from .receiver import create_app, sources_from_settings

        s = self.settings
        async with runtime(s, self.store, lock_wait=0.0) as rt:
            rt.engine.metrics = self.metrics
            self.engine = rt.engine
            await self._check_systems(rt.engine)
            freed = self.store.release_stale_locks()
            if freed:
                log.info("[hms-sync] released %d lock(s) left by a stopped process", freed)

            app = create_app(
                store=self.store,
                metrics=self.metrics,
                sources=sources_from_settings(s) if s.webhooks_enabled else {},
                order_type_code=s.oms_order_type_code,
                wake=self.wake,
                health=self.health,
            )
            server = QuietServer(uvicorn.Config(
                app, host=s.host, port=s.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5, lifespan="off",
            ))
            server_task = asyncio.create_task(server.serve(sockets=[sock]), name="receiver")
            self._start_scheduler()
            dispatcher = asyncio.create_task(self._dispatch(), name="dispatcher")
            log.info("[hms-sync] running: receiver on http://%s:%s, polling every %ss",
                     s.host, s.port, s.poll_interval)
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait(
                {server_task, dispatcher, stop_wait}, return_when=asyncio.FIRST_COMPLETED
            )
            failure = next((t.exception() for t in done if t is not stop_wait
                            and not t.cancelled() and t.exception()), None)
            log.info("[hms-sync] stopping")
            server.should_exit = True
            self._stop.set()
            self._scheduler.shutdown(wait=False)
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            await self._drain_inflight()
            with contextlib.suppress(asyncio.CancelledError):
                await server_task
            stop_wait.cancel()
            if failure is not None:
                if isinstance(failure, SystemExit):  # uvicorn could not bind
                    raise ConfigError(f"cannot listen on {s.host}:{s.port}")
                raise failure
        log.info("[hms-sync] stopped cleanly")
        return 0

    async def _check_systems(self, engine: Engine) -> None:
        """A wrong credential is a configuration error; an unreachable system is not."""
        for client in (engine.api, engine.oms):
            try:
                await client.ping()
            except Unauthorized:
                raise
            except HmsSyncError as exc:
                log.warning("[hms-sync] %s not reachable at start (%s); will keep trying",
                            client.system, exc)

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        s = self.settings
        sched = AsyncIOScheduler(job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": None,
        })
        now = _utcnow()
        sched.add_job(self._poll, "interval", seconds=s.poll_interval, args=[API, poll_api],
                      id="poll-api", next_run_time=now)
        sched.add_job(self._poll, "interval", seconds=s.poll_interval, args=[OMS, poll_oms],
                      id="poll-oms", next_run_time=now)
        if s.full_resync_interval > 0:
            sched.add_job(self._full_rescan, "interval", seconds=s.full_resync_interval,
                          id="full-rescan")
        sched.add_job(self._housekeeping, "interval", seconds=HOUSEKEEPING_INTERVAL,
                      id="housekeeping", next_run_time=now)
        sched.add_job(self._prune, "interval", seconds=3600, id="prune-deliveries",
                      next_run_time=now)
        sched.start()
        self._scheduler = sched

    # -- jobs -----------------------------------------------------------------------------

    async def _poll(self, system: str, poll: Callable[..., Awaitable[int]]) -> None:
        assert self.engine is not None
        try:
            async with asyncio.timeout(POLL_TIMEOUT):
                n = await poll(self.engine)
        except (HmsSyncError, TimeoutError) as exc:
            self.metrics.errors.labels("poll").inc()
            log.warning("[hms-sync] poll of %s failed: %s", system, exc or "timed out")
            return
        except asyncio.CancelledError:
            # Stopping cancels a running job (APScheduler 3), which it logs as an error with
            # a traceback. Nothing is lost (pages already walked are committed, the next
            # start resumes from the cursor), so end quietly instead.
            log.info("[hms-sync] poll of %s cut short by the stop", system)
            return
        self.last_poll[system] = time.time()
        if n:
            log.info("[hms-sync] poll of %s found %d changed order(s)", system, n)
            self.wake()

    async def _full_rescan(self) -> None:
        """Safety net: walk both systems from the start and enqueue whatever differs."""
        assert self.engine is not None
        try:
            async with asyncio.timeout(max(POLL_TIMEOUT, self.settings.full_resync_interval)):
                n = await poll_api(self.engine, full=True) + await poll_oms(self.engine, full=True)
        except (HmsSyncError, TimeoutError) as exc:
            log.warning("[hms-sync] full rescan failed: %s", exc or "timed out")
            return
        except asyncio.CancelledError:  # stopping: as in _poll
            log.info("[hms-sync] full rescan cut short by the stop")
            return
        log.info("[hms-sync] full rescan enqueued %d order(s)", n)
        if n:
            self.wake()

    async def _housekeeping(self) -> None:
        try:
            counts = self.store.queue_counts()
            self.metrics.queue_depth.set(counts["pending"])
            self.metrics.dead_letters.set(counts["dead"])
        except StoreError as exc:
            log.error("[hms-sync] store: %s", exc)
        self.wake()  # backoffs that expired since the last look

    async def _prune(self) -> None:
        """Delivery ids are kept a week for deduplication: far past any sender's retries."""
        try:
            n = self.store.prune_deliveries(DELIVERY_RETENTION)
        except StoreError as exc:
            log.error("[hms-sync] store: %s", exc)
            return
        if n:
            log.info("[hms-sync] forgot %d webhook deliveries older than a week", n)

    # -- workers --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def _dispatch(self) -> None:
        limit = self.settings.concurrency
        while not self._stop.is_set():
            self._wake.clear()
            free = limit - len(self._inflight)
            if free > 0:
                try:
                    items = self.store.due(free, exclude=self._inflight.keys())
                except StoreError as exc:
                    log.error("[hms-sync] store: %s", exc)
                    items = []
                for item in items:
                    task = asyncio.create_task(self._work(item))
                    self._inflight[item.api_id] = task
                    task.add_done_callback(functools.partial(self._done, item.api_id))
                if len(items) == free:
                    continue  # more may be due; look again at once
            try:
                due_in = self.store.next_due_in(exclude=self._inflight.keys())
            except StoreError:
                due_in = None
            timeout = 1.0 if due_in is None else min(1.0, max(due_in, 0.01))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _done(self, api_id: int, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(api_id, None)
        self._wake.set()

    async def _work(self, item: WorkItem) -> None:
        assert self.engine is not None
        s = self.settings
        try:
            async with asyncio.timeout(RECONCILE_TIMEOUT):
                result = await self.engine.reconcile(item.api_id)
        except Busy:
            self.store.postpone(item, 1.0)
        except Unauthorized as exc:
            # Not the order's fault: wait without spending its attempts.
            self.metrics.errors.labels("unauthorized").inc()
            self.store.postpone(item, s.backoff_max, error=str(exc))
        except (TransientError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.metrics.errors.labels(kind).inc()
            retry_after = getattr(exc, "retry_after", None)
            delay = backoff_delay(item.attempts, s.backoff_initial, s.backoff_max, retry_after)
            message = str(exc) or "reconcile timed out"
            if self.store.fail(item, message, delay=delay, max_attempts=s.max_attempts):
                log.error("[hms-sync] API order %s given up after %d attempts: %s",
                          item.api_id, item.attempts + 1, message)
            else:
                log.info("[hms-sync] API order %s will be retried in %.1fs: %s",
                         item.api_id, delay, message)
        except StoreError as exc:
            log.error("[hms-sync] store: %s", exc)
        except HmsSyncError as exc:
            self.store.fail(item, str(exc), delay=None, max_attempts=s.max_attempts)
        else:
            if result.outcome == "error":
                self.store.fail(item, result.error or "error", delay=None,
                                max_attempts=s.max_attempts)
            else:
                self.store.complete(item)

    async def _drain_inflight(self) -> None:
        if not self._inflight:
            return
        tasks = list(self._inflight.values())
        log.info("[hms-sync] waiting up to %.0fs for %d reconcile(s)", SHUTDOWN_GRACE, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
        for task in pending:  # their queue rows stay: the next start picks them up
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    # -- health ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {
            "last_successful_poll": {
                k: (_iso(v) if v else None) for k, v in self.last_poll.items()
            },
        }
        ok = True
        try:
            self.store.ping()
            details["queue"] = self.store.queue_counts()
        except StoreError as exc:
            ok, details["store"] = False, str(exc)
        if self._scheduler is None or not self._scheduler.running:
            ok, details["scheduler"] = False, "not running"
        if self.engine is not None:
            for client in (self.engine.api, self.engine.oms):
                if client.unauthorized is not None:
                    ok = False
                    details.setdefault("credentials", []).append(f"{client.system} rejected")
        return ok, details


def _listen_socket(host: str, port: int) -> socket.socket:
    """The receiver's listening socket, bound now; ConfigError names the setting."""
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise ConfigError(
            f"{setting_name('port')}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()
