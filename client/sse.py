"""Server-sent events as OpenAI streams them: each event's `data:` payload as a JSON object, until [DONE]."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from client.errors import LlmqError

DONE = "[DONE]"


def json_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Each event's data as a dict; stops at `data: [DONE]`; raises LlmqError for an `error` event."""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line:
            if line.startswith(":"):
                continue  # a comment, e.g. a keep-alive
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))
            continue
        # A blank line ends one event.
        if not data:
            continue
        payload, data = "\n".join(data), []
        if payload == DONE:
            return
        yield _decode(payload)
    if data and "\n".join(data) != DONE:
        yield _decode("\n".join(data))  # a stream that ended without the final blank line


def _decode(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise LlmqError(f"malformed event in stream: {payload[:200]!r}") from exc
    if not isinstance(event, dict):
        raise LlmqError(f"malformed event in stream: {payload[:200]!r}")
    error = event.get("error")
    if isinstance(error, dict):
        raise LlmqError(str(error.get("message") or error), code=error.get("code"), detail=error)
    return event
