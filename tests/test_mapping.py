"""Mapper: the pure translation between an API order and an OMS order (contract section 4).

No I/O here, so these tests are exhaustive: every default pair, every refusal, and property
tests that the maps round-trip.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hms_sync.config import DEFAULT_STATUS_MAP
from hms_sync.errors import MappingError
from hms_sync.mapping import Mapper
from hms_sync.models import ApiOrder, OmsOrder

T0 = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
WITH_CANCEL = {**DEFAULT_STATUS_MAP, "cancelled": "canceled"}


def api_order(**kw: Any) -> ApiOrder:
    fields: dict[str, Any] = {
        "id": 12345, "title": "Ward 3 linen", "user_id": 42, "status": "pending",
        "items": ITEMS, "oms_order_code": None, "updated_at": T0,
    }
    return ApiOrder(**{**fields, **kw})


def oms_order(**kw: Any) -> OmsOrder:
    fields: dict[str, Any] = {
        "code": "ORD-000123", "ext_code": "12345", "order_type_code": "api_order",
        "state": "to_execute", "user_id": 42,
        "data": {"title": "Ward 3 linen", "items": ITEMS, "dock": "B"}, "updated_at": T0,
    }
    return OmsOrder(**{**fields, **kw})


# -- the status map -------------------------------------------------------------------------


def test_default_status_map_is_exactly_the_seeds_three_pairs() -> None:
    mapper = Mapper()
    assert dict(mapper.status_map) == {
        "pending": "to_execute",
        "processing": "in_progress",
        "completed": "done",
    }
    assert dict(mapper.reverse_status_map) == {
        "to_execute": "pending",
        "in_progress": "processing",
        "done": "completed",
    }


@pytest.mark.parametrize(("status", "state"), sorted(DEFAULT_STATUS_MAP.items()))
def test_default_pairs_map_both_ways(status: str, state: str) -> None:
    mapper = Mapper()
    assert mapper.oms_state_for(status) == state
    assert mapper.api_status_for(state) == status


def test_cancelled_and_canceled_are_unmapped_by_default() -> None:
    mapper = Mapper()
    with pytest.raises(MappingError):
        mapper.oms_state_for("cancelled")
    with pytest.raises(MappingError):
        mapper.api_status_for("canceled")


def test_an_added_pair_maps_both_ways() -> None:
    mapper = Mapper(status_map=WITH_CANCEL)
    assert mapper.oms_state_for("cancelled") == "canceled"
    assert mapper.api_status_for("canceled") == "cancelled"
    assert mapper.oms_state_for("pending") == "to_execute"  # the seed's pairs are kept


def test_a_status_map_that_is_not_one_to_one_is_refused() -> None:
    with pytest.raises(MappingError, match="not one-to-one"):
        Mapper(status_map={"pending": "to_execute", "cancelled": "to_execute"})


def test_unmapped_status_names_the_value_and_the_order() -> None:
    with pytest.raises(MappingError) as info:
        Mapper().oms_state_for("cancelled", 77)
    assert "'cancelled'" in str(info.value)
    assert "77" in str(info.value)
    assert info.value.value == "cancelled"


def test_unmapped_state_names_the_value_and_the_order() -> None:
    with pytest.raises(MappingError) as info:
        Mapper().api_status_for("canceled", 78)
    assert "'canceled'" in str(info.value)
    assert "78" in str(info.value)
    assert info.value.value == "canceled"


# -- the user map ---------------------------------------------------------------------------


def test_users_are_the_same_in_both_systems_by_default() -> None:
    assert Mapper().oms_user_for(42) == 42
    assert Mapper().oms_user_for(1) == 1


def test_a_configured_user_map_translates_users() -> None:
    mapper = Mapper(user_map={42: 7, 1: 1})
    assert mapper.oms_user_for(42) == 7
    assert mapper.oms_user_for(1) == 1


def test_a_user_missing_from_a_configured_map_is_unmapped() -> None:
    with pytest.raises(MappingError) as info:
        Mapper(user_map={42: 7}).oms_user_for(43, 99)
    assert "43" in str(info.value)
    assert "99" in str(info.value)
    assert info.value.value == 43


def test_an_empty_user_map_maps_nobody() -> None:
    # Present but empty is not "absent": nothing is guessed.
    with pytest.raises(MappingError):
        Mapper(user_map={}).oms_user_for(42)


# -- ids ------------------------------------------------------------------------------------


def test_ext_code_is_the_decimal_api_id() -> None:
    assert Mapper.ext_code_for(12345) == "12345"
    assert Mapper.api_id_for("12345") == 12345


@pytest.mark.parametrize(
    "ext_code",
    ["", None, "abc", "007", "0", "-1", "+1", "1.0", " 12", "12 ", "1e3", "١٢", "１２", "12a"],
)
def test_api_id_for_refuses_what_is_not_a_canonical_decimal_id(ext_code: str | None) -> None:
    assert Mapper.api_id_for(ext_code) is None


# -- whole orders ---------------------------------------------------------------------------


def test_create_payload_maps_every_field() -> None:
    mapper = Mapper(user_map={42: 7}, order_type_code="hospital_order")
    payload = mapper.create_payload(api_order(status="processing"))
    assert payload == {
        "ext_code": "12345",
        "order_type_code": "hospital_order",
        "state": "in_progress",
        "user_id": 7,
        "data": {"title": "Ward 3 linen", "items": ITEMS},
    }


def test_create_payload_refuses_an_unmapped_status() -> None:
    with pytest.raises(MappingError, match="cancelled"):
        Mapper().create_payload(api_order(status="cancelled"))


def test_create_payload_refuses_an_unmapped_user() -> None:
    with pytest.raises(MappingError, match="43"):
        Mapper(user_map={42: 7}).create_payload(api_order(user_id=43))


def test_content_patch_is_empty_when_title_items_and_user_agree() -> None:
    # `dock` and the state are not content hms-sync owns: they never cause a patch.
    assert Mapper().content_patch(api_order(), oms_order(state="done")) == {}


def test_content_patch_sends_both_owned_data_keys_and_nothing_else() -> None:
    patch = Mapper().content_patch(api_order(title="Ward 4 linen"), oms_order())
    assert patch == {"data": {"title": "Ward 4 linen", "items": ITEMS}}
    assert "dock" not in patch["data"]


def test_content_patch_carries_changed_items() -> None:
    items = [*ITEMS, {"sku": "PW-7", "name": "Pillow", "quantity": 2, "unit_price": "4.00"}]
    patch = Mapper().content_patch(api_order(items=items), oms_order())
    assert patch == {"data": {"title": "Ward 3 linen", "items": items}}


def test_content_patch_carries_a_changed_user_through_the_user_map() -> None:
    mapper = Mapper(user_map={42: 7, 43: 8})
    assert mapper.content_patch(api_order(user_id=43), oms_order(user_id=7)) == {"user_id": 8}
    assert mapper.content_patch(api_order(user_id=42), oms_order(user_id=7)) == {}


def test_content_patch_fills_missing_owned_keys() -> None:
    patch = Mapper().content_patch(api_order(), oms_order(data={"dock": "B"}))
    assert patch == {"data": {"title": "Ward 3 linen", "items": ITEMS}}


def test_content_patch_refuses_an_unmapped_user() -> None:
    with pytest.raises(MappingError):
        Mapper(user_map={}).content_patch(api_order(), oms_order())


# -- properties -----------------------------------------------------------------------------

STATUS_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


@st.composite
def one_to_one_maps(draw: st.DrawFn) -> dict[str, str]:
    keys = draw(st.lists(STATUS_WORDS, unique=True, min_size=1, max_size=8))
    values = draw(st.lists(STATUS_WORDS, unique=True, min_size=len(keys), max_size=len(keys)))
    return dict(zip(keys, values, strict=True))


@given(one_to_one_maps())
def test_every_mapped_status_round_trips(status_map: dict[str, str]) -> None:
    mapper = Mapper(status_map=status_map)
    for status, state in status_map.items():
        assert mapper.api_status_for(mapper.oms_state_for(status)) == status
        assert mapper.oms_state_for(mapper.api_status_for(state)) == state


@given(st.sampled_from(sorted(WITH_CANCEL)))
def test_every_status_of_the_extended_map_round_trips(status: str) -> None:
    mapper = Mapper(status_map=WITH_CANCEL)
    assert mapper.api_status_for(mapper.oms_state_for(status)) == status


@given(st.dictionaries(st.integers(min_value=1), st.integers(min_value=1), max_size=20))
def test_oms_user_for_is_exactly_the_configured_map(user_map: dict[int, int]) -> None:
    mapper = Mapper(user_map=user_map)
    for api_user, oms_user in user_map.items():
        assert mapper.oms_user_for(api_user) == oms_user


@given(st.integers(min_value=1, max_value=10**18))
def test_ext_code_round_trips_to_the_api_id(api_id: int) -> None:
    assert Mapper.api_id_for(Mapper.ext_code_for(api_id)) == api_id


@given(st.text(max_size=12))
def test_api_id_for_accepts_only_what_ext_code_for_produces(text: str) -> None:
    api_id = Mapper.api_id_for(text)
    if api_id is not None:
        assert Mapper.ext_code_for(api_id) == text
