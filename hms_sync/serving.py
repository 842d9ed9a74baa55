"""An embedded uvicorn server that leaves signal handling to its owner.

uvicorn >= 0.29 captures SIGINT/SIGTERM in `serve()` and re-raises them after shutdown; the
daemon and the sandbox each own shutdown themselves, so they use this instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn


class QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
