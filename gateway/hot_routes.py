"""The two busiest routes (submit: POST /v1/generations; poll: GET /v1/generations/{id} without ?wait=) answered
as plain ASGI, without FastAPI's router, dependency solving and exception middlewares: the same code
(gateway.routes.generations' queue_generation and load_now), the same answers.

Authenticate and BodyLimit run first, as for every route (this sits inside them). Anything off the common case
goes on to FastAPI unchanged: SQLite, a query string, a body that is not JSON or does not validate, a cap or
an empty prompt (FastAPI then answers its 422 from the same body, replayed; nothing was written), a job id that
is not a plain name. An ApiError (404, 429, 503) is answered here as FastAPI's handler answers it.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import views
from gateway.auth import TENANT
from gateway.errors import ApiError, api_error_response
from gateway.front_door import front_door
from gateway.request_metrics import ROUTE_TEMPLATE
from gateway.routes.generations import load_now, queue_generation
from shared.request_fields import plain_name
from shared.schemas import GenerationRequest
from shared.settings import get_settings

SUBMIT = "/v1/generations"
POLL = "/v1/generations/"


class HotRoutes:
    """ASGI middleware: the submit and poll of generation jobs on Postgres, answered directly."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["query_string"] or TENANT not in scope or front_door(scope).pg is None:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST" and path == SUBMIT and _json_body(scope):
            await self._submit(scope, receive, send)
        elif method == "GET" and path.startswith(POLL) and _plain(path[len(POLL) :]):
            await self._poll(scope, receive, send, path[len(POLL) :])
        else:
            await self.app(scope, receive, send)

    async def _submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        scope[ROUTE_TEMPLATE] = SUBMIT
        try:
            request = GenerationRequest.model_validate_json(body)
        except (ValueError, RecursionError):  # not JSON, not valid (pydantic's ValidationError), nested too deep
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            answer = await queue_generation(request, front_door(scope), get_settings(), scope[TENANT])
        except RequestValidationError:  # a cap or an empty prompt: raised before anything is written
            await self.app(scope, _replay(body, receive), send)
            return
        except ApiError as exc:
            answer = api_error_response(exc, scope["path"])
        await answer(scope, receive, send)

    async def _poll(self, scope: Scope, receive: Receive, send: Send, job_id: str) -> None:
        scope[ROUTE_TEMPLATE] = POLL + "{job_id}"
        try:
            job = await load_now(front_door(scope), scope[TENANT], job_id)
            body = views.generation_job(job).model_dump_json().encode()
        except ApiError as exc:
            await api_error_response(exc, scope["path"])(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _json_headers(body)})
        await send({"type": "http.response.body", "body": body})


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]


def _json_body(scope: Scope) -> bool:
    """Whether the request says its body is JSON (anything else goes to FastAPI, which decides)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";")[0].strip().lower() == b"application/json")
    return False


def _plain(job_id: str) -> bool:
    """A job id the route's path and check_params would take as it is: one segment, plain text."""
    if not job_id or "/" in job_id:
        return False
    try:
        plain_name(job_id)
    except ValueError:
        return False
    return True


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then whatever the connection says next."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
