"""The outgoing webhook queue: events waiting for delivery, leased to one deliverer at a time.

An event is queued once (``enqueue``) with the time it is due. A deliverer ``lease``s the events that
are due: each is pushed ``lease_s`` into the future and its attempt number goes up by one, in one
atomic step, so no other deliverer takes it meanwhile; the attempt number is the lease's fence.
The deliverer then ``settle``s it (delivered, or given up: the event goes) or ``retry``s it at a
later time; both act only while that attempt is still the event's latest. A deliverer that dies
holds nothing: once its lease time has passed the event is due again for anyone.

``RedisWebhookQueue`` is shared by every instance and survives their restarts (keys in
relay/store/redis_keys.py); ``MemoryWebhookQueue`` lives in one process and dies with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from redis.asyncio import Redis

from .redis_keys import RedisKeys

__all__ = ["LeasedEvent", "MemoryWebhookQueue", "QueuedEvent", "RedisWebhookQueue", "WebhookQueue"]


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """One event as queued: its id (the ``webhook-id``), type, target URL, body bytes, creation time."""

    id: str
    type: str
    url: str
    body: bytes
    created: float  # epoch seconds

    def encode(self) -> bytes:
        return orjson.dumps(
            {"id": self.id, "type": self.type, "url": self.url, "body": self.body.decode(), "created": self.created}
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> QueuedEvent:
        data = orjson.loads(raw)
        return cls(data["id"], data["type"], data["url"], data["body"].encode(), float(data["created"]))


@dataclass(frozen=True, slots=True)
class LeasedEvent:
    """An event leased for one attempt (``attempt`` counts from 1)."""

    event: QueuedEvent
    attempt: int


class WebhookQueue(Protocol):
    async def enqueue(self, event: QueuedEvent, due: float) -> bool:
        """Queue `event` to be due at `due` (epoch s); False, and nothing changed, if it is queued already."""
        ...

    async def lease(self, now: float, lease_s: float, limit: int) -> list[LeasedEvent]:
        """Up to `limit` events due at `now`, each leased for `lease_s` seconds."""
        ...

    async def retry(self, event_id: str, attempt: int, due: float) -> bool:
        """Make the event due again at `due` if `attempt` is its latest lease; True if so."""
        ...

    async def settle(self, event_id: str, attempt: int) -> bool:
        """Remove the event (delivered or given up) if `attempt` is its latest lease; True if so."""
        ...

    async def depth(self) -> int:
        """Events queued (due, waiting for a retry, or leased)."""
        ...


# KEYS: due (zset), attempts (hash), events (hash). ARGV: now ms, lease ms, limit.
# Returns id, attempt, event, id, attempt, event, ...; an id without an event is dropped.
_LEASE: Final = """
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local event = redis.call('HGET', KEYS[3], id)
  if event then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    local attempt = redis.call('HINCRBY', KEYS[2], id, 1)
    out[#out + 1] = id
    out[#out + 1] = attempt
    out[#out + 1] = event
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  end
end
return out
"""
# KEYS: due, attempts, events. ARGV: id, event, due ms.
_ENQUEUE: Final = """
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], 0)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
# KEYS: due, attempts. ARGV: id, attempt, due ms.
_RETRY: Final = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
# KEYS: due, attempts, events. ARGV: id, attempt.
_SETTLE: Final = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisWebhookQueue:
    """`WebhookQueue` on Redis, one Lua script per step; unbounded in time (callers bound them)."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self._keys = [keys.webhooks_due, keys.webhooks_attempts, keys.webhooks_events]
        self._redis = redis
        self._enqueue = redis.register_script(_ENQUEUE)
        self._lease = redis.register_script(_LEASE)
        self._retry = redis.register_script(_RETRY)
        self._settle = redis.register_script(_SETTLE)

    async def enqueue(self, event: QueuedEvent, due: float) -> bool:
        return bool(await self._enqueue(keys=self._keys, args=[event.id, event.encode(), _ms(due)]))

    async def lease(self, now: float, lease_s: float, limit: int) -> list[LeasedEvent]:
        raw: list[Any] = await self._lease(keys=self._keys, args=[_ms(now), _ms(lease_s), limit])
        return [LeasedEvent(QueuedEvent.decode(raw[i + 2]), int(raw[i + 1])) for i in range(0, len(raw), 3)]

    async def retry(self, event_id: str, attempt: int, due: float) -> bool:
        return bool(await self._retry(keys=self._keys[:2], args=[event_id, attempt, _ms(due)]))

    async def settle(self, event_id: str, attempt: int) -> bool:
        return bool(await self._settle(keys=self._keys, args=[event_id, attempt]))

    async def depth(self) -> int:
        return int(await self._redis.zcard(self._keys[0]))


class MemoryWebhookQueue:
    """`WebhookQueue` in this process (no REDIS_URL): what is queued is lost when the process ends."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._events: dict[str, QueuedEvent] = {}
        self._due: dict[str, float] = {}
        self._attempts: dict[str, int] = {}

    async def enqueue(self, event: QueuedEvent, due: float) -> bool:
        if event.id in self._events:
            return False
        self._events[event.id] = event
        self._attempts[event.id] = 0
        self._due[event.id] = due
        return True

    async def lease(self, now: float, lease_s: float, limit: int) -> list[LeasedEvent]:
        due = sorted((at, event_id) for event_id, at in self._due.items() if at <= now)[:limit]
        leased = []
        for _, event_id in due:
            self._due[event_id] = now + lease_s
            self._attempts[event_id] += 1
            leased.append(LeasedEvent(self._events[event_id], self._attempts[event_id]))
        return leased

    async def retry(self, event_id: str, attempt: int, due: float) -> bool:
        if self._attempts.get(event_id) != attempt:
            return False
        self._due[event_id] = due
        return True

    async def settle(self, event_id: str, attempt: int) -> bool:
        if self._attempts.get(event_id) != attempt:
            return False
        del self._events[event_id], self._due[event_id], self._attempts[event_id]
        return True

    async def depth(self) -> int:
        return len(self._events)
