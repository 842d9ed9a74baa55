"""plan_update: which writes make a linked pair agree (pure, no I/O).

`Synced` is the status/state pair both sides held at the last sync; a side "changed" when it
differs from it. These cases are the decision table of guarantees 2 (conflict policy),
4 (no echo) and 7 (no guessing) before any request is involved.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hms_sync.errors import MappingError
from hms_sync.mapping import Mapper
from hms_sync.models import ApiOrder, OmsOrder
from hms_sync.plan import Synced, plan_update

T0 = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
MAPPER = Mapper()
IN_STEP = Synced("pending", "to_execute")


def api_order(**kw: Any) -> ApiOrder:
    fields: dict[str, Any] = {
        "id": 7, "title": "Ward 3 linen", "user_id": 42, "status": "pending", "items": ITEMS,
        "oms_order_code": "ORD-000001", "updated_at": T0,
    }
    return ApiOrder(**{**fields, **kw})


def oms_order(**kw: Any) -> OmsOrder:
    fields: dict[str, Any] = {
        "code": "ORD-000001", "ext_code": "7", "order_type_code": "api_order",
        "state": "to_execute", "user_id": 42,
        "data": {"title": "Ward 3 linen", "items": ITEMS, "dock": "B"}, "updated_at": T0,
    }
    return OmsOrder(**{**fields, **kw})


def test_orders_in_step_need_no_write() -> None:
    plan = plan_update(api_order(), oms_order(), IN_STEP, MAPPER, "oms")
    assert plan.oms_patch == {} and plan.api_patch == {}
    assert plan.writes == 0
    assert plan.describe() == []


def test_only_api_changed_patches_the_oms_state() -> None:
    plan = plan_update(api_order(status="processing"), oms_order(), IN_STEP, MAPPER, "oms")
    assert plan.oms_patch == {"state": "in_progress"}
    assert plan.api_patch == {}
    assert plan.status_from == "api"


def test_only_oms_changed_patches_the_api_status() -> None:
    plan = plan_update(api_order(), oms_order(state="done"), IN_STEP, MAPPER, "oms")
    assert plan.api_patch == {"status": "completed"}
    assert plan.oms_patch == {}
    assert plan.status_from == "oms"


@pytest.mark.parametrize("policy", ["oms", "api", "newest"])
def test_one_sided_changes_do_not_consult_the_policy(policy: Any) -> None:
    # API changed long ago, OMS never: API wins even under "oms" or "newest".
    api = api_order(status="completed", updated_at=T0 - timedelta(days=1))
    plan = plan_update(api, oms_order(), IN_STEP, MAPPER, policy)
    assert plan.oms_patch == {"state": "done"}
    assert plan.api_patch == {}


# Both changed since the last sync: API says processing, OMS says done.
BOTH = (api_order(status="processing"), oms_order(state="done"))


def test_both_changed_policy_oms_takes_the_oms_state() -> None:
    plan = plan_update(*BOTH, IN_STEP, MAPPER, "oms")
    assert plan.api_patch == {"status": "completed"}
    assert plan.oms_patch == {}
    assert "policy 'oms'" in plan.why


def test_both_changed_policy_api_takes_the_api_status() -> None:
    plan = plan_update(*BOTH, IN_STEP, MAPPER, "api")
    assert plan.oms_patch == {"state": "in_progress"}
    assert plan.api_patch == {}


def test_both_changed_policy_newest_takes_the_later_api_change() -> None:
    api = api_order(status="processing", updated_at=T0 + timedelta(seconds=5))
    oms = oms_order(state="done", updated_at=T0 + timedelta(seconds=4))
    plan = plan_update(api, oms, IN_STEP, MAPPER, "newest")
    assert plan.oms_patch == {"state": "in_progress"}
    assert plan.api_patch == {}


def test_both_changed_policy_newest_takes_the_later_oms_change() -> None:
    api = api_order(status="processing", updated_at=T0 + timedelta(seconds=4))
    oms = oms_order(state="done", updated_at=T0 + timedelta(seconds=5))
    plan = plan_update(api, oms, IN_STEP, MAPPER, "newest")
    assert plan.api_patch == {"status": "completed"}
    assert plan.oms_patch == {}


def test_both_changed_policy_newest_on_a_tie_takes_oms() -> None:
    api = api_order(status="processing", updated_at=T0)
    oms = oms_order(state="done", updated_at=T0)
    plan = plan_update(api, oms, IN_STEP, MAPPER, "newest")
    assert plan.api_patch == {"status": "completed"}
    assert plan.oms_patch == {}


@pytest.mark.parametrize(
    ("policy", "oms_patch", "api_patch"),
    [
        ("oms", {}, {"status": "processing"}),
        ("api", {"state": "to_execute"}, {}),
    ],
)
def test_adoption_counts_as_both_changed(
    policy: Any, oms_patch: dict[str, Any], api_patch: dict[str, Any]
) -> None:
    # No remembered sync (a link to an OMS order that already existed): the policy decides.
    plan = plan_update(api_order(), oms_order(state="in_progress"), None, MAPPER, policy)
    assert plan.oms_patch == oms_patch
    assert plan.api_patch == api_patch


def test_adoption_of_an_order_already_in_step_writes_nothing() -> None:
    plan = plan_update(api_order(), oms_order(), None, MAPPER, "api")
    assert plan.writes == 0


def test_a_carried_change_does_not_echo() -> None:
    # OMS moved to in_progress, hms-sync set API to processing and remembered the pair.
    # Reading both sides again (each with a newer updated_at) must plan nothing.
    later = T0 + timedelta(seconds=3)
    api = api_order(status="processing", updated_at=later)
    oms = oms_order(state="in_progress", updated_at=later)
    for policy in ("oms", "api", "newest"):
        plan = plan_update(api, oms, Synced("processing", "in_progress"), MAPPER, policy)
        assert plan.writes == 0, policy


def test_a_stale_synced_pair_with_equal_sides_writes_nothing() -> None:
    # Both sides moved the same way on their own: nothing to carry either way.
    api, oms = api_order(status="completed"), oms_order(state="done")
    assert plan_update(api, oms, IN_STEP, MAPPER, "oms").writes == 0


def test_content_and_state_go_to_oms_in_one_patch() -> None:
    api = api_order(status="processing", title="Ward 4 linen", user_id=43)
    plan = plan_update(api, oms_order(), IN_STEP, MAPPER, "oms")
    assert plan.oms_patch == {
        "state": "in_progress",
        "data": {"title": "Ward 4 linen", "items": ITEMS},
        "user_id": 43,
    }
    assert plan.writes == 1


def test_content_goes_to_oms_even_when_oms_wins_the_status() -> None:
    api = api_order(status="processing", title="Ward 4 linen")
    plan = plan_update(api, oms_order(state="done"), IN_STEP, MAPPER, "oms")
    assert plan.oms_patch == {"data": {"title": "Ward 4 linen", "items": ITEMS}}
    assert plan.api_patch == {"status": "completed"}


def test_a_missing_oms_order_code_is_written_back() -> None:
    plan = plan_update(api_order(oms_order_code=None), oms_order(), IN_STEP, MAPPER, "oms")
    assert plan.api_patch == {"oms_order_code": "ORD-000001"}
    assert plan.oms_patch == {}


def test_a_wrong_oms_order_code_is_corrected_with_the_status() -> None:
    api = api_order(oms_order_code="ORD-999999")
    plan = plan_update(api, oms_order(state="in_progress"), IN_STEP, MAPPER, "oms")
    assert plan.api_patch == {"oms_order_code": "ORD-000001", "status": "processing"}
    assert plan.writes == 1  # one API PATCH carries both


@pytest.mark.parametrize(
    ("api_kw", "oms_kw", "value"),
    [
        ({"status": "cancelled"}, {}, "cancelled"),
        ({}, {"state": "canceled"}, "canceled"),
        ({"status": "cancelled", "title": "new"}, {}, "cancelled"),
    ],
)
def test_an_unmapped_value_raises_before_anything_is_planned(
    api_kw: dict[str, Any], oms_kw: dict[str, Any], value: str
) -> None:
    with pytest.raises(MappingError) as info:
        plan_update(api_order(oms_order_code=None, **api_kw), oms_order(**oms_kw), IN_STEP,
                    MAPPER, "oms")
    assert value in str(info.value)


def test_an_unmapped_user_raises() -> None:
    with pytest.raises(MappingError, match="42"):
        plan_update(api_order(), oms_order(), IN_STEP, Mapper(user_map={1: 1}), "oms")


def test_describe_names_every_write() -> None:
    api = api_order(status="processing", title="Ward 4 linen", oms_order_code=None)
    plan = plan_update(api, oms_order(), IN_STEP, MAPPER, "oms")
    text = "\n".join(plan.describe())
    assert "HMS-OMS update" in text and "state=in_progress" in text
    assert "data.items/title" in text
    assert "HMS-API update oms_order_code=ORD-000001" in text
