"""Client for HMS-OMS (contract section 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import BadResponse
from ..models import OmsOrder, iso
from .base import HttpOptions, JsonClient, expect

MAX_PER_PAGE = 200  # HMS-OMS silently caps per_page here


class OmsClient(JsonClient[OmsOrder]):
    system = "HMS-OMS"
    model = OmsOrder
    envelope = "order"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        options: HttpOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            base_url,
            {"Authorization": f'Token token="{api_key}"'},
            secret=api_key,
            options=options,
            transport=transport,
            **kw,
        )



    @staticmethod
    def _path(code: str) -> str:
        return f"/api/v1/orders/{quote(code, safe='')}"

    async def get_order(self, code: str) -> OmsOrder:
        path = self._path(code)
        return self._order(await self.request("GET", path), "GET", path, {"code": code})

    async def create_order(self, order: dict[str, Any]) -> OmsOrder:
        path = "/api/v1/orders"
        doc = await self.request("POST", path, json_body={"order": order})
        same: dict[str, Any] = {
            k: order[k] for k in ("ext_code", "order_type_code") if k in order
        }
        return self._order(doc, "POST", path, same)

    async def update_order(self, code: str, patch: dict[str, Any]) -> OmsOrder:
        path = self._path(code)
        # Not retried here: by the time a retry went out, someone may have changed the
        # order, and re-sending what we decided earlier would undo their change. The
        # engine retries the whole reconcile instead, which reads both sides afresh.
        doc = await self.request("PATCH", path, json_body={"order": patch}, retry=False)
        return self._order(doc, "PATCH", path, {"code": code})

    async def list_page(
        self,
        *,
        updated_since: datetime | None = None,
        ext_code: str | None = None,
        order_type_code: str | None = None,
        page: int = 1,
        per_page: int = MAX_PER_PAGE,
    ) -> tuple[list[OmsOrder], int | None]:
        path = "/api/v1/orders"
        params = {
            "updated_since": iso(updated_since) if updated_since else None,
            "ext_code": ext_code,
            "order_type_code": order_type_code,
            "page": page,
            "per_page": per_page,
        }
        doc = await self.request("GET", path, params=params)
        ctx: dict[str, Any] = {"system": self.system, "method": "GET", "path": path}
        rows = expect(doc, "orders", list, ctx)
        meta = expect(doc, "meta", dict, ctx)
        next_page = meta.get("next_page")
        if next_page is not None and not isinstance(next_page, int):
            raise BadResponse("meta.next_page is not an integer", **ctx)
        return [self._parse(r, "GET", path) for r in rows], next_page

    async def find_by_ext_code(self, ext_code: str, order_type_code: str) -> list[OmsOrder]:
        """Every order of this type with this ext_code (the contract allows at most one)."""
        found: list[OmsOrder] = []
        page: int | None = 1
        while page is not None:
            rows, page = await self.list_page(
                ext_code=ext_code, order_type_code=order_type_code, page=page
            )
            found.extend(o for o in rows if o.ext_code == ext_code)
        return found

    async def iter_pages(
        self,
        *,
        updated_since: datetime | None = None,
        order_type_code: str | None = None,
        per_page: int = MAX_PER_PAGE,
    ) -> AsyncIterator[list[OmsOrder]]:
        """Walk every order updated at or after `updated_since`, a page at a time.

        Page numbers drift while orders change (an updated order moves to the end and the
        rest shift forward, so page 2 can skip one). Instead of turning pages we seek: ask
        for page 1 again with `updated_since` set to the last timestamp seen, dropping the
        rows at that timestamp we already gave. Only when a whole page shares one timestamp
        do we step to the next page number within it; since that stepping can drift too,
        such a group is walked again from its first page until a pass finds nothing new.
        """
        since = updated_since
        page = 1
        given: set[tuple[str, datetime]] = set()  # (code, updated_at) yielded since `since`
        stepped = new_in_group = False
        previous: list[tuple[str, datetime]] = []
        while True:
            rows, next_page = await self.list_page(
                updated_since=since, order_type_code=order_type_code, page=page,
                per_page=per_page,
            )
            current = [(o.code, o.updated_at) for o in rows]
            if page > 1 and current and current == previous:
                # A server that ignores `page` would have us walk forever.
                raise BadResponse(
                    f"page {page} repeats page {page - 1}; the listing ignores page numbers",
                    system=self.system, method="GET", path="/api/v1/orders",
                )
            previous = current
            fresh = [o for o in rows if (o.code, o.updated_at) not in given]
            if fresh:
                given.update((o.code, o.updated_at) for o in fresh)
                new_in_group = new_in_group or any(o.updated_at == since for o in fresh)
                yield fresh
            last = rows[-1].updated_at if rows else None
            if next_page is not None and last is not None and last == since:
                page, stepped = page + 1, True  # a whole page at one timestamp
                continue
            if stepped and new_in_group:
                page, new_in_group = 1, False  # walk the group again: did anything shift?
                continue
            if next_page is None or last is None:
                return
            since, page, stepped, new_in_group = last, 1, False, False
            given = {(o.code, o.updated_at) for o in rows if o.updated_at == last}

    async def ping(self) -> None:
        await self.list_page(per_page=1)
