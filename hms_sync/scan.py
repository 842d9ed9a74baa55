"""Finding the orders that changed: incremental polls and the full sync.

Polls walk each system from its stored cursor (`updated_since`, inclusive) and enqueue the
orders whose `updated_at` is newer than the link remembers. The cursor moves in the same
transaction as the work it covers, page by page, so a crash never skips an order, and the
inclusive bound re-reads orders sharing the cursor's timestamp (they are then recognised as
seen, not enqueued again).

The full sync (`sync-all`) reconciles every order with what it read by the page, so a
backfill costs only the list requests and the writes. It keeps memory flat: the OMS side is
spooled to a temporary SQLite file, never held in a dict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .engine import Engine, Result
from .errors import HmsSyncError, TransientError
from .models import ApiOrder, OmsOrder
from .store import Link

log = logging.getLogger("hms_sync.integration")

API, OMS = "HMS-API", "HMS-OMS"
API_PAGE = 500
SYNC_ALL_ATTEMPTS = 4  # per order, before it is left to the daemon's retry queue


async def poll_api(engine: Engine, *, full: bool = False) -> int:
    """Enqueue API orders changed since the cursor. Returns how many were enqueued.

    `full` walks from the beginning without moving the cursor (the periodic safety net).
    """
    store = engine.store
    enqueued = 0
    since = None if full else store.get_cursor(API)
    async for page in engine.api.iter_pages(updated_since=since, per_page=API_PAGE):
        links = store.get_links(o.id for o in page)
        changed = [(o.id, o) for o in page if _api_changed(o, links.get(o.id))]
        fresh, again = _split(changed, since, full)
        position = None if full else page[-1].updated_at
        enqueued += store.advance(API, position, fresh, f"poll {API}", seen=again)
    engine.metrics.last_poll.labels(API).set(time.time())
    return enqueued


async def poll_oms(engine: Engine, *, full: bool = False) -> int:
    """Enqueue the API ids of our OMS orders changed since the cursor."""
    store = engine.store
    enqueued = 0
    since = None if full else store.get_cursor(OMS)
    async for page in engine.oms.iter_pages(
        updated_since=since, order_type_code=engine.mapper.order_type_code,
    ):
        ids = {o.code: engine.mapper.api_id_for(o.ext_code) for o in page}
        links = store.get_links(i for i in ids.values() if i is not None)
        changed = []
        for o in page:
            api_id = ids[o.code]
            if api_id is None or not o.is_ours(engine.mapper.order_type_code):
                continue
            if _oms_changed(o, links.get(api_id)):
                changed.append((api_id, o))
        fresh, again = _split(changed, since, full)
        position = None if full else page[-1].updated_at
        enqueued += store.advance(OMS, position, fresh, f"poll {OMS}", seen=again)
    engine.metrics.last_poll.labels(OMS).set(time.time())
    return enqueued


def _split(
    changed: Sequence[tuple[int, ApiOrder | OmsOrder]], since: datetime | None, full: bool
) -> tuple[list[int], list[int]]:
    """API ids of orders newer than the cursor, and of those read again at it.

    The full rescan reads everything again: it is a safety net for orders nothing else
    queued, so it must not revive what was given up on (that is `hms-sync retry`'s job).
    """
    if full:
        return [], [api_id for api_id, _ in changed]
    fresh: list[int] = []
    again: list[int] = []
    for api_id, order in changed:
        (again if since is not None and order.updated_at <= since else fresh).append(api_id)
    return fresh, again


def _api_changed(order: ApiOrder, link: Link | None) -> bool:
    if link is None or link.api_updated_at is None or link.sync_state == "pending":
        return True
    return order.updated_at > link.api_updated_at


def _oms_changed(order: OmsOrder, link: Link | None) -> bool:
    if link is None or link.oms_code != order.code or link.oms_updated_at is None:
        return True
    if link.sync_state == "pending":
        return True
    return order.updated_at > link.oms_updated_at


# -- full sync ---------------------------------------------------------------------------


@dataclass
class Summary:
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)  # OMS orders of no API order
    planned: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, result: Result, dry_run: bool) -> None:
        self.counts["seen"] += 1
        self.counts[result.outcome] += 1
        if result.outcome == "error":
            self.errors.append({"api_id": result.api_id, "error": result.error})
        elif result.outcome == "missing":
            self.orphans.append({"api_id": result.api_id, "error": result.error})
        if dry_run and result.writes:
            self.planned.append({"api_id": result.api_id, "writes": result.writes})

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        keys = ("seen", "created", "updated", "unchanged", "error", "missing", "retry_later")
        return {
            "summary": {k: self.counts.get(k, 0) for k in keys},
            "seconds": round(self.seconds, 3),
            "errors": self.errors,
            "orphans": self.orphans,
            **({"planned": self.planned} if self.planned else {}),
        }


class _OmsSpool:
    """Our OMS orders by ext_code, spooled to a private temporary SQLite file."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False)  # "" = temp file on disk
        self._db.execute("CREATE TABLE o (ext TEXT, code TEXT, doc TEXT, seen INTEGER DEFAULT 0)")
        self._db.execute("CREATE TABLE met (id INTEGER PRIMARY KEY)")

    def add(self, orders: list[OmsOrder]) -> None:
        self._db.executemany(
            "INSERT INTO o (ext, code, doc) VALUES (?, ?, ?)",
            [(o.ext_code, o.code, o.model_dump_json()) for o in orders],
        )

    def index(self) -> None:
        self._db.execute("CREATE INDEX o_ext ON o (ext)")

    def take(self, ext_codes: list[str]) -> dict[str, list[OmsOrder]]:
        marks = ",".join("?" * len(ext_codes))
        rows = self._db.execute(f"SELECT ext, doc FROM o WHERE ext IN ({marks})", ext_codes)
        out: dict[str, list[OmsOrder]] = {}
        for ext, doc in rows:
            out.setdefault(ext, []).append(OmsOrder.model_validate(json.loads(doc)))
        self._db.execute(f"UPDATE o SET seen = 1 WHERE ext IN ({marks})", ext_codes)
        return out

    def meet(self, api_ids: list[int]) -> set[int]:
        """Record the API ids the walk met; return those it had met before."""
        marks = ",".join("?" * len(api_ids))
        rows = self._db.execute(f"SELECT id FROM met WHERE id IN ({marks})", api_ids)
        before = {r[0] for r in rows}
        self._db.executemany("INSERT OR IGNORE INTO met (id) VALUES (?)", [(i,) for i in api_ids])
        return before

    def unseen_ext_codes(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT ext FROM o WHERE seen = 0")]

    def close(self) -> None:
        self._db.close()


Progress = Callable[[Result], None]


async def sync_all(
    engine: Engine,
    *,
    dry_run: bool = False,
    concurrency: int = 8,
    progress: Progress | None = None,
) -> Summary:
    """Two-way reconcile of every API order and every OMS order that is ours.

    `progress(result)` is called once per order. A transient failure leaves the order in
    the retry queue (the daemon finishes it) and counts as an error here.
    """
    started = time.perf_counter()
    summary = Summary()
    spool = _OmsSpool()
    kind = engine.mapper.order_type_code
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def attempt(api_id: int, **kw: Any) -> Result:
        """Reconcile, trying again a few times on a transient failure, each time from
        fresh reads (a write is never re-sent as decided before the failure)."""
        for n in range(SYNC_ALL_ATTEMPTS):
            try:
                return await engine.reconcile(api_id, dry_run=dry_run, **kw)
            except TransientError as exc:
                if n + 1 == SYNC_ALL_ATTEMPTS:
                    raise
                delay = 0.2 * 2**n
                retry_after = getattr(exc, "retry_after", None)
                await asyncio.sleep(max(delay, retry_after or 0.0))
                kw = {}  # what was read by the page may be stale now: read afresh
        raise AssertionError("unreachable")  # pragma: no cover

    async def one(api_id: int, **kw: Any) -> None:
        async with sem:
            try:
                result = await attempt(api_id, **kw)
            except TransientError as exc:
                result = Result(api_id, "error", error=f"{exc} (queued for retry)")
                summary.counts["retry_later"] += 1
                if not dry_run:
                    engine.store.enqueue([api_id], "sync-all retry")
            except HmsSyncError as exc:
                result = Result(api_id, "error", error=str(exc))
        summary.add(result, dry_run)
        if progress:
            progress(result)

    inflight: dict[int, asyncio.Task[None]] = {}

    async def again(order: ApiOrder) -> None:
        # The API walk is keyset-ordered by updated_at, so an order updated while we walk
        # (usually by our own write-back) comes round again. Skip the version we synced.
        earlier = inflight.get(order.id)
        if earlier is not None:
            await asyncio.wait([earlier])
        link = engine.store.get_link(order.id)
        if link is not None and link.api_updated_at is not None and (
            order.updated_at <= link.api_updated_at
        ):
            return
        await one(order.id)  # changed by someone else meanwhile: read both afresh

    async def launch(api_id: int, **kw: Any) -> None:
        # Bounded in flight: wait for a slot before reading further pages.
        while len(tasks) >= concurrency * 4:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        met_again = kw.pop("met_again", None)
        task = asyncio.create_task(again(met_again) if met_again else one(api_id, **kw))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if met_again is None:
            inflight[api_id] = task
            task.add_done_callback(
                lambda t: inflight.pop(api_id) if inflight.get(api_id) is t else None
            )

    try:
        async for page in engine.oms.iter_pages(order_type_code=kind):
            spool.add([o for o in page if o.is_ours(kind)])
        spool.index()
        async for api_page in engine.api.iter_pages(per_page=API_PAGE):
            found = spool.take([engine.mapper.ext_code_for(o.id) for o in api_page])
            met_before = spool.meet([o.id for o in api_page])
            for order in api_page:
                if order.id in met_before:
                    await launch(order.id, met_again=order)
                    continue
                matches = found.get(engine.mapper.ext_code_for(order.id), [])
                if len(matches) > 1:
                    # Several candidates: let reconcile read fresh and refuse to guess.
                    await launch(order.id, api=order)
                else:
                    await launch(order.id, api=order, oms=matches[0] if matches else None,
                                 oms_known=True)
        # OMS orders whose API order the walk did not meet (created since, or orphans).
        for ext in spool.unseen_ext_codes():
            api_id = engine.mapper.api_id_for(ext)
            if api_id is not None:
                await launch(api_id)
        if tasks:
            await asyncio.gather(*list(tasks))
    finally:
        for task in list(tasks):
            task.cancel()
        spool.close()
    summary.seconds = time.perf_counter() - started
    log.info("[hms-sync] sync-all %s", json.dumps(summary.to_dict()["summary"]))
    return summary
