"""Reference HMS-API (Laravel-like), contract section 1, as a Starlette app.

Decisions where the contract is silent:

- A write that changes nothing (same values) neither bumps ``updated_at`` nor sends a
  webhook: Laravel's ``save()`` skips clean models.
- ``PATCH`` also accepts ``title``, ``items`` and ``user_id`` (what a customer edits),
  validated like create; any other field is ignored. hms-sync only sends ``status`` and
  ``oms_order_code``.
- A cursor that cannot be decoded is a 422 on ``cursor`` (Laravel would silently restart
  at the first page, which makes a client loop forever). ``prev_cursor`` and
  ``prev_page_url`` are always null.
- A malformed JSON body is a 400 ``{"message": ...}``; a JSON body that is not an object
  counts as empty input.
"""

from __future__ import annotations

import base64
import hmac
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hms_sync.sandbox.common import (
    Faults,
    Invalid,
    NotFound,
    SortedIndex,
    format_micros,
    is_int,
    parse_iso,
    read_json,
)
from hms_sync.sandbox.system import SystemState, build_app, guarded
from hms_sync.sandbox.webhooks import WebhookSender

STATUSES = ("pending", "processing", "completed", "cancelled")
DEFAULT_PER_PAGE = 100
MAX_PER_PAGE = 500


class ApiOrder:
    __slots__ = (
        "id", "title", "user_id", "status", "items", "oms_order_code", "created_us", "updated_us",
        "created_at", "updated_at",
    )

    def __init__(self, order_id: int, title: str, user_id: int, items: list[Any], now: int):
        self.id = order_id
        self.title = title
        self.user_id = user_id
        self.status = "pending"
        self.items = items
        self.oms_order_code: str | None = None
        self.created_us = now
        self.created_at = format_micros(now)
        self.touch(now)

    def touch(self, now: int) -> None:
        """Set ``updated_at``; the string is formatted once here, not on every read."""
        self.updated_us = now
        self.updated_at = format_micros(now)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "user_id": self.user_id,
            "status": self.status,
            "items": self.items,
            "oms_order_code": self.oms_order_code,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _check_fields(body: dict[str, Any], names: tuple[str, ...]) -> dict[str, list[str]]:
    """Laravel-style validation of the editable fields present in ``body``."""
    errors: dict[str, list[str]] = {}
    if "title" in names:
        title = body.get("title")
        if title is None or title == "":
            errors["title"] = ["The title field is required."]
        elif not isinstance(title, str):
            errors["title"] = ["The title field must be a string."]
        elif len(title) > 255:
            errors["title"] = ["The title field must not be greater than 255 characters."]
    if "user_id" in names:
        user_id = body.get("user_id")
        if user_id is None:
            errors["user_id"] = ["The user id field is required."]
        elif not is_int(user_id):
            errors["user_id"] = ["The user id field must be an integer."]
    if "items" in names:
        items = body.get("items")
        if items is None or items == []:
            errors["items"] = ["The items field is required."]
        elif not isinstance(items, list):
            errors["items"] = ["The items field must be an array."]
        else:
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    errors[f"items.{i}"] = [f"The items.{i} field must be an array."]
    if "status" in names and body.get("status") not in STATUSES:
        errors["status"] = ["The selected status is invalid."]
    if "oms_order_code" in names:
        code = body.get("oms_order_code")
        if code is not None and not isinstance(code, str):
            errors["oms_order_code"] = ["The oms order code field must be a string."]
        elif code is not None and len(code) > 255:
            errors["oms_order_code"] = [
                "The oms order code field must not be greater than 255 characters."
            ]
    return errors


