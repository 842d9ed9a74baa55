"""Running the real daemon in tests: a `hms-sync run` subprocess on a free loopback port.

Used by the daemon, reliability and chaos tests. Everything waits on conditions with a
deadline; nothing sleeps on luck.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from hms_sync.sandbox.server import Sandbox, SandboxConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def sandbox_for_daemon(port: int, **config: Any) -> Sandbox:
    """A sandbox whose webhooks go to a daemon listening on `port`."""
    base = f"http://127.0.0.1:{port}"
    return Sandbox(SandboxConfig(
        api_webhook_url=f"{base}/webhooks/hms-api", oms_webhook_url=f"{base}/webhooks/oms",
        **config,
    ))


class DaemonProcess:
    """`hms-sync run` as a subprocess, its output kept in a log file."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_sandbox(
        cls, sb: Sandbox, tmp_path: Path, port: int, **env: str
    ) -> DaemonProcess:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("HMS_", "OMS_"))}
        full.update(sb.env())
        full.update({
            "HMS_SYNC_DB": str(tmp_path / "daemon.db"),
            "HMS_SYNC_HOST": "127.0.0.1",
            "HMS_SYNC_PORT": str(port),
            "HMS_SYNC_POLL_INTERVAL": "1",
            "HMS_SYNC_LOG_LEVEL": "INFO",
        })
        full.update(env)
        return cls(full, port, tmp_path / "daemon.log")

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hms_sync", "run"], env=self.env, stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            wait_until(self.healthy, timeout, 0.05, what="daemon /healthz")
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
