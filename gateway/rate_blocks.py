"""Per-key request counts per clock minute, shared by every gateway process through Redis, at most one Redis
round trip per BLOCK_SHARE of a key's limit.

Each request takes a position in its key's minute: positions up to the limit are admitted, later ones refused.
A process reserves positions in blocks (one INCRBY of the block's size) and hands them out itself until the block
is used up, so a key near its limit costs one round trip per block instead of one per request. The count errs on
the safe side: positions a process reserved and did not use this minute count as used, so a key sending from P
processes can be refused up to P x (block - 1) requests before its limit (at most BLOCK_SHARE of it per process);
it is never admitted past it. Limits under 2 x BLOCK_SHARE reserve one position at a time (exact counting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis

BLOCK_SHARE = 100  # a block is 1/100 of the limit: 60 positions of the default 6,000 a minute
ENTRIES = 10_000  # keys remembered at most; past it the blocks start over (their positions count as used)


def block_size(limit: int) -> int:
    """Positions reserved per round trip for a limit."""
    return max(1, limit // BLOCK_SHARE)


@dataclass
class Block:
    minute: int
    next: int  # the next position to hand out
    last: int  # the last position of the block


@dataclass
class RateBlocks:
    """The blocks this process holds, by counter name."""

    client: aioredis.Redis
    blocks: dict[str, Block] = field(default_factory=dict)

    async def position(self, name: str, minute: int, limit: int) -> int:
        """This request's position among the name's requests this minute (1-based; over the limit: refuse).
        Raises what Redis raises when it does not answer."""
        block = self.blocks.get(name)
        if block is not None and block.minute == minute and block.next <= block.last:
            block.next += 1
            return block.next - 1
        if block is not None and block.minute == minute and block.last >= limit:
            return block.last + 1  # over the limit for the rest of the minute: no round trip to learn it again
        size = block_size(limit)
        key = f"llmq:rate:{name}:{minute}"
        last = int(await self.client.incrby(key, size))
        if last == size:  # the minute's first block: the counter goes away after the next minute
            await self.client.expire(key, 120)
        first = last - size + 1
        current = self.blocks.get(name)
        # Another request of this name may have reserved a block while this one waited: keep the one with more
        # positions left (the other's unused positions count as used).
        if current is None or current.minute != minute or current.last - current.next < last - first:
            if len(self.blocks) >= ENTRIES:
                self.blocks.clear()
            self.blocks[name] = Block(minute, first + 1, last)
        return first
