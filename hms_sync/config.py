"""Configuration, read in one place and validated before any request is sent.

Precedence, highest first: command-line flags > environment > TOML file > default.
Environment names are the seed's (`HMS_API_URL`, `OMS_API_KEY`, ...) plus hms-sync's own
(`HMS_SYNC_CONFIG`, `HMS_SYNC_DB`, `HMS_SYNC_POLL_INTERVAL`, ...). In the TOML file the same
settings live in tables (`[hms_api] url = ...`); `SETTINGS` below is the one list of them.
Every error names the setting by its environment name or TOML key, and never shows a secret.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError

DEFAULT_STATUS_MAP: dict[str, str] = {
    "pending": "to_execute",
    "processing": "in_progress",
    "completed": "done",
}


@dataclass(frozen=True)
class Setting:
    field: str
    env: str | None
    toml: str  # dotted key in the TOML file


SETTINGS: tuple[Setting, ...] = (
    Setting("hms_api_url", "HMS_API_URL", "hms_api.url"),
    Setting("hms_api_token", "HMS_API_TOKEN", "hms_api.token"),
    Setting("hms_api_webhook_secret", "HMS_API_WEBHOOK_SECRET", "hms_api.webhook_secret"),
    Setting("hms_api_webhook_secrets_old", None, "hms_api.webhook_secrets_old"),
    Setting("hms_api_webhook_scheme", None, "hms_api.webhook_scheme"),
    Setting("oms_api_url", "OMS_API_URL", "oms.url"),
    Setting("oms_api_key", "OMS_API_KEY", "oms.api_key"),
    Setting("oms_order_type_code", "OMS_ORDER_TYPE_CODE", "oms.order_type_code"),
    Setting("oms_webhook_secret", "OMS_WEBHOOK_SECRET", "oms.webhook_secret"),
    Setting("oms_webhook_secrets_old", None, "oms.webhook_secrets_old"),
    Setting("oms_webhook_scheme", None, "oms.webhook_scheme"),
    Setting("db", "HMS_SYNC_DB", "sync.db"),
    Setting("poll_interval", "HMS_SYNC_POLL_INTERVAL", "sync.poll_interval"),
    Setting("full_resync_interval", "HMS_SYNC_FULL_RESYNC_INTERVAL", "sync.full_resync_interval"),
    Setting("conflict_policy", "HMS_SYNC_CONFLICT_POLICY", "sync.conflict_policy"),
    Setting("concurrency", "HMS_SYNC_CONCURRENCY", "sync.concurrency"),
    Setting("max_attempts", "HMS_SYNC_MAX_ATTEMPTS", "sync.max_attempts"),
    Setting("backoff_initial", None, "sync.backoff_initial"),
    Setting("backoff_max", None, "sync.backoff_max"),
    Setting("connect_timeout", None, "http.connect_timeout"),
    Setting("read_timeout", None, "http.read_timeout"),
    Setting("request_deadline", None, "http.request_deadline"),
    Setting("webhooks_enabled", "HMS_SYNC_WEBHOOKS", "receiver.enabled"),
    Setting("host", "HMS_SYNC_HOST", "receiver.host"),
    Setting("port", "HMS_SYNC_PORT", "receiver.port"),
    Setting("webhook_tolerance", None, "receiver.tolerance"),
    Setting("log_level", "HMS_SYNC_LOG_LEVEL", "log.level"),
    Setting("log_format", "HMS_SYNC_LOG_FORMAT", "log.format"),
    Setting("status_map", None, "mapping.status"),
    Setting("user_map", None, "mapping.users"),
)
_BY_FIELD = {s.field: s for s in SETTINGS}
_BY_TOML = {s.toml: s for s in SETTINGS}
_TABLES = {s.toml.split(".")[0] for s in SETTINGS}
# Tables whose keys are data (statuses, user ids), not setting names.
_FREE_TABLES = {"mapping.status", "mapping.users"}


def setting_name(field: str) -> str:
    """How an error names a setting: its environment name, else its TOML key."""
    s = _BY_FIELD.get(field)
    if s is None:
        return field
    return s.env or s.toml


class Settings(BaseSettings):
    """Every setting hms-sync reads. Build it with `load_settings`, not directly."""

    model_config = SettingsConfigDict(extra="forbid", populate_by_name=True)
    # (environment, flattened TOML) for the sources below; bound by `load_settings`.
    layered: ClassVar[tuple[Mapping[str, str], Mapping[str, Any]]] = ({}, {})

    hms_api_url: str = "http://api-service:8000"
    hms_api_token: SecretStr | None = None
    hms_api_webhook_secret: SecretStr | None = None
    hms_api_webhook_secrets_old: list[SecretStr] = Field(default_factory=list)
    hms_api_webhook_scheme: Literal["hms", "standard", "both"] = "hms"
    oms_api_url: str = "http://oms-service:3000"
    oms_api_key: SecretStr | None = None
    oms_order_type_code: str = "api_order"
    oms_webhook_secret: SecretStr | None = None
    oms_webhook_secrets_old: list[SecretStr] = Field(default_factory=list)
    oms_webhook_scheme: Literal["hms", "standard", "both"] = "hms"

    db: str = "./hms-sync.db"
    poll_interval: float = Field(30.0, gt=0)
    full_resync_interval: float = Field(3600.0, ge=0)
    conflict_policy: Literal["oms", "api", "newest"] = "oms"
    concurrency: int = Field(8, ge=1, le=256)
    max_attempts: int = Field(12, ge=1)
    backoff_initial: float = Field(1.0, gt=0)
    backoff_max: float = Field(300.0, gt=0)

    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(15.0, gt=0)
    request_deadline: float = Field(30.0, gt=0)

    webhooks_enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    webhook_tolerance: float = Field(300.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    status_map: dict[str, str] = Field(default_factory=dict)
    user_map: dict[int, int] | None = None

    @field_validator("hms_api_url", "oms_api_url")
    @classmethod
    def _is_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("is not an http(s) URL")
        return v.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _status_map_one_to_one(self) -> Settings:
        merged = self.effective_status_map
        seen: dict[str, str] = {}
        for api_status, oms_state in merged.items():
            if oms_state in seen:
                raise ValueError(
                    f"mapping.status is not one-to-one: {seen[oms_state]!r} and "
                    f"{api_status!r} both map to {oms_state!r}"
                )
            seen[oms_state] = api_status
        return self

    @property
    def effective_status_map(self) -> dict[str, str]:
        """The seed's three pairs plus what `[mapping.status]` adds or overrides."""
        return {**DEFAULT_STATUS_MAP, **self.status_map}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env, toml = cls.layered
        return (
            init_settings,
            _MappingSource(settings_cls, _env_values(env)),
            _MappingSource(settings_cls, toml),
        )


