"""Rate counting in blocks (gateway/rate_blocks.py) against a real Redis: processes sharing a key never admit
past its limit between them, a small limit counts exactly, and a block costs one round trip."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from gateway.rate_blocks import RateBlocks, block_size


def _admitted(url: str, processes: int, requests: int, limit: int, name: str) -> list[int]:
    """How many requests each of `processes` counters (one per gateway process) admitted, their requests
    interleaved."""

    async def run() -> list[int]:
        counters = [RateBlocks(aioredis.Redis.from_url(url)) for _ in range(processes)]
        admitted = [0] * processes
        try:
            for i in range(requests):
                p = i % processes
                if await counters[p].position(name, 1000, limit) <= limit:
                    admitted[p] += 1
        finally:
            for c in counters:
                await c.client.aclose()
        return admitted

    return asyncio.run(run())


def test_processes_sharing_a_key_never_admit_past_its_limit(quiet_redis_url: str) -> None:
    redis.Redis.from_url(quiet_redis_url).delete("llmq:rate:k-shared:1000")
    admitted = _admitted(quiet_redis_url, processes=3, requests=9000, limit=6000, name="k-shared")
    assert sum(admitted) <= 6000
    assert sum(admitted) >= 6000 - 3 * (block_size(6000) - 1)  # what unused reserved positions may cost


def test_a_small_limit_counts_every_request_exactly(quiet_redis_url: str) -> None:
    redis.Redis.from_url(quiet_redis_url).delete("llmq:rate:k-small:1000")
    assert block_size(150) == 1
    assert sum(_admitted(quiet_redis_url, processes=2, requests=200, limit=150, name="k-small")) == 150


def _incrby_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_incrby", {}).get("calls", 0))


def test_a_block_costs_one_round_trip(quiet_redis_url: str) -> None:
    client = redis.Redis.from_url(quiet_redis_url)
    client.delete("llmq:rate:k-trips:1000")
    before = _incrby_calls(client)
    _admitted(quiet_redis_url, processes=1, requests=600, limit=6000, name="k-trips")
    assert _incrby_calls(client) - before == 600 // block_size(6000)
    assert int(client.get("llmq:rate:k-trips:1000") or 0) == 600  # every reserved position was used
    assert 0 < client.ttl("llmq:rate:k-trips:1000") <= 120
