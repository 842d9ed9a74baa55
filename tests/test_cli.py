"""The `hms-sync` command as an operator or a script meets it (contract section 5).

Runs `hms_sync.cli.app` in-process with typer's CliRunner and the environment an operator
would export (`sb.env()` plus `HMS_SYNC_DB`). Every invocation is checked for the habits of
a thin CLI: no traceback, no secret in any output, one clear line for an expected failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from conftest import SECRETS
from typer.testing import CliRunner, Result

from hms_sync.cli import app
from hms_sync.sandbox import Sandbox
from hms_sync.store import Store

ITEMS = [{"sku": "LN-100", "name": "Sheet", "quantity": 4, "unit_price": "12.50"}]
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def invoke(args: list[str], env: dict[str, str]) -> Result:
    """Run the CLI; fail on a traceback or a leaked secret, whatever the exit code."""
    result = CliRunner().invoke(app, args, env=env)
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    secrets = set(SECRETS) | {
        v for k, v in env.items() if k.endswith(("_TOKEN", "_KEY", "_SECRET")) and v
    }
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    for secret in secrets:
        assert secret not in everything, f"{secret!r} leaked by {args}"
    return result


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def new_order(sb: Sandbox, title: str = "Ward 3 linen", user_id: int = 1) -> int:
    return int(sb.create_api_order(title, user_id, ITEMS)["id"])


def total_requests(sb: Sandbox) -> int:
    return sum(sum(sb.stats(s)["requests"].values()) for s in ("api", "oms"))


def sandbox_writes(sb: Sandbox) -> int:
    api, oms = sb.stats("api")["requests"], sb.stats("oms")["requests"]
    return api["create"] + api["update"] + oms["create"] + oms["update"]


# -- help -------------------------------------------------------------------------------------


def test_help_lists_every_command(sb_env: dict[str, str]) -> None:
    result = invoke(["--help"], sb_env)
    assert result.exit_code == 0
    for command in ("run", "sync-all", "import", "status", "retry", "check"):
        assert command in COMMANDS
    for command in COMMANDS:
        assert command in result.stdout, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_text_with_an_example(
    command: str, sb_env: dict[str, str]
) -> None:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    assert (getattr(click_command, "help", None) or "").strip(), f"{command} has no help text"
    result = invoke([command, "--help"], sb_env)
    assert result.exit_code == 0
    assert "Example" in result.stdout, f"`hms-sync {command} --help` shows no example"
    assert "hms-sync " in result.stdout


# -- sync-all ---------------------------------------------------------------------------------


def test_sync_all_json_is_one_document_with_counts(sb: Sandbox, sb_env: dict[str, str]) -> None:
    ids = [new_order(sb), new_order(sb)]
    result = invoke(["sync-all", "--json"], sb_env)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert doc["dry_run"] is False
    assert doc["summary"]["seen"] == 2
    assert doc["summary"]["created"] == 2
    assert doc["summary"]["error"] == 0
    assert doc["errors"] == []
    for api_id in ids:
        assert sb.get_api_order(api_id)["oms_order_code"]


def test_sync_all_exits_1_when_an_order_is_in_error(sb: Sandbox, sb_env: dict[str, str]) -> None:
    new_order(sb)
    bad = new_order(sb)
    sb.update_api_order(bad, status="cancelled")
    result = invoke(["sync-all", "--json"], sb_env)
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["summary"]["created"] == 1 and doc["summary"]["error"] == 1
    [error] = doc["errors"]
    assert error["api_id"] == bad and "'cancelled'" in error["error"]


def test_sync_all_text_output_shows_error_reasons_verbatim(
    sb: Sandbox, sb_env: dict[str, str], tmp_path: Path
) -> None:
    """Reasons can hold brackets (`[mapping.users]`); they are text, not terminal markup."""
    config = tmp_path / "hms-sync.toml"
    config.write_text("[mapping.users]\n1 = 101\n", encoding="utf-8")
    stranger = new_order(sb, user_id=2)
    result = invoke(["sync-all", "--config", str(config)], sb_env)
    assert result.exit_code == 1
    assert f"API order {stranger}" in result.stdout
    assert "is not in [mapping.users]" in result.stdout


def test_sync_all_dry_run_writes_nothing(sb: Sandbox, sb_env: dict[str, str]) -> None:
    ids = [new_order(sb), new_order(sb)]
    result = invoke(["sync-all", "--dry-run", "--json"], sb_env)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True
    assert {p["api_id"] for p in doc["planned"]} == set(ids)
    assert sandbox_writes(sb) == 0
    assert sb.list_oms_orders() == []
    status = json.loads(invoke(["status", "--json"], sb_env).stdout)
    assert status["links"] == []


def test_sync_all_dry_run_text_says_what_it_would_write(
    sb: Sandbox, sb_env: dict[str, str]
) -> None:
    api_id = new_order(sb)
    result = invoke(["sync-all", "--dry-run"], sb_env)
    assert result.exit_code == 0
    assert "dry run" in result.stdout
    assert f"would write, API order {api_id}: HMS-OMS create" in result.stdout
    assert sandbox_writes(sb) == 0


# -- import -----------------------------------------------------------------------------------


def test_import_creates_the_oms_order_and_link(sb: Sandbox, sb_env: dict[str, str]) -> None:
    api_id = new_order(sb)
    result = invoke(["import", str(api_id)], sb_env)
    assert result.exit_code == 0, result.stderr
    code = sb.get_api_order(api_id)["oms_order_code"]
    assert code and code in one_line(result.stdout)
    assert "created" in result.stdout
    again = invoke(["import", str(api_id), "--json"], sb_env)
    assert again.exit_code == 0
    assert json.loads(again.stdout) == {
        "api_id": api_id, "outcome": "unchanged", "oms_code": code, "writes": [], "error": None,
    }
    assert len(sb.list_oms_orders()) == 1


def test_import_of_a_missing_order_is_one_clear_line_and_exit_1(
    sb: Sandbox, sb_env: dict[str, str]
) -> None:
    result = invoke(["import", "999999"], sb_env)
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert "999999" in line and "does not exist" in line
    assert result.stdout == ""
    assert sandbox_writes(sb) == 0


def test_import_of_an_unmapped_order_names_the_reason(sb: Sandbox, sb_env: dict[str, str]) -> None:
    api_id = new_order(sb)
    sb.update_api_order(api_id, status="cancelled")
    result = invoke(["import", str(api_id)], sb_env)
    assert result.exit_code == 1
    assert "'cancelled'" in one_line(result.stderr)
    assert sb.list_oms_orders() == []


# -- status -----------------------------------------------------------------------------------


@pytest.fixture
def three_links(sb: Sandbox, sb_env: dict[str, str]) -> dict[str, int]:
    """Three linked orders in the store, the middle one in error."""
    ok1, bad, ok2 = new_order(sb), new_order(sb), new_order(sb)
    sb.update_api_order(bad, status="cancelled")
    assert invoke(["sync-all", "--json"], sb_env).exit_code == 1
    return {"ok1": ok1, "bad": bad, "ok2": ok2}


def test_status_json_lists_links(three_links: dict[str, int], sb_env: dict[str, str]) -> None:
    result = invoke(["status", "--json"], sb_env)
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert [row["api_id"] for row in doc["links"]] == sorted(three_links.values())
    assert doc["counts"] == {"ok": 2, "pending": 0, "error": 1}
    ok = next(r for r in doc["links"] if r["api_id"] == three_links["ok1"])
    assert (ok["api_status"], ok["oms_state"], ok["sync_state"]) == (
        "pending", "to_execute", "ok"
    )
    assert ok["oms_code"] and ok["last_sync_at"]


def test_status_errors_shows_only_orders_in_error(
    three_links: dict[str, int], sb_env: dict[str, str]
) -> None:
    doc = json.loads(invoke(["status", "--json", "--errors"], sb_env).stdout)
    [row] = doc["links"]
    assert row["api_id"] == three_links["bad"]
    assert "'cancelled'" in row["last_error"]
    text = invoke(["status", "--errors"], sb_env)
    assert text.exit_code == 0
    assert f"API order {three_links['bad']}" in text.stdout


def test_status_limit_limits(three_links: dict[str, int], sb_env: dict[str, str]) -> None:
    doc = json.loads(invoke(["status", "--json", "--limit", "2"], sb_env).stdout)
    assert len(doc["links"]) == 2


def test_status_needs_no_credentials_and_sends_no_request(
    three_links: dict[str, int], sb: Sandbox, sb_env: dict[str, str]
) -> None:
    sb.reset_stats()
    env = {k: v for k, v in sb_env.items() if k not in ("HMS_API_TOKEN", "OMS_API_KEY")}
    result = invoke(["status"], env)
    assert result.exit_code == 0
    assert "links: 2 ok, 0 pending, 1 in error" in result.stdout
    assert total_requests(sb) == 0


# -- retry ------------------------------------------------------------------------------------


@pytest.fixture
def dead_items(db_path: Path) -> list[int]:
    with Store(db_path) as store:
        store.enqueue([11, 12, 13], "poll")
        for item in store.due(10):
            store.fail(item, "HMS-OMS 422", delay=None, max_attempts=5)
    return [11, 12, 13]


def test_retry_ids_requeues_those_dead_items(
    dead_items: list[int], sb_env: dict[str, str], db_path: Path
) -> None:
    result = invoke(["retry", "11", "12", "--json"], sb_env)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"requeued": 2}
    with Store(db_path) as store:
        assert {i.api_id for i in store.due(10)} == {11, 12}
        assert store.queue_counts() == {"pending": 2, "dead": 1}


def test_retry_all_requeues_every_dead_item(
    dead_items: list[int], sb_env: dict[str, str], db_path: Path
) -> None:
    result = invoke(["retry", "--all"], sb_env)
    assert result.exit_code == 0
    assert "requeued 3" in result.stdout
    with Store(db_path) as store:
        assert store.queue_counts() == {"pending": 3, "dead": 0}


@pytest.mark.parametrize("args", [["retry"], ["retry", "11", "--all"]])
def test_retry_needs_either_ids_or_all(
    args: list[str], dead_items: list[int], sb_env: dict[str, str], db_path: Path
) -> None:
    result = invoke(args, sb_env)
    assert result.exit_code == 2
    assert "--all" in one_line(result.stderr)
    with Store(db_path) as store:
        assert store.queue_counts() == {"pending": 0, "dead": 3}


# -- bad configuration ------------------------------------------------------------------------

BAD_CONFIG = [
    pytest.param({"OMS_API_KEY": None}, None, "OMS_API_KEY", id="missing-key"),
    pytest.param({"HMS_API_TOKEN": ""}, None, "HMS_API_TOKEN", id="empty-token"),
    pytest.param({"HMS_API_URL": "notaurl"}, None, "HMS_API_URL", id="url-not-a-url"),
    pytest.param({"OMS_API_URL": "ftp://oms"}, None, "OMS_API_URL", id="url-not-http"),
    pytest.param({}, "[sync\nconcurrency = 3\n", "line 1", id="malformed-toml"),
    pytest.param({}, '[mapping.status]\ncancelled = "done"\n', "mapping.status",
                 id="status-map-not-one-to-one"),
    pytest.param({"HMS_SYNC_CONFIG": "/no/such/hms-sync.toml"}, None, "HMS_SYNC_CONFIG",
                 id="missing-config-file"),
]


@pytest.mark.parametrize("command", [["sync-all"], ["sync-all", "--json"], ["import", "1"],
                                     ["check"]])
@pytest.mark.parametrize(("changes", "toml", "named"), BAD_CONFIG)
def test_bad_configuration_is_exit_2_one_line_and_no_request(
    sb: Sandbox, sb_env: dict[str, str], tmp_path: Path, command: list[str],
    changes: dict[str, str | None], toml: str | None, named: str,
) -> None:
    new_order(sb)
    sb.reset_stats()
    env = {k: v for k, v in sb_env.items() if changes.get(k, "") is not None}
    env.update({k: v for k, v in changes.items() if v is not None})
    if toml is not None:
        path = tmp_path / "hms-sync.toml"
        path.write_text(toml, encoding="utf-8")
        env["HMS_SYNC_CONFIG"] = str(path)
    result = invoke(command, env)
    assert result.exit_code == 2, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert named in line
    if toml is not None and named == "line 1":
        assert str(tmp_path / "hms-sync.toml") in line  # malformed TOML: the file and line
    assert result.stdout == ""
    assert total_requests(sb) == 0


def test_a_secret_in_a_bad_setting_is_not_echoed(sb: Sandbox, sb_env: dict[str, str]) -> None:
    env = {**sb_env, "HMS_API_URL": f"not a url {SECRETS[0]}"}
    result = invoke(["sync-all"], env)  # `invoke` fails the test if the value leaks
    assert result.exit_code == 2
    assert "HMS_API_URL" in result.stderr


# -- secrets and check ------------------------------------------------------------------------


def test_check_reports_both_systems_and_shows_no_secret(
    sb: Sandbox, sb_env: dict[str, str]
) -> None:
    result = invoke(["check", "--json"], sb_env)
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["checks"]["HMS-API"]["ok"] and doc["checks"]["HMS-OMS"]["ok"]
    assert doc["config"]["hms_api_token"] == "(set)"
    text = invoke(["check"], sb_env)
    assert text.exit_code == 0
    assert "HMS-API" in text.stdout and "HMS-OMS" in text.stdout


def test_a_rejected_credential_is_exit_1_and_not_echoed(
    sb: Sandbox, sb_env: dict[str, str]
) -> None:
    wrong = "tok-WRONG-S3CRET-0000"
    env = {**sb_env, "HMS_API_TOKEN": wrong}
    for args in (["check"], ["sync-all"], ["import", "1"]):
        result = invoke(args, env)
        assert result.exit_code == 1, args
        assert wrong not in result.stdout + result.stderr
        assert "401" in result.stdout + result.stderr


def test_no_command_output_contains_a_secret(sb: Sandbox, sb_env: dict[str, str]) -> None:
    api_id = new_order(sb)
    sb.update_api_order(new_order(sb), status="cancelled")
    runs: list[list[str]] = [
        ["sync-all"], ["sync-all", "--json"], ["sync-all", "--dry-run"],
        ["import", str(api_id)], ["import", str(api_id), "--json"], ["import", "999999"],
        ["status"], ["status", "--json"], ["check"], ["check", "--json"],
        ["retry", "--all"],
    ]
    for args in runs:
        invoke(args, sb_env)  # asserts no secret and no traceback
