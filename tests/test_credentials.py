"""Credentials (issue 6, item 6): a 401 stops calls to that system with one clear error
naming it, never a retry storm; no token, key or secret ever appears in any output.

- `hms-sync run` with a wrong key or token exits 2 at start-up naming the system, after at
  most one rejected request;
- a credential that stops working while the daemon runs (rotated in the system) trips the
  client's breaker: the rejected calls stop, /healthz says which system refused us, the
  orders wait without spending their attempts, and the daemon still stops cleanly;
- `sync-all` and `import` with a wrong credential exit 1 with one line naming the system;
- every command (`sync-all`, `import`, `status`, `check`, `run`), with wrong credentials
  and with right ones against a failing sandbox, is grepped for every secret value (the
  right ones and the wrong ones): stdout, stderr, the daemon's DEBUG log, /healthz and
  /metrics (body and every label value).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SECRETS
from harness import DaemonProcess, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from hms_sync.sandbox import Sandbox, SandboxConfig

ROOT = Path(__file__).resolve().parent.parent
WRONG_TOKEN = "tok-WRONG-S3CRET-77d1e0"
WRONG_KEY = "key-WRONG-S3CRET-9e2b44"
ALL_SECRETS = (*SECRETS, WRONG_TOKEN, WRONG_KEY)
ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
# Calls and queue retries give up within a second, so failing runs stay short.
FAST_TOML = """
[http]
request_deadline = 0.5
read_timeout = 2.0
[sync]
backoff_initial = 0.05
backoff_max = 0.2
"""


def cli_env(sb: Sandbox, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMS_", "OMS_"))}
    env.update(sb.env())
    config = tmp_path / "fast.toml"
    config.write_text(FAST_TOML)
    env.update({
        "HMS_SYNC_DB": str(tmp_path / "hms-sync.db"),
        "HMS_SYNC_CONFIG": str(config),
        "HMS_SYNC_LOG_LEVEL": "DEBUG",
        "HMS_SYNC_WEBHOOKS": "false",
    })
    env.update(extra)
    return env


def hms_sync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hms_sync", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def many(env: dict[str, str], commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: hms_sync(env, *args), commands))


def assert_no_secret(where: str, text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text, f"{where} shows a secret ({secret[:8]}...):\n{text}"
    assert "S3CRET" not in text, f"{where} shows part of a secret:\n{text}"


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def rejected(sb: Sandbox) -> dict[str, int]:
    return {s: sb.stats(s)["unauthorized"] for s in ("api", "oms")}


def requests(sb: Sandbox, system: str) -> int:
    return sum(sb.stats(system)["requests"].values())


@pytest.fixture
def own_sandbox() -> Iterator[tuple[Sandbox, int]]:
    """A sandbox of this test's own (its credentials get rotated), webhooks to `port`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = SandboxConfig(
        api_token=SECRETS[0], oms_api_key=SECRETS[1], api_webhook_secret=SECRETS[2],
        oms_webhook_secret=SECRETS[3], api_webhook_url=f"{base}/webhooks/hms-api",
        oms_webhook_url=f"{base}/webhooks/oms",
    )
    with Sandbox(config) as sb:
        yield sb, port


def rotate_credential(sb: Sandbox, system: str) -> None:
    """Stands for an operator rotating the credential in that system while we run."""
    servers = sb._servers  # noqa: SLF001 - the sandbox has no admin route for this
    state = servers[0 if system == "api" else 1].config.app.state.sandbox
    if system == "api":
        state.token = "rotated-elsewhere"
    else:
        state._expected_auth = b'Token token="rotated-elsewhere"'  # noqa: SLF001


# -- a wrong credential at start-up ----------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "env_name", "wrong", "name"),
    [("oms", "OMS_API_KEY", WRONG_KEY, "HMS-OMS"), ("api", "HMS_API_TOKEN", WRONG_TOKEN,
                                                   "HMS-API")],
)
def test_daemon_with_a_wrong_credential_exits_2_naming_the_system_without_a_storm(
    sb: Sandbox, tmp_path: Path, system: str, env_name: str, wrong: str, name: str
) -> None:
    sb.create_api_order("Ward 3 linen", 1, ITEMS)
    daemon = DaemonProcess.for_sandbox(sb, tmp_path, free_port(), **{env_name: wrong},
                                       HMS_SYNC_LOG_LEVEL="DEBUG")
    daemon.start(wait=False)
    assert daemon.proc is not None
    code = daemon.proc.wait(30)
    log = daemon.log()
    assert code == 2, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log
    assert name in errors[0] and "401" in errors[0], errors[0]
    assert "Traceback" not in log
    assert_no_secret("daemon log", log)
    assert rejected(sb)[system] <= 1, "more than one rejected request: a retry storm"
    assert requests(sb, system) <= 2
    if system == "api":  # HMS-API is checked first: HMS-OMS was never called
        assert requests(sb, "oms") == 0
    assert sb.stats("oms")["requests"]["create"] == 0
    assert sb.stats("api")["requests"]["update"] == 0


