"""Server-sent events: how a stream's chunks, its errors and its end are framed (`data: ...` and a blank line)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from gateway.errors import error_object

MEDIA_TYPE = "text/event-stream"
DONE = "data: [DONE]\n\n"  # OpenAI's last event of a stream that ended well


def event(payload: Mapping[str, object]) -> str:
    """One event carrying a JSON object."""
    return f"data: {json.dumps(payload)}\n\n"


def error_event(code: str, message: str, type_: str = "server_error") -> str:
    """The event that ends a stream with an error: `{"error": {...}}`, the error object of an error answer."""
    return event({"error": error_object(code, message, type_)})
