"""Outbound calls on Redis: the cluster-wide cap and rate, idempotency keys and the stream's reference.

The cap counts calls in progress in one sorted set (a reference per call, scored by when it was
placed; entries older than OUTBOUND_STALE_S are dropped, so a call whose final status callback
never came frees its place eventually); the rate is a per-minute counter. Both are checked and
taken in one Lua script, so two instances never both take the last place.
"""

from __future__ import annotations

import time
from typing import Final

from redis.asyncio import Redis

from .base import OUTBOUND_STALE_S
from .redis_keys import RedisKeys, text

__all__ = ["RedisOutbound"]

# KEYS: active set, rate counter. ARGV: stale before (ms), cap, per minute, now (ms), reference.
_ADMIT: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 'cap' end
local placed = tonumber(redis.call('GET', KEYS[2]) or '0')
if placed >= tonumber(ARGV[3]) then return 'rate' end
if placed == 0 then redis.call('SET', KEYS[2], '1', 'EX', 60) else redis.call('INCR', KEYS[2]) end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[1], 86400)
return ''
"""


class RedisOutbound:
    """The outbound commands of `RedisStore` (it bounds them in time and maps failures)."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._admit = redis.register_script(_ADMIT)

    async def admit(self, ref: str, cap: int, per_minute: int) -> str | None:
        now_ms = int(time.time() * 1000)
        stale = now_ms - OUTBOUND_STALE_S * 1000
        keys = [self._keys.outbound_active, self._keys.outbound_rate]
        refused = text(await self._admit(keys=keys, args=[stale, cap, per_minute, now_ms, ref]))
        return refused or None

    async def done(self, ref: str) -> None:
        await self._redis.zrem(self._keys.outbound_active, ref)

    async def claim_key(self, key: str, ttl_s: int) -> str | None:
        full = self._keys.outbound_idempotency(key)
        if await self._redis.set(full, b"", nx=True, ex=ttl_s):
            return None
        raw = await self._redis.get(full)
        return "" if raw is None else text(raw)

    async def set_key(self, key: str, call_sid: str, ttl_s: int) -> None:
        await self._redis.set(self._keys.outbound_idempotency(key), call_sid.encode(), ex=ttl_s)

    async def drop_key(self, key: str) -> None:
        await self._redis.delete(self._keys.outbound_idempotency(key))

    async def link(self, ref: str, call_sid: str, ttl_s: int) -> None:
        await self._redis.set(self._keys.outbound_ref(ref), call_sid.encode(), ex=ttl_s)

    async def call_sid(self, ref: str) -> str | None:
        raw = await self._redis.get(self._keys.outbound_ref(ref))
        return None if raw is None else text(raw)
