"""The sync engine against the real sandbox over sockets: contract section 4, one test per
guarantee (`test_guarantee_N_...`), the seed's flow end to end, dry runs and the done-when
check at a smaller scale.

Triggers are driven by hand, as the daemon would: `poll_api`/`poll_oms` enqueue, `drain`
reconciles what is due, `sync_all` reconciles everything. Writes are counted by the sandbox
(`stats`), so "no echo" and "one write per change" are measured, not inferred.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from hms_sync.cli_views import status_doc
from hms_sync.errors import NetworkError, ServerError, StoreError, TransientError
from hms_sync.runtime import Runtime, runtime
from hms_sync.sandbox import Sandbox
from hms_sync.scan import API, OMS, poll_api, poll_oms, sync_all
from hms_sync.store import Link

pytestmark = pytest.mark.usefixtures("fast_http")

ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
T1 = "2026-12-04T19:00:00.000000Z"
T2 = "2026-12-04T19:00:05.000000Z"
T3 = "2026-12-04T19:00:09.000000Z"

Writes = Callable[[], dict[str, int]]
NO_WRITES = {"api_update": 0, "oms_create": 0, "oms_update": 0}


def new_api_order(sb: Sandbox, title: str = "Ward 3 linen", user_id: int = 1) -> dict[str, Any]:
    return sb.create_api_order(title, user_id, ITEMS)


def ours(sb: Sandbox, api_id: int) -> list[dict[str, Any]]:
    """OMS orders that are ours for `api_id` (our type, ext_code = the id)."""
    return [
        o for o in sb.list_oms_orders()
        if o["ext_code"] == str(api_id) and o["order_type_code"] == "api_order"
    ]


def the_oms_order(sb: Sandbox, api_id: int) -> dict[str, Any]:
    [order] = ours(sb, api_id)
    return order


def assert_linked(sb: Sandbox, api_id: int) -> dict[str, Any]:
    """Guarantee 1 for one order: exactly one OMS order, and oms_order_code names it."""
    oms = the_oms_order(sb, api_id)
    assert sb.get_api_order(api_id)["oms_order_code"] == oms["code"]
    return oms


async def poll_and_drain(rt: Runtime, drain: Any) -> list[Any]:
    await poll_api(rt.engine)
    await poll_oms(rt.engine)
    return await drain(rt.engine)


# -- the seed's flow ---------------------------------------------------------------------------


def test_seed_flow_end_to_end(sb: Sandbox, settings: Any, in_runtime: Any, drain: Any) -> None:
    async def flow(rt: Runtime) -> None:
        # 1. A customer places an order in HMS-API.
        order = new_api_order(sb)
        api_id = order["id"]
        # 2. hms-sync finds it and creates the OMS order ...
        await poll_and_drain(rt, drain)
        oms = the_oms_order(sb, api_id)
        assert oms["state"] == "to_execute"
        assert oms["data"] == {"title": "Ward 3 linen", "items": ITEMS}
        assert oms["user_id"] == 1
        # 3. ... and writes its code back to HMS-API.
        assert sb.get_api_order(api_id)["oms_order_code"] == oms["code"]
        # 4. The warehouse starts: HMS-API says processing.
        sb.update_oms_order(oms["code"], state="in_progress")
        await poll_and_drain(rt, drain)
        assert sb.get_api_order(api_id)["status"] == "processing"
        # 5. The warehouse finishes: HMS-API says completed.
        sb.update_oms_order(oms["code"], state="done")
        await poll_and_drain(rt, drain)
        assert sb.get_api_order(api_id)["status"] == "completed"
        # 6. The link is remembered as in step.
        link = rt.store.get_link(api_id)
        assert link is not None
        assert (link.oms_code, link.api_status, link.oms_state, link.sync_state) == (
            oms["code"], "completed", "done", "ok",
        )
        assert ours(sb, api_id)[0]["code"] == oms["code"]  # still exactly one

    in_runtime(settings, flow)


# -- guarantee 1: exactly one OMS order, no duplicate ever --------------------------------------


def test_guarantee_1_one_oms_order_with_its_code_written_back(
    sb: Sandbox, settings: Any, in_runtime: Any
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        first = await rt.engine.reconcile(api_id)
        assert first.outcome == "created"
        for _ in range(3):
            assert (await rt.engine.reconcile(api_id)).outcome == "unchanged"

    in_runtime(settings, body)
    oms = assert_linked(sb, api_id)
    assert oms["ext_code"] == str(api_id)
    assert sb.stats("oms")["requests"]["create"] == 1


def test_guarantee_1_crash_between_create_and_write_back(
    sb: Sandbox, settings: Any, in_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        real = rt.engine.api.update_order
        calls = {"n": 0}

        async def dies_once(*args: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise NetworkError("connection reset", system="HMS-API", method="PATCH")
            return await real(*args, **kw)

        monkeypatch.setattr(rt.engine.api, "update_order", dies_once)
        with pytest.raises(TransientError):
            await rt.engine.reconcile(api_id)
        assert len(ours(sb, api_id)) == 1
        assert sb.get_api_order(api_id)["oms_order_code"] is None
        await rt.engine.reconcile(api_id)

    in_runtime(settings, body)
    assert_linked(sb, api_id)
    assert sb.stats("oms")["requests"]["create"] == 1


def test_guarantee_1_crash_before_the_link_is_stored(
    sb: Sandbox, settings: Any, in_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest window: the OMS create happened, nothing was remembered locally."""
    api_id = new_api_order(sb)["id"]

    async def crash(rt: Runtime) -> None:
        def store_dies(*args: Any, **kw: Any) -> None:
            raise StoreError("disk gone")

        monkeypatch.setattr(rt.store, "save_link", store_dies)
        with pytest.raises(StoreError):
            await rt.engine.reconcile(api_id)

    in_runtime(settings, crash)
    assert len(ours(sb, api_id)) == 1

    async def restart(rt: Runtime) -> None:
        assert rt.store.get_link(api_id) is None
        assert (await rt.engine.reconcile(api_id)).outcome != "error"

    in_runtime(settings, restart)  # a new runtime: nothing carried over in memory
    assert_linked(sb, api_id)
    assert sb.stats("oms")["requests"]["create"] == 1


