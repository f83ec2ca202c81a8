"""Closing Redis connections without hanging the gateway.

redis-py's asyncio close can stall while it waits for the socket to finish closing (redis/redis-py#3941);
awaited bare, that would hang a gateway's shutdown, or keep a finished stream's request open forever.
Every close here gets a deadline instead; a close that misses it is abandoned (the socket is closed
already; only the wait for it is given up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 2.0


async def close_within(closing: Awaitable[object], what: str, timeout: float = CLOSE_TIMEOUT_SECONDS) -> bool:
    """Awaits closing for at most timeout seconds; whether it completed. Errors are logged, not raised."""
    task = asyncio.ensure_future(closing)
    # asyncio.wait, not wait_for: wait_for would wait again for the cancelled close to finish.
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        log.warning("closing %s took more than %.1f s; gave up waiting", what, timeout)
        return False
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("closing %s failed: %s", what, exc)
    return True
