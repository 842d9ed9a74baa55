"""Reference HMS-API and HMS-OMS servers (contract sections 1-3) for tests, demo, bench.

Start both with :class:`Sandbox` (a context manager) or ``python -m hms_sync.sandbox``.
"""

from __future__ import annotations

from hms_sync.sandbox.common import Faults
from hms_sync.sandbox.server import (
    Sandbox,
    SandboxConfig,
    SandboxError,
    describe,
    run_foreground,
)

__all__ = ["Faults", "Sandbox", "SandboxConfig", "SandboxError", "describe", "run_foreground"]
