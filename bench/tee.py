"""A webhook tee: sits between the sandbox's webhook senders and hms-sync's receiver.

Each request is forwarded byte for byte to the daemon and the daemon's answer is relayed
back (so the sandbox still retries what hms-sync refuses). Before forwarding, the tee hands
the body and its arrival time to a callback: the propagation benchmark learns that a system
*holds* a value when that system's own webhook for the change arrives, without polling
the sandbox. Plain asyncio streams, HTTP/1.1 keep-alive, one upstream connection per
downstream one: it costs a fraction of a millisecond per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

OnBody = Callable[[str, bytes, float], None]


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes, dict[str, str]]:
    """One HTTP/1.1 message: (head, body, lower-cased headers). Raises IncompleteReadError."""
    head = await reader.readuntil(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            chunks.append(size_line + data)
            if size == 0:
                break
        body = b"".join(chunks)
    else:
        body = b""
    return head, body, headers


class Tee:
    def __init__(self, upstream_port: int, on_body: OnBody) -> None:
        self.upstream_port = upstream_port
        self.on_body = on_body
        self.port = 0
        self.forwarded = 0
        self.failed = 0
        self.statuses: dict[int, int] = {}
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> Tee:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head, body, headers = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                path = head.split(b" ", 2)[1].decode("latin-1")
                self.on_body(path, body, time.perf_counter())
                answer = None
                for _ in range(2):  # a kept-alive upstream connection may have been closed
                    try:
                        if up is None:
                            up = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                        up[1].write(head + body)
                        answer = await _read_message(up[0])
                        break
                    except (OSError, asyncio.IncompleteReadError):
                        if up is not None:
                            up[1].close()
                            up = None
                if answer is None:
                    self.failed += 1
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                rhead, rbody, rheaders = answer
                self.forwarded += 1
                status = int(rhead.split(b" ", 2)[1])
                self.statuses[status] = self.statuses.get(status, 0) + 1
                writer.write(rhead + rbody)
                await writer.drain()
                if "close" in (headers.get("connection", "").lower(),
                               rheaders.get("connection", "").lower()):
                    return
        finally:
            if up is not None:
                up[1].close()
            writer.close()
