"""The gateway's error tree, mapped to HTTP in one place.

Bodies carry a short stable `detail` (what tests assert) and an OpenAI-style `error` object
(what SDKs read).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException

from gateway.methods import allowed_methods
from shared.schemas import ApiErrorObject, ErrorResponse, ValidationErrorResponse
from shared.storable import scrub


class ApiError(Exception):
    """Base of every error the API answers on purpose."""

    status_code = 400
    code = "invalid_request"
    type = "invalid_request_error"
    param: str | None = None  # the request parameter at fault, when one is
    headers: dict[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class FileNotFound(NotFound):
    code = "file_not_found"


class JobStateConflict(ApiError):
    """The job's status does not allow the operation (pausing a finished job, resuming a running one)."""

    status_code = 409
    code = "invalid_job_state"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(ApiError):
    status_code = 401
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class RateLimited(ApiError):
    status_code = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class Unavailable(ApiError):
    status_code = 503
    code = "unavailable"
    type = "server_error"


# What each error status means, for the OpenAPI schema (`responses=` of routers and routes).
_MEANINGS = {
    400: "Malformed body (not UTF-8 JSON, an integer of more than 4300 digits, or a broken multipart form); on the "
    "OpenAI routes (completions, chat, files, fine-tuning, models) also an invalid parameter, as OpenAI answers it "
    "(`error.param` names it, `error.code` says why); for a completion also a prompt that does not fit the model.",
    401: "Missing or invalid API key (when keys are required).",
    404: "No such resource for this tenant.",
    409: "The job's status does not allow this (pause a queued or running fine-tune, resume a paused one, export a "
    "succeeded one).",
    413: "Request body over the configured limit.",
    422: "Invalid request: `detail` lists every problem, `error.param` names the first field at fault.",
    429: "Over the per-key rate limit, the tenant's active-job quota, or the failed-authentication throttle of the "
    "client's address; see Retry-After.",
    500: "The job failed in the worker (completions answer with the job's error).",
    503: "The database is unavailable; see Retry-After.",
    504: "The job did not finish in time (it is cancelled if still queued).",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of these error statuses, each with the body it carries."""
    return {
        status: {
            # A 400 is also a bad parameter of an OpenAI route: detail then lists the issues, as a 422 does.
            "model": ValidationErrorResponse if status in (400, 422) else ErrorResponse,
            "description": _MEANINGS[status],
        }
        for status in statuses
    }


# Every /v1 route: keys, the body limit, validation, rate limit and quota, the database.
V1_ERRORS = documented(401, 413, 422, 429, 503)
# Routes that read a body: one that cannot be parsed answers 400.
BODY_ERRORS = documented(400)


def error_object(code: str, message: str, type_: str, param: str | None = None) -> dict[str, object]:
    """The OpenAI-style `error` of an answer or a stream's error event (ApiErrorObject; param only when set)."""
    return ApiErrorObject(message=message, type=type_, code=code, param=param).model_dump(exclude_none=True)


def error_body(code: str, message: str, type_: str, param: str | None = None) -> dict[str, object]:
    """The JSON body of an error answer (ErrorResponse)."""
    return {"detail": message, "error": error_object(code, message, type_, param)}


def api_error_response(exc: ApiError, path: str = "") -> JSONResponse:
    """The answer to an ApiError (a 422 is a 400 on OpenAI's routes, as OpenAI answers it)."""
    body = error_body(exc.code, exc.message, exc.type, exc.param)
    status = 400 if exc.status_code == 422 and openai_route(path) else exc.status_code
    return JSONResponse(body, status_code=status, headers=exc.headers)


def database_down_response() -> JSONResponse:
    """The answer while the database is unreachable."""
    return JSONResponse(
        error_body("database_unavailable", "database unavailable", "server_error"),
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _json_safe(value: Any) -> Any:
    """value with every non-finite float as text and every lone surrogate as U+FFFD: Python's JSON reads NaN,
    Infinity, 1e400 and "\\ud800", which then come back as the `input` (or, for a dict key, in the `loc`) of a
    validation error, and a JSON answer cannot hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _union_member(part: object) -> bool:
    """Whether a loc part names the member of a union pydantic tried (`int`, `literal['auto']`,
    `function-after[storable_text(), str]`) rather than a field: left out of `param`, which names the field."""
    return isinstance(part, str) and (part in ("int", "str", "float", "bool") or ("[" in part and part != "[key]"))


# Routes in OpenAI's shape answer a bad request as OpenAI does: 400 invalid_request_error, with the parameter at
# fault (`messages[0].role`) and a code. The llmq-only routes (/v1/generations, /v1/jobs, ...) keep 422.
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/", "/v1/files", "/v1/fine_tuning/", "/v1/models", "/v1/batches")

# pydantic's error types -> OpenAI's error codes (any other type: invalid_value).
_OPENAI_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "unsupported_parameter": "unsupported_parameter",
    "int_type": "invalid_type",
    "float_type": "invalid_type",
    "string_type": "invalid_type",
    "bool_type": "invalid_type",
    "list_type": "invalid_type",
    "dict_type": "invalid_type",
    "model_type": "invalid_type",
    "literal_error": "invalid_value",
}


def openai_route(path: str) -> bool:
    """Whether the path is one of the routes that answer in OpenAI's shapes."""
    return path.startswith(OPENAI_ROUTES)


def openai_param(loc: Sequence[Any]) -> str | None:
    """OpenAI's name for the parameter at loc: ("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if _union_member(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def in_words(issue: dict[str, Any]) -> dict[str, Any]:
    """A pydantic issue as a person reads it: a length limit of text (an optional field, a dict key) says
    characters, where pydantic says "Value should have at most 64 items after validation"; a file part sent
    without a file name says so, where FastAPI says "Expected UploadFile, received: <class 'str'>"."""
    ctx = issue.get("ctx") or {}
    if issue.get("type") in ("too_long", "too_short") and isinstance(issue.get("input"), str):
        bound = ctx.get("max_length") if issue["type"] == "too_long" else ctx.get("min_length")
        most = "at most" if issue["type"] == "too_long" else "at least"
        return issue | {"msg": f"String should have {most} {bound} character{'' if bound == 1 else 's'}"}
    if "Expected UploadFile" in str(issue.get("msg", "")):  # a form part with no file name reads as plain text
        return issue | {"msg": "must be a file (a multipart part with a filename)"}
    return issue


def _validation_answer(issues: Sequence[Any], echo_inputs: bool, openai_shape: bool = False) -> JSONResponse:
    """The answer to an invalid request: every issue in `detail`, the first as the OpenAI-style `error` naming
    its field; 400 with OpenAI's param and code on OpenAI's routes, 422 elsewhere."""
    issues = [in_words(issue) for issue in issues]
    if not echo_inputs:
        issues = [{k: v for k, v in issue.items() if k != "input"} for issue in issues]
    errors = _json_safe(jsonable_encoder(issues))
    first = errors[0] if errors else {"loc": [], "msg": "invalid request", "type": "invalid_request"}
    if openai_shape:
        param = openai_param(first["loc"])
        code = _OPENAI_CODES.get(str(first.get("type", "")), "invalid_value")
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        error = ApiErrorObject(message=message, type="invalid_request_error", code=code, param=param)
        return JSONResponse({"detail": errors, "error": error.model_dump()}, status_code=400)
    where = ".".join(str(part) for part in first["loc"] if not _union_member(part))
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    error = ApiErrorObject(message=message, type="invalid_request_error", code="invalid_request", param=where or None)
    return JSONResponse({"detail": errors, "error": error.model_dump()}, status_code=422)


def _body_problem(issues: Sequence[Any], content_type: str) -> JSONResponse | None:
    """The answer when the body as a whole is at fault, on every route: 400 invalid_request naming no parameter,
    for a body that is not JSON (FastAPI reports the character where parsing stopped as if it were a field) or
    JSON that is not an object (often a body sent without Content-Type: application/json); None otherwise."""
    first = issues[0] if issues else {}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error")
        at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        message = f"the request body is not valid JSON{f' ({why}{at})' if why else at}"
    elif loc == ("body",) and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        message = "the request body must be a JSON object"
        if "json" not in content_type.lower():
            message += f", sent with Content-Type: application/json (it came with {content_type or 'none'!r})"
    else:
        return None
    return JSONResponse(error_body("invalid_request", message, "invalid_request_error"), status_code=400)


def _http_message(request: Request, exc: HTTPException) -> str:
    """Starlette's or FastAPI's message, said more precisely where it is about the body."""
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if isinstance(exc.__cause__, ValueError) and "digits" in str(exc.__cause__):
        # Python's JSON refuses integers of more than 4,300 digits (int_max_str_digits) while FastAPI reads it.
        return "body holds an integer of more than 4300 digits"
    if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
        encoding = request.headers.get("content-encoding")
        if encoding and encoding.lower() != "identity":
            return f"the request body could not be read: Content-Encoding {encoding!r} is not supported (send it as is)"
        return "the request body could not be read as JSON: it is not UTF-8 text (or not a valid form)"
    return message


def install(app: FastAPI) -> None:
    """Maps ApiError and database outages to JSON answers (never a traceback)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return api_error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        whole_body = _body_problem(exc.errors(), request.headers.get("content-type", ""))
        if whole_body is not None:
            return whole_body
        openai_shape = openai_route(request.url.path)
        try:
            return _validation_answer(exc.errors(), echo_inputs=True, openai_shape=openai_shape)
        except RecursionError:  # an input nested hundreds deep: answer without echoing inputs
            return _validation_answer(exc.errors(), echo_inputs=False, openai_shape=openai_shape)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own answers (unparsable body, unknown path, wrong method) in our shape.
        message = _http_message(request, exc)
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route that matched
            headers["Allow"] = ", ".join(allowed_methods(app.router, request.scope))
        return JSONResponse(error_body(code, message, type_), exc.status_code, headers=headers)

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, _exc: DataError) -> JSONResponse:
        # Postgres refuses some values outright (a NUL character in a text value): the request is at fault.
        message = "request holds a value the database cannot store (such as a NUL character)"
        status = 400 if openai_route(request.url.path) else 422
        return JSONResponse(error_body("invalid_request", message, "invalid_request_error"), status_code=status)

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, _exc: OperationalError) -> JSONResponse:
        return database_down_response()
