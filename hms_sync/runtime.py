"""Wiring: settings in, a ready engine out. The CLI and the daemon both start here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .clients.api import ApiClient
from .clients.base import HttpOptions
from .clients.oms import OmsClient
from .config import Settings
from .engine import Engine
from .mapping import Mapper
from .metrics import Metrics
from .store import Store


def mapper_for(settings: Settings) -> Mapper:
    return Mapper(
        status_map=settings.effective_status_map,
        user_map=settings.user_map,
        order_type_code=settings.oms_order_type_code,
    )


def http_options(settings: Settings) -> HttpOptions:
    return HttpOptions(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        deadline=settings.request_deadline,
        max_connections=max(16, settings.concurrency * 2),
    )


def open_store(settings: Settings) -> Store:
    return Store(settings.db)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    engine: Engine
    metrics: Metrics


@asynccontextmanager
async def runtime(
    settings: Settings, store: Store | None = None, *, lock_wait: float = 30.0
) -> AsyncIterator[Runtime]:
    """Clients, store and engine for `settings`; everything is closed on exit.

    `lock_wait`: how long a reconcile waits for an order another process is syncing (the
    CLI waits; the daemon passes 0 and retries the order later instead).
    """
    assert settings.hms_api_token is not None and settings.oms_api_key is not None
    own_store = store is None
    store = store or open_store(settings)
    metrics = Metrics()
    opts = http_options(settings)
    api = ApiClient(settings.hms_api_url, settings.hms_api_token.get_secret_value(), options=opts)
    oms = OmsClient(settings.oms_api_url, settings.oms_api_key.get_secret_value(), options=opts)
    engine = Engine(
        api, oms, store, mapper_for(settings), policy=settings.conflict_policy, metrics=metrics,
        lock_wait=lock_wait,
    )
    try:
        yield Runtime(settings, store, engine, metrics)
    finally:
        await api.aclose()
        await oms.aclose()
        if own_store:
            store.close()
