"""Reference HMS-OMS (Rails-like), contract section 2, as a Starlette app.

Decisions where the contract is silent:

- A ``PATCH`` that changes nothing (same state, same user, data keys already equal)
  neither bumps ``updated_at`` nor sends a webhook (Rails skips clean records).
- ``order.fulfilled`` is sent when the state is ``done`` and was not before, so a create
  directly in ``done`` is also ``order.fulfilled``; every other change, creates included,
  is ``order.status_changed``.
- Strict types, to catch client bugs: ``ext_code`` and ``order_type_code`` must be
  non-empty strings, ``user_id`` an integer, ``data`` an object (422 otherwise). Fields
  that may not be updated (``ext_code``, ``order_type_code``, unknown keys) are ignored,
  like Rails strong parameters.
- A missing ``order`` root or malformed JSON is 400 ``{"error": ...}``. A bad
  ``updated_since`` is 422 ``{"errors": {"updated_since": ["is invalid"]}}``; a bad
  ``page`` counts as 1 and a bad ``per_page`` as the default (Kaminari).
- ``updated_at`` is stored truncated to milliseconds, so what a client reads is exactly
  what the list compares ``updated_since`` against.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hms_sync.sandbox.common import (
    BadRequest,
    Faults,
    Invalid,
    NotFound,
    SortedIndex,
    format_millis,
    is_int,
    parse_iso,
    read_json,
)
from hms_sync.sandbox.system import SystemState, build_app, guarded
from hms_sync.sandbox.webhooks import WebhookSender

STATES = ("to_execute", "in_progress", "done", "canceled")
ALLOWED: dict[str, frozenset[str]] = {
    "to_execute": frozenset({"in_progress", "done", "canceled"}),
    "in_progress": frozenset({"done", "canceled"}),
    "done": frozenset(),
    "canceled": frozenset(),
}
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 200


def transition_allowed(old: str, new: str) -> bool:
    return old == new or new in ALLOWED[old]


class OmsOrder:
    __slots__ = (
        "code", "ext_code", "order_type_code", "state", "user_id", "data",
        "created_us", "updated_us", "created_at", "updated_at",
    )

    def __init__(self, code: str, fields: dict[str, Any], now: int) -> None:
        self.code = code
        self.ext_code: str = fields["ext_code"]
        self.order_type_code: str = fields["order_type_code"]
        self.state: str = fields["state"]
        self.user_id: int = fields["user_id"]
        self.data: dict[str, Any] = dict(fields.get("data") or {})
        self.created_us = now
        self.created_at = format_millis(now)
        self.touch(now)

    def touch(self, now: int) -> None:
        """Set ``updated_at``; the string is formatted once here, not on every read."""
        self.updated_us = now
        self.updated_at = format_millis(now)

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "ext_code": self.ext_code,
            "order_type_code": self.order_type_code,
            "state": self.state,
            "user_id": self.user_id,
            "data": self.data,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _check_create(fields: dict[str, Any]) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for name in ("ext_code", "order_type_code"):
        value = fields.get(name)
        if value is None or value == "":
            errors[name] = ["can't be blank"]
        elif not isinstance(value, str):
            errors[name] = ["is invalid"]
    state = fields.get("state")
    if state is None or state == "":
        errors["state"] = ["can't be blank"]
    elif state not in STATES:
        errors["state"] = ["is not included in the list"]
    user_id = fields.get("user_id")
    if user_id is None:
        errors["user_id"] = ["can't be blank"]
    elif not is_int(user_id):
        errors["user_id"] = ["is not a number"]
    if fields.get("data") is not None and not isinstance(fields["data"], dict):
        errors["data"] = ["is invalid"]
    return errors


def _int_param(raw: str | None, default: int) -> int:
    try:
        value = int(raw) if raw else default
    except ValueError:
        return default
    return value if value >= 1 else default


class OmsState(SystemState):
    """Orders of the HMS-OMS sandbox, indexed by ``(updated_at, code)`` overall and per
    order type, and by ``(ext_code, order_type_code)`` for uniqueness."""

    name = "hms-oms"

    def __init__(
        self, api_key: str, webhooks: WebhookSender | None = None, faults: Faults | None = None
    ) -> None:
        super().__init__(webhooks or WebhookSender("hms-oms"), faults)
        self.api_key = api_key
        self._expected_auth = f'Token token="{api_key}"'.encode()
        self.orders: dict[str, OmsOrder] = {}
        self.index = SortedIndex()
        self.by_type: dict[str, SortedIndex] = {}
        self.by_ext: dict[tuple[str, str], str] = {}
        self.by_ext_code: dict[str, set[str]] = {}
        self.next_number = 1

    # -- system hooks ----------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").strip().encode()
        return hmac.compare_digest(given, self._expected_auth)

    def error(self, status: int, message: str) -> JSONResponse:
        text = {
            401: "Unauthorized",
            404: "Not found",
            429: "Too Many Requests",
        }.get(status, "Internal Server Error" if status >= 500 else message or "Bad Request")
        return JSONResponse({"error": text}, status_code=status)

    def clear_orders(self) -> None:
        self.orders.clear()
        self.index.clear()
        self.by_type.clear()
        self.by_ext.clear()
        self.by_ext_code.clear()
        self.next_number = 1

    # -- operations (synchronous: no await between read and write) --------------------------

    def get(self, code: str) -> OmsOrder:
        order = self.orders.get(code)
        if order is None:
            raise NotFound(code)
        return order

    def validate_new(self, fields: dict[str, Any], taken: set[tuple[str, str]]) -> None:
        errors = _check_create(fields)
        if "ext_code" not in errors and "order_type_code" not in errors:
            key = (fields["ext_code"], fields["order_type_code"])
            if key in self.by_ext or key in taken:
                errors["ext_code"] = ["has already been taken"]
        if errors:
            raise Invalid(errors)

    def create(self, fields: dict[str, Any], *, notify: bool = True) -> OmsOrder:
        self.validate_new(fields, set())
        return self._insert(fields, notify=notify)

    def _insert(self, fields: dict[str, Any], *, notify: bool) -> OmsOrder:
        now = self._now()
        code = f"ORD-{self.next_number:06d}"
        self.next_number += 1
        order = OmsOrder(code, fields, now)
        self.orders[code] = order
        self.index.add(now, code)
        self.by_type.setdefault(order.order_type_code, SortedIndex()).add(now, code)
        self.by_ext[(order.ext_code, order.order_type_code)] = code
        self.by_ext_code.setdefault(order.ext_code, set()).add(code)
        if notify:
            event = "order.fulfilled" if order.state == "done" else "order.status_changed"
            self.webhooks.emit(code, event, order.to_json(), format_millis(now))
        return order

    def seed(self, batch: list[Any]) -> list[str]:
        """Create all orders of ``batch`` without webhooks, or none if any is invalid."""
        taken: set[tuple[str, str]] = set()
        errors: dict[str, list[str]] = {}
        for i, fields in enumerate(batch):
            try:
                if not isinstance(fields, dict):
                    raise Invalid({"order": ["is invalid"]})
                self.validate_new(fields, taken)
            except Invalid as exc:
                errors.update({f"orders[{i}].{k}": v for k, v in exc.errors.items()})
                continue
            taken.add((fields["ext_code"], fields["order_type_code"]))
        if errors:
            raise Invalid(errors)
        return [self._insert(fields, notify=False).code for fields in batch]

    def update(self, code: str, fields: dict[str, Any]) -> OmsOrder:
        order = self.get(code)
        errors: dict[str, list[str]] = {}
        if "state" in fields:
            new = fields["state"]
            if new not in STATES:
                errors["state"] = ["is not included in the list"]
            elif not transition_allowed(order.state, new):
                errors["state"] = [f"cannot transition from {order.state} to {new}"]
        if "user_id" in fields and not is_int(fields["user_id"]):
            errors["user_id"] = ["is not a number"]
        if "data" in fields and not isinstance(fields["data"], dict):
            errors["data"] = ["is invalid"]
        if errors:
            raise Invalid(errors)
        old_state = order.state
        changed = False
        if "state" in fields and fields["state"] != order.state:
            order.state, changed = fields["state"], True
        if "user_id" in fields and fields["user_id"] != order.user_id:
            order.user_id, changed = fields["user_id"], True
        for key, value in (fields.get("data") or {}).items():
            if key not in order.data or order.data[key] != value:
                order.data[key], changed = value, True
        if not changed:
            return order
        now = self._now()
        self.index.move(order.updated_us, now, code)
        self.by_type[order.order_type_code].move(order.updated_us, now, code)
        order.touch(now)
        fulfilled = order.state == "done" and old_state != "done"
        event = "order.fulfilled" if fulfilled else "order.status_changed"
        self.webhooks.emit(code, event, order.to_json(), format_millis(now))
        return order

    def page(
        self,
        since_us: int | None,
        ext_code: str | None,
        order_type: str | None,
        page: int,
        per_page: int,
    ) -> tuple[list[OmsOrder], int]:
        """One page over the ordering as it is now; returns the orders and the total count."""
        if ext_code is not None:
            if order_type is not None:
                code = self.by_ext.get((ext_code, order_type))
                codes: set[str] | list[str] = [code] if code else []
            else:
                codes = self.by_ext_code.get(ext_code, set())
            rows = sorted((self.orders[c].updated_us, c) for c in codes)
            if since_us is not None:
                rows = [row for row in rows if row[0] >= since_us]
            start, total = 0, len(rows)
        else:
            index = self.index if order_type is None else self.by_type.get(order_type)
            if index is None:
                return [], 0
            rows = index.rows
            start = 0 if since_us is None else index.first_at_or_after(since_us)
            total = len(rows) - start
        offset = start + (page - 1) * per_page
        chunk = rows[offset : min(offset + per_page, start + total)]
        return [self.orders[code] for _, code in chunk], total

    def _now(self) -> int:
        now = self.clock.now_us()
        return now - now % 1000


def _invalid(errors: dict[str, list[str]]) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=422)


async def _order_param(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("order"), dict):
        raise BadRequest("param is missing or the value is empty: order")
    return body["order"]


def _routes(state: OmsState) -> tuple[list[BaseRoute], list[BaseRoute]]:
    async def list_orders(request: Request) -> Response:
        query = request.query_params
        since: int | None = None
        if query.get("updated_since"):
            try:
                since = parse_iso(query["updated_since"])
            except ValueError:
                return _invalid({"updated_since": ["is invalid"]})
        page = _int_param(query.get("page"), 1)
        per_page = min(_int_param(query.get("per_page"), DEFAULT_PER_PAGE), MAX_PER_PAGE)
        orders, total = state.page(
            since, query.get("ext_code"), query.get("order_type_code"), page, per_page
        )
        total_pages = -(-total // per_page)
        out_of_range = page > total_pages
        return JSONResponse(
            {
                "orders": [order.to_json() for order in orders],
                "meta": {
                    "current_page": page,
                    "next_page": page + 1 if page < total_pages else None,
                    "prev_page": page - 1 if page > 1 and not out_of_range else None,
                    "total_pages": total_pages,
                    "total_count": total,
                },
            }
        )

    async def get_order(request: Request) -> Response:
        try:
            return JSONResponse({"order": state.get(request.path_params["code"]).to_json()})
        except NotFound:
            return state.error(404, "")

    async def create_order(request: Request) -> Response:
        fields = await _order_param(request)
        try:
            order = state.create(fields)
        except Invalid as exc:
            return _invalid(exc.errors)
        return JSONResponse({"order": order.to_json()}, status_code=201)

    async def update_order(request: Request) -> Response:
        fields = await _order_param(request)
        try:
            order = state.update(request.path_params["code"], fields)
        except NotFound:
            return state.error(404, "")
        except Invalid as exc:
            return _invalid(exc.errors)
        return JSONResponse({"order": order.to_json()})

    async def admin_list(request: Request) -> Response:
        orders = sorted(state.orders.values(), key=lambda o: (len(o.code), o.code))
        return JSONResponse({"orders": [order.to_json() for order in orders]})

    async def admin_seed(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("orders"), list):
            return JSONResponse({"error": 'expected {"orders": [...]}'}, status_code=400)
        try:
            codes = state.seed(body["orders"])
        except Invalid as exc:
            return _invalid(exc.errors)
        return JSONResponse({"codes": codes}, status_code=201)

    contract: list[BaseRoute] = [
        Route("/api/v1/orders", guarded(state, "list", list_orders), methods=["GET"]),
        Route("/api/v1/orders", guarded(state, "create", create_order, write=True),
              methods=["POST"]),
        Route("/api/v1/orders/{code}", guarded(state, "get", get_order), methods=["GET"]),
        Route("/api/v1/orders/{code}", guarded(state, "update", update_order, write=True),
              methods=["PATCH", "PUT"]),
    ]
    admin: list[BaseRoute] = [
        Route("/_sandbox/orders", admin_list, methods=["GET"]),
        Route("/_sandbox/orders", create_order, methods=["POST"]),
        Route("/_sandbox/orders/{code}", get_order, methods=["GET"]),
        Route("/_sandbox/orders/{code}", update_order, methods=["PATCH"]),
        Route("/_sandbox/seed", admin_seed, methods=["POST"]),
    ]
    return contract, admin


def create_oms_app(state: OmsState) -> Starlette:
    """The HMS-OMS sandbox app over ``state`` (contract routes plus ``/_sandbox/``)."""
    contract, admin = _routes(state)
    return build_app(state, contract + admin)
