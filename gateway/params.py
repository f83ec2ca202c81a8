"""Path and query parameters: a 422 naming the parameter when one holds a control character or a lone
surrogate. They carry ids, names and numbers, never free text; a NUL would otherwise reach the database."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from gateway.auth import TenantDep
from shared.request_fields import plain_name


async def check_params(request: Request, _tenant: TenantDep) -> None:
    """Refuses the request when a path or query value is not plain text (after authentication: a caller
    without a key learns nothing from it)."""
    problems = []
    located = [("path", name, value) for name, value in request.path_params.items()]
    located += [("query", name, value) for name, value in request.query_params.multi_items()]
    for where, name, value in located:
        try:
            plain_name(str(value))
        except ValueError as exc:
            problems.append({"type": "invalid_name", "loc": (where, name), "msg": str(exc), "input": None})
    if problems:
        raise RequestValidationError(problems)
