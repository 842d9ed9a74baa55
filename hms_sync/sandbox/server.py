"""Run both sandbox systems on loopback ports and drive them from Python.

>>> with Sandbox() as sb:                                    # doctest: +SKIP
...     order = sb.create_api_order("Ward 3 linen", 42, [{"sku": "LN-100"}])
...     env = sb.env()   # HMS_API_URL, HMS_API_TOKEN, ... for hms-sync

Both apps are served by uvicorn on one event loop in a background thread. The helper
methods talk to the ``/_sandbox/`` admin routes over HTTP, so they are thread-safe, are
never counted in ``stats`` and never hit injected faults; order writes made through them
still send webhooks (they stand for a customer or an OMS user).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import httpx
import uvicorn

from hms_sync.sandbox.api import ApiState, create_api_app
from hms_sync.sandbox.common import Faults
from hms_sync.sandbox.oms import OmsState, create_oms_app
from hms_sync.sandbox.webhooks import WebhookSender

from ..serving import QuietServer, bind_tcp

logger = logging.getLogger(__name__)

SYSTEMS = ("api", "oms")


@dataclass
class SandboxConfig:
    """Credentials, webhook targets, addresses and initial faults (applied to both)."""

    api_token: str = "sandbox-api-token"
    oms_api_key: str = "sandbox-oms-key"
    api_webhook_secret: str = "sandbox-api-webhook-secret"
    oms_webhook_secret: str = "sandbox-oms-webhook-secret"
    api_webhook_url: str | None = None
    oms_webhook_url: str | None = None
    host: str = "127.0.0.1"
    api_port: int = 0
    oms_port: int = 0
    faults: Faults = field(default_factory=Faults)
    oms_order_type_code: str = "api_order"
    webhook_max_attempts: int = 8
    startup_timeout: float = 10.0


class SandboxError(Exception):
    """An admin call was refused; ``status`` and ``body`` are the server's answer."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"sandbox answered {status}: {body}")
        self.status = status
        self.body = body




