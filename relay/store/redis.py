"""Redis-backed `Store`: shared state for horizontally scaled instances, kept off the audio path.

The key layout is relay/store/redis_keys.py's. Writes (the non-async methods) only append to the
queue of relay/store/redis_writer.py, whose one task writes them in pipelines; reads and claims
are awaited here, each bounded by the I/O timeout; ownership's commands are relay/store/redis_live.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .base import (
    CallRecord,
    EndedCall,
    InstanceRecord,
    LiveCall,
    LiveCallRecord,
    StoreUnavailable,
    encode_event,
    hash_number,
)
from .redis_console import RedisConsole
from .redis_keys import RedisKeys, describe, text
from .redis_live import RedisOwnership
from .redis_outbound import RedisOutbound
from .redis_writer import BatchWriter
from .webhook_queue import RedisWebhookQueue

# Compare-and-delete: the disposition goes only if it is still the one expected.
_TAKE_DISPOSITION = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

__all__ = ["RedisStore"]

_T = TypeVar("_T")


def _decode_entries(raw: list[Any]) -> list[dict[str, Any]]:
    """Decode stored entries; one corrupt item must not make the whole call unreadable."""
    out: list[dict[str, Any]] = []
    for item in raw:
        try:
            value = orjson.loads(item)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


class RedisStore:
    """`Store` on Redis; see the module docstring for where each part lives."""

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "relay:",
        state_ttl_s: int = 7 * 24 * 3600,
        caller_memory_ttl_s: int = 30 * 24 * 3600,
        queue_size: int = 10_000,
        batch_max: int = 500,
        linger_s: float = 0.1,
        ttl_refresh_s: float = 60.0,
        max_connections: int = 50,
        io_timeout_s: float = 1.0,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 2.0,
        caller_key_secret: bytes,
        logger: logging.Logger | None = None,
    ) -> None:
        if state_ttl_s < 1 or caller_memory_ttl_s < 1:
            raise ValueError("TTLs must be >= 1 s")
        if not caller_key_secret:
            raise ValueError("caller_key_secret must not be empty")
        self._keys = RedisKeys(prefix)
        self._state_ttl = state_ttl_s
        self._io_timeout = io_timeout_s
        self._caller_key = caller_key_secret
        self._log = logger or logging.getLogger("relay.store")
        # Our own writer does the retrying (with backoff and outage logging); the client only
        # retries once, immediately, on a connection error: a pooled connection the server closed.
        # A burst of call set-ups (two reads each) can want more connections than the pool has: a
        # blocking pool makes them wait their turn (within the I/O timeout) instead of failing at once
        # with "Too many connections", as redis-py's default pool does at 100.
        pool = BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=io_timeout_s,
            decode_responses=False,
            socket_timeout=io_timeout_s,
            socket_connect_timeout=io_timeout_s,
            health_check_interval=15,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._ownership = RedisOwnership(self._redis, self._keys)
        self._outbound = RedisOutbound(self._redis, self._keys)
        self._take_disposition = self._redis.register_script(_TAKE_DISPOSITION)
        self._webhooks = RedisWebhookQueue(self._redis, self._keys)
        self._writer = BatchWriter(
            self._redis,
            self._keys,
            state_ttl_s=state_ttl_s,
            caller_memory_ttl_s=caller_memory_ttl_s,
            queue_size=queue_size,
            batch_max=batch_max,
            linger_s=linger_s,
            ttl_refresh_s=ttl_refresh_s,
            io_timeout_s=io_timeout_s,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            logger=self._log,
        )
        self._console = RedisConsole(self._redis, self._keys, state_ttl_s)
        self._closed = False

    # lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer; does not touch Redis, so start-up never waits on it."""
        if self._closed:
            raise RuntimeError("store is closed")
        self._writer.start()
        self._console.start()

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Flush within `flush_timeout`, stop the writer, report lost writes, close the pool."""
        if self._closed:
            return
        await self._writer.close(flush_timeout)
        await self._console.close(0.5)
        self._closed = True
        await self._redis.aclose()

    # writes: called from the audio path; queued, never awaited -----------------------------------

    def call_started(self, call_sid: str, meta: Mapping[str, str]) -> None:
        self._writer.put_meta(call_sid, meta)

    def call_updated(self, call_sid: str, meta: Mapping[str, str]) -> None:
        self._writer.put_meta(call_sid, meta)
        if isinstance(meta, Mapping) and "ended" in meta:
            # A finished call is read right away (GET /calls/{sid}, the next call's memory):
            # its last writes go out now instead of waiting out the linger.
            self._writer.write_now()
            if meta["ended"]:
                self._console.index_ended(call_sid, time.time())

    def add_entry(self, call_sid: str, entry: Mapping[str, Any]) -> None:
        self._writer.put_entry(call_sid, entry)
        # What a resumed stream is seeded with (turns, tool results, the summary) goes out at once: an
        # instance killed mid-linger would otherwise take up to linger_s of the conversation with it.
        self._writer.write_now()

    def add_usage(self, call_sid: str, usage: Mapping[str, int]) -> None:
        self._writer.put_usage(call_sid, usage)

    def add_totals(self, call_sid: str, amounts: Mapping[str, float]) -> None:
        self._writer.put_totals(call_sid, amounts)

    def set_summary(self, call_sid: str, summary: str) -> None:
        self._writer.put_summary(call_sid, summary)
        self._writer.write_now()

    def set_caller_memory(self, caller_number: str, summary: str) -> None:
        try:
            hashed = hash_number(caller_number, self._caller_key)
        except Exception as exc:
            self._writer.reject(exc)
            return
        self._writer.put_caller_memory(hashed, summary)

    # reads: awaited, bounded, StoreUnavailable on failure ----------------------------------------

    async def get_call(self, call_sid: str) -> CallRecord | None:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:  # one consistent snapshot
                pipe.hgetall(self._keys.call(call_sid, "meta"))
                pipe.lrange(self._keys.call(call_sid, "entries"), 0, -1)
                pipe.get(self._keys.call(call_sid, "summary"))
                pipe.hgetall(self._keys.call(call_sid, "usage"))
                return await pipe.execute()

        meta_raw, entries_raw, summary_raw, usage_raw = await self._read("get_call", read)
        if not (meta_raw or entries_raw or summary_raw is not None or usage_raw):
            return None
        return CallRecord(
            call_sid=call_sid,
            meta={text(k): text(v) for k, v in meta_raw.items()},
            entries=_decode_entries(entries_raw),
            summary=None if summary_raw is None else text(summary_raw),
            usage={text(k): int(v) for k, v in usage_raw.items()},
        )

    async def recent_entries(self, call_sid: str, n: int) -> list[dict[str, Any]]:
        if n <= 0:
            return []
        key = self._keys.call(call_sid, "entries")

        async def read() -> list[Any]:
            return list(await self._redis.lrange(key, -n, -1))

        return _decode_entries(await self._read("recent_entries", read))

    async def get_caller_memory(self, caller_number: str) -> str | None:
        key = self._keys.caller(hash_number(caller_number, self._caller_key))

        async def read() -> Any:
            return await self._redis.get(key)

        raw = await self._read("get_caller_memory", read)
        return None if raw is None else text(raw)

    async def set_disposition(self, call_sid: str, disposition: str) -> None:
        key = self._keys.call(call_sid, "disposition")

        async def write() -> Any:
            return await self._redis.set(key, disposition.encode(), ex=self._state_ttl)

        await self._read("set_disposition", write)

    async def get_disposition(self, call_sid: str) -> str | None:
        key = self._keys.call(call_sid, "disposition")

        async def read() -> Any:
            return await self._redis.get(key)

        raw = await self._read("get_disposition", read)
        return None if raw is None else text(raw)

    async def take_disposition(self, call_sid: str, disposition: str) -> bool:
        key = self._keys.call(call_sid, "disposition")

        async def take() -> Any:
            return await self._take_disposition(keys=[key], args=[disposition.encode()])

        return bool(await self._read("take_disposition", take))

    async def count_continuation(self, call_sid: str, window_s: int) -> int:
        key = self._keys.call(call_sid, "continuations")

        async def count() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(key, b"0", ex=window_s, nx=True)  # the window starts with its first continuation
                pipe.incr(key)
                return await pipe.execute()

        return int((await self._read("count_continuation", count))[1])

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        full_key = self._keys.once(key)

        async def claim() -> Any:
            return await self._redis.set(full_key, b"1", nx=True, ex=ttl_s)

        return bool(await self._read("claim_once", claim))

    # outbound calls (relay/store/redis_outbound.py) ---------------------------------------------

    async def outbound_admit(self, ref: str, cap: int, per_minute: int) -> str | None:
        return await self._read("outbound_admit", lambda: self._outbound.admit(ref, cap, per_minute))

    async def outbound_done(self, ref: str) -> None:
        await self._read("outbound_done", lambda: self._outbound.done(ref))

    async def claim_idempotency_key(self, key: str, ttl_s: int) -> str | None:
        return await self._read("claim_idempotency_key", lambda: self._outbound.claim_key(key, ttl_s))

    async def set_idempotency_key(self, key: str, call_sid: str, ttl_s: int) -> None:
        await self._read("set_idempotency_key", lambda: self._outbound.set_key(key, call_sid, ttl_s))

    async def drop_idempotency_key(self, key: str) -> None:
        await self._read("drop_idempotency_key", lambda: self._outbound.drop_key(key))

    async def link_outbound(self, ref: str, call_sid: str, ttl_s: int) -> None:
        await self._read("link_outbound", lambda: self._outbound.link(ref, call_sid, ttl_s))

    async def outbound_call_sid(self, ref: str) -> str | None:
        return await self._read("outbound_call_sid", lambda: self._outbound.call_sid(ref))

    # live-stream ownership (relay/store/redis_live.py) -------------------------------------------

    async def claim_live(self, call_sid: str, owner: str, ttl_s: float, record: LiveCallRecord | None = None) -> bool:
        return await self._read("claim_live", lambda: self._ownership.claim(call_sid, owner, ttl_s, record))

    async def refresh_live(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        return await self._read("refresh_live", lambda: self._ownership.refresh(call_sid, owner, ttl_s))

    async def beat(self, instance: InstanceRecord, calls: Sequence[LiveCallRecord], ttl_s: float) -> list[bool]:
        return await self._read("beat", lambda: self._ownership.beat(instance, calls, ttl_s))

    async def release_live(self, call_sid: str, owner: str) -> bool:
        return await self._read("release_live", lambda: self._ownership.release(call_sid, owner))

    async def hand_off(self, call_sid: str, owner: str) -> bool:
        return await self._read("hand_off", lambda: self._ownership.hand_off(call_sid, owner))

    async def live_owner(self, call_sid: str) -> str | None:
        return await self._read("live_owner", lambda: self._ownership.owner(call_sid))

    async def keep_presence(self, instance_id: str, on_message: Callable[[bytes], None] | None = None) -> None:
        await self._ownership.keep_presence(instance_id, on_message)

    async def send_to_instance(self, instance_id: str, message: bytes) -> bool:
        return await self._read("send_to_instance", lambda: self._ownership.send(instance_id, message))

    async def instance_gone(self, instance_id: str, stale_s: float) -> bool:
        return await self._read("instance_gone", lambda: self._ownership.gone(instance_id, stale_s))

    async def take_over_live(
        self, call_sid: str, gone: str, owner: str, ttl_s: float, record: LiveCallRecord | None = None
    ) -> bool:
        taken = self._ownership.take_over
        return await self._read("take_over_live", lambda: taken(call_sid, gone, owner, ttl_s, record))

    async def live_instances(self) -> list[InstanceRecord]:
        return await self._read("live_instances", self._ownership.instances)

    async def live_calls(self) -> list[LiveCall]:
        return await self._read("live_calls", self._ownership.calls)

    def webhook_queue(self) -> RedisWebhookQueue:
        return self._webhooks

    # the console: its live feed, the index of ended calls, failed sign-ins

    def publish_event(self, event: Mapping[str, Any]) -> None:
        try:
            self._console.queue_event(encode_event(event))
        except Exception as exc:
            self._writer.reject(exc)

    async def console_events(self) -> AsyncIterator[bytes]:
        if self._closed:
            raise StoreUnavailable("store is closed")
        try:
            async for message in self._console.events():
                yield message
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis console feed lost: {describe(exc)}") from exc

    async def ended_calls(self, since: float, until: float, limit: int) -> list[EndedCall]:
        found = await self._read("ended_calls", lambda: self._console.ended_calls(since, until, limit))
        return [EndedCall(sid, ended, meta) for sid, ended, meta in found]

    async def count_signin_failure(self, client: str, window_s: int) -> int:
        return await self._read("count_signin_failure", lambda: self._console.count_signin_failure(client, window_s))

    async def signin_failures(self, client: str) -> int:
        return await self._read("signin_failures", lambda: self._console.signin_failures(client))

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            async with asyncio.timeout(self._io_timeout):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def flush(self, timeout: float) -> bool:
        """True once nothing queued before this call is pending (written, or dropped and counted).

        False on timeout, or if the writer is not running (nothing would ever drain the queue).
        """
        return await self._writer.flush(timeout)

    # observability -------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._writer.queue_depth

    @property
    def dropped_writes(self) -> int:
        return self._writer.dropped

    @property
    def kind(self) -> str:
        return "redis"

    # helpers -------------------------------------------------------------------------------------

    async def _read(self, what: str, fn: Callable[[], Awaitable[_T]]) -> _T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        try:
            async with asyncio.timeout(self._io_timeout * 2):
                return await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis {what} failed: {describe(exc)}") from exc