@pytest.mark.parametrize(
    ("env_name", "wrong", "name"),
    [("HMS_API_TOKEN", WRONG_TOKEN, "HMS-API"), ("OMS_API_KEY", WRONG_KEY, "HMS-OMS")],
)
def test_sync_all_and_import_with_a_wrong_credential_are_one_line_naming_the_system(
    sb: Sandbox, tmp_path: Path, env_name: str, wrong: str, name: str
) -> None:
    for i in range(30):
        sb.create_api_order(f"order {i}", 1, ITEMS)
    env = cli_env(sb, tmp_path, **{env_name: wrong})
    for args in (["sync-all"], ["import", "1"]):
        sb.reset_stats()
        proc = hms_sync(env, *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = error_lines(proc)
        assert len(lines) == 1 and name in lines[0] and "401" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert sum(rejected(sb).values()) <= 3, (args, rejected(sb))
        assert sb.stats("oms")["requests"]["create"] == 0
        assert sb.stats("api")["requests"]["update"] == 0
        assert_no_secret(f"{args} output", proc.stdout + proc.stderr)


# -- a credential that stops working while the daemon runs -----------------------------------


@pytest.mark.parametrize("system", ["oms", "api"])
def test_a_credential_rotated_while_running_stops_calls_to_that_system(
    own_sandbox: tuple[Sandbox, int], tmp_path: Path, system: str
) -> None:
    sb, port = own_sandbox
    name = "HMS-OMS" if system == "oms" else "HMS-API"
    daemon = DaemonProcess.for_sandbox(sb, tmp_path, port, HMS_SYNC_LOG_LEVEL="DEBUG",
                                       HMS_SYNC_MAX_ATTEMPTS="3")
    daemon.start()
    try:
        first = sb.create_api_order("before the rotation", 1, ITEMS)["id"]
        wait_until(lambda: sb.get_api_order(first)["oms_order_code"], 20, 0.05,
                   what="the first order linked")

        rotate_credential(sb, system)
        later = [sb.create_api_order(f"after {i}", 1, ITEMS)["id"] for i in range(5)]

        def health() -> dict[str, Any]:
            r = httpx.get(f"{daemon.url}/healthz", timeout=2)
            return {**r.json(), "http": r.status_code}

        doc = wait_until(lambda: (h := health())["http"] == 503 and h, 20, 0.1,
                         what="/healthz to report the rejected credential")
        assert f"{name} rejected" in json.dumps(doc), doc

        # Let several polls and queue rounds pass: rejected calls must not grow.
        after_trip = rejected(sb)[system]
        polls_failed = daemon.log().count(f"poll of {name} failed")
        wait_until(lambda: daemon.log().count(f"poll of {name} failed") >= polls_failed + 3,
                   20, 0.1, what="three more polls")
        assert rejected(sb)[system] == after_trip, "calls continued after a 401"
        assert after_trip <= 10, f"{after_trip} rejected requests: a retry storm"

        log = daemon.log()
        breaker = [ln for ln in log.splitlines() if "rejected our credential" in ln]
        assert 1 <= len(breaker) <= after_trip, breaker
        assert all(name in ln for ln in breaker)
        for api_id in later:  # nothing was written for them, nothing was given up
            assert sb.get_api_order(api_id)["oms_order_code"] is None
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    status = hms_sync(cli_env(sb, tmp_path, HMS_SYNC_DB=str(tmp_path / "daemon.db")),
                      "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["queue"]["dead"] == 0, "a 401 spent the orders' attempts"
    assert_no_secret("daemon log", daemon.log())
    assert_no_secret("status", status.stdout + status.stderr)


# -- no secret in any output -----------------------------------------------------------------


# Text and JSON forms between them; `status` runs again once the store holds errors.
WRONG_CREDS = [["sync-all", "--json"], ["import", "1"], ["status"], ["check", "--json"]]
FAILING = [["sync-all"], ["import", "1", "--json"], ["check"]]
AFTER = [["status"], ["status", "--json", "--errors"]]


def test_no_secret_in_any_output_of_failing_runs(sb: Sandbox, tmp_path: Path) -> None:
    for i in range(20):
        sb.create_api_order(f"order {i}", 1, ITEMS)
    outputs: dict[str, str] = {}

    # 1. wrong credentials for both systems
    wrong = cli_env(sb, tmp_path, HMS_API_TOKEN=WRONG_TOKEN, OMS_API_KEY=WRONG_KEY)
    for args, proc in zip(WRONG_CREDS, many(wrong, WRONG_CREDS), strict=True):
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        outputs[f"wrong creds: {args}"] = proc.stdout + proc.stderr
    daemon = DaemonProcess.for_sandbox(sb, tmp_path / "wrong", free_port(),
                                       HMS_API_TOKEN=WRONG_TOKEN, OMS_API_KEY=WRONG_KEY,
                                       HMS_SYNC_LOG_LEVEL="DEBUG")
    (tmp_path / "wrong").mkdir()
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(30) == 2
    outputs["wrong creds: run"] = daemon.log()

    # 2. right credentials, failing systems (5xx and 429 on every contract call)
    sb.set_faults("both", error_rate=0.7, rate_limit_rate=0.3, retry_after=0)
    right = cli_env(sb, tmp_path)
    for args, proc in zip(FAILING, many(right, FAILING), strict=True):
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        outputs[f"failing systems: {args}"] = proc.stdout + proc.stderr
    # the store now holds errors and dead items: show them

    (tmp_path / "daemon").mkdir()
    port = free_port()
    sb.configure_webhooks("api", f"http://127.0.0.1:{port}/webhooks/hms-api")
    sb.configure_webhooks("oms", f"http://127.0.0.1:{port}/webhooks/oms")
    daemon = DaemonProcess.for_sandbox(
        sb, tmp_path / "daemon", port, HMS_SYNC_LOG_LEVEL="DEBUG",
        HMS_SYNC_CONFIG=str(tmp_path / "fast.toml"), HMS_SYNC_MAX_ATTEMPTS="2",
    )
    daemon.start()
    try:
        for i in range(5):  # webhooks for these reach the daemon, signed with the secret
            sb.create_api_order(f"live {i}", 1, ITEMS)
        forged = httpx.post(f"{daemon.url}/webhooks/hms-api", content=b'{"id": "x"}',
                            headers={"X-Hms-Signature": "sha256=" + "0" * 64,
                                     "Content-Type": "application/json"}, timeout=5)
        assert forged.status_code == 401
        wait_until(lambda: "given up after" in daemon.log(), 30, 0.1,
                   what="an order given up after failures")
        metrics = httpx.get(f"{daemon.url}/metrics", timeout=5)
        health = httpx.get(f"{daemon.url}/healthz", timeout=5)
        assert metrics.status_code == 200
        outputs["failing systems: /metrics"] = metrics.text
        outputs["failing systems: /healthz"] = health.text
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
        sb.set_faults("both")
    outputs["failing systems: run"] = daemon.log()
    # the daemon's store now holds orders given up with their last error: show them
    after = {**right, "HMS_SYNC_DB": str(tmp_path / "daemon" / "daemon.db")}
    for args, proc in zip(AFTER, many(after, AFTER), strict=True):
        outputs[f"failing systems, after: {args}"] = proc.stdout + proc.stderr

    for where, text in outputs.items():
        assert_no_secret(where, text)
    for family in text_string_to_metric_families(outputs["failing systems: /metrics"]):
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert_no_secret(f"metrics label {family.name}{{{label}}}", value)
                assert len(value) <= 40 and " " not in value, (family.name, label, value)
    # the failing runs did fail where they should, and said so
    assert "401" in outputs["wrong creds: ['sync-all', '--json']"]
    assert "HMS-" in outputs["failing systems: ['import', '1', '--json']"]
    assert "HMS-" in outputs["failing systems, after: ['status']"]
    assert "given up after" in outputs["failing systems: run"]

