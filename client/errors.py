"""The client's exception tree, and the one place an HTTP error answer becomes one of its exceptions.

    LlmqError                    anything the client raises on purpose; `status_code` when the server answered
    ├── UnreachableError         no answer: connection refused, DNS, timeout (after the retries)
    ├── AuthError                401 / 403
    ├── NotFoundError            404
    ├── ValidationError          422 (and 400); `detail` is the server's detail, `errors` its field list
    ├── RateLimitError           429 (after the retries); `retry_after` in seconds when the server said
    ├── UnavailableError         502 / 503 / 504 (503 after the retries); `retry_after` likewise
    └── WaitTimeout              a wait for a job ran out of time before the job ended

The gateway answers errors as `{"detail": ..., "error": {"message", "type", "code"}}`; FastAPI's own
422 answers carry only `detail`, a list of `{"loc": [...], "msg": ...}`. Both are understood here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class LlmqError(Exception):
    """Base of every error the client raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.detail = detail


class UnreachableError(LlmqError):
    """The server did not answer: refused, unresolvable, or timed out."""


class AuthError(LlmqError):
    """The server refused the credentials (401) or the permission (403)."""


class NotFoundError(LlmqError):
    """The job, file or model does not exist (404)."""


class ValidationError(LlmqError):
    """The server rejected the request's content (422, 400)."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        """FastAPI's per-field errors ({"loc", "msg", ...}); empty when the detail is a plain message."""
        if isinstance(self.detail, list):
            return [e for e in self.detail if isinstance(e, dict)]
        return []


class RateLimitError(LlmqError):
    """Too many requests (429), still after the retries."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class UnavailableError(LlmqError):
    """The server is up but cannot serve now (503; 502/504 from a proxy in front of it)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class WaitTimeout(LlmqError):
    """A job did not end within the time a wait allowed; the job itself goes on."""


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The response's Retry-After in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    date = response.headers.get("date")
    try:
        now = parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError):
        now = None
    if now is None or now.tzinfo is None:
        now = datetime.now(UTC)
    return max((moment - now).total_seconds(), 0.0)


def _field_errors(detail: list[Any]) -> str:
    """FastAPI's 422 list as one line: `max_tokens: must be at most 256; prompt: ...`."""
    parts = []
    for error in detail:
        if not isinstance(error, dict):
            parts.append(str(error))
            continue
        loc = [str(p) for p in error.get("loc", [])]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        where = ".".join(loc)
        message = str(error.get("msg", "invalid"))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


def error_from_response(response: httpx.Response) -> LlmqError:
    """The exception for an error answer, with the server's message, code and detail."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    detail: Any = None
    code: str | None = None
    message: str
    if isinstance(body, dict):
        detail = body.get("detail")
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("code") if isinstance(error.get("code"), str) else None
        if isinstance(detail, list):
            message = _field_errors(detail)
        elif isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif detail is not None:
            message = str(detail)
        else:
            message = response.reason_phrase or f"HTTP {status}"
    else:
        text = " ".join(response.text.split())[:200]
        message = f"HTTP {status} {response.reason_phrase}".strip() + (f": {text}" if text else "")
    kwargs: dict[str, Any] = {"status_code": status, "code": code, "detail": detail}
    if status in (401, 403):
        return AuthError(message, **kwargs)
    if status == 404:
        return NotFoundError(message, **kwargs)
    if status in (400, 422):
        return ValidationError(message, **kwargs)
    if status == 429:
        return RateLimitError(message, retry_after=retry_after_seconds(response), **kwargs)
    if status in (502, 503, 504):
        return UnavailableError(message, retry_after=retry_after_seconds(response), **kwargs)
    return LlmqError(message, **kwargs)
