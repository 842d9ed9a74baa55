"""Processes and measurements shared by the benchmarks.

Everything measured runs in its own process: the sandbox (``python -m hms_sync.sandbox``),
hms-sync (``hms-sync sync-all`` / ``hms-sync run``) and the bare load scripts
(``python -m bench.load``). This module starts them, waits for them and reads their cost
from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
API_TOKEN = "sandbox-api-token"
OMS_KEY = "sandbox-oms-key"
API_SECRET = "sandbox-api-webhook-secret"
OMS_SECRET = "sandbox-oms-webhook-secret"


def log(msg: str) -> None:
    """Progress on stderr (figures go to stdout and BENCHMARKS.md)."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def hms_sync_cmd() -> list[str]:
    """The installed console script (what operators run), else ``python -m hms_sync``."""
    script = Path(sys.executable).with_name("hms-sync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hms_sync"]


# -- /proc --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a live process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=5).stdout.strip() or "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- the sandbox process --------------------------------------------------------------------


class SandboxProc:
    """``python -m hms_sync.sandbox`` on free ports, plus the admin calls the benchmarks use."""

    def __init__(self, workdir: Path, *, webhook_base: str | None = None) -> None:
        self.workdir = workdir
        self.webhook_base = webhook_base
        self.proc: subprocess.Popen[str] | None = None
        self.api_url = self.oms_url = ""
        self.http = httpx.Client(timeout=120.0)

    def start(self) -> SandboxProc:
        api_port, oms_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "hms_sync.sandbox", "--api-port", str(api_port),
               "--oms-port", str(oms_port)]
        if self.webhook_base:
            cmd += ["--api-webhook-url", f"{self.webhook_base}/webhooks/hms-api",
                    "--oms-webhook-url", f"{self.webhook_base}/webhooks/oms"]
        errlog = open(self.workdir / "sandbox.log", "ab")  # noqa: SIM115 - child's lifetime
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errlog, cwd=ROOT)
        errlog.close()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.oms_url = f"http://127.0.0.1:{oms_port}"
        wait_until(self._up, 20, "the sandbox")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"sandbox exited with {self.proc.returncode}; see "
                               f"{self.workdir / 'sandbox.log'}")
        try:
            return all(self.http.get(f"{u}/_sandbox/stats", timeout=1).status_code == 200
                       for u in (self.api_url, self.oms_url))
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.http.close()

    def __enter__(self) -> SandboxProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        return {
            "HMS_API_URL": self.api_url, "HMS_API_TOKEN": API_TOKEN,
            "HMS_API_WEBHOOK_SECRET": API_SECRET,
            "OMS_API_URL": self.oms_url, "OMS_API_KEY": OMS_KEY,
            "OMS_ORDER_TYPE_CODE": "api_order", "OMS_WEBHOOK_SECRET": OMS_SECRET,
        }

    def admin(self, system: str, method: str, path: str, body: Any = None) -> Any:
        base = self.api_url if system == "api" else self.oms_url
        r = self.http.request(method, f"{base}/_sandbox/{path}", json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"sandbox admin {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def seed_api(self, count: int) -> None:
        self.admin("api", "POST", "seed", {"count": count})

    def stats(self, system: str) -> dict[str, Any]:
        return self.admin(system, "GET", "stats")

    def reset_stats(self) -> None:
        for system in ("api", "oms"):
            self.admin(system, "POST", "stats/reset")

    def webhooks(self, base: str | None) -> None:
        self.admin("api", "POST", "webhooks",
                   {"url": f"{base}/webhooks/hms-api" if base else None})
        self.admin("oms", "POST", "webhooks", {"url": f"{base}/webhooks/oms" if base else None})


def hms_env(sandbox: SandboxProc, db: Path, **extra: str) -> dict[str, str]:
    """A clean environment for hms-sync: the sandbox's variables and our own store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMS_", "OMS_"))}
    env.update(sandbox.env())
    env["HMS_SYNC_DB"] = str(db)
    env.update(extra)
    return env


# -- measured child processes ---------------------------------------------------------------


@dataclass
class Run:
    """How a child process went: exit code, wall and CPU seconds, peak RSS, its output."""

    code: int
    wall: float
    cpu: float
    max_rss_mb: float
    stdout: str
    stderr: str
    sandbox_cpu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_measured(cmd: list[str], env: dict[str, str] | None = None, *, timeout: float = 900,
                 sandbox: SandboxProc | None = None) -> Run:
    """Run ``cmd`` to completion; its rusage comes from wait4, so it is this child's only."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sb0 = sandbox.cpu() if sandbox else 0.0
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + timeout
        hwm = 0.0
        while True:
            # Peak RSS from the child's own VmHWM while it runs. Not ru_maxrss: Linux
            # folds the parent's RSS at fork time into the child's ru_maxrss at exec.
            with contextlib.suppress(OSError, ValueError):
                hwm = max(hwm, vm_hwm_mb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - started
        sb_cpu = (sandbox.cpu() - sb0) if sandbox else 0.0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            code=proc.returncode, wall=wall, cpu=usage.ru_utime + usage.ru_stime,
            max_rss_mb=hwm, stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"), sandbox_cpu=sb_cpu,
        )


class Daemon:
    """``hms-sync run`` as a child process with its log in the work directory."""

    def __init__(self, env: dict[str, str], port: int, workdir: Path) -> None:
        self.env = {**env, "HMS_SYNC_HOST": "127.0.0.1", "HMS_SYNC_PORT": str(port)}
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        logf = open(self.log_path, "ab")  # noqa: SIM115 - child's lifetime
        self.proc = subprocess.Popen(hms_sync_cmd() + ["run"], env=self.env, stdout=logf,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        logf.close()
        wait_until(self._healthy, 30, "hms-sync run /healthz", 0.1)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"hms-sync run exited with {self.proc.returncode}; see "
                               f"{self.log_path}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hms-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def parse_json_tail(text: str) -> Any:
    """The JSON document a child printed (the last one if it printed more)."""
    import json

    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("py-spy>")).strip()
    try:
        return json.loads(text)
    except ValueError:
        match = re.search(r"\{.*\}\s*$", text, re.S)
        if not match:
            raise
        return json.loads(match.group(0))
