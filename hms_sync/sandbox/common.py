"""Pieces shared by the two sandbox servers: time, ordering index, faults, counters.

Timestamps are kept as integer microseconds since the Unix epoch (UTC) so that ordering
and ``updated_since`` comparisons are exact; each system formats them its own way
(Laravel: 6-digit microseconds, Rails: 3-digit milliseconds).
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from starlette.requests import ClientDisconnect, Request

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_iso(value: str) -> int:
    """Parse an ISO-8601 timestamp into epoch microseconds (naive means UTC).

    Accepts ``...00.000000Z``, ``...00.123Z``, ``+00:00`` and other offsets. A ``+`` that
    arrived unencoded in a query string (decoded to a space) is tolerated.

    >>> parse_iso("1970-01-01T00:00:01.5Z")
    1500000
    """
    text = value.strip()
    if len(text) > 19 and text[19:].count(" ") == 1:
        text = text[:19] + text[19:].replace(" ", "+")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def format_micros(us: int) -> str:
    """Laravel's format: ``2026-12-04T19:00:00.000000Z``."""
    return _to_datetime(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_millis(us: int) -> str:
    """Rails' format: ``2026-12-04T19:00:00.123Z`` (truncated, never rounded up)."""
    dt = _to_datetime(us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class Clock:
    """Wall clock in epoch microseconds that tests can freeze (many writes, one timestamp)."""

    def __init__(self) -> None:
        self.frozen_us: int | None = None

    def now_us(self) -> int:
        if self.frozen_us is not None:
            return self.frozen_us
        return time.time_ns() // 1000


class SortedIndex:
    """Rows ``(updated_us, key)`` kept sorted, so list endpoints seek instead of scanning.

    Updates move a row with two bisects; a row bumped to "now" lands at the end, so the
    insert is cheap. Keys of one index are all of one type (int ids or str codes).
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ts: int, key: Any) -> None:
        insort(self.rows, (ts, key))

    def remove(self, ts: int, key: Any) -> None:
        i = bisect_left(self.rows, (ts, key))
        if i < len(self.rows) and self.rows[i] == (ts, key):
            del self.rows[i]

    def move(self, old_ts: int, new_ts: int, key: Any) -> None:
        if old_ts != new_ts:
            self.remove(old_ts, key)
            self.add(new_ts, key)

    def first_at_or_after(self, ts: int) -> int:
        """Position of the first row with ``updated_us >= ts`` (inclusive lower bound)."""
        return bisect_left(self.rows, (ts,))

    def first_after(self, ts: int, key: Any) -> int:
        """Position of the first row strictly after ``(ts, key)`` (keyset seek)."""
        return bisect_right(self.rows, (ts, key))

    def clear(self) -> None:
        self.rows.clear()


class BadRequest(Exception):
    """The request body is not JSON, or not the expected shape (mapped to 400)."""


async def read_json(request: Request) -> Any:
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client went away (a killed daemon): nobody to answer
        raise BadRequest("client disconnected before sending the body") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("malformed JSON body") from None


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _rate(data: dict[str, Any], name: str) -> float:
    value = data.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number between 0 and 1")
    return float(value)


@dataclass
class Faults:
    """Fault-injection knobs of one system (applied to contract endpoints only).

    ``apply_before_error`` is the probability that an injected 5xx on a write is answered
    after the write was applied (the contract says a 5xx does not tell either way).
    ``seed`` makes the random draws reproducible.
    """

    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: int = 1
    latency_ms: tuple[int, int] = (0, 0)
    apply_before_error: float = 0.0
    seed: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> Faults:
        """Build from a JSON object; missing keys take their defaults. Raises ValueError."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown fault knobs: {sorted(unknown)}")
        retry_after = data.get("retry_after", 1)
        if not is_int(retry_after) or retry_after < 0:
            raise ValueError("retry_after must be a non-negative integer")
        latency = data.get("latency_ms", [0, 0])
        if is_int(latency) or isinstance(latency, float):
            latency = [latency, latency]
        if (
            not isinstance(latency, list | tuple)
            or len(latency) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in latency)
            or not 0 <= latency[0] <= latency[1]
        ):
            raise ValueError("latency_ms must be [min, max] with 0 <= min <= max")
        seed = data.get("seed")
        if seed is not None and not is_int(seed):
            raise ValueError("seed must be an integer or null")
        return cls(
            error_rate=_rate(data, "error_rate"),
            rate_limit_rate=_rate(data, "rate_limit_rate"),
            retry_after=retry_after,
            latency_ms=(int(latency[0]), int(latency[1])),
            apply_before_error=_rate(data, "apply_before_error"),
            seed=seed,
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["latency_ms"] = list(self.latency_ms)
        return out


KINDS = ("list", "get", "create", "update")


@dataclass
class Stats:
    """Counters of contract traffic; ``/_sandbox/`` calls are never counted."""

    requests: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    unauthorized: int = 0

    def reset(self) -> None:
        self.requests.clear()
        self.injected.clear()
        self.statuses.clear()
        self.unauthorized = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": {kind: self.requests[kind] for kind in KINDS},
            "injected": {"5xx": self.injected["5xx"], "429": self.injected["429"]},
            "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
            "unauthorized": self.unauthorized,
        }


class Invalid(Exception):
    """Validation failed; ``errors`` maps a field to its messages (rendered as 422)."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class NotFound(Exception):
    """No order with that key (rendered as 404)."""
