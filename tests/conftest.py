"""Shared fixtures: a clean environment, one sandbox per module, settings pointed at it,
a temp store, and helpers to run the async engine and to wait for a condition with a deadline.

The sandbox servers start once per module; the function-scoped `sb` fixture resets them (no
orders, zero counters, no faults, real clock, no webhook target) so every test starts from
nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import harness
import pytest

from hms_sync.config import SETTINGS, Settings, load_settings
from hms_sync.engine import Engine, Result
from hms_sync.errors import TransientError
from hms_sync.runtime import Runtime, runtime
from hms_sync.sandbox import Sandbox, SandboxConfig

T = TypeVar("T")

# Distinctive credentials, so a leak into any output is unmistakable.
API_TOKEN = "tok-S3CRET-5b1e9d77"
OMS_KEY = "key-S3CRET-0c4a2f11"
API_WEBHOOK_SECRET = "whapi-S3CRET-88aa01"
OMS_WEBHOOK_SECRET = "whoms-S3CRET-42cc90"
SECRETS = (API_TOKEN, OMS_KEY, API_WEBHOOK_SECRET, OMS_WEBHOOK_SECRET)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the developer's shell or from another test."""
    for setting in SETTINGS:
        if setting.env:
            monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.delenv("HMS_SYNC_CONFIG", raising=False)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """HMS-API and HMS-OMS on free loopback ports, started once per test module (no webhooks).

    Not once per session: its server thread would outlive the module and show up in other
    modules' tests (one that patches `asyncio.sleep` would record uvicorn's ticks)."""
    config = SandboxConfig(
        api_token=API_TOKEN,
        oms_api_key=OMS_KEY,
        api_webhook_secret=API_WEBHOOK_SECRET,
        oms_webhook_secret=OMS_WEBHOOK_SECRET,
    )
    with Sandbox(config) as sb:
        yield sb


@pytest.fixture
def sb(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The session sandbox, empty: no orders, zero counters, no faults, real clock."""
    for system in ("api", "oms"):
        sandbox.configure_webhooks(system, None)
    sandbox.reset()
    yield sandbox
    sandbox.freeze_clock(None)
    sandbox.set_faults("both")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hms-sync.db"


@pytest.fixture
def sb_env(sb: Sandbox, db_path: Path) -> dict[str, str]:
    """The environment an operator would export to point hms-sync at the sandbox."""
    return {**sb.env(), "HMS_SYNC_DB": str(db_path)}


@pytest.fixture
def settings_for(sb_env: dict[str, str]) -> Callable[..., Settings]:
    """`settings_for(**overrides)`: Settings for the sandbox and a temp store; overrides are
    field names, as command-line flags would give them (`conflict_policy="api"`)."""

    def make(**overrides: Any) -> Settings:
        return load_settings(env=sb_env, overrides=overrides)

    return make


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for()


@pytest.fixture
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client retries back off for milliseconds, not seconds, so fault tests stay fast.

    Only the waits shrink: the number of attempts and what is retried are unchanged.
    """
    import hms_sync.runtime as runtime_module

    original = runtime_module.http_options

    def fast(settings: Settings) -> Any:
        return dataclasses.replace(original(settings), backoff_initial=0.002, backoff_max=0.01)

    monkeypatch.setattr(runtime_module, "http_options", fast)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def run() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """`run(coro)`: run a coroutine to the end (no pytest-asyncio on purpose)."""
    return _run


@pytest.fixture
def in_runtime() -> Callable[..., Any]:
    """`in_runtime(settings, body)`: run `await body(rt)` inside `runtime(settings)`, where
    `rt.engine` and `rt.store` are ready; clients and store are closed afterwards."""

    def go(settings: Settings, body: Callable[[Runtime], Awaitable[T]]) -> T:
        async def main() -> T:
            async with runtime(settings) as rt:
                return await body(rt)

        return _run(main())

    return go


async def _drain(engine: Engine, *, passes: int = 10) -> list[Result]:
    results: list[Result] = []
    for _ in range(passes):
        items = engine.store.due(1000)
        if not items:
            break
        for item in items:
            try:
                results.append(await engine.reconcile(item.api_id))
            except TransientError as exc:
                engine.store.fail(item, str(exc), delay=0, max_attempts=1000)
            else:
                engine.store.complete(item)
    return results


@pytest.fixture
def drain() -> Callable[..., Awaitable[list[Result]]]:
    """`await drain(engine)`: what the daemon's worker does, in the foreground.

    Every due order is reconciled and completed. A transient failure leaves the item queued
    (due again at once); `passes` bounds the sweeps so a failing system cannot loop forever.
    """
    return _drain


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    """`wait_until(predicate, timeout=10, interval=0.02)`: poll a condition with a deadline
    and return its truthy value (never a bare sleep to wait for something)."""
    return harness.wait_until


@pytest.fixture
def sandbox_writes(sb: Sandbox) -> Callable[[], dict[str, int]]:
    """`sandbox_writes()`: contract write requests each system received since the reset."""

    def count() -> dict[str, int]:
        api, oms = sb.stats("api")["requests"], sb.stats("oms")["requests"]
        return {
            "api_update": api["update"],
            "oms_create": oms["create"],
            "oms_update": oms["update"],
        }

    return count
