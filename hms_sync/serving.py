"""An embedded uvicorn server that leaves signal handling to its owner.

uvicorn >= 0.29 captures SIGINT/SIGTERM in `serve()` and re-raises them after shutdown; the
daemon and the sandbox each own shutdown themselves, so they use this instead.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound listening socket for uvicorn's `sockets=`; OSError if the port is taken.

    proto=IPPROTO_TCP so that asyncio sets TCP_NODELAY on accepted connections (without it
    every small answer waited 40 ms on Nagle's algorithm).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
