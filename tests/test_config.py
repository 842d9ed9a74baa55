"""Configuration: precedence, validation messages, secrecy, mapping tables, the example file.

Every call passes `env=` explicitly so the real environment is never read.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from hms_sync.config import (
    DEFAULT_STATUS_MAP,
    SETTINGS,
    Settings,
    load_settings,
    read_toml,
    redacted,
)
from hms_sync.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

# Distinctive values, so a leak is unmistakable.
TOKEN = "tok-S3CRET-5b1e9d77"
KEY = "key-S3CRET-0c4a2f11"
API_WH = "whapi-S3CRET-88aa01"
OMS_WH = "whoms-S3CRET-42cc90"
OLD_WH = "whold-S3CRET-7f7f7f"
SECRETS = (TOKEN, KEY, API_WH, OMS_WH, OLD_WH)
CREDS = {"HMS_API_TOKEN": TOKEN, "OMS_API_KEY": KEY}


@pytest.fixture
def toml_file(tmp_path: Path):
    def write(text: str, name: str = "hms-sync.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def config_error(**kw: Any) -> str:
    """The ConfigError message for these arguments; it must be exactly one line."""
    with pytest.raises(ConfigError) as info:
        load_settings(**kw)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"error is not one line: {msg!r}"
    for secret in SECRETS:
        assert secret not in msg, f"secret leaked into: {msg!r}"
        assert secret not in repr(info.value)
    return msg


# --- precedence: flag > env > TOML > default -------------------------------------------------

# field, TOML (table, key, literal), env (name, value), flag value, expected per layer.
PRECEDENCE = [
    pytest.param(
        "hms_api_url", ("hms_api", "url", '"http://toml.test"'),
        ("HMS_API_URL", "http://env.test"), "http://flag.test",
        ("http://api-service:8000", "http://toml.test", "http://env.test", "http://flag.test"),
        id="hms_api_url",
    ),
    pytest.param(
        "oms_api_url", ("oms", "url", '"https://toml.test:3000/"'),
        ("OMS_API_URL", "https://env.test"), "https://flag.test",
        ("http://oms-service:3000", "https://toml.test:3000", "https://env.test",
         "https://flag.test"),
        id="oms_api_url",
    ),
    pytest.param(
        "poll_interval", ("sync", "poll_interval", "10"),
        ("HMS_SYNC_POLL_INTERVAL", "20.5"), 40.0,
        (30.0, 10.0, 20.5, 40.0),
        id="poll_interval",
    ),
    pytest.param(
        "oms_order_type_code", ("oms", "order_type_code", '"toml_type"'),
        ("OMS_ORDER_TYPE_CODE", "env_type"), "flag_type",
        ("api_order", "toml_type", "env_type", "flag_type"),
        id="oms_order_type_code",
    ),
    pytest.param(
        "conflict_policy", ("sync", "conflict_policy", '"api"'),
        ("HMS_SYNC_CONFLICT_POLICY", "newest"), "oms",
        ("oms", "api", "newest", "oms"),
        id="conflict_policy",
    ),
    pytest.param(
        "db", ("sync", "db", '"/toml/hms.db"'),
        ("HMS_SYNC_DB", "/env/hms.db"), "/flag/hms.db",
        ("./hms-sync.db", "/toml/hms.db", "/env/hms.db", "/flag/hms.db"),
        id="db",
    ),
    pytest.param(
        "port", ("receiver", "port", "9001"),
        ("HMS_SYNC_PORT", "9002"), 9003,
        (8080, 9001, 9002, 9003),
        id="port",
    ),
    pytest.param(
        "log_level", ("log", "level", '"debug"'),
        ("HMS_SYNC_LOG_LEVEL", "warning"), "ERROR",
        ("INFO", "DEBUG", "WARNING", "ERROR"),
        id="log_level",
    ),
]


@pytest.mark.parametrize(("field", "toml", "env", "flag", "expected"), PRECEDENCE)
def test_precedence_flag_over_env_over_toml_over_default(
    toml_file, field, toml, env, flag, expected
):
    table, key, literal = toml
    env_name, env_value = env
    default, from_toml, from_env, from_flag = expected
    path = toml_file(f"[{table}]\n{key} = {literal}\n")

    assert getattr(load_settings(env=CREDS), field) == default
    assert getattr(load_settings(config_file=path, env=CREDS), field) == from_toml
    both = {**CREDS, env_name: env_value}
    assert getattr(load_settings(config_file=path, env=both), field) == from_env
    got = load_settings(config_file=path, env=both, overrides={field: flag})
    assert getattr(got, field) == from_flag
    # A flag left unset (None) does not hide the lower layers.
    got = load_settings(config_file=path, env=both, overrides={field: None})
    assert getattr(got, field) == from_env


def test_empty_environment_variable_counts_as_unset(toml_file):
    path = toml_file("[sync]\npoll_interval = 12\n")
    got = load_settings(config_file=path, env={**CREDS, "HMS_SYNC_POLL_INTERVAL": ""})
    assert got.poll_interval == 12.0


def test_credentials_come_from_any_layer(toml_file):
    path = toml_file(f'[hms_api]\ntoken = "{TOKEN}"\n[oms]\napi_key = "{KEY}"\n')
    got = load_settings(config_file=path, env={})
    assert got.hms_api_token.get_secret_value() == TOKEN
    assert got.oms_api_key.get_secret_value() == KEY
    got = load_settings(config_file=path, env={"HMS_API_TOKEN": "from-env"})
    assert got.hms_api_token.get_secret_value() == "from-env"
    got = load_settings(
        config_file=path, env={"HMS_API_TOKEN": "from-env"},
        overrides={"hms_api_token": SecretStr("from-flag")},
    )
    assert got.hms_api_token.get_secret_value() == "from-flag"


def test_config_file_named_by_env_and_flag_wins(toml_file):
    from_env = toml_file("[sync]\npoll_interval = 11\n", "env.toml")
    from_flag = toml_file("[sync]\npoll_interval = 22\n", "flag.toml")
    env = {**CREDS, "HMS_SYNC_CONFIG": str(from_env)}
    assert load_settings(env=env).poll_interval == 11.0
    assert load_settings(config_file=from_flag, env=env).poll_interval == 22.0


def test_explicit_env_means_the_process_environment_is_not_read(monkeypatch):
    monkeypatch.setenv("HMS_API_TOKEN", TOKEN)
    monkeypatch.setenv("OMS_API_KEY", KEY)
    monkeypatch.setenv("HMS_SYNC_POLL_INTERVAL", "99")
    assert load_settings(env=CREDS).poll_interval == 30.0
    msg = config_error(env={})
    assert "HMS_API_TOKEN" in msg


def test_require_credentials_false_allows_missing_credentials():
    got = load_settings(env={}, require_credentials=False)
    assert got.hms_api_token is None
    assert got.oms_api_key is None


def test_defaults_match_the_contract():
    got = load_settings(env=CREDS)
    assert got.hms_api_url == "http://api-service:8000"
    assert got.oms_api_url == "http://oms-service:3000"
    assert got.oms_order_type_code == "api_order"
    assert got.db == "./hms-sync.db"
    assert got.conflict_policy == "oms"
    assert got.effective_status_map == {
        "pending": "to_execute", "processing": "in_progress", "completed": "done",
    }
    assert got.user_map is None


def test_settings_table_lists_every_field_once():
    fields = [s.field for s in SETTINGS]
    assert sorted(fields) == sorted(Settings.model_fields)
    assert len({s.toml for s in SETTINGS}) == len(SETTINGS)
    envs = [s.env for s in SETTINGS if s.env]
    assert len(set(envs)) == len(envs)


# --- validation: one line naming the setting ------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"OMS_API_KEY": KEY}, "HMS_API_TOKEN"),
        ({"HMS_API_TOKEN": TOKEN}, "OMS_API_KEY"),
        ({"HMS_API_TOKEN": "", "OMS_API_KEY": KEY}, "HMS_API_TOKEN"),
        ({}, "HMS_API_TOKEN"),
    ],
)
def test_missing_credential_is_named(env, name):
    assert name in config_error(env=env)


def test_empty_credential_in_toml_is_missing(toml_file):
    path = toml_file('[oms]\napi_key = ""\n')
    assert "OMS_API_KEY" in config_error(config_file=path, env={"HMS_API_TOKEN": TOKEN})


@pytest.mark.parametrize("name", ["HMS_API_URL", "OMS_API_URL"])
@pytest.mark.parametrize(
    "bad", ["api-service:8000", "not a url", "ftp://files.test", "http://", "//host.test", "x"]
)
def test_url_that_is_not_a_url_is_named(name, bad):
    assert name in config_error(env={**CREDS, name: bad})


@pytest.mark.parametrize(("table", "name"), [("hms_api", "HMS_API_URL"), ("oms", "OMS_API_URL")])
def test_bad_url_in_toml_is_named(toml_file, table, name):
    path = toml_file(f'[{table}]\nurl = "nope"\n')
    msg = config_error(config_file=path, env=CREDS)
    assert name in msg or f"{table}.url" in msg


def test_malformed_toml_names_file_and_line(toml_file):
    path = toml_file('[sync]\npoll_interval = 5\n\n[oms\nurl = "http://x.test"\n')
    msg = config_error(config_file=path, env=CREDS)
    assert str(path) in msg
    assert "line 4" in msg


def test_malformed_toml_does_not_echo_a_secret_on_the_bad_line(toml_file):
    path = toml_file(f'[hms_api]\ntoken = "{TOKEN}\n')  # unterminated string
    msg = config_error(config_file=path, env=CREDS)
    assert "line" in msg and str(path) in msg


def test_toml_that_is_not_utf8_is_reported(toml_file, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[oms]\norder_type_code = "caf\xe9"\n')
    assert str(path) in config_error(config_file=path, env=CREDS)


def test_unknown_toml_key_is_named(toml_file):
    path = toml_file("[sync]\npoll_intervall = 5\n")
    assert "sync.poll_intervall" in config_error(config_file=path, env=CREDS)


def test_unknown_toml_table_is_named(toml_file):
    path = toml_file("[syncing]\npoll_interval = 5\n")
    assert "syncing" in config_error(config_file=path, env=CREDS)


def test_top_level_key_outside_a_table_is_unknown(toml_file):
    path = toml_file("poll_interval = 5\n")
    assert "poll_interval" in config_error(config_file=path, env=CREDS)


def test_unknown_key_in_mapping_table_is_named(toml_file):
    path = toml_file("[mapping]\nstates = 1\n")
    assert "mapping.states" in config_error(config_file=path, env=CREDS)


@pytest.mark.parametrize(
    "pairs",
    [
        'cancelled = "done"',  # two API statuses onto the seed's done
        'pending = "in_progress"',  # an override that collides with processing
        'cancelled = "canceled"\nvoided = "canceled"',
    ],
)
def test_status_map_not_one_to_one_is_named(toml_file, pairs):
    path = toml_file(f"[mapping.status]\n{pairs}\n")
    assert "mapping.status" in config_error(config_file=path, env=CREDS)


def test_status_map_that_is_not_a_table(toml_file):
    path = toml_file('[mapping]\nstatus = "pending"\n')
    assert "mapping.status" in config_error(config_file=path, env=CREDS)


@pytest.mark.parametrize("bad", ["thirty", "30s", "nan?", "1,5"])
def test_non_numeric_poll_interval_is_named_without_echoing_the_value(bad):
    msg = config_error(env={**CREDS, "HMS_SYNC_POLL_INTERVAL": bad})
    assert "HMS_SYNC_POLL_INTERVAL" in msg
    assert bad not in msg


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_poll_interval_must_be_positive(bad):
    assert "HMS_SYNC_POLL_INTERVAL" in config_error(env={**CREDS, "HMS_SYNC_POLL_INTERVAL": bad})


def test_bad_conflict_policy_is_named():
    msg = config_error(env={**CREDS, "HMS_SYNC_CONFLICT_POLICY": "loudest"})
    assert "HMS_SYNC_CONFLICT_POLICY" in msg
    assert "loudest" not in msg


def test_bad_conflict_policy_in_toml_is_named(toml_file):
    path = toml_file('[sync]\nconflict_policy = "loudest"\n')
    msg = config_error(config_file=path, env=CREDS)
    assert "sync.conflict_policy" in msg or "HMS_SYNC_CONFLICT_POLICY" in msg


def test_hms_sync_config_pointing_to_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "hms-sync.toml"
    msg = config_error(env={**CREDS, "HMS_SYNC_CONFIG": str(missing)})
    assert "HMS_SYNC_CONFIG" in msg
    assert str(missing) in msg


def test_unknown_override_is_rejected():
    assert "poll_intervall" in config_error(env=CREDS, overrides={"poll_intervall": 5})


# --- secrets ---------------------------------------------------------------------------------


def full_secret_settings(toml_file) -> Settings:
    path = toml_file(
        f'[hms_api]\nwebhook_secrets_old = ["{OLD_WH}"]\n'
        f'[oms]\nwebhook_secrets_old = ["{OLD_WH}", "{OLD_WH}-2"]\n'
    )
    env = {**CREDS, "HMS_API_WEBHOOK_SECRET": API_WH, "OMS_WEBHOOK_SECRET": OMS_WH}
    return load_settings(config_file=path, env=env)


def test_secrets_are_not_in_repr_or_str(toml_file):
    settings = full_secret_settings(toml_file)
    assert settings.hms_api_token.get_secret_value() == TOKEN
    assert settings.oms_webhook_secrets_old[1].get_secret_value() == f"{OLD_WH}-2"
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        for secret in SECRETS:
            assert secret not in text


def test_secrets_are_not_in_redacted(toml_file):
    settings = full_secret_settings(toml_file)
    shown = redacted(settings)
    text = json.dumps(shown, default=str)
    for secret in SECRETS:
        assert secret not in text
    assert shown["hms_api_token"] == "(set)"
    assert shown["oms_api_key"] == "(set)"
    assert shown["hms_api_webhook_secret"] == "(set)"
    assert shown["oms_webhook_secrets_old"] == "(2 set)"
    # Non-secrets are shown as they are.
    assert shown["hms_api_url"] == "http://api-service:8000"
    assert shown["poll_interval"] == 30.0


def test_redacted_says_when_a_secret_is_not_set():
    shown = redacted(load_settings(env={}, require_credentials=False))
    assert shown["hms_api_token"] == "(not set)"
    assert shown["oms_webhook_secret"] == "(not set)"


@pytest.mark.parametrize(
    "env_extra",
    [
        {"HMS_SYNC_POLL_INTERVAL": TOKEN},
        {"HMS_API_URL": TOKEN},
        {"OMS_API_URL": f"ftp://{KEY}@oms.test"},
        {"HMS_SYNC_CONFLICT_POLICY": KEY},
        {"HMS_SYNC_PORT": TOKEN},
        {"HMS_SYNC_CONCURRENCY": TOKEN},
        {"HMS_SYNC_LOG_LEVEL": TOKEN},
        {"HMS_SYNC_LOG_FORMAT": TOKEN},
        {"HMS_SYNC_WEBHOOKS": TOKEN},
    ],
    ids=lambda d: next(iter(d)),
)
def test_config_errors_never_echo_a_secret_put_in_a_bad_field(env_extra):
    # config_error() asserts no secret appears in the message.
    config_error(env={**CREDS, "HMS_API_WEBHOOK_SECRET": API_WH, **env_extra})


@pytest.mark.parametrize(
    "text",
    [
        f'[hms_api]\nwebhook_secrets_old = "{OLD_WH}"\n',  # a string, not a list
        f'[hms_api]\ntoken = ["{TOKEN}"]\n',
        f'[oms]\napi_key = {{ value = "{KEY}" }}\n',
        f'[oms]\nwebhook_scheme = "{OMS_WH}"\n',
        f'[sync]\nmax_attempts = "{TOKEN}"\n',
        f'[mapping.users]\n42 = "{TOKEN}"\n',
        f'[mapping.status]\npending = ["{TOKEN}"]\n',
    ],
)
def test_config_errors_from_toml_never_echo_a_secret(toml_file, text):
    path = toml_file(text)
    config_error(config_file=path, env={})


# --- mapping tables --------------------------------------------------------------------------


def test_user_map_parses_to_int_keys_and_values(toml_file):
    path = toml_file('[mapping.users]\n42 = 7\n"43" = 8\n')
    got = load_settings(config_file=path, env=CREDS)
    assert got.user_map == {42: 7, 43: 8}
    assert all(type(k) is int and type(v) is int for k, v in got.user_map.items())


def test_absent_user_map_is_none(toml_file):
    assert load_settings(env=CREDS).user_map is None
    path = toml_file('[mapping.status]\ncancelled = "canceled"\n')
    assert load_settings(config_file=path, env=CREDS).user_map is None


def test_present_but_empty_user_map_is_not_none(toml_file):
    path = toml_file("[mapping.users]\n")
    assert load_settings(config_file=path, env=CREDS).user_map == {}


def test_user_map_with_non_integer_is_named(toml_file):
    path = toml_file('[mapping.users]\n42 = "seven"\n')
    assert "mapping.users" in config_error(config_file=path, env=CREDS)


def test_status_map_adds_pairs(toml_file):
    path = toml_file('[mapping.status]\ncancelled = "canceled"\n')
    got = load_settings(config_file=path, env=CREDS)
    assert got.status_map == {"cancelled": "canceled"}
    assert got.effective_status_map == {**DEFAULT_STATUS_MAP, "cancelled": "canceled"}
    assert len(got.effective_status_map) == 4


def test_status_map_may_override_a_seed_pair_one_to_one(toml_file):
    path = toml_file('[mapping.status]\ncompleted = "finished"\n')
    got = load_settings(config_file=path, env=CREDS)
    assert got.effective_status_map["completed"] == "finished"
    assert got.effective_status_map["pending"] == "to_execute"


def test_flag_status_map_replaces_toml_status_map(toml_file):
    path = toml_file('[mapping.status]\ncancelled = "canceled"\n')
    got = load_settings(
        config_file=path, env=CREDS, overrides={"status_map": {"on_hold": "paused"}}
    )
    assert got.status_map == {"on_hold": "paused"}


def test_read_toml_flattens_to_fields(toml_file):
    path = toml_file(
        '[hms_api]\nurl = "http://a.test"\n[receiver]\nenabled = false\n'
        '[mapping.status]\ncancelled = "canceled"\n'
    )
    assert read_toml(path) == {
        "hms_api_url": "http://a.test",
        "webhooks_enabled": False,
        "status_map": {"cancelled": "canceled"},
    }


# --- config.example.toml ---------------------------------------------------------------------

_HEADER = re.compile(r"^\[([A-Za-z0-9_.]+)\]\s*$")
_KEY = re.compile(r'^("?[A-Za-z0-9_-]+"?)\s*=\s*(.+?)\s*$')
_SECRET_FIELDS = {
    name for name, info in Settings.model_fields.items() if "SecretStr" in repr(info.annotation)
}


def documented_keys() -> dict[str, str]:
    """{dotted key: value literal} for every `key = value` line, commented out or not.

    Mapping tables count as documented when their `[table]` header appears (value "").
    """
    found: dict[str, str] = {}
    table = ""
    for raw in EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip().lstrip("#").strip()
        if m := _HEADER.match(line):
            table = m.group(1)
            found.setdefault(table, "")
        elif (m := _KEY.match(line)) and table:
            found.setdefault(f"{table}.{m.group(1).strip(chr(34))}", m.group(2))
    return found


def test_example_config_loads():
    got = load_settings(config_file=EXAMPLE, env=CREDS)
    defaults = load_settings(env=CREDS)
    assert got.model_dump() == defaults.model_dump()


def test_example_config_holds_no_live_secrets_or_mapping_tables():
    got = load_settings(config_file=EXAMPLE, env={}, require_credentials=False)
    for field in _SECRET_FIELDS:
        assert getattr(got, field) in (None, []), field
    assert got.user_map is None  # an uncommented [mapping.users] would unmap every user
    assert got.status_map == {}


def test_example_config_documents_every_setting():
    documented = documented_keys()
    missing = [s.toml for s in SETTINGS if s.toml not in documented]
    assert not missing, f"config.example.toml does not document {missing}"


def test_example_config_names_every_environment_variable():
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [s.env for s in SETTINGS if s.env and s.env not in text]
    assert not missing, f"config.example.toml does not mention {missing}"


def test_example_config_shows_the_defaults():
    documented = documented_keys()
    for s in SETTINGS:
        if s.field in _SECRET_FIELDS or s.toml in ("mapping.status", "mapping.users"):
            continue
        value = tomllib.loads(f"v = {documented[s.toml]}")["v"]
        default = Settings.model_fields[s.field].get_default(call_default_factory=True)
        assert value == default, f"{s.toml}: example shows {value!r}, default is {default!r}"


def test_example_config_comments_every_setting():
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    table = ""
    for i, raw in enumerate(lines):
        line = raw.strip().lstrip("#").strip()
        if m := _HEADER.match(line):
            table = m.group(1)
            continue
        if not _KEY.match(line) or table.startswith("mapping."):
            continue  # prose, or an example row of a mapping table
        prev = lines[i - 1].strip()
        assert prev.startswith("#") and not _KEY.match(prev.lstrip("#").strip()), (
            f"line {i + 1} ({raw!r}) has no comment line above it"
        )
