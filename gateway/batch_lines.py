"""A batch's input file, line by line: each valid line a generation job's params, each bad one an error line.

A line is `{"custom_id", "method": "POST", "url", "body"}`; url must be the batch's endpoint and body a valid
request of it (the same checks and conversion its route makes: gateway.routes.completions.completion_job_params,
gateway.chat_jobs.chat_job_params). A bad line (not JSON, another url, an invalid body, a custom_id met before)
is reported with its line number (1-based) and, once read, its custom_id (a duplicate's error names none: each
custom_id is answered once), and the rest run. A custom_id must be text a row can hold (no NUL, no lone
surrogate: invalid_custom_id).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from gateway.chat_jobs import chat_job_params
from gateway.errors import ApiError, in_words, openai_param
from gateway.routes.completions import completion_job_params
from shared.chat_schemas import ChatCompletionRequest
from shared.job_data import GenerationParams
from shared.schemas import CompletionRequest
from shared.settings import Settings
from shared.storable import unstorable

MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class GoodLine:
    line: int
    custom_id: str
    model: tuple[str, str]  # (model asked for, base model)
    params: GenerationParams


@dataclass(frozen=True)
class BadLine:
    line: int
    custom_id: str | None
    code: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "code": self.code, "message": self.message}


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def check_lines(
    lines: Iterator[bytes], session: Session, settings: Settings, tenant: str, endpoint: str
) -> Iterator[GoodLine | BadLine]:
    """Each non-blank line of the input file, checked, in order. A bad line's error carries its custom_id once
    that was read, except a duplicate's (its line and message name it): each custom_id is answered once, in the
    output file or in the error file."""
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        custom_id = None
        try:
            request = _request(raw)
            named = _custom_id(request)
            if named in seen:
                raise _Refused("duplicate_custom_id", f"custom_id {named!r} is used by an earlier line")
            seen.add(named)
            custom_id = named
            _check_call(request, endpoint)
            model, params = _params(session, settings, tenant, endpoint, request["body"])
            yield GoodLine(number, custom_id, model, params)
        except _Refused as exc:
            yield BadLine(number, custom_id, exc.code, exc.message)


def _request(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig")  # strictly (json.loads of bytes lets encoded surrogates through)
    except UnicodeDecodeError as exc:
        raise _Refused("invalid_json_line", f"the line is not UTF-8 (byte {exc.start + 1})") from None
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):
        raise _Refused("invalid_json_line", "the line is not valid JSON") from None
    if not isinstance(request, dict):
        raise _Refused("invalid_request", "the line is not a JSON object")
    return request


def _custom_id(request: dict[str, Any]) -> str:
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        raise _Refused("missing_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if (why := unstorable(custom_id)) is not None:
        raise _Refused("invalid_custom_id", f"custom_id {why}")
    return custom_id


def _check_call(request: dict[str, Any], endpoint: str) -> None:
    if request.get("method") != "POST":
        raise _Refused("invalid_method", "method must be POST")
    if not isinstance(request.get("url"), str) or not isinstance(request.get("body"), dict):
        raise _Refused("invalid_request", "url must be a string and body an object")
    if request["url"] != endpoint:
        raise _Refused("invalid_url", f"url {request['url']!r} is not the batch's endpoint {endpoint}")


def _params(
    session: Session, settings: Settings, tenant: str, endpoint: str, body: dict[str, Any]
) -> tuple[tuple[str, str], GenerationParams]:
    if body.get("stream") or body.get("echo"):
        raise _Refused("invalid_body", "stream and echo are not supported in a batch")
    try:
        if endpoint == "/v1/chat/completions":
            return chat_job_params(session, settings, tenant, ChatCompletionRequest.model_validate(body))
        return completion_job_params(session, settings, tenant, CompletionRequest.model_validate(body))
    except (ValidationError, RequestValidationError) as exc:
        first = in_words(dict(exc.errors()[0]))
        where = openai_param(first.get("loc", ()))  # the field as OpenAI names it, not pydantic's union members
        message = f"body.{where}: {first.get('msg')}" if where else str(first.get("msg"))
        raise _Refused("invalid_body", message) from None
    except ApiError as exc:
        raise _Refused(exc.code, exc.message) from None
