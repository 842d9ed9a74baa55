"""Pure translation between the two order shapes (contract section 4). No I/O.

    API id        -> OMS ext_code (decimal string)
    title, items  -> data.title, data.items (every other key of data is left alone)
    user_id       -> user_id through the user map (identity unless [mapping.users] is set)
    status        <-> state through the status map (one-to-one)
    OMS code      -> API oms_order_code

A value with no mapping raises MappingError naming the value and the order: nothing is
guessed and nothing is written for that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import DEFAULT_STATUS_MAP
from .errors import MappingError
from .models import ApiOrder, OmsOrder

OWNED_DATA_KEYS = ("title", "items")


@dataclass(frozen=True)
class Mapper:
    status_map: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_STATUS_MAP))
    user_map: Mapping[int, int] | None = None  # None: the same ids in both systems
    order_type_code: str = "api_order"

    def __post_init__(self) -> None:
        reverse: dict[str, str] = {}
        for api_status, oms_state in self.status_map.items():
            if oms_state in reverse:
                raise MappingError(
                    f"status map is not one-to-one: {reverse[oms_state]!r} and {api_status!r} "
                    f"both map to {oms_state!r}"
                )
            reverse[oms_state] = api_status
        object.__setattr__(self, "_reverse", reverse)

    @property
    def reverse_status_map(self) -> Mapping[str, str]:
        return self._reverse  # type: ignore[attr-defined, no-any-return]

    # -- values ---------------------------------------------------------------------------

    def oms_state_for(self, status: str, order_id: int | None = None) -> str:
        try:
            return self.status_map[status]
        except KeyError:
            raise MappingError(
                f"API status {status!r}{_of(order_id)} has no OMS state in the status map",
                value=status,
            ) from None

    def api_status_for(self, state: str, order_id: int | None = None) -> str:
        try:
            return self.reverse_status_map[state]
        except KeyError:
            raise MappingError(
                f"OMS state {state!r}{_of(order_id)} has no API status in the status map",
                value=state,
            ) from None

    def oms_user_for(self, user_id: int, order_id: int | None = None) -> int:
        if self.user_map is None:
            return user_id
        try:
            return self.user_map[user_id]
        except KeyError:
            raise MappingError(
                f"API user {user_id}{_of(order_id)} is not in [mapping.users]", value=user_id
            ) from None

    # -- orders ---------------------------------------------------------------------------

    @staticmethod
    def ext_code_for(api_id: int) -> str:
        return str(int(api_id))

    @staticmethod
    def api_id_for(ext_code: str | None) -> int | None:
        """The API id an OMS ext_code names, or None when it is not a decimal id."""
        if not ext_code or not ext_code.isascii() or not ext_code.isdigit():
            return None
        value = int(ext_code)
        return value if value > 0 and str(value) == ext_code else None

    def create_payload(self, api: ApiOrder) -> dict[str, Any]:
        """The `order` body of the OMS create for a new API order."""
        return {
            "ext_code": self.ext_code_for(api.id),
            "order_type_code": self.order_type_code,
            "state": self.oms_state_for(api.status, api.id),
            "user_id": self.oms_user_for(api.user_id, api.id),
            "data": {"title": api.title, "items": list(api.items)},
        }

    def content_patch(self, api: ApiOrder, oms: OmsOrder) -> dict[str, Any]:
        """What OMS needs so that its title, items and user match API (empty: nothing).

        `data` is merged key by key by OMS, so sending only our keys keeps the rest.
        """
        patch: dict[str, Any] = {}
        if oms.data.get("title") != api.title or oms.data.get("items") != list(api.items):
            # Send both owned keys together so they never drift apart.
            patch["data"] = {"title": api.title, "items": list(api.items)}
        user = self.oms_user_for(api.user_id, api.id)
        if oms.user_id != user:
            patch["user_id"] = user
        return patch


def _of(order_id: int | None) -> str:
    return f" (API order {order_id})" if order_id is not None else ""
