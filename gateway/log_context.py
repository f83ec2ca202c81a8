"""Binds the job id a request's path names (/v1/generations/gen-..., /v1/fine_tuning/jobs/ftjob-...) to the
log lines written while the request is handled."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.logging import JOB_ID, job_context


class JobLogContext:
    """ASGI middleware: log lines of a request about a job carry its job_id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        job_ids = [part for part in path.split("/") if JOB_ID.match(part)]
        if not job_ids:
            await self.app(scope, receive, send)
            return
        with job_context(job_ids[0]):
            await self.app(scope, receive, send)
