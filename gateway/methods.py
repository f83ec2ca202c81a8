"""Which methods a path allows, across every route that shares it: the Allow header of a 405, and the answer
to OPTIONS.

Starlette answers a wrong method with the methods of the first route whose path matched, and a path often has
several routes (GET /v1/files lists, POST /v1/files uploads); nothing answers OPTIONS at all.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(router: Router, scope: Scope) -> list[str]:
    """Every method some route allows on this request's path, OPTIONS included; empty when no route has the path."""
    # Asks the routes themselves (FastAPI nests included routers in route objects of its own): a method is
    # allowed when some route matches the path with it in full.
    methods = {
        method
        for method in METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in router.routes)
    }
    return sorted(methods | {"OPTIONS"}) if methods else []


class AnswerOptions:
    """ASGI middleware: OPTIONS on a path that has routes answers 204 with Allow (no key needed: the methods are
    those the public OpenAPI schema lists); on any other path it goes on to the router (404)."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            methods = allowed_methods(self.router, scope)
            if methods:
                await Response(status_code=204, headers={"Allow": ", ".join(methods)})(scope, receive, send)
                return
        await self.app(scope, receive, send)