class _MappingSource(PydanticBaseSettingsSource):
    """A settings source over an already flattened {field: value} mapping."""

    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = dict(values)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in SETTINGS:
        if s.env and env.get(s.env, "") != "":
            out[s.field] = env[s.env]
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """Read the TOML file and flatten it to {field: value}; unknown keys are errors."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"HMS_SYNC_CONFIG: config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"HMS_SYNC_CONFIG: cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line N, column M)".
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    out: dict[str, Any] = {}
    for table, body in doc.items():
        if table not in _TABLES:
            raise ConfigError(f"{path}: unknown table or key {table!r}")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {table!r} must be a table")
        for key, value in body.items():
            dotted = f"{table}.{key}"
            if dotted in _FREE_TABLES:
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: {dotted} must be a table")
                out[_BY_TOML[dotted].field] = value
                continue
            setting = _BY_TOML.get(dotted)
            if setting is None:
                raise ConfigError(f"{path}: unknown key {dotted!r}")
            out[setting.field] = value
    return out


def load_settings(
    *,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    require_credentials: bool = True,
) -> Settings:
    """Build and validate the settings; raise ConfigError naming the first bad setting.

    `overrides` are command-line flags by field name; None values are ignored.
    """
    env = os.environ if env is None else env
    path = config_file or env.get("HMS_SYNC_CONFIG") or None
    toml_values = read_toml(Path(path)) if path else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(flags) - set(_BY_FIELD)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    # pydantic-settings merges dict values across sources key by key; a table given by a
    # higher layer must replace the lower one whole, so settle those here.
    for name in ("status_map", "user_map"):
        if name in toml_values:
            value = toml_values.pop(name)
            flags.setdefault(name, value)

    settings_type = type("BoundSettings", (Settings,), {"layered": (env, toml_values)})
    try:
        settings: Settings = settings_type(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None

    if require_credentials:
        for field in ("hms_api_token", "oms_api_key"):
            secret = getattr(settings, field)
            if secret is None or not secret.get_secret_value():
                raise ConfigError(f"{setting_name(field)} is missing, and has no default")
    return settings


def _describe(exc: ValidationError) -> str:
    """One line naming the first bad setting, without echoing its value (it may be secret)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = loc[0] if loc else ""
    msg = err.get("msg", "invalid")
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"unknown setting {field!r}"
    if field in ("status_map", "user_map"):
        key = _BY_FIELD[field].toml
        where = f"{key}.{loc[1]}" if len(loc) > 1 else key
        return f"{where}: {msg}"
    if not field:
        return msg
    return f"{setting_name(field)} (TOML {_BY_FIELD[field].toml}): {msg}"


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data for display, secrets shown only as set or not set."""
    out: dict[str, Any] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            out[name] = "(set)" if value.get_secret_value() else "(not set)"
        elif isinstance(value, list) and value and isinstance(value[0], SecretStr):
            out[name] = f"({len(value)} set)"
        elif value is None and name.endswith(("token", "key", "secret")):
            out[name] = "(not set)"
        else:
            out[name] = value
    return out
