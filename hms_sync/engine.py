"""The sync engine: one level-triggered `reconcile(api_id)`.

Every trigger (webhook, poll, retry, `import`, `sync-all`) only names an order. `reconcile`
reads the current truth of both systems, decides with `plan.plan_update`, makes the smallest
writes and records them. Because it never acts on what a trigger said, duplicated, late,
reordered or replayed triggers are harmless, and so is a crash at any point:

    find or create the OMS order  ->  remember the link  ->  write back oms_order_code

A crash after the create leaves an OMS order with our ext_code; the next reconcile finds it
by ext_code (or the create answers 422 "taken") and adopts it instead of creating another.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from .clients.api import ApiClient
from .clients.oms import OmsClient
from .errors import (
    HmsSyncError,
    MappingError,
    NotFound,
    OrderError,
    PermanentError,
    TransientError,
    ValidationFailed,
)
from .mapping import Mapper
from .metrics import Metrics
from .models import ApiOrder, OmsOrder, iso
from .plan import Plan, Policy, Synced, plan_update
from .store import Link, Store, Write, now_iso

log = logging.getLogger("hms_sync.integration")

MAX_ROUNDS = 3  # plans carried out per reconcile while the orders change under us

Outcome = Literal["created", "updated", "unchanged", "error", "missing"]


class Busy(TransientError):
    """Another process holds this order right now."""


@dataclass
class Result:
    api_id: int
    outcome: Outcome
    oms_code: str | None = None
    writes: list[str] = field(default_factory=list)
    error: str | None = None


def _error_key(api: ApiOrder, oms: OmsOrder | None, config: str) -> str:
    """What a permanent failure was about: the same versions of both orders under the same
    mapping configuration. A change to any of them is worth another try."""
    return f"{iso(api.updated_at)}|{iso(oms.updated_at) if oms else '-'}|{config}"


class Engine:
    def __init__(
        self,
        api: ApiClient,
        oms: OmsClient,
        store: Store,
        mapper: Mapper,
        *,
        policy: Policy = "oms",
        metrics: Metrics | None = None,
        lock_wait: float = 0.0,
    ) -> None:
        self.api = api
        self.oms = oms
        self.store = store
        self.mapper = mapper
        self.policy = policy
        self.metrics = metrics or Metrics()
        # How long to wait for another process's lock on an order before raising Busy.
        self.lock_wait = lock_wait
        # Fixing the configuration (say, adding a user mapping) retries permanent failures.
        self._config_key = hashlib.sha256(json.dumps(
            [sorted(mapper.status_map.items()), sorted((mapper.user_map or {}).items()),
             mapper.user_map is None, mapper.order_type_code, policy],
        ).encode()).hexdigest()[:12]
        self._local: dict[int, asyncio.Lock] = {}
        self._users: dict[int, int] = {}
        self._held: set[int] = set()  # order locks this engine holds in the store

    # -- entry point ----------------------------------------------------------------------

    async def reconcile(
        self,
        api_id: int,
        *,
        api: ApiOrder | None = None,
        oms: OmsOrder | None = None,
        oms_known: bool = False,
        dry_run: bool = False,
        force: bool = False,
    ) -> Result:
        """Make both systems agree about API order `api_id`.

        `api`/`oms` may carry orders already read (sync-all reads them by the page);
        `oms_known=True` says `oms` is the whole truth (None: no OMS order exists).
        `force` tries again even an order whose last permanent failure nothing has changed.
        Permanent failures are recorded on the link and returned as outcome "error";
        transient ones raise TransientError for the caller to retry later.
        """
        # One reconcile per order at a time: in this process by an asyncio lock, across
        # processes by a lock row in the store.
        lock = self._local.setdefault(api_id, asyncio.Lock())
        self._users[api_id] = self._users.get(api_id, 0) + 1
        try:
            async with lock:
                if dry_run:
                    return await self._reconcile(api_id, api, oms, oms_known, True, force)
                if not self.store.try_lock(api_id):
                    await self._wait_for_lock(api_id)
                    api, oms, oms_known = None, None, False  # read before waiting: stale
                started = time.perf_counter()
                self._held.add(api_id)
                try:
                    result = await self._reconcile(api_id, api, oms, oms_known, False, force)
                finally:
                    if api_id in self._held:  # not already released with the final save
                        self._held.discard(api_id)
                        self.store.unlock(api_id)
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.metrics.reconciles.labels(result.outcome).inc()
                return result
        finally:
            self._users[api_id] -= 1
            if not self._users[api_id]:
                del self._users[api_id], self._local[api_id]

    async def _wait_for_lock(self, api_id: int) -> None:
        """Another process holds the order: wait for it (up to `lock_wait`), or raise Busy."""
        deadline = time.monotonic() + self.lock_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if self.store.try_lock(api_id):
                return
        raise Busy("order is being synced by another process", system="hms-sync")

    async def _reconcile(
        self,
        api_id: int,
        api: ApiOrder | None,
        oms: OmsOrder | None,
        oms_known: bool,
        dry_run: bool,
        force: bool,
    ) -> Result:
        link = self.store.get_link(api_id)
        if api is None:
            try:
                api = await self.api.get_order(api_id)
            except NotFound:
                return self._api_missing(api_id, link, dry_run)
        if oms_known and oms is None and link is not None and link.oms_code:
            # The caller's snapshot predates a link made since (sync-all meets an order
            # again after our own write-back moved it): trusting it would create again.
            oms_known = False
        if not oms_known:
            try:
                oms = await self._locate(api, link)
            except OrderError as exc:  # several candidates: permanent, recorded, no guess
                return self._permanent(api, None, link, exc, dry_run)

        if (
            not force
            and link is not None
            and link.sync_state == "error"
            and link.error_key == _error_key(api, oms, self._config_key)
        ):
            # Permanent for that change: nothing new on either side, so nothing to try.
            return Result(api_id, "error", link.oms_code, error=link.last_error)

        try:
            if oms is None:
                return await self._create(api, link, dry_run)
            adopting = link is None or link.oms_code != oms.code
            synced = None if adopting or link is None else _synced(link)
            return await self._update(api, oms, link, synced, dry_run)
        except (MappingError, OrderError, ValidationFailed) as exc:
            return self._permanent(api, oms, link, exc, dry_run)

    # -- finding and creating -------------------------------------------------------------

    async def _locate(self, api: ApiOrder, link: Link | None) -> OmsOrder | None:
        """The OMS order that is ours for `api`, or None. Never guesses between several."""
        ext = self.mapper.ext_code_for(api.id)
        kind = self.mapper.order_type_code
        if link is not None and link.oms_code:
            try:
                order = await self.oms.get_order(link.oms_code)
            except NotFound:
                log.warning(
                    "[hms-sync] OMS order %s of API order %s is gone", link.oms_code, api.id
                )
            else:
                if order.is_ours(kind) and order.ext_code == ext:
                    return order
        found = [o for o in await self.oms.find_by_ext_code(ext, kind) if o.is_ours(kind)]
        if len(found) > 1:
            named = [o for o in found if o.code == api.oms_order_code]
            if len(named) == 1:
                return named[0]
            codes = ", ".join(sorted(o.code for o in found))
            raise OrderError(
                f"{len(found)} OMS orders claim ext_code {ext} ({codes}); resolve by hand"
            )
        return found[0] if found else None

    async def _create(self, api: ApiOrder, link: Link | None, dry_run: bool) -> Result:
        payload = self.mapper.create_payload(api)  # MappingError: nothing is written
        if dry_run:
            return Result(
                api.id, "created",
                writes=[f"HMS-OMS create ext_code={payload['ext_code']} state={payload['state']}",
                        "HMS-API update oms_order_code=<new code>"],
            )
        try:
            oms = await self.oms.create_order(payload)
        except ValidationFailed as exc:
            if not exc.has_error("ext_code", "taken"):
                raise
            # Created before (a crash, a timeout that did apply, another process): adopt it.
            existing = await self._locate(api, None)
            if existing is None:
                raise OrderError(
                    f"HMS-OMS says ext_code {payload['ext_code']} is taken but lists no such "
                    "order of our type"
                ) from None
            log.info("[hms-sync] adopted OMS order %s for API order %s", existing.code, api.id)
            return await self._update(api, existing, link, None, dry_run)
        self._wrote("HMS-OMS", "create")
        self._propagated("api_to_oms", api.updated_at)
        log.info("[hms-sync] created OMS order %s for API order %s", oms.code, api.id)
        write = Write("HMS-OMS", api.id, oms.code, "create",
                      {k: payload[k] for k in ("ext_code", "state", "user_id")},
                      "new API order")
        # Remember the link before the write-back: a crash after this point finds it.
        fresh = _link_from(api, oms, link, Synced(api.status, oms.state), "pending")
        self.store.save_link(fresh, [write])
        result = await self._update(api, oms, fresh, Synced(api.status, oms.state), dry_run)
        result.outcome = "created"
        result.writes.insert(0, f"HMS-OMS create {oms.code}")
        return result

    # -- updating -------------------------------------------------------------------------

    async def _update(
        self,
        api: ApiOrder,
        oms: OmsOrder,
        link: Link | None,
        synced: Synced | None,
        dry_run: bool,
    ) -> Result:
        plan = plan_update(api, oms, synced, self.mapper, self.policy)
        if dry_run:
            return Result(api.id, "updated" if plan.writes else "unchanged", oms.code,
                          writes=plan.describe())
        writes: list[Write] = []
        described: list[str] = []
        agreed = Synced(api.status, oms.state)
        try:
            for _ in range(MAX_ROUNDS):
                if not plan.writes:
                    agreed = Synced(api.status, oms.state)
                    break
                # The pair both sides hold once this plan is carried out.
                agreed = Synced(plan.api_patch.get("status", api.status),
                                plan.oms_patch.get("state", oms.state))
                if plan.oms_patch:
                    oms = await self.oms.update_order(oms.code, plan.oms_patch)
                    self._wrote("HMS-OMS", "update")
                    writes.append(
                        Write("HMS-OMS", api.id, oms.code, "update", plan.oms_patch, plan.why)
                    )
                    if plan.status_from == "api" or "data" in plan.oms_patch:
                        self._propagated("api_to_oms", api.updated_at)
                if plan.api_patch:
                    api = await self._write_api(api, plan, writes)
                    if plan.status_from == "oms":
                        self._propagated("oms_to_api", oms.updated_at)
                described += plan.describe()
                log.info("[hms-sync] API order %s / OMS order %s: %s (%s)", api.id, oms.code,
                         "; ".join(plan.describe()), plan.why)
                # A write answers with the order as it is now. If someone changed it after we
                # read it, plan again from there: recording their change as synced would
                # lose it (no poll sees it as new) or, worse, revert it later.
                plan = plan_update(api, oms, agreed, self.mapper, self.policy)
        except BaseException:
            if writes:  # the audit log keeps every write that happened, even half a plan
                self.store.record_writes(writes)
            raise
        # Still changing under us after MAX_ROUNDS: "pending" makes the next poll look again.
        state = "ok" if not plan.writes else "pending"
        done = _link_from(api, oms, link, agreed, state)
        self._save_final(done, writes)
        return Result(api.id, "updated" if writes else "unchanged", oms.code, writes=described)

    async def _write_api(self, api: ApiOrder, plan: Plan, writes: list[Write]) -> ApiOrder:
        try:
            updated = await self.api.update_order(api.id, **plan.api_patch)
        except NotFound:
            raise OrderError(f"API order {api.id} disappeared while syncing") from None
        kind = "write-back" if set(plan.api_patch) == {"oms_order_code"} else "update"
        self._wrote("HMS-API", kind)
        writes.append(Write("HMS-API", api.id, plan.api_patch.get("oms_order_code"), kind,
                            plan.api_patch, plan.why))
        return updated

    # -- failures -------------------------------------------------------------------------

    def _permanent(
        self, api: ApiOrder, oms: OmsOrder | None, link: Link | None, exc: HmsSyncError,
        dry_run: bool,
    ) -> Result:
        message = str(exc)
        kind = "mapping" if isinstance(exc, MappingError) else (
            "rejected" if isinstance(exc, PermanentError) else "order")
        self.metrics.errors.labels(kind).inc()
        if not dry_run:
            failed = _link_from(api, oms, link, _synced(link) if link else None, "error")
            failed.last_error = message
            failed.error_key = _error_key(api, oms, self._config_key)
            self._save_final(failed)
            log.warning("[hms-sync] API order %s not synced: %s", api.id, message)
        return Result(api.id, "error", oms.code if oms else None, error=message)

    def _api_missing(self, api_id: int, link: Link | None, dry_run: bool) -> Result:
        message = f"API order {api_id} does not exist"
        if link is not None and not dry_run:
            link.sync_state, link.last_error = "error", message
            link.error_key = "missing"
            self.store.save_link(link)
        return Result(api_id, "missing" if link is None else "error",
                      link.oms_code if link else None, error=message)

    def _save_final(self, link: Link, writes: Iterable[Write] = ()) -> None:
        """The last save of a reconcile also releases the order's lock: one transaction."""
        release = link.api_id in self._held
        self.store.save_link(link, writes, release_lock=release)
        if release:
            self._held.discard(link.api_id)

    # -- bookkeeping ----------------------------------------------------------------------

    def _wrote(self, system: str, kind: str) -> None:
        self.metrics.writes.labels(system, kind).inc()

    def _propagated(self, direction: str, changed_at: datetime) -> None:
        lag = (datetime.now(UTC) - changed_at).total_seconds()
        if lag >= 0:
            self.metrics.propagation_seconds.labels(direction).observe(lag)


def _synced(link: Link) -> Synced | None:
    if link.synced_status is None and link.synced_state is None:
        return None
    return Synced(link.synced_status, link.synced_state)


def _link_from(
    api: ApiOrder, oms: OmsOrder | None, old: Link | None, synced: Synced | None, state: str
) -> Link:
    link = Link(api_id=api.id) if old is None else Link(**old.__dict__)
    link.api_status, link.api_updated_at = api.status, api.updated_at
    if oms is not None:
        link.oms_code, link.oms_state, link.oms_updated_at = oms.code, oms.state, oms.updated_at
    if synced is not None:
        link.synced_status, link.synced_state = synced.status, synced.state
    link.sync_state = state
    if state != "error":
        link.last_error = link.error_key = None
    link.last_sync_at = now_iso()
    return link
