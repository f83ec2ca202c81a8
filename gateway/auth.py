"""Who is asking: the tenant behind the request's API key, and the per-key rate limit."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Annotated

import redis
from fastapi import Depends, Request

from gateway.deps import SessionDep, SettingsDep
from gateway.errors import RateLimited, Unauthorized
from shared.api_keys import authenticate
from shared.models import DEFAULT_TENANT
from shared.notify import redis_url
from shared.settings import Settings

UNAUTHORIZED = "invalid or missing API key"  # the same answer whatever was wrong


class MinuteWindows:
    """Counts requests per key per clock minute: in Redis when there is one, else in this process."""

    def __init__(self, url: str | None) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=1) if url else None
        self._local: dict[tuple[str, int], int] = defaultdict(int)
        self._lock = threading.Lock()

    def hit(self, key_id: str, minute: int) -> int:
        """This request's number within its key's minute."""
        if self._redis is not None:
            name = f"llmq:rate:{key_id}:{minute}"
            pipe = self._redis.pipeline()
            pipe.incr(name)
            pipe.expire(name, 120)
            return int(pipe.execute()[0])
        with self._lock:
            for stale in [k for k in self._local if k[1] < minute]:
                del self._local[stale]
            self._local[(key_id, minute)] += 1
            return self._local[(key_id, minute)]


_windows: dict[str | None, MinuteWindows] = {}


def _check_rate(key_id: str, settings: Settings) -> None:
    if settings.rate_limit_per_minute == 0:
        return
    url = redis_url()
    windows = _windows.setdefault(url, MinuteWindows(url))
    now = time.time()
    if windows.hit(key_id, int(now // 60)) > settings.rate_limit_per_minute:
        raise RateLimited(
            f"rate limit of {settings.rate_limit_per_minute} requests per minute exceeded",
            retry_after=int(60 - now % 60) + 1,
        )


def current_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> str:
    """The tenant of the request's API key (the default tenant when keys are not required); 401 otherwise."""
    if not settings.require_api_keys:
        return DEFAULT_TENANT
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = authenticate(session, token.strip()) if scheme.lower() == "bearer" else None
    session.rollback()
    if found is None:
        raise Unauthorized(UNAUTHORIZED)
    tenant, key_id = found
    _check_rate(key_id, settings)
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