def encode_cursor(updated_us: int, order_id: int) -> str:
    raw = json.dumps({"updated_at": updated_us, "id": order_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        updated_us, order_id = data["updated_at"], data["id"]
    except (ValueError, TypeError, KeyError):
        raise ValueError("bad cursor") from None
    if not (is_int(updated_us) and is_int(order_id)):
        raise ValueError("bad cursor")
    return updated_us, order_id


class ApiState(SystemState):
    """Orders of the HMS-API sandbox, indexed by ``(updated_at, id)``."""

    name = "hms-api"
    EDITABLE = ("status", "oms_order_code", "title", "items", "user_id")

    def __init__(
        self, token: str, webhooks: WebhookSender | None = None, faults: Faults | None = None
    ) -> None:
        super().__init__(webhooks or WebhookSender("hms-api"), faults)
        self.token = token
        self.orders: dict[int, ApiOrder] = {}
        self.index = SortedIndex()
        self.next_id = 1

    # -- system hooks ----------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        )

    def error(self, status: int, message: str) -> JSONResponse:
        if status == 401:
            message = "Unauthenticated."
        elif status >= 500:
            message = "Server Error"
        return JSONResponse({"message": message or "Error"}, status_code=status)

    def clear_orders(self) -> None:
        self.orders.clear()
        self.index.clear()
        self.next_id = 1

    # -- operations (synchronous: no await between read and write) --------------------------

    def get(self, order_id: int) -> ApiOrder:
        order = self.orders.get(order_id)
        if order is None:
            raise NotFound(f"No query results for model [Order] {order_id}")
        return order

    def create(self, body: dict[str, Any], *, notify: bool = True) -> ApiOrder:
        errors = _check_fields(body, ("title", "user_id", "items"))
        if errors:
            raise Invalid(errors)
        now = self.clock.now_us()
        order = ApiOrder(self.next_id, body["title"], body["user_id"], body["items"], now)
        self.next_id += 1
        self.orders[order.id] = order
        self.index.add(now, order.id)
        if notify:
            self.webhooks.emit(order.id, "order.created", order.to_json(), format_micros(now))
        return order

    def update(self, order_id: int, body: dict[str, Any]) -> ApiOrder:
        order = self.get(order_id)
        present = tuple(name for name in self.EDITABLE if name in body)
        errors = _check_fields(body, present)
        if errors:
            raise Invalid(errors)
        changed = [name for name in present if getattr(order, name) != body[name]]
        if not changed:
            return order
        for name in changed:
            setattr(order, name, body[name])
        now = self.clock.now_us()
        self.index.move(order.updated_us, now, order.id)
        order.touch(now)
        self.webhooks.emit(order.id, "order.updated", order.to_json(), format_micros(now))
        return order

    def page(
        self, since_us: int | None, after: tuple[int, int] | None, per_page: int
    ) -> tuple[list[ApiOrder], str | None]:
        """One keyset page: rows with ``updated_at >= since`` strictly after the cursor."""
        start = 0 if since_us is None else self.index.first_at_or_after(since_us)
        if after is not None:
            start = max(start, self.index.first_after(*after))
        rows = self.index.rows[start : start + per_page + 1]
        more = len(rows) > per_page
        rows = rows[:per_page]
        next_cursor = encode_cursor(*rows[-1]) if more else None
        return [self.orders[key] for _, key in rows], next_cursor

    def seed(self, count: int, status: str, user_id: int) -> tuple[int, int]:
        """Bulk-create ``count`` orders without webhooks; returns the first and last ids."""
        first = self.next_id
        for _ in range(count):
            n = self.next_id
            items = [
                {"sku": f"SKU-{n % 1000:03d}-{i}", "name": f"Item {i + 1}",
                 "quantity": 1 + (n + i) % 5, "unit_price": "12.50"}
                for i in range(1 + n % 2)
            ]
            order = self.create({"title": f"Order {n}", "user_id": user_id, "items": items},
                                notify=False)
            order.status = status
        return first, self.next_id - 1


def _invalid(errors: dict[str, list[str]]) -> JSONResponse:
    messages = [m for ms in errors.values() for m in ms]
    message = messages[0]
    if len(messages) > 1:
        more = len(messages) - 1
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return JSONResponse({"message": message, "errors": errors}, status_code=422)


def _order_id(request: Request, state: ApiState) -> int:
    raw = request.path_params["order_id"]
    if not raw.isdigit():
        raise NotFound(f"No query results for model [Order] {raw}")
    return int(raw)


async def _object_body(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    return body if isinstance(body, dict) else {}


def _routes(state: ApiState) -> tuple[list[BaseRoute], list[BaseRoute]]:
    async def list_orders(request: Request) -> Response:
        query = request.query_params
        errors: dict[str, list[str]] = {}
        per_page = DEFAULT_PER_PAGE
        raw = query.get("per_page", "")
        if raw != "":
            try:
                per_page = int(raw)
            except ValueError:
                errors["per_page"] = ["The per page field must be an integer."]
            else:
                if not 1 <= per_page <= MAX_PER_PAGE:
                    errors["per_page"] = [
                        f"The per page field must be between 1 and {MAX_PER_PAGE}."
                    ]
        since: int | None = None
        raw = query.get("updated_since", "")
        if raw != "":
            try:
                since = parse_iso(raw)
            except ValueError:
                errors["updated_since"] = ["The updated since field must be a valid date."]
        after: tuple[int, int] | None = None
        raw = query.get("cursor", "")
        if raw != "":
            try:
                after = decode_cursor(raw)
            except ValueError:
                errors["cursor"] = ["The cursor is invalid."]
        if errors:
            return _invalid(errors)
        orders, next_cursor = state.page(since, after, per_page)
        return JSONResponse(
            {
                "data": [order.to_json() for order in orders],
                "path": str(request.url.replace(query="")),
                "per_page": per_page,
                "next_cursor": next_cursor,
                "next_page_url": (
                    str(request.url.include_query_params(cursor=next_cursor))
                    if next_cursor
                    else None
                ),
                "prev_cursor": None,
                "prev_page_url": None,
            }
        )

    async def get_order(request: Request) -> Response:
        try:
            return JSONResponse({"data": state.get(_order_id(request, state)).to_json()})
        except NotFound as exc:
            return state.error(404, str(exc))

    async def create_order(request: Request) -> Response:
        body = await _object_body(request)
        try:
            order = state.create(body)
        except Invalid as exc:
            return _invalid(exc.errors)
        return JSONResponse({"data": order.to_json()}, status_code=201)

    async def update_order(request: Request) -> Response:
        body = await _object_body(request)
        try:
            order = state.update(_order_id(request, state), body)
        except NotFound as exc:
            return state.error(404, str(exc))
        except Invalid as exc:
            return _invalid(exc.errors)
        return JSONResponse({"data": order.to_json()})

    async def admin_list(request: Request) -> Response:
        return JSONResponse({"data": [state.orders[k].to_json() for k in sorted(state.orders)]})

    async def admin_seed(request: Request) -> Response:
        body = await _object_body(request)
        count, status, user_id = body.get("count"), body.get("status", "pending"), body.get(
            "user_id", 1
        )
        if not is_int(count) or not 1 <= count <= 1_000_000:
            return JSONResponse({"error": "count must be 1..1000000"}, status_code=400)
        if status not in STATUSES or not is_int(user_id):
            return JSONResponse({"error": "bad status or user_id"}, status_code=400)
        first, last = state.seed(count, status, user_id)
        return JSONResponse({"ids": [first, last]}, status_code=201)

    contract: list[BaseRoute] = [
        Route("/api/orders", guarded(state, "list", list_orders), methods=["GET"]),
        Route("/api/orders", guarded(state, "create", create_order, write=True),
              methods=["POST"]),
        Route("/api/orders/{order_id}", guarded(state, "get", get_order), methods=["GET"]),
        Route("/api/orders/{order_id}", guarded(state, "update", update_order, write=True),
              methods=["PATCH", "PUT"]),
    ]
    admin: list[BaseRoute] = [
        Route("/_sandbox/orders", admin_list, methods=["GET"]),
        Route("/_sandbox/orders", create_order, methods=["POST"]),
        Route("/_sandbox/orders/{order_id}", get_order, methods=["GET"]),
        Route("/_sandbox/orders/{order_id}", update_order, methods=["PATCH"]),
        Route("/_sandbox/seed", admin_seed, methods=["POST"]),
    ]
    return contract, admin


def create_api_app(state: ApiState) -> Starlette:
    """The HMS-API sandbox app over ``state`` (contract routes plus ``/_sandbox/``)."""
    contract, admin = _routes(state)
    return build_app(state, contract + admin)
