"""scripts/test-hms-oms-api-integration.sh, the seed's six-step check, against the sandbox
with a real `hms-sync run` (issue 4, deliverable 5)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import DaemonProcess, free_port, sandbox_for_daemon

from hms_sync.sandbox.server import Sandbox

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test-hms-oms-api-integration.sh"
CREDENTIALS = {
    "api_token": "tok-SCRIPT-S3CRET-2d9e41",
    "oms_api_key": "key-SCRIPT-S3CRET-6a0c58",
    "api_webhook_secret": "whapi-SCRIPT-S3CRET-b7f1",
    "oms_webhook_secret": "whoms-SCRIPT-S3CRET-13e9",
}
STEP = re.compile(r"^\[(\d)/6\] .* \.\.\. (PASS|FAIL) \(\d+\.\d{3}s\)", re.M)


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def script_sandbox(port: int) -> Iterator[Sandbox]:
    with sandbox_for_daemon(port, **CREDENTIALS) as sb:
        yield sb


def script_env(sb: Sandbox, **overrides: str) -> dict[str, str]:
    """What an operator exports: the URLs and credentials only (no webhook secrets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMS_", "OMS_"))}
    env.pop("TIMEOUT", None)
    full = sb.env()
    env.update({k: full[k] for k in ("HMS_API_URL", "HMS_API_TOKEN", "OMS_API_URL",
                                     "OMS_API_KEY", "OMS_ORDER_TYPE_CODE")})
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def run_script(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_no_secret(done: subprocess.CompletedProcess[str]) -> None:
    text = done.stdout + done.stderr
    leaked = [name for name, s in CREDENTIALS.items() if s in text]
    assert not leaked, f"the script printed {leaked}"


def test_script_is_executable_bash_with_strict_mode() -> None:
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "jq" not in re.sub(r"#.*", "", text)


def test_six_steps_pass_against_the_sandbox_with_the_daemon(
    script_sandbox: Sandbox, port: int, tmp_path: Path
) -> None:
    sb = script_sandbox
    sb.reset()
    daemon = DaemonProcess.for_sandbox(sb, tmp_path, port, HMS_SYNC_POLL_INTERVAL="60").start()
    try:
        done = run_script(script_env(sb, TIMEOUT="20"))
    finally:
        daemon.stop()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    steps = STEP.findall(done.stdout)
    assert [n for n, _ in steps] == ["1", "2", "3", "4", "5", "6"], output
    assert all(result == "PASS" for _, result in steps), output
    assert "FAIL" not in output
    assert_no_secret(done)
    assert not any(s in daemon.log() for s in CREDENTIALS.values())

    # It really did the seed's flow: one order, completed, with its one OMS order done.
    [order] = sb.list_api_orders()
    assert order["status"] == "completed"
    [oms] = [o for o in sb.list_oms_orders() if o["ext_code"] == str(order["id"])]
    assert oms["state"] == "done" and oms["code"] == order["oms_order_code"]


@pytest.mark.parametrize("missing", ["HMS_API_TOKEN", "OMS_API_KEY"])
def test_missing_credential_is_a_clear_error(script_sandbox: Sandbox, missing: str) -> None:
    sb = script_sandbox
    sb.reset()
    env = script_env(sb)
    del env[missing]
    done = run_script(env, timeout=20)
    assert done.returncode != 0
    assert missing in done.stderr and "not set" in done.stderr, done.stderr
    assert "PASS" not in done.stdout
    assert_no_secret(done)
    assert sum(sb.stats("api")["requests"].values()) == 0, "it sent a request anyway"


def test_wrong_token_fails_step_one_without_printing_it(script_sandbox: Sandbox) -> None:
    sb = script_sandbox
    sb.reset()
    wrong = "tok-WRONG-S3CRET-aa11"
    done = run_script(script_env(sb, HMS_API_TOKEN=wrong), timeout=20)
    assert done.returncode == 1
    assert STEP.findall(done.stdout) == [("1", "FAIL")], done.stdout
    assert "HTTP 401" in done.stdout
    assert wrong not in done.stdout + done.stderr
    assert_no_secret(done)


def test_without_the_daemon_step_two_fails_after_the_timeout(script_sandbox: Sandbox) -> None:
    sb = script_sandbox
    sb.reset()
    done = run_script(script_env(sb, TIMEOUT="1"), timeout=20)
    assert done.returncode == 1
    assert STEP.findall(done.stdout) == [("1", "PASS"), ("2", "FAIL")], done.stdout
    assert "not seen within 1s" in done.stdout
    assert_no_secret(done)
