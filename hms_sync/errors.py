"""Every error hms-sync raises on purpose.

    HmsSyncError
    ├── ConfigError              bad configuration: exit 2 before any request
    ├── StoreError               the SQLite store cannot be opened or written
    ├── MappingError             a value with no mapping (status, user): permanent
    ├── OrderError               an order that cannot be synced for a stated reason: permanent
    └── SystemError_             a call to HMS-API or HMS-OMS failed
        ├── TransientError       may succeed later: retried with backoff
        │   ├── RateLimited      429, carries Retry-After
        │   ├── ServerError      5xx
        │   ├── NetworkError     timeout, connection refused or reset
        │   └── BadResponse      an answer that is not what the contract promises
        └── PermanentError       retrying the same call cannot help
            ├── NotFound         404
            ├── ValidationFailed 422, carries the field errors
            └── Unauthorized     401: the credential is wrong; calls to that system stop

Third-party exceptions (httpx, sqlite3, tomllib, pydantic) are translated where they are
caught, so the engine and the CLI only ever see these. Messages name the system, the request
and the order, and never a secret.
"""

from __future__ import annotations

from typing import Any


class HmsSyncError(Exception):
    """Root of every error hms-sync raises on purpose."""


class ConfigError(HmsSyncError):
    """The configuration is unusable; the message names the setting."""


class StoreError(HmsSyncError):
    """The store cannot be opened, migrated or written."""


class MappingError(HmsSyncError):
    """A value has no mapping to the other system. Nothing is written for it."""

    def __init__(self, message: str, *, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


class OrderError(HmsSyncError):
    """An order cannot be synced for a reason that retrying will not fix."""


class SystemError_(HmsSyncError):  # noqa: N801 - avoid shadowing the builtin SystemError
    """A request to one of the two systems failed."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        system: str,
        method: str = "",
        path: str = "",
        status_code: int | None = None,
    ) -> None:
        self.system = system
        self.method = method
        self.path = path
        self.status_code = status_code
        self.detail = message
        where = f"{system} {method} {path}".strip()
        super().__init__(f"{where}: {message}")


class TransientError(SystemError_):
    """May succeed if tried again later."""

    retryable = True


class RateLimited(TransientError):
    """429 Too Many Requests; `retry_after` is in seconds when the server said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(TransientError):
    """5xx: the request may or may not have been applied."""


class NetworkError(TransientError):
    """Timeout or connection failure: the request may or may not have been applied."""


class BadResponse(TransientError):
    """An answer outside the contract (bad JSON, missing fields, HTML, redirect)."""


class PermanentError(SystemError_):
    """Trying the same request again cannot help."""


class NotFound(PermanentError):
    """404."""


class ValidationFailed(PermanentError):
    """422; `errors` holds the field errors the system gave."""

    def __init__(self, message: str, *, errors: dict[str, list[str]] | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.errors = errors or {}

    def has_error(self, field: str, fragment: str) -> bool:
        return any(fragment in msg for msg in self.errors.get(field, []))


class Unauthorized(PermanentError):
    """401: the configured credential is wrong. Calls to that system stop."""


def is_transient(exc: BaseException) -> bool:
    """The retry policy reads off the exception type, never its message."""
    return isinstance(exc, SystemError_) and exc.retryable
