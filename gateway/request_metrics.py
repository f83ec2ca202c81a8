"""ASGI middleware counting every HTTP request by method, route template and status, and timing it.

Plain ASGI (no BaseHTTPMiddleware): one wrapped `send`, a clock read at each end and two metric updates,
a few microseconds a request. The route is the template (`/v1/generations/{job_id}`) of the route the router
matched (it leaves it in the scope), so ids never become label values; an unmatched path counts as "unmatched".
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.counters import HTTP_DURATION, HTTP_REQUESTS

# Where a route answered outside FastAPI's router (gateway/hot_routes.py) leaves its template for the labels.
ROUTE_TEMPLATE = "llmq.route_template"


class RequestMetrics:
    """Counts and times HTTP requests (outermost middleware: it sees every answer, errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            counter, histogram = _children(scope["method"], _template(scope), status)
            counter.inc()
            histogram.observe(perf_counter() - start)


def _template(scope: Scope) -> str:
    """The matched route's template, which the router leaves in the scope; "unmatched" when none matched."""
    template = scope.get(ROUTE_TEMPLATE)
    if template is not None:
        return str(template)
    route = scope.get("route")
    if route is None:
        return "unmatched"
    return str(getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched")


_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _children(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The two metric children of a label set, looked up once (labels() takes a lock and builds a key each time).
    Bounded: methods x route templates x statuses."""
    key = (method, route, status)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = (HTTP_REQUESTS.labels(method, route, str(status)), HTTP_DURATION.labels(method, route))
    return found
