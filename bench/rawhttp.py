"""A tiny keep-alive HTTP/1.1 client for bulk set-up calls (not measured).

The sandbox's admin routes take one order per PATCH; linking 100,000 orders through httpx
would cost the bench more CPU than the sandbox. Plain asyncio streams cost next to nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from bench.tee import _read_message


async def _worker(host: str, port: int, jobs: asyncio.Queue[tuple[str, str, bytes] | None],
                  failures: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (job := await jobs.get()) is not None:
            method, path, body = job
            writer.write(
                f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                .encode() + body
            )
            head, _, _ = await _read_message(reader)
            status = int(head.split(b" ", 2)[1])
            if status >= 400 and len(failures) < 10:
                failures.append(f"{method} {path}: {status}")
    finally:
        writer.close()


async def _many(base: str, calls: Iterable[tuple[str, str, Any]], connections: int) -> None:
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    jobs: asyncio.Queue[tuple[str, str, bytes] | None] = asyncio.Queue(connections * 8)
    failures: list[str] = []
    workers = [asyncio.create_task(_worker(host, port, jobs, failures))
               for _ in range(connections)]
    for method, path, body in calls:
        await jobs.put((method, path, json.dumps(body).encode()))
    for _ in workers:
        await jobs.put(None)
    await asyncio.gather(*workers)
    if failures:
        raise RuntimeError(f"bulk calls failed: {failures}")


def many(base: str, calls: Iterable[tuple[str, str, Any]], connections: int = 8) -> None:
    """Send ``(method, path, json_body)`` calls to ``base`` over a few keep-alive connections."""
    asyncio.run(_many(base, calls, connections))