def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Sandbox:
    """Context manager running HMS-API and HMS-OMS sandboxes in a background thread."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.api_url = ""
        self.oms_url = ""
        self._servers: list[QuietServer] = []
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._http: httpx.Client | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Sandbox:
        cfg = self.config
        api = ApiState(
            cfg.api_token,
            WebhookSender("hms-api", url=cfg.api_webhook_url, secret=cfg.api_webhook_secret,
                          max_attempts=cfg.webhook_max_attempts),
            Faults(**vars(cfg.faults)),
        )
        oms = OmsState(
            cfg.oms_api_key,
            WebhookSender("hms-oms", url=cfg.oms_webhook_url, secret=cfg.oms_webhook_secret,
                          max_attempts=cfg.webhook_max_attempts),
            Faults(**vars(cfg.faults)),
        )
        sockets = [bind_tcp(cfg.host, cfg.api_port)]
        try:
            sockets.append(bind_tcp(cfg.host, cfg.oms_port))
        except OSError:
            sockets[0].close()
            raise
        self.api_url = _url(cfg.host, sockets[0].getsockname()[1])
        self.oms_url = _url(cfg.host, sockets[1].getsockname()[1])
        self._servers = [
            QuietServer(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                   ws="none", timeout_graceful_shutdown=2, backlog=2048))
            for app in (create_api_app(api), create_oms_app(oms))
        ]
        self._thread = threading.Thread(
            target=self._run, args=(sockets,), name="hms-sandbox", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + cfg.startup_timeout
        while not all(s.started for s in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sandbox did not start: {self._failure!r}")
            time.sleep(0.01)
        self._http = httpx.Client(timeout=10.0)
        logger.info("sandbox up: HMS-API %s, HMS-OMS %s", self.api_url, self.oms_url)
        return self

    def _run(self, sockets: list[socket.socket]) -> None:
        async def main() -> None:
            tasks = [
                asyncio.create_task(server.serve(sockets=[sock]))
                for server, sock in zip(self._servers, sockets, strict=True)
            ]
            for done in asyncio.as_completed(tasks):
                try:
                    await done
                except BaseException as exc:  # one failing stops both
                    self._failure = self._failure or exc
                for server in self._servers:
                    server.should_exit = True

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start() and alive
            self._failure = exc
            logger.exception("sandbox server thread failed")
        finally:
            for sock in sockets:
                sock.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("sandbox thread did not stop within %.1fs", timeout)
            self._thread = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The contract's section-5 variables that point hms-sync at this sandbox."""
        cfg = self.config
        return {
            "HMS_API_URL": self.api_url,
            "HMS_API_TOKEN": cfg.api_token,
            "HMS_API_WEBHOOK_SECRET": cfg.api_webhook_secret,
            "OMS_API_URL": self.oms_url,
            "OMS_API_KEY": cfg.oms_api_key,
            "OMS_ORDER_TYPE_CODE": cfg.oms_order_type_code,
            "OMS_WEBHOOK_SECRET": cfg.oms_webhook_secret,
        }

    # -- admin calls -------------------------------------------------------------------------

    def _base(self, system: str) -> str:
        if system not in SYSTEMS:
            raise ValueError(f"system must be 'api' or 'oms', not {system!r}")
        return self.api_url if system == "api" else self.oms_url

    def _call(self, system: str, method: str, path: str, body: Any = None) -> Any:
        if self._http is None:
            raise RuntimeError("sandbox is not running")
        response = self._http.request(method, self._base(system) + path, json=body)
        data = response.json() if response.content else None
        if response.status_code >= 400:
            raise SandboxError(response.status_code, data)
        return data

    def create_api_order(
        self, title: str, user_id: int, items: list[dict[str, Any]]
    ) -> dict[str, Any]:
        body = {"title": title, "user_id": user_id, "items": items}
        return self._call("api", "POST", "/_sandbox/orders", body)["data"]

    def update_api_order(self, order_id: int, **fields: Any) -> dict[str, Any]:
        """Change ``status``, ``oms_order_code``, ``title``, ``items`` or ``user_id``."""
        return self._call("api", "PATCH", f"/_sandbox/orders/{order_id}", fields)["data"]

    def get_api_order(self, order_id: int) -> dict[str, Any]:
        return self._call("api", "GET", f"/_sandbox/orders/{order_id}")["data"]

    def list_api_orders(self) -> list[dict[str, Any]]:
        """Every API order, by id."""
        return self._call("api", "GET", "/_sandbox/orders")["data"]

    def seed_api_orders(self, count: int, status: str = "pending", user_id: int = 1) -> list[int]:
        """Bulk-create orders without webhooks; returns ``[first_id, last_id]``."""
        body = {"count": count, "status": status, "user_id": user_id}
        return self._call("api", "POST", "/_sandbox/seed", body)["ids"]

    def create_oms_order(
        self, ext_code: str, *, order_type_code: str | None = None, state: str = "to_execute",
        user_id: int = 1, data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        order = {
            "ext_code": ext_code,
            "order_type_code": order_type_code or self.config.oms_order_type_code,
            "state": state,
            "user_id": user_id,
            "data": data or {},
        }
        return self._call("oms", "POST", "/_sandbox/orders", {"order": order})["order"]

    def update_oms_order(self, code: str, **fields: Any) -> dict[str, Any]:
        """Same state machine and data merge as the contract; raises SandboxError on 422."""
        return self._call("oms", "PATCH", f"/_sandbox/orders/{code}", {"order": fields})["order"]

    def get_oms_order(self, code: str) -> dict[str, Any]:
        return self._call("oms", "GET", f"/_sandbox/orders/{code}")["order"]

    def list_oms_orders(self) -> list[dict[str, Any]]:
        """Every OMS order, in creation order."""
        return self._call("oms", "GET", "/_sandbox/orders")["orders"]

    def seed_oms_orders(self, orders: list[dict[str, Any]]) -> list[str]:
        """Bulk-create OMS orders without webhooks (all or nothing); returns their codes."""
        return self._call("oms", "POST", "/_sandbox/seed", {"orders": orders})["codes"]

    def set_faults(self, system: str, **knobs: Any) -> dict[str, Any]:
        """Replace the faults of ``system`` ('api', 'oms' or 'both'); no knobs clears them."""
        if system == "both":
            self.set_faults("oms", **knobs)
            system = "api"
        return self._call(system, "POST", "/_sandbox/faults", knobs)

    def stats(self, system: str) -> dict[str, Any]:
        return self._call(system, "GET", "/_sandbox/stats")

    def reset_stats(self) -> None:
        for system in SYSTEMS:
            self._call(system, "POST", "/_sandbox/stats/reset")

    def reset(self) -> None:
        """Both systems: no orders, zero counters, no faults, real clock (webhook target kept)."""
        for system in SYSTEMS:
            self._call(system, "POST", "/_sandbox/reset")

    def freeze_clock(self, iso: str | None) -> None:
        """Freeze both clocks at ``iso`` (every write then shares it); ``None`` unfreezes."""
        for system in SYSTEMS:
            self._call(system, "POST", "/_sandbox/clock", {"frozen": iso})

    def configure_webhooks(
        self, system: str, url: str | None, secret: str | None = None, enabled: bool = True,
        max_attempts: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"url": url, "enabled": enabled}
        if secret is not None:
            body["secret"] = secret
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        return self._call(system, "POST", "/_sandbox/webhooks", body)

    def wait_webhooks_idle(self, timeout: float = 10.0) -> bool:
        """Wait until neither system has a delivery queued or retrying; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.stats(s)["webhooks"]["pending"] == 0 for s in SYSTEMS):
                return True
            time.sleep(0.02)
        return False


def describe(sandbox: Sandbox) -> str:
    """Human text for the terminal: both URLs and ``export`` lines for hms-sync."""
    lines = [
        f"HMS-API sandbox: {sandbox.api_url}",
        f"HMS-OMS sandbox: {sandbox.oms_url}",
        "",
        "# point hms-sync at it:",
    ]
    lines += [f"export {name}={value}" for name, value in sandbox.env().items()]
    return "\n".join(lines)


def run_foreground(cfg: SandboxConfig, announce: Callable[[Sandbox], None] | None = None) -> int:
    """Run the sandbox until SIGINT or SIGTERM; ``announce`` is called once it is up.

    Must be called from the main thread (it installs the signal handlers and restores the
    previous ones on return). Returns 0 on a clean stop, 1 if the servers died.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Sandbox(cfg) as sandbox:
            if announce is not None:
                announce(sandbox)
            while not stop.wait(0.5):
                if not sandbox.alive:
                    logger.error("sandbox servers stopped unexpectedly")
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
