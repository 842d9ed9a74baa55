"""Client for HMS-API (contract section 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx

from ..errors import BadResponse
from ..models import ApiOrder, iso
from .base import HttpOptions, JsonClient, expect


class ApiClient(JsonClient[ApiOrder]):
    system = "HMS-API"
    model = ApiOrder
    envelope = "data"

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        options: HttpOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            base_url,
            {"Authorization": f"Bearer {token}"},
            secret=token,
            options=options,
            transport=transport,
            **kw,
        )



    async def get_order(self, order_id: int) -> ApiOrder:
        path = f"/api/orders/{int(order_id)}"
        return self._order(await self.request("GET", path), "GET", path, {"id": int(order_id)})

    async def update_order(
        self, order_id: int, *, status: str | None = None, oms_order_code: str | None = None
    ) -> ApiOrder:
        path = f"/api/orders/{int(order_id)}"
        body: dict[str, Any] = {}
        if status is not None:
            body["status"] = status
        if oms_order_code is not None:
            body["oms_order_code"] = oms_order_code
        # Not retried here: by the time a retry went out, someone may have changed the
        # order, and re-sending what we decided earlier would undo their change. The
        # engine retries the whole reconcile instead, which reads both sides afresh.
        doc = await self.request("PATCH", path, json_body=body, retry=False)
        return self._order(doc, "PATCH", path, {"id": int(order_id)})

    async def create_order(self, title: str, user_id: int, items: list[Any]) -> ApiOrder:
        """What a customer does; hms-sync itself never creates API orders."""
        path = "/api/orders"
        body = {"title": title, "user_id": user_id, "items": items}
        return self._order(await self.request("POST", path, json_body=body), "POST", path)

    async def list_page(
        self,
        *,
        updated_since: datetime | None = None,
        per_page: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[ApiOrder], str | None]:
        path = "/api/orders"
        params = {
            "updated_since": iso(updated_since) if updated_since else None,
            "per_page": per_page,
            "cursor": cursor,
        }
        doc = await self.request("GET", path, params=params)
        rows = expect(doc, "data", list, {"system": self.system, "method": "GET", "path": path})
        next_cursor = doc.get("next_cursor")
        if next_cursor is not None and not isinstance(next_cursor, str):
            raise BadResponse("next_cursor is not a string", system=self.system, path=path)
        return [self._parse(r, "GET", path) for r in rows], next_cursor

    async def iter_pages(
        self, *, updated_since: datetime | None = None, per_page: int = 100
    ) -> AsyncIterator[list[ApiOrder]]:
        """Walk every order updated at or after `updated_since`, a page at a time.

        Keyset pagination is stable while orders change: one updated during the walk moves
        behind the cursor's position and is still reached.
        """
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            rows, cursor = await self.list_page(
                updated_since=updated_since, per_page=per_page, cursor=cursor
            )
            if rows:
                yield rows
            if not cursor or not rows:
                return
            if cursor in seen:  # a keyset cursor never comes back: the walk would not end
                raise BadResponse("next_cursor repeats; the listing does not advance",
                                  system=self.system, method="GET", path="/api/orders")
            seen.add(cursor)

    async def ping(self) -> None:
        """One cheap authenticated call, for `hms-sync check`."""
        await self.list_page(per_page=1)
