"""Structured logs: one JSON object per line (or plain text), carrying the job id a line belongs to.

The job id travels in a context variable, so code that logs never passes it around: the worker binds it
around a task or a batch (`with job_context(job_id):`), the gateway around a request whose path names a job,
and every line logged inside (by llmq, Celery, transformers...) carries it. A line of a batch carries
`job_ids` instead, the jobs it ran together.

    {"time": "2026-11-29T09:07:00.123Z", "level": "INFO", "logger": "worker.serving",
     "message": "batch of 2 jobs, 2 prompts in 0.084 s", "job_ids": ["gen-...", "gen-..."]}
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]

_job_ids: ContextVar[tuple[str, ...]] = ContextVar("llmq_job_ids", default=())

# A job id as shared.models.new_id writes it, for finding one in a request path.
JOB_ID = re.compile(r"^(?:gen|ftjob)-[0-9a-f]{24}$")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
# uvicorn's color_message duplicates the message with terminal colours.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def bind_job(*job_ids: str) -> Token[tuple[str, ...]]:
    """Makes later log lines of this context carry these job ids; give the token to unbind_job."""
    return _job_ids.set(tuple(job_ids))


def unbind_job(token: Token[tuple[str, ...]]) -> None:
    """Restores the job ids bound before bind_job returned token."""
    _job_ids.reset(token)


@contextmanager
def job_context(*job_ids: str) -> Iterator[None]:
    """Log lines inside carry job_id (one id) or job_ids (several, e.g. one generate batch)."""
    token = bind_job(*job_ids)
    try:
        yield
    finally:
        unbind_job(token)


def current_job_ids() -> tuple[str, ...]:
    """The job ids bound in this context (empty when none)."""
    return _job_ids.get()


def _job_fields(record: logging.LogRecord) -> dict[str, Any]:
    """job_id / job_ids of a record: from `extra=` when given there, else from the context."""
    if getattr(record, "job_id", None) or getattr(record, "job_ids", None):
        return {}  # logged as extra fields
    ids = current_job_ids()
    if not ids:
        return {}
    return {"job_id": ids[0]} if len(ids) == 1 else {"job_ids": list(ids)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, job_id(s), extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "time": moment.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= _job_fields(record)
        entry |= {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message [job_id=...]` for reading by eye."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _job_fields(record) or {
            k: getattr(record, k) for k in ("job_id", "job_ids") if getattr(record, k, None)
        }
        if not fields:
            return line
        first, _, rest = line.partition("\n")  # keep a traceback below the tagged first line
        tags = " ".join(f"{k}={','.join(v) if isinstance(v, list | tuple) else v}" for k, v in fields.items())
        return f"{first} [{tags}]" + (f"\n{rest}" if rest else "")


def make_formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter for a log format setting."""
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_logging(log_format: LogFormat, level: int | str = logging.INFO) -> None:
    """Sends every log line of this process to stderr in log_format; safe to call more than once.

    Like logging.basicConfig it leaves alone a root logger that already has someone else's handlers (pytest's,
    an application embedding llmq). uvicorn's loggers are routed through the root logger so that the gateway's
    own lines and uvicorn's share one format.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "llmq", False)]:
        root.removeHandler(handler)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.llmq = True  # type: ignore[attr-defined]  # marks the handler this function owns
        handler.setFormatter(make_formatter(log_format))
        root.addHandler(handler)
        logging.captureWarnings(True)  # Python warnings become log lines too, in the same format
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
