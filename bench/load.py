"""Bare httpx load generators, each run in its own process by the benchmarks.

``python -m bench.load limit ...``   the *limit* of a backfill: exactly the requests a
                                      backfill needs, nothing else (no store, no models).
``python -m bench.load ceiling ...`` the sandbox's own ceiling: a tight loop of GETs, then
                                      of PATCHes, at the given concurrency.

Each prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import httpx


def _clients(args: argparse.Namespace) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(30.0)
    api = httpx.AsyncClient(base_url=args.api, limits=limits, timeout=timeout,
                            headers={"Authorization": f"Bearer {args.token}",
                                     "Accept": "application/json"})
    oms = httpx.AsyncClient(base_url=args.oms, limits=limits, timeout=timeout,
                            headers={"Authorization": f'Token token="{args.key}"',
                                     "Accept": "application/json"})
    return api, oms


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 300:
        raise RuntimeError(f"{response.request.method} {response.request.url} answered "
                           f"{response.status_code}: {response.text[:200]}")
    return response.json()


async def limit(args: argparse.Namespace) -> dict[str, Any]:
    """List pages of 500, one OMS list page, then per order: OMS create + API write-back."""
    api, oms = _clients(args)
    counts = {"api_list": 0, "oms_list": 0, "oms_create": 0, "api_update": 0}
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(args.concurrency * 4)
    done: set[int] = set()
    started = time.perf_counter()

    async def worker() -> None:
        while (order := await queue.get()) is not None:
            body = {"order": {
                "ext_code": str(order["id"]), "order_type_code": "api_order",
                "state": "to_execute", "user_id": order["user_id"],
                "data": {"title": order["title"], "items": order["items"]},
            }}
            created = _ok(await oms.post("/api/v1/orders", json=body))["order"]
            counts["oms_create"] += 1
            _ok(await api.patch(f"/api/orders/{order['id']}",
                                json={"oms_order_code": created["code"]}))
            counts["api_update"] += 1

    async with api, oms:
        _ok(await oms.get("/api/v1/orders",
                          params={"order_type_code": "api_order", "page": 1, "per_page": 200}))
        counts["oms_list"] += 1
        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"per_page": 500}
            if cursor:
                params["cursor"] = cursor
            doc = _ok(await api.get("/api/orders", params=params))
            counts["api_list"] += 1
            rows = doc["data"]
            # Our own write-backs move orders behind the cursor: stop when we meet one again.
            fresh = [o for o in rows if o["id"] not in done]
            for order in fresh:
                done.add(order["id"])
                await queue.put(order)
            cursor = doc["next_cursor"]
            if not cursor or len(fresh) < len(rows):
                break
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    seconds = time.perf_counter() - started
    return {"orders": len(done), "seconds": seconds, "requests": counts}


async def ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s of API GETs by id, then API PATCHes (status toggled, a real write)."""
    api, _oms = _clients(args)
    await _oms.aclose()
    out: dict[str, Any] = {}
    async with api:
        for phase in ("get", "patch"):
            n = 0
            stop = time.perf_counter() + args.seconds

            async def loop(w: int, phase: str = phase, stop: float = stop) -> None:
                nonlocal n
                i = w
                while time.perf_counter() < stop:
                    order_id = 1 + i % args.orders
                    if phase == "get":
                        _ok(await api.get(f"/api/orders/{order_id}"))
                    else:
                        status = "processing" if (i // args.orders) % 2 == 0 else "pending"
                        _ok(await api.patch(f"/api/orders/{order_id}", json={"status": status}))
                    n += 1
                    i += args.concurrency

            started = time.perf_counter()
            await asyncio.gather(*(loop(w) for w in range(args.concurrency)))
            out[phase] = n / (time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load")
    p.add_argument("mode", choices=("limit", "ceiling"))
    p.add_argument("--api", required=True)
    p.add_argument("--oms", required=True)
    p.add_argument("--token", default="sandbox-api-token")
    p.add_argument("--key", default="sandbox-oms-key")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="ceiling: per phase")
    p.add_argument("--orders", type=int, default=1000, help="ceiling: seeded API orders")
    args = p.parse_args(argv)
    result = asyncio.run(limit(args) if args.mode == "limit" else ceiling(args))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