def test_guarantee_1_create_that_failed_but_was_applied_is_adopted(
    sb: Sandbox, settings: Any, in_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        real = rt.engine.oms.create_order

        async def create_fails_after_applying(order: dict[str, Any]) -> Any:
            # From the create on, every OMS answer is a 500, but each write is applied first
            # (the client's own retries included).
            sb.set_faults("oms", error_rate=1.0, apply_before_error=1.0)
            return await real(order)

        monkeypatch.setattr(rt.engine.oms, "create_order", create_fails_after_applying)
        with pytest.raises(ServerError):
            await rt.engine.reconcile(api_id)
        assert len(ours(sb, api_id)) == 1
        assert sb.stats("oms")["requests"]["create"] > 1  # the client did retry
        sb.set_faults("oms")
        monkeypatch.setattr(rt.engine.oms, "create_order", real)
        assert (await rt.engine.reconcile(api_id)).outcome == "updated"  # adopted, not created

    in_runtime(settings, body)
    assert_linked(sb, api_id)


def test_guarantee_1_concurrent_triggers_in_one_engine_create_once(
    sb: Sandbox, settings: Any, in_runtime: Any
) -> None:
    """A webhook racing a poll: two reconciles of one order at the same time."""
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        results = await asyncio.gather(*(rt.engine.reconcile(api_id) for _ in range(5)))
        assert sorted(r.outcome for r in results) == ["created"] + ["unchanged"] * 4

    in_runtime(settings, body)
    assert_linked(sb, api_id)
    assert sb.stats("oms")["requests"]["create"] == 1


@pytest.mark.parametrize("same_owner", [False, True], ids=["two-processes", "one-process"])
def test_guarantee_1_two_runs_at_once_on_one_store(
    sb: Sandbox, settings: Any, drain: Any, run: Any, same_owner: bool
) -> None:
    """Two runtimes on one store file reconcile the same new orders at the same time.

    As two processes the per-order lock turns one away (retried later); as one process both
    get through, and the create that loses gets 422 "taken" and adopts the winner's order.
    """
    first, last = sb.seed_api_orders(20)
    ids = list(range(first, last + 1))

    async def body() -> None:
        async with runtime(settings) as a, runtime(settings) as b:
            if not same_owner:
                b.store.owner = "other-host:4242"
            for api_id in ids:
                outcomes = await asyncio.gather(
                    a.engine.reconcile(api_id), b.engine.reconcile(api_id),
                    return_exceptions=True,
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        assert isinstance(outcome, TransientError), outcome
                        a.store.enqueue([api_id], "busy")
                    else:
                        assert outcome.outcome != "error", outcome
            await drain(a.engine)
            summaries = await asyncio.gather(sync_all(a.engine), sync_all(b.engine))
            for summary in summaries:
                assert summary.counts["created"] == 0, summary.to_dict()
            await drain(a.engine)

    run(body())
    for api_id in ids:
        assert_linked(sb, api_id)
    assert len(sb.list_oms_orders()) == len(ids)


def test_guarantee_1_adopts_an_oms_order_someone_else_created(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes
) -> None:
    api_id = new_api_order(sb)["id"]
    theirs = sb.create_oms_order(
        str(api_id), state="in_progress", user_id=1, data={"dock": "A"}
    )
    sb.reset_stats()

    async def body(rt: Runtime) -> None:
        assert (await rt.engine.reconcile(api_id)).outcome == "updated"

    in_runtime(settings, body)
    oms = assert_linked(sb, api_id)
    assert oms["code"] == theirs["code"]
    # Adoption counts as both changed: policy `oms` keeps the OMS state.
    assert sb.get_api_order(api_id)["status"] == "processing"
    assert oms["state"] == "in_progress"
    assert oms["data"] == {"dock": "A", "title": "Ward 3 linen", "items": ITEMS}
    assert sandbox_writes() == {"api_update": 1, "oms_create": 0, "oms_update": 1}


def test_guarantee_1_an_order_of_another_type_is_never_ours(
    sb: Sandbox, settings: Any, in_runtime: Any
) -> None:
    api_id = new_api_order(sb)["id"]
    other = sb.create_oms_order(str(api_id), order_type_code="manual", data={"x": 1})

    async def body(rt: Runtime) -> None:
        assert (await rt.engine.reconcile(api_id)).outcome == "created"

    in_runtime(settings, body)
    assert assert_linked(sb, api_id)["code"] != other["code"]
    assert sb.get_oms_order(other["code"]) == other  # not touched


def test_guarantee_1_several_oms_orders_for_one_ext_code_write_nothing(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contract says this cannot happen; if OMS ever lists two, hms-sync refuses to guess."""
    api_id = new_api_order(sb)["id"]
    real = sb.create_oms_order(str(api_id), state="in_progress")
    sb.reset_stats()

    async def body(rt: Runtime) -> None:
        [order] = await rt.engine.oms.find_by_ext_code(str(api_id), "api_order")
        twin = order.model_copy(update={"code": "ORD-TWIN"})

        async def two(ext_code: str, kind: str) -> list[Any]:
            return [order, twin]

        monkeypatch.setattr(rt.engine.oms, "find_by_ext_code", two)
        result = await rt.engine.reconcile(api_id)
        assert result.outcome == "error"
        assert "2 OMS orders claim ext_code" in (result.error or "")
        link = rt.store.get_link(api_id)
        assert link is not None and link.sync_state == "error"
        assert "ORD-TWIN" in (link.last_error or "")

    in_runtime(settings, body)
    assert sandbox_writes() == NO_WRITES
    assert sb.get_api_order(api_id)["oms_order_code"] is None
    assert sb.get_api_order(api_id)["status"] == "pending"
    assert sb.get_oms_order(real["code"]) == real


# -- guarantee 2: status converges, conflict policy -----------------------------------------------


def test_guarantee_2_status_converges_from_api_to_oms(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        for status, state in (("processing", "in_progress"), ("completed", "done")):
            sb.update_api_order(api_id, status=status)
            await poll_and_drain(rt, drain)
            assert assert_linked(sb, api_id)["state"] == state

    in_runtime(settings, body)


def test_guarantee_2_status_converges_from_oms_to_api(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        code = the_oms_order(sb, api_id)["code"]
        sb.update_oms_order(code, state="in_progress")
        await poll_and_drain(rt, drain)
        assert sb.get_api_order(api_id)["status"] == "processing"

    in_runtime(settings, body)


@pytest.mark.parametrize(
    ("policy", "status", "state"),
    [
        (None, "processing", "in_progress"),  # default: HMS-OMS is the system of record
        ("oms", "processing", "in_progress"),
        ("api", "completed", "done"),
    ],
)
def test_guarantee_2_conflict_policy_decides_when_both_changed(
    sb: Sandbox, settings_for: Any, in_runtime: Any, policy: str | None, status: str,
    state: str,
) -> None:
    api_id = new_api_order(sb)["id"]
    settings = settings_for(conflict_policy=policy)

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        # Both sides change before hms-sync looks again.
        sb.update_api_order(api_id, status="completed")
        sb.update_oms_order(the_oms_order(sb, api_id)["code"], state="in_progress")
        await rt.engine.reconcile(api_id)

    in_runtime(settings, body)
    assert sb.get_api_order(api_id)["status"] == status
    assert the_oms_order(sb, api_id)["state"] == state


@pytest.mark.parametrize(
    ("api_at", "oms_at", "status", "state"),
    [
        (T3, T2, "completed", "done"),  # HMS-API changed last: it wins
        (T2, T3, "processing", "in_progress"),  # HMS-OMS changed last: it wins
        (T2, T2, "processing", "in_progress"),  # a tie goes to HMS-OMS
    ],
    ids=["api-newer", "oms-newer", "tie"],
)
def test_guarantee_2_conflict_policy_newest_compares_updated_at(
    sb: Sandbox, settings_for: Any, in_runtime: Any, api_at: str, oms_at: str, status: str,
    state: str,
) -> None:
    sb.freeze_clock(T1)
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        code = the_oms_order(sb, api_id)["code"]
        for at, change in sorted(
            [(api_at, lambda: sb.update_api_order(api_id, status="completed")),
             (oms_at, lambda: sb.update_oms_order(code, state="in_progress"))],
            key=lambda pair: pair[0],
        ):
            sb.freeze_clock(at)
            change()
        await rt.engine.reconcile(api_id)

    in_runtime(settings_for(conflict_policy="newest"), body)
    assert sb.get_api_order(api_id)["status"] == status
    assert the_oms_order(sb, api_id)["state"] == state


def test_guarantee_2_backward_move_is_rejected_once_recorded_and_not_retried(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes, drain: Any
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        sb.update_oms_order(the_oms_order(sb, api_id)["code"], state="done")
        await rt.engine.reconcile(api_id)
        assert sb.get_api_order(api_id)["status"] == "completed"

        # Someone moves HMS-API back; HMS-OMS cannot leave `done`: 422.
        sb.update_api_order(api_id, status="processing")
        sb.reset_stats()
        result = await rt.engine.reconcile(api_id)
        assert result.outcome == "error"
        assert "cannot transition from done to in_progress" in (result.error or "")
        assert sandbox_writes() == {"api_update": 0, "oms_create": 0, "oms_update": 1}
        link = rt.store.get_link(api_id)
        assert link is not None and link.sync_state == "error"
        assert "cannot transition" in (link.last_error or "")

        # Nothing changed since: triggers (a poll, a retry, sync-all) send no write.
        sb.reset_stats()
        assert (await rt.engine.reconcile(api_id)).outcome == "error"
        await poll_and_drain(rt, drain)
        await sync_all(rt.engine)
        assert sandbox_writes() == NO_WRITES

        # A new change clears the error.
        sb.update_api_order(api_id, status="completed")
        assert (await rt.engine.reconcile(api_id)).outcome == "unchanged"
        link = rt.store.get_link(api_id)
        assert link is not None and link.sync_state == "ok" and link.last_error is None

    in_runtime(settings, body)
    assert the_oms_order(sb, api_id)["state"] == "done"


# -- guarantee 3: nothing is lost -----------------------------------------------------------------


def test_guarantee_3_an_oms_change_during_a_page_walk_is_not_lost(
    sb: Sandbox, settings: Any, in_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """250 OMS orders (two pages of 200): the first 200 already linked and in step, the last
    50 new. Between the pages an order on page 1 changes and moves to the end; a naive page-2
    read would then skip order 201. The poll must enqueue exactly the changed one and the 50."""
    codes = sb.seed_oms_orders([
        {"ext_code": str(i), "order_type_code": "api_order", "state": "to_execute",
         "user_id": 1, "data": {}}
        for i in range(1, 251)
    ])
    by_ext = {int(o["ext_code"]): o for o in sb.list_oms_orders()}

    async def body(rt: Runtime) -> None:
        from hms_sync.models import parse_iso

        for i in range(1, 201):
            o = by_ext[i]
            rt.store.save_link(Link(
                api_id=i, oms_code=o["code"], oms_state=o["state"],
                oms_updated_at=parse_iso(o["updated_at"]), api_status="pending",
                api_updated_at=parse_iso(o["updated_at"]), synced_status="pending",
                synced_state="to_execute", sync_state="ok",
            ))
        real = rt.engine.oms.list_page
        calls: list[dict[str, Any]] = []

        async def change_after_first_page(**kw: Any) -> Any:
            page = await real(**kw)
            calls.append(kw)
            if len(calls) == 1:
                sb.update_oms_order(codes[4], state="in_progress")  # ext_code 5, on page 1
            return page

        monkeypatch.setattr(rt.engine.oms, "list_page", change_after_first_page)
        await poll_oms(rt.engine)
        assert len(calls) >= 2
        queued = {item.api_id for item in rt.store.due(1000)}
        assert queued == {5} | set(range(201, 251))

    in_runtime(settings, body)


def test_guarantee_3_an_api_change_during_a_page_walk_is_not_lost(
    sb: Sandbox, settings: Any, in_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, last = sb.seed_api_orders(600)  # two pages of 500

    async def body(rt: Runtime) -> None:
        for o in sb.list_api_orders():
            rt.store.save_link(Link(api_id=o["id"], api_status="pending", sync_state="ok",
                                    api_updated_at=_dt(o["updated_at"])))
        real = rt.engine.api.list_page
        calls: list[dict[str, Any]] = []

        async def change_after_first_page(**kw: Any) -> Any:
            page = await real(**kw)
            calls.append(kw)
            if len(calls) == 1:
                sb.update_api_order(first + 2, status="processing")
            return page

        monkeypatch.setattr(rt.engine.api, "list_page", change_after_first_page)
        await poll_api(rt.engine)
        assert len(calls) >= 2
        assert [item.api_id for item in rt.store.due(1000)] == [first + 2]

    in_runtime(settings, body)


def _dt(text: str) -> Any:
    from hms_sync.models import parse_iso

    return parse_iso(text)


def test_guarantee_3_many_orders_sharing_one_timestamp_are_all_found(
    sb: Sandbox, settings: Any, in_runtime: Any
) -> None:
    sb.freeze_clock(T1)
    first, last = sb.seed_api_orders(1200)  # three API pages of 500, one timestamp
    sb.seed_oms_orders([
        {"ext_code": str(i), "order_type_code": "api_order", "state": "to_execute",
         "user_id": 1, "data": {}}
        for i in range(5001, 5451)  # three OMS pages of 200, the same timestamp
    ])
    assert {o["updated_at"][:19] for o in sb.list_oms_orders()} == {T1[:19]}

    async def body(rt: Runtime) -> None:
        await poll_api(rt.engine)
        await poll_oms(rt.engine)
        queued = {item.api_id for item in rt.store.due(10_000)}
        assert queued == set(range(first, last + 1)) | set(range(5001, 5451))
        assert rt.store.get_cursor(API) == _dt(T1)
        assert rt.store.get_cursor(OMS) == _dt(T1)

    in_runtime(settings, body)


def test_guarantee_3_a_restart_resumes_from_the_cursors(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = new_api_order(sb, "A")["id"]
    b = new_api_order(sb, "B")["id"]

    async def before(rt: Runtime) -> dict[str, Any]:
        await poll_and_drain(rt, drain)
        await poll_and_drain(rt, drain)  # the OMS cursor moves once OMS has orders
        return {API: rt.store.get_cursor(API), OMS: rt.store.get_cursor(OMS)}

    cursors = in_runtime(settings, before)
    assert all(cursors.values())

    # While hms-sync is stopped: a status change on each side and a new order.
    sb.update_api_order(a, status="processing")
    sb.update_oms_order(the_oms_order(sb, b)["code"], state="done")
    c = new_api_order(sb, "C")["id"]

    async def after(rt: Runtime) -> None:
        seen: list[Any] = []
        for client in (rt.engine.api, rt.engine.oms):
            real = client.list_page

            async def spy(real: Any = real, **kw: Any) -> Any:
                seen.append(kw.get("updated_since"))
                return await real(**kw)

            monkeypatch.setattr(client, "list_page", spy)
        await poll_api(rt.engine)
        await poll_oms(rt.engine)
        assert seen[0] == cursors[API]  # resumed, not started over
        assert cursors[OMS] in seen
        assert {i.api_id for i in rt.store.due(100)} == {a, b, c}
        await drain(rt.engine)

    in_runtime(settings, after)
    assert the_oms_order(sb, a)["state"] == "in_progress"
    assert sb.get_api_order(b)["status"] == "completed"
    assert_linked(sb, c)


def test_guarantee_3_changes_made_while_oms_fails_are_propagated_later(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        sb.set_faults("oms", error_rate=1.0)
        await poll_api(rt.engine)
        results = await drain(rt.engine, passes=2)
        assert results == []  # every attempt failed transiently
        assert ours(sb, api_id) == []
        assert [i.api_id for i in rt.store.due(10)] == [api_id]  # still queued

        sb.set_faults("oms")
        await drain(rt.engine)
        assert rt.store.queue_counts() == {"pending": 0, "dead": 0}

    in_runtime(settings, body)
    assert_linked(sb, api_id)


def _before_first_call(monkeypatch: pytest.MonkeyPatch, client: Any, name: str,
                       change: Callable[[], Any]) -> None:
    """Make `change` happen just before `client.name` is first called: someone else writes
    to an order after hms-sync read it and before hms-sync's own write lands."""
    real = getattr(client, name)
    done: list[bool] = []

    async def wrapper(*args: Any, **kw: Any) -> Any:
        if not done:
            done.append(True)
            change()
        return await real(*args, **kw)

    monkeypatch.setattr(client, name, wrapper)


def test_guarantee_3_an_api_status_change_racing_our_write_back_is_not_lost(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        _before_first_call(monkeypatch, rt.engine.api, "update_order",
                           lambda: sb.update_api_order(api_id, status="processing"))
        await rt.engine.reconcile(api_id)  # creates, then writes the code back
        await poll_and_drain(rt, drain)
        await rt.engine.reconcile(api_id)  # any later trigger must not revert the customer

    in_runtime(settings, body)
    assert assert_linked(sb, api_id)["state"] == "in_progress"
    assert sb.get_api_order(api_id)["status"] == "processing"


def test_guarantee_3_an_api_content_change_racing_our_status_write_is_not_lost(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        sb.update_oms_order(the_oms_order(sb, api_id)["code"], state="in_progress")
        _before_first_call(monkeypatch, rt.engine.api, "update_order",
                           lambda: sb.update_api_order(api_id, title="Ward 4 linen"))
        await rt.engine.reconcile(api_id)  # carries in_progress -> processing
        await poll_and_drain(rt, drain)

    in_runtime(settings, body)
    assert sb.get_api_order(api_id)["status"] == "processing"
    assert the_oms_order(sb, api_id)["data"]["title"] == "Ward 4 linen"


def test_guarantee_3_an_oms_state_change_racing_our_content_write_is_not_lost(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        code = the_oms_order(sb, api_id)["code"]
        sb.update_api_order(api_id, title="Ward 4 linen")
        _before_first_call(monkeypatch, rt.engine.oms, "update_order",
                           lambda: sb.update_oms_order(code, state="in_progress"))
        await rt.engine.reconcile(api_id)  # sends the title to OMS
        await poll_and_drain(rt, drain)

    in_runtime(settings, body)
    oms = the_oms_order(sb, api_id)
    assert (oms["state"], oms["data"]["title"]) == ("in_progress", "Ward 4 linen")
    assert sb.get_api_order(api_id)["status"] == "processing"


def test_guarantee_3_sync_all_reconciles_an_order_changed_after_it_was_synced(
    sb: Sandbox, settings: Any, in_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sync-all meets an order again when it moved during the walk: skipped when the move was
    our own write-back, reconciled again when someone else changed it."""
    import hms_sync.scan as scan

    monkeypatch.setattr(scan, "API_PAGE", 2)
    first, last = sb.seed_api_orders(6)

    async def body(rt: Runtime) -> None:
        real = rt.engine.api.list_page
        calls: list[int] = []

        async def customer_edits_a_synced_order(**kw: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:  # page 1 was handed out; wait until its orders are synced
                for _ in range(500):
                    link = rt.store.get_link(first)
                    if link is not None and link.sync_state == "ok":
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("order 1 was never synced")
                sb.update_api_order(first, title="changed during the walk")
            return await real(**kw)

        monkeypatch.setattr(rt.engine.api, "list_page", customer_edits_a_synced_order)
        summary = await sync_all(rt.engine)
        assert summary.ok
        assert summary.counts["created"] == 6

    in_runtime(settings, body)
    assert the_oms_order(sb, first)["data"]["title"] == "changed during the walk"
    assert sb.stats("oms")["requests"]["create"] == 6


# -- guarantee 4: no echo, one write per change ---------------------------------------------------


def test_guarantee_4_a_new_order_costs_one_create_and_one_write_back(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, sandbox_writes: Writes
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        assert sandbox_writes() == {"api_update": 1, "oms_create": 1, "oms_update": 0}
        sb.reset_stats()
        await poll_and_drain(rt, drain)  # the write-back does not come back as a change
        await poll_and_drain(rt, drain)
        assert sandbox_writes() == NO_WRITES

    in_runtime(settings, body)
    assert_linked(sb, api_id)


def test_guarantee_4_an_oms_change_costs_one_api_write_and_does_not_echo(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, sandbox_writes: Writes
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        sb.update_oms_order(the_oms_order(sb, api_id)["code"], state="in_progress")
        sb.reset_stats()
        await poll_and_drain(rt, drain)
        assert sandbox_writes() == {"api_update": 1, "oms_create": 0, "oms_update": 0}
        sb.reset_stats()
        await poll_and_drain(rt, drain)
        assert (await rt.engine.reconcile(api_id)).outcome == "unchanged"
        assert sandbox_writes() == NO_WRITES

    in_runtime(settings, body)
    assert sb.get_api_order(api_id)["status"] == "processing"


def test_guarantee_4_an_api_change_costs_one_oms_write_and_does_not_echo(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, sandbox_writes: Writes
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        sb.update_api_order(api_id, status="processing", title="Ward 4 linen")
        sb.reset_stats()
        await poll_and_drain(rt, drain)
        # Status and content together: still one write.
        assert sandbox_writes() == {"api_update": 0, "oms_create": 0, "oms_update": 1}
        sb.reset_stats()
        await poll_and_drain(rt, drain)
        assert sandbox_writes() == NO_WRITES

    in_runtime(settings, body)
    oms = the_oms_order(sb, api_id)
    assert (oms["state"], oms["data"]["title"]) == ("in_progress", "Ward 4 linen")


# -- guarantee 5: fulfilment ----------------------------------------------------------------------


@pytest.mark.parametrize("path", [["in_progress", "done"], ["done"]], ids=["via", "skipping"])
def test_guarantee_5_oms_done_makes_the_api_order_completed(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any, path: list[str]
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        code = the_oms_order(sb, api_id)["code"]
        for state in path:
            sb.update_oms_order(code, state=state)
        await poll_and_drain(rt, drain)

    in_runtime(settings, body)
    assert sb.get_api_order(api_id)["status"] == "completed"


# -- guarantee 6: title, items, user --------------------------------------------------------------


def test_guarantee_6_title_items_and_user_reach_oms_and_other_data_survives(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any
) -> None:
    api_id = new_api_order(sb)["id"]
    items = [{"sku": "PW-7", "name": "Pillow", "quantity": 2, "unit_price": "4.00"}]

    async def body(rt: Runtime) -> None:
        await poll_and_drain(rt, drain)
        code = the_oms_order(sb, api_id)["code"]
        sb.update_oms_order(code, data={"dock": "B", "notes": {"gate": 3}})  # an OMS user
        await poll_and_drain(rt, drain)
        sb.update_api_order(api_id, title="Ward 4 towels", items=items, user_id=2)
        await poll_and_drain(rt, drain)

    in_runtime(settings, body)
    oms = assert_linked(sb, api_id)
    assert oms["data"] == {"title": "Ward 4 towels", "items": items, "dock": "B",
                           "notes": {"gate": 3}}
    assert oms["user_id"] == 2
    assert oms["state"] == "to_execute"


def test_guarantee_6_user_goes_through_the_configured_user_map(
    sb: Sandbox, settings_for: Any, in_runtime: Any
) -> None:
    api_id = new_api_order(sb, user_id=42)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        assert the_oms_order(sb, api_id)["user_id"] == 7
        sb.update_api_order(api_id, user_id=43)
        await rt.engine.reconcile(api_id)

    in_runtime(settings_for(user_map={42: 7, 43: 8}), body)
    assert the_oms_order(sb, api_id)["user_id"] == 8


# -- guarantee 7: no guessing; permanent vs transient ---------------------------------------------


def test_guarantee_7_unmapped_values_write_nothing_and_the_rest_go_on(
    sb: Sandbox, settings_for: Any, in_runtime: Any, sandbox_writes: Writes
) -> None:
    good = new_api_order(sb, "good", user_id=1)["id"]
    cancelled = new_api_order(sb, "cancelled", user_id=1)["id"]
    sb.update_api_order(cancelled, status="cancelled")  # no OMS state in the default map
    stranger = new_api_order(sb, "stranger", user_id=2)["id"]  # not in [mapping.users]
    settings = settings_for(user_map={1: 101})

    async def body(rt: Runtime) -> None:
        summary = await sync_all(rt.engine)
        assert summary.counts["created"] == 1
        assert {e["api_id"] for e in summary.errors} == {cancelled, stranger}
        errors = {e["api_id"]: e["error"] for e in summary.errors}
        assert "'cancelled'" in errors[cancelled] and str(cancelled) in errors[cancelled]
        assert "API user 2" in errors[stranger] and "mapping.users" in errors[stranger]
        for api_id in (cancelled, stranger):
            link = rt.store.get_link(api_id)
            assert link is not None and link.sync_state == "error"
            assert link.last_error == errors[api_id]
        assert sandbox_writes() == {"api_update": 1, "oms_create": 1, "oms_update": 0}

        sb.reset_stats()  # nothing changed: a second pass writes nothing and still refuses
        again = await sync_all(rt.engine)
        assert {e["api_id"] for e in again.errors} == {cancelled, stranger}
        assert sandbox_writes() == NO_WRITES

    in_runtime(settings, body)
    assert assert_linked(sb, good)["user_id"] == 101
    for api_id in (cancelled, stranger):
        assert ours(sb, api_id) == []
        assert sb.get_api_order(api_id)["oms_order_code"] is None


def test_guarantee_7_fixing_the_mapping_retries_the_orders_it_failed(
    sb: Sandbox, settings_for: Any, in_runtime: Any
) -> None:
    stranger = new_api_order(sb, "stranger", user_id=2)["id"]

    async def first(rt: Runtime) -> None:
        summary = await sync_all(rt.engine)
        assert [e["api_id"] for e in summary.errors] == [stranger]

    in_runtime(settings_for(user_map={1: 101}), first)
    assert ours(sb, stranger) == []

    async def fixed(rt: Runtime) -> None:
        # Neither order changed, but the configuration did: the failure is tried again.
        summary = await sync_all(rt.engine)
        assert summary.errors == [] and summary.counts["created"] == 1

    in_runtime(settings_for(user_map={1: 101, 2: 202}), fixed)
    assert assert_linked(sb, stranger)["user_id"] == 202


def test_guarantee_7_an_added_status_pair_is_carried(
    sb: Sandbox, settings_for: Any, in_runtime: Any
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        sb.update_api_order(api_id, status="cancelled")
        assert (await rt.engine.reconcile(api_id)).outcome == "updated"

    in_runtime(settings_for(status_map={"cancelled": "canceled"}), body)
    assert the_oms_order(sb, api_id)["state"] == "canceled"


def test_guarantee_7_an_unmapped_oms_state_writes_nothing_to_api(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        sb.update_oms_order(the_oms_order(sb, api_id)["code"], state="canceled")
        sb.reset_stats()
        result = await rt.engine.reconcile(api_id)
        assert result.outcome == "error" and "'canceled'" in (result.error or "")

    in_runtime(settings, body)
    assert sandbox_writes() == NO_WRITES
    assert sb.get_api_order(api_id)["status"] == "pending"


def test_guarantee_7_server_errors_are_retried_until_everything_converges(
    sb: Sandbox, settings: Any, in_runtime: Any, drain: Any
) -> None:
    first, last = sb.seed_api_orders(15)
    ids = range(first, last + 1)
    # Half of OMS answers are 500s, and half of those failed writes were applied anyway.
    sb.set_faults("oms", error_rate=0.5, apply_before_error=0.5, seed=7)

    async def body(rt: Runtime) -> None:
        for _ in range(5):
            try:
                summary = await sync_all(rt.engine, concurrency=1)
            except TransientError:
                continue  # a listing ran out of attempts: the next pass starts over
            await drain(rt.engine)
            if summary.ok:
                break
        assert sb.stats("oms")["injected"]["5xx"] > 0
        sb.set_faults("oms")
        await drain(rt.engine)
        final = await sync_all(rt.engine)
        assert final.ok and final.counts["unchanged"] == len(ids), final.to_dict()

    in_runtime(settings, body)
    for api_id in ids:
        assert assert_linked(sb, api_id)["state"] == "to_execute"
    assert len(sb.list_oms_orders()) == len(ids)


# -- sync-all -------------------------------------------------------------------------------------


def test_sync_all_dry_run_writes_nothing_but_reports_the_plan(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes
) -> None:
    ids = [new_api_order(sb, f"order {n}")["id"] for n in range(3)]

    async def body(rt: Runtime) -> None:
        summary = await sync_all(rt.engine, dry_run=True)
        assert summary.counts["created"] == 3
        planned = {p["api_id"]: p["writes"] for p in summary.planned}
        assert set(planned) == set(ids)
        for writes in planned.values():
            assert any(w.startswith("HMS-OMS create") for w in writes)
            assert any("oms_order_code" in w for w in writes)
        assert rt.store.list_links() == []
        assert rt.store.queue_counts() == {"pending": 0, "dead": 0}

    in_runtime(settings, body)
    assert sandbox_writes() == NO_WRITES
    assert sb.list_oms_orders() == []


def test_sync_all_dry_run_of_a_linked_order_reports_its_status_change(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes
) -> None:
    api_id = new_api_order(sb)["id"]

    async def body(rt: Runtime) -> None:
        await rt.engine.reconcile(api_id)
        sb.update_oms_order(the_oms_order(sb, api_id)["code"], state="done")
        before = rt.store.get_link(api_id)
        sb.reset_stats()
        summary = await sync_all(rt.engine, dry_run=True)
        assert summary.planned == [
            {"api_id": api_id, "writes": ["HMS-API update status=completed"]}
        ]
        assert rt.store.get_link(api_id) == before

    in_runtime(settings, body)
    assert sandbox_writes() == NO_WRITES
    assert sb.get_api_order(api_id)["status"] == "pending"


def test_done_when_a_thousand_orders_sync_once_and_then_cost_nothing(
    sb: Sandbox, settings: Any, in_runtime: Any, sandbox_writes: Writes
) -> None:
    first, last = sb.seed_api_orders(1000)

    async def body(rt: Runtime) -> None:
        summary = await sync_all(rt.engine)
        assert summary.ok, summary.errors[:3]
        assert summary.counts["seen"] == summary.counts["created"] == 1000
        # Each order once: our own write-back moving it to the end of the walk is no news.
        assert sb.stats("oms")["requests"]["get"] == 0
        assert sandbox_writes() == {"api_update": 1000, "oms_create": 1000, "oms_update": 0}
        sb.reset_stats()
        again = await sync_all(rt.engine)
        assert again.counts["unchanged"] == 1000
        assert sandbox_writes() == NO_WRITES
        doc = status_doc(rt.store, errors_only=False, limit=5000)
        assert doc["counts"] == {"ok": 1000, "pending": 0, "error": 0}
        assert [row["api_id"] for row in doc["links"]] == list(range(first, last + 1))

    in_runtime(settings, body)
    codes = {o["ext_code"]: o["code"] for o in sb.list_oms_orders()}
    assert len(codes) == 1000
    assert all(o["oms_order_code"] == codes[str(o["id"])] for o in sb.list_api_orders())


def test_the_full_rescan_queues_what_nothing_else_did_but_does_not_revive_the_dead(
    sb: Sandbox, settings: Any, in_runtime: Any
) -> None:
    given_up = new_api_order(sb, "given up")["id"]
    missed = new_api_order(sb, "missed by every trigger")["id"]

    async def body(rt: Runtime) -> None:
        rt.store.enqueue([given_up], "test")
        [item] = rt.store.due(10)
        assert rt.store.fail(item, "gave up", delay=None, max_attempts=3)  # dead

        await poll_api(rt.engine, full=True)
        dead = {row["api_id"]: row for row in rt.store.queue_items(dead=True)}
        waiting = {row["api_id"] for row in rt.store.queue_items(dead=False)}
        assert given_up in dead and dead[given_up]["last_error"] == "gave up"
        assert waiting == {missed}  # queued: it has no link yet
        assert rt.store.get_cursor(API) is None  # the safety net never moves the cursor

    in_runtime(settings, body)
