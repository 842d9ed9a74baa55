"""`hms-sync demo`: the sandbox and the daemon together, playing the seed's flows live.

The daemon runs as a real `hms-sync run` subprocess, exactly as an operator would start it,
pointed at the sandbox through the environment; the sandbox sends its webhooks to it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .sandbox.server import Sandbox, SandboxConfig

STEP_TIMEOUT = 30.0
TIMING_KEYS = ("linked", "started", "done", "changed")


@dataclass
class Row:
    api_id: int
    title: str
    api_status: str = "pending"
    oms_code: str | None = None
    oms_state: str = "-"
    timings: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


class Demo:
    def __init__(self, console: Console, sandbox: Sandbox, orders: int) -> None:
        self.console = console
        self.sb = sandbox
        self.n = orders
        self.rows: list[Row] = []
        self.steps: list[tuple[str, float | None]] = []

    def refresh(self) -> None:
        for row in self.rows:
            api = self.sb.get_api_order(row.api_id)
            row.api_status = api["status"]
            row.oms_code = api["oms_order_code"]
            if row.oms_code:
                row.oms_state = self.sb.get_oms_order(row.oms_code)["state"]

    def render(self) -> Group:
        table = Table(title="hms-sync demo: HMS-API <-> HMS-OMS (timings in ms)",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("API", "status", "OMS", "state"):
            table.add_column(col, no_wrap=True)
        for key in TIMING_KEYS:
            table.add_column(key, justify="right", no_wrap=True)
        for row in self.rows:
            timings = [f"{row.timings[k] * 1000:.0f}" if k in row.timings else "" for k in
                       TIMING_KEYS]
            table.add_row(str(row.api_id), row.api_status, row.oms_code or "-",
                          row.oms_state, *timings)
        lines = [Text(f"{'ok ' if t is not None else '.. '} {name}"
                      + (f"  ({t:.2f} s)" if t is not None else "")) for name, t in self.steps]
        return Group(table, *lines)

    def step(self, live: Live, name: str, key: str, act: Callable[[], None],
             done: Callable[[Row], bool], rows: list[Row] | None = None) -> bool:
        self.steps.append((name, None))
        started = time.monotonic()
        act()
        deadline = started + STEP_TIMEOUT
        while time.monotonic() < deadline:
            self.refresh()
            watched = self.rows if rows is None else rows
            for row in watched:
                if key not in row.timings and done(row):
                    row.timings[key] = time.monotonic() - started
            live.update(self.render())
            if all(key in r.timings for r in watched):
                self.steps[-1] = (name, time.monotonic() - started)
                live.update(self.render())
                return True
            time.sleep(0.02)
        return False

    def play(self) -> bool:
        with Live(self.render(), console=self.console, refresh_per_second=10,
                  transient=False) as live:
            def place() -> None:
                for i in range(self.n):
                    title = f"Ward {i + 1} linen"
                    order = self.sb.create_api_order(
                        title, 1, [{"sku": f"LN-{100 + i}", "name": "Sheet", "quantity": 4,
                                    "unit_price": "12.50"}])
                    self.rows.append(Row(order["id"], title))

            flows: list[tuple[str, str, Callable[[], None], Callable[[Row], bool]]] = [
                ("1-2. orders placed in HMS-API appear in HMS-OMS; code written back",
                 "linked", place, lambda r: bool(r.oms_code) and r.oms_state == "to_execute"),
                ("3-4. HMS-OMS starts them; HMS-API shows processing", "started",
                 lambda: self._oms_all("in_progress"), lambda r: r.api_status == "processing"),
                ("5-6. HMS-OMS finishes them; HMS-API shows completed", "done",
                 lambda: self._oms_all("done"), lambda r: r.api_status == "completed"),
            ]
            for name, key, act, done in flows:
                if not self.step(live, name, key, act, done):
                    return False
            # An API-side change reaching OMS.
            extra: list[Row] = []

            def api_change() -> None:
                order = self.sb.create_api_order("Theatre gowns", 2, [{"sku": "GW-1",
                                                 "quantity": 10}])
                extra.append(Row(order["id"], "Theatre gowns"))
                self.rows.append(extra[0])

            if not self.step(live, "a new order reaches HMS-OMS", "linked", api_change,
                             lambda r: bool(r.oms_code), rows=extra):
                return False
            return self.step(
                live, "an HMS-API status change (processing) reaches HMS-OMS", "changed",
                lambda: self._api_status(extra[0].api_id, "processing"),
                lambda r: r.oms_state == "in_progress", rows=extra,
            )

    def _api_status(self, api_id: int, status: str) -> None:
        self.sb.update_api_order(api_id, status=status)

    def _oms_all(self, state: str) -> None:
        for row in self.rows:
            if row.oms_code:
                self.sb.update_oms_order(row.oms_code, state=state)


def run_demo(console: Console, *, orders: int = 5, keep_running: bool = False) -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = SandboxConfig(api_webhook_url=f"{base}/webhooks/hms-api",
                        oms_webhook_url=f"{base}/webhooks/oms")
    workdir = tempfile.mkdtemp(prefix="hms-sync-demo-")
    with Sandbox(cfg) as sb:
        env = {**os.environ, **sb.env(), "HMS_SYNC_DB": os.path.join(workdir, "demo.db"),
               "HMS_SYNC_PORT": str(port), "HMS_SYNC_HOST": "127.0.0.1",
               "HMS_SYNC_POLL_INTERVAL": "5", "HMS_SYNC_LOG_LEVEL": "WARNING"}
        env.pop("HMS_SYNC_CONFIG", None)
        console.print(f"sandbox: HMS-API {sb.api_url}  HMS-OMS {sb.oms_url}")
        console.print(f"daemon:  hms-sync run on {base} (store {env['HMS_SYNC_DB']})")
        log_path = os.path.join(workdir, "daemon.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "hms_sync", "run"], env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        try:
            if not _wait_healthy(f"{base}/healthz", proc, time.monotonic() + 30):
                console.print(f"[red]the daemon did not become healthy; see {log_path}[/red]")
                return 1
            demo = Demo(console, sb, orders)
            ok = demo.play()
            _summary(console, demo, sb, ok)
            if keep_running and ok:
                console.print("\nStill running. Try, in another shell:")
                for k, v in {**sb.env(), "HMS_SYNC_DB": env["HMS_SYNC_DB"]}.items():
                    console.print(f"  export {k}={v}")
                console.print("  hms-sync status\nCtrl-C to stop.")
                try:
                    proc.wait()
                except KeyboardInterrupt:
                    pass
            return 0 if ok else 1
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _summary(console: Console, demo: Demo, sb: Sandbox, ok: bool) -> None:
    console.print()
    table = Table(title="summary")
    table.add_column("flow")
    table.add_column("took", justify="right")
    for name, took in demo.steps:
        table.add_row(name, f"{took:.2f} s" if took is not None else "[red]timed out[/red]")
    console.print(table)
    api: dict[str, Any] = sb.stats("api")["requests"]
    oms: dict[str, Any] = sb.stats("oms")["requests"]
    console.print(f"requests seen by HMS-API: {api}; by HMS-OMS: {oms}")
    console.print("[green]all flows completed[/green]" if ok else "[red]a flow did not complete "
                  f"within {STEP_TIMEOUT:.0f} s[/red]")
