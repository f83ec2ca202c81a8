"""What a gateway process keeps open for its hot paths (authenticate, submit, poll), so that they run on the
event loop without a thread hop: the asyncpg pool (Postgres only), the broker's Redis for publishing, the rate
counters' blocks (gateway.rate_blocks), and the cache of keys found valid.

The app's lifespan opens it (app.state.front_door). An app whose lifespan did not run (a TestClient used
without `with`), the embedded SQLite database and the file broker get None in the matching field, and those
paths go through SQLAlchemy sessions and Celery in a worker thread, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.types import Scope

from gateway import pg
from gateway.pg import GroupedInserts
from gateway.publish import Publisher, broker_client
from gateway.rate_blocks import RateBlocks
from shared.api_keys import PREFIX, _hash
from shared.notify import redis_url
from shared.settings import Settings

log = logging.getLogger(__name__)

_DUMMY_HASH = _hash("no such key")
CACHE_ENTRIES = 10_000  # keys remembered at most; past it the cache starts over


@dataclass
class KeyCache:
    """Keys found valid, by the SHA-256 of the whole token: (tenant, key id, monotonic time they expire)."""

    seconds: float
    found: dict[bytes, tuple[str, str, float]] = field(default_factory=dict)

    def get(self, digest: bytes, now: float) -> tuple[str, str] | None:
        entry = self.found.get(digest)
        if entry is None or entry[2] <= now:
            return None
        return entry[0], entry[1]

    def put(self, digest: bytes, tenant: str, key_id: str, now: float) -> None:
        if self.seconds <= 0:
            return
        if len(self.found) >= CACHE_ENTRIES:
            self.found.clear()
        self.found[digest] = (tenant, key_id, now + self.seconds)


@dataclass
class FrontDoor:
    pg: asyncpg.Pool | None = None
    inserts: GroupedInserts | None = None  # with pg
    broker: Publisher | None = None
    counters: RateBlocks | None = None
    keys: KeyCache = field(default_factory=lambda: KeyCache(0.0))

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.close()
        for client in (
            self.broker.client if self.broker is not None else None,
            self.counters.client if self.counters is not None else None,
        ):
            if client is not None:
                await client.aclose()

    async def lookup_key(self, token: str) -> tuple[str, str] | None:
        """(tenant, key id) of a valid, live key from the cache or the database (Postgres only: None in the
        pool field means the caller looks it up through SQLAlchemy); None for anything else."""
        assert self.pg is not None
        now = time.monotonic()
        digest = hashlib.sha256(token.encode()).digest()
        cached = self.keys.get(digest, now)
        if cached is not None:
            return cached
        prefix, _, rest = token.partition("-")
        key_id, _, secret = rest.partition("-")
        row = await pg.key_row(self.pg, key_id) if prefix == PREFIX and key_id and secret else None
        expected = row["secret_sha256"] if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(expected, _hash(secret))
        if row is None or not matches or row["revoked_at"] is not None:
            return None
        self.keys.put(digest, row["tenant"], key_id, now)
        return row["tenant"], key_id

    async def count(self, name: str, minute: int, limit: int) -> int | None:
        """This request's position among name's requests in this minute (over limit: refuse), counted in Redis
        in blocks (gateway.rate_blocks: one round trip per block, not per request); None when there is no Redis,
        or it does not answer (the caller counts in this process)."""
        if self.counters is None:
            return None
        try:
            return await self.counters.position(name, minute, limit)
        except (RedisError, OSError) as exc:
            log.warning("rate counting in Redis failed (%s); counting in this process", exc)
            return None


async def open_front_door(settings: Settings) -> FrontDoor:
    """What this process's hot paths use, for the configured database and broker."""
    counters_url = redis_url()
    broker = broker_client(settings.resolved_broker_url)
    pool = await pg.open_pool(settings.resolved_database_url)
    return FrontDoor(
        pg=pool,
        inserts=pg.GroupedInserts(pool) if pool is not None else None,
        broker=Publisher(broker) if broker is not None else None,
        counters=RateBlocks(aioredis.Redis.from_url(counters_url, socket_timeout=1)) if counters_url else None,
        keys=KeyCache(settings.key_cache_seconds),
    )


NO_FRONT_DOOR = FrontDoor()


def front_door(scope: Scope) -> FrontDoor:
    """The app's FrontDoor, or one with nothing open when its lifespan did not run."""
    app = scope.get("app")
    door = getattr(app.state, "front_door", None) if app is not None else None
    return door if isinstance(door, FrontDoor) else NO_FRONT_DOOR
