"""The gateway's error tree, mapped to HTTP in one place.

Bodies carry a short stable `detail` (what tests assert) and an OpenAI-style `error` object
(what SDKs read).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError


class ApiError(Exception):
    """Base of every error the API answers on purpose."""

    status_code = 400
    code = "invalid_request"
    type = "invalid_request_error"
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


def error_body(status_code: int, code: str, message: str, type_: str) -> dict[str, object]:
    """The JSON body of an error answer."""
    return {"detail": message, "error": {"message": message, "type": type_, "code": code}}


def install(app: FastAPI) -> None:
    """Maps ApiError and database outages to JSON answers (never a traceback)."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        body = error_body(exc.status_code, exc.code, exc.message, exc.type)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        body = {"detail": errors, "error": {"message": message, "type": "invalid_request_error",
                                            "code": "invalid_request", "param": where or None}}  # fmt: skip
        return JSONResponse(body, status_code=422)

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, _exc: OperationalError) -> JSONResponse:
        return JSONResponse(
            error_body(503, "database_unavailable", "database unavailable", "server_error"),
            status_code=503,
            headers={"Retry-After": "1"},
        )
