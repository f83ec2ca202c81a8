"""Who is asking: the tenant behind the request's API key, checked before any of the request's body is read;
the per-key rate limit; and the per-address throttle on failed authentications."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Annotated

import redis
from fastapi import Depends, Request
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ApiError, RateLimited, Unauthorized, api_error_response, database_down_response
from gateway.front_door import FrontDoor, front_door
from shared.api_keys import authenticate
from shared.db import get_sessionmaker
from shared.models import DEFAULT_TENANT
from shared.notify import redis_url
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

UNAUTHORIZED = "invalid or missing API key"  # the same answer whatever was wrong
TENANT = "llmq.tenant"  # where Authenticate leaves the request's tenant in the ASGI scope


class MinuteWindows:
    """Counts events per name per clock minute: in Redis when there is one (shared by every gateway process),
    else in this process."""

    def __init__(self, url: str | None) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=1) if url else None
        self._local: dict[tuple[str, int], int] = defaultdict(int)
        self._lock = threading.Lock()

    def hit(self, name: str, minute: int) -> int:
        """Counts one more event; how many this name has had in this minute, this one included.

        While Redis does not answer, this process counts on its own: a limit is not worth failing requests for.
        """
        if self._redis is not None:
            key = f"llmq:rate:{name}:{minute}"
            pipe = self._redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            try:
                return int(pipe.execute()[0])
            except redis.RedisError as exc:
                log.warning("rate counting in Redis failed (%s); counting in this process", exc)
        return self.hit_here(name, minute)

    def hit_here(self, name: str, minute: int) -> int:
        """hit, counted in this process only."""
        with self._lock:
            for stale in [k for k in self._local if k[1] < minute]:
                del self._local[stale]
            self._local[(name, minute)] += 1
            return self._local[(name, minute)]


class FailedAuthentications:
    """Failed authentications per client address and clock minute, counted in MinuteWindows (so across gateway
    processes when there is Redis). An address that reaches the limit is blocked for the rest of the minute;
    each process remembers its blocks itself, so a request that authenticates costs no extra round trip."""

    def __init__(self) -> None:
        self._blocked: dict[str, int] = {}  # address -> the minute it is blocked in
        self._lock = threading.Lock()

    def blocked(self, address: str, minute: int) -> bool:
        """Whether this process has blocked the address for this minute."""
        with self._lock:
            return self._blocked.get(address) == minute

    def failed(self, address: str, minute: int, limit: int) -> None:
        """Counts a failure; blocks the address once it has failed limit times this minute."""
        if _minute_windows().hit(f"authfail:{address}", minute) >= limit:
            with self._lock:
                for stale in [a for a, m in self._blocked.items() if m < minute]:
                    del self._blocked[stale]
                self._blocked[address] = minute


_failures = FailedAuthentications()
_windows: dict[str | None, MinuteWindows] = {}


def _minute_windows() -> MinuteWindows:
    url = redis_url()
    return _windows.setdefault(url, MinuteWindows(url))


def _seconds_to_next_minute(now: float) -> int:
    return int(60 - now % 60) + 1


def _check_rate(key_id: str, settings: Settings) -> None:
    if settings.rate_limit_per_minute == 0:
        return
    now = time.time()
    if _minute_windows().hit(key_id, int(now // 60)) > settings.rate_limit_per_minute:
        raise RateLimited(
            f"rate limit of {settings.rate_limit_per_minute} requests per minute exceeded",
            retry_after=_seconds_to_next_minute(now),
        )


async def _check_rate_async(door: FrontDoor, key_id: str, settings: Settings) -> None:
    """_check_rate from the event loop, in Redis at most one round trip per block of the limit (gateway.rate_blocks;
    in this process while Redis does not answer)."""
    if settings.rate_limit_per_minute == 0:
        return
    now = time.time()
    minute = int(now // 60)
    hits = await door.count(key_id, minute, settings.rate_limit_per_minute)
    if hits is None:
        hits = _minute_windows().hit_here(key_id, minute)
    if hits > settings.rate_limit_per_minute:
        raise RateLimited(
            f"rate limit of {settings.rate_limit_per_minute} requests per minute exceeded",
            retry_after=_seconds_to_next_minute(now),
        )


def _refuse_blocked(address: str, settings: Settings) -> None:
    now = time.time()
    limit = settings.auth_failures_per_minute
    if limit and _failures.blocked(address, int(now // 60)):
        raise RateLimited(
            f"too many failed authentications from this address; at most {limit} a minute",
            retry_after=_seconds_to_next_minute(now),
        )


def _failed(address: str, settings: Settings) -> None:
    if settings.auth_failures_per_minute:
        _failures.failed(address, int(time.time() // 60), settings.auth_failures_per_minute)


async def _tenant_from_door(door: FrontDoor, authorization: str, address: str, settings: Settings) -> str:
    """_tenant_of on the event loop: the key from the process's cache or the asyncpg pool, the rate in one
    Redis round trip. A failure (rare) counts against the address in a worker thread."""
    _refuse_blocked(address, settings)
    scheme, _, token = authorization.partition(" ")
    found = await door.lookup_key(token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        await run_in_threadpool(_failed, address, settings)
        raise Unauthorized(UNAUTHORIZED)
    tenant, key_id = found
    await _check_rate_async(door, key_id, settings)
    return tenant


def _tenant_of(authorization: str, address: str, settings: Settings) -> str:
    """The tenant of the Authorization header's key; 401 for a bad key, 429 for an address that has failed
    too often this minute (then its keys are not even checked) or a key over its rate limit."""
    _refuse_blocked(address, settings)
    scheme, _, token = authorization.partition(" ")
    found = None
    if scheme.lower() == "bearer":
        with get_sessionmaker()() as session:
            found = authenticate(session, token.strip())
            session.rollback()
    if found is None:
        _failed(address, settings)
        raise Unauthorized(UNAUTHORIZED)
    tenant, key_id = found
    _check_rate(key_id, settings)
    return tenant


# Operator routes under /v1: they take the operator's token (metrics_token), not a tenant's key.
OPERATOR_PATHS = frozenset({"/v1/workers"})


def needs_key(scope: Scope) -> bool:
    """Whether a request must carry an API key (when keys are required): every /v1 request but OPTIONS,
    whose answer (the methods a path allows) the public OpenAPI schema states anyway, and the operator's."""
    path: str = scope["path"]
    return (path == "/v1" or path.startswith("/v1/")) and scope["method"] != "OPTIONS" and path not in OPERATOR_PATHS


class Authenticate:
    """ASGI middleware: authenticates every /v1 request from its headers alone, before any of its body is read,
    and answers 401 (or 429) without reading it; the tenant goes to the route through the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_key(scope):
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        if not settings.require_api_keys:
            scope[TENANT] = DEFAULT_TENANT
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization", "")
        address = scope["client"][0] if scope.get("client") else "unknown"
        door = front_door(scope)
        try:
            if door.pg is not None:
                scope[TENANT] = await _tenant_from_door(door, authorization, address, settings)
            else:
                scope[TENANT] = await run_in_threadpool(_tenant_of, authorization, address, settings)
        except ApiError as exc:
            await api_error_response(exc)(scope, receive, send)
            return
        except OperationalError:
            await database_down_response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def current_tenant(request: Request) -> str:
    """The tenant Authenticate found for this request (the default tenant when keys are not required)."""
    tenant = request.scope.get(TENANT)
    if tenant is None:  # a /v1 route outside the middleware's reach: refuse rather than guess
        raise Unauthorized(UNAUTHORIZED)
    return str(tenant)


TenantDep = Annotated[str, Depends(current_tenant)]
