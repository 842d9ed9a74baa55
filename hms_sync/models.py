"""Typed views of the two systems' order resources (contract sections 1 and 2).

Both parse either timestamp format (Laravel's microseconds, Rails' milliseconds) into aware
UTC datetimes and ignore fields they do not know, so a newer server does not break us.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_STATUSES = ("pending", "processing", "completed", "cancelled")
OMS_STATES = ("to_execute", "in_progress", "done", "canceled")


def _aware(v: datetime) -> datetime:
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


def iso(dt: datetime) -> str:
    """Timestamps as we send and store them: UTC, microseconds, `Z`."""
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return _aware(datetime.fromisoformat(text.replace("Z", "+00:00")))


class _Resource(BaseModel):
    """Tolerant of unknown fields; timestamps made aware UTC whatever the server sent."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @field_validator("created_at", "updated_at", check_fields=False)
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else _aware(v)


class ApiOrder(_Resource):
    """An order in HMS-API."""

    id: int
    title: str
    user_id: int
    status: str
    items: list[Any] = Field(default_factory=list)
    oms_order_code: str | None = None
    created_at: datetime | None = None
    updated_at: datetime



class OmsOrder(_Resource):
    """An order in HMS-OMS. `code` is opaque: never parse it."""

    code: str
    ext_code: str | None = None
    order_type_code: str | None = None
    state: str
    user_id: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime


    @field_validator("data", mode="before")
    @classmethod
    def _data_may_be_null(cls, v: Any) -> Any:
        return {} if v is None else v

    def is_ours(self, order_type_code: str) -> bool:
        """Contract section 0: our order type and a non-empty ext_code."""
        return self.order_type_code == order_type_code and bool(self.ext_code)
