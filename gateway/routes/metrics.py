"""GET /metrics: the service's figures in the Prometheus text format (OpenMetrics when the scraper asks)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from gateway.deps import SettingsDep
from gateway.errors import Unauthorized
from gateway.metrics import registry
from shared.schemas import ErrorResponse
from shared.settings import Settings

router = APIRouter(tags=["metrics"])


CLOSED = "metrics_token is set and not sent, or API keys are required and no metrics_token is set (then closed)."


@router.get("/metrics", response_class=Response, responses={401: {"model": ErrorResponse, "description": CLOSED}})
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Request and job counters, queues, recent latencies, tokens, batch sizes and training progress."""
    require_operator(request, settings, "/metrics")
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry()), media_type=content_type)


def require_operator(request: Request, settings: Settings, what: str) -> None:
    """The operator's figures (/metrics, /v1/workers) name every tenant's work: the metrics token opens them."""
    expected = settings.metrics_token or None  # an empty token is no token (else "Bearer " would open it)
    if expected is None and settings.require_api_keys:
        # The figures name every tenant's models and jobs: a gateway that keeps tenants apart does not show
        # them to anyone who asks.
        raise Unauthorized(f"{what} is closed: API keys are required and LLMQ_METRICS_TOKEN is not set")
    if expected is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
            raise Unauthorized("invalid or missing metrics token")
