"""The console's share of Redis: the live event feed (pub/sub), the index of ended calls and the
count of failed sign-ins.

Calls publish their events from the audio path, so publishing never awaits: an event goes into a
bounded queue that one task empties, pipelined; when the queue is full (Redis slow or gone) the
event is dropped and counted. The console is a view: a lost event costs a line on a screen,
never audio. See relay/store/redis_keys.py for the keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .redis_keys import RedisKeys, describe, text

__all__ = ["RedisConsole"]

log = logging.getLogger("relay.store")

FEED_LINGER_S = 0.05  # a console shows an event at most this much later; calls' events share round trips
FEED_QUEUE_MAX = 2000  # events (and ended-call index updates) waiting to be published
FEED_BATCH_MAX = 200
FEED_READ_S = 5.0
FEED_READER_MAX = 1000  # events waiting for one console's event stream before it misses some


def client_key(client: str) -> str:
    """A client address as a key part: hashed, so a key list names no addresses."""
    return hashlib.sha256(client.encode("utf-8", "replace")).hexdigest()[:32]


class RedisConsole:
    def __init__(self, redis: Redis, keys: RedisKeys, state_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._state_ttl = state_ttl_s
        self._queue: collections.deque[tuple[str, bytes, float]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self._closing = False
        self._readers: set[asyncio.Queue[bytes | None]] = set()  # this process's console event streams
        self._reader: asyncio.Task[None] | None = None  # their one subscription
        self._ready: asyncio.Future[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._publisher(), name="console-feed")

    async def close(self, flush_timeout: float) -> None:
        """Publish what is queued within `flush_timeout`, then stop (a send is never cut in half:
        that would leave a pooled connection mid-reply)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        await asyncio.wait({task}, timeout=flush_timeout)
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task

    def queue_event(self, event: bytes) -> None:
        self._put("event", event, 0.0)

    def index_ended(self, call_sid: str, ended_at: float) -> None:
        self._put("ended", call_sid.encode(), ended_at)

    def _put(self, kind: str, value: bytes, score: float) -> None:
        if len(self._queue) >= FEED_QUEUE_MAX:
            self.dropped += 1
            return
        self._queue.append((kind, value, score))
        self._wake.set()

    async def _publisher(self) -> None:
        failing = False
        while not self._closing:
            await self._wake.wait()
            await asyncio.sleep(FEED_LINGER_S)  # the events of a moment go in one pipeline, not one each
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(FEED_BATCH_MAX, len(self._queue)))]
                try:
                    await self._send(batch)
                    if failing:
                        failing = False
                        log.info("console feed publishing again")
                except (RedisError, OSError) as exc:
                    self.dropped += len(batch)
                    if not failing:
                        failing = True
                        log.warning("console feed: events not published (%s); dropped", describe(exc))
                    await asyncio.sleep(0.5)

    async def _send(self, batch: list[tuple[str, bytes, float]]) -> None:
        keys = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for kind, value, score in batch:
                if kind == "event":
                    pipe.publish(keys.console_events, value)
                else:
                    pipe.zadd(keys.ended_calls, {value: score})
                    pipe.zremrangebyscore(keys.ended_calls, "-inf", time.time() - self._state_ttl)
                    pipe.expire(keys.ended_calls, self._state_ttl)
            await pipe.execute()

    async def events(self) -> AsyncIterator[bytes]:
        """Every event published from now on, by any instance, until the caller stops iterating;
        the first item is b"" once subscribed. Raises ConnectionError when the feed is lost.

        A process has one subscription however many consoles follow it (each would otherwise hold a
        pooled connection the calls' reads need): it starts with the first reader, fans out to
        each reader's bounded queue (a slow reader misses events, nobody waits for it) and stops
        with the last."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=FEED_READER_MAX)
        if self._reader is None or self._reader.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._reader = asyncio.create_task(self._read_feed(self._ready), name="console-feed-reader")
        ready = self._ready
        assert ready is not None
        self._readers.add(queue)
        try:
            await asyncio.shield(ready)
            yield b""  # subscribed: what is published from here on arrives
            while True:
                item = await queue.get()
                if item is None:
                    raise ConnectionError("the console feed's subscription was lost")
                yield item
        finally:
            self._readers.discard(queue)
            if not self._readers and self._reader is not None:
                self._reader.cancel()
                self._reader = None

    async def _read_feed(self, ready: asyncio.Future[None]) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._keys.console_events)
            ready.set_result(None)
            while True:
                message = await pubsub.get_message(timeout=FEED_READ_S)
                if message is None or message.get("type") != "message":
                    continue
                data = message.get("data")
                if isinstance(data, bytes):
                    for queue in self._readers:
                        if queue.qsize() < FEED_READER_MAX - 1:  # room kept for the end-of-feed marker
                            queue.put_nowait(data)
        except (RedisError, OSError) as exc:
            if not ready.done():
                ready.set_exception(ConnectionError(describe(exc)))
            for queue in self._readers:
                queue.put_nowait(None)  # each reader ends; its console reconnects
        finally:
            if not ready.done():
                ready.cancel()
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ended_calls(self, since: float, until: float, limit: int) -> list[tuple[str, float, dict[str, str]]]:
        redis = self._redis
        raw: Any = await redis.zrevrangebyscore(
            self._keys.ended_calls, until, since, start=0, num=limit, withscores=True
        )
        if not raw:
            return []
        async with redis.pipeline(transaction=False) as pipe:
            for member, _ in raw:
                pipe.hgetall(self._keys.call(text(member), "meta"))
            metas = await pipe.execute()
        out: list[tuple[str, float, dict[str, str]]] = []
        for (member, score), meta in zip(raw, metas, strict=True):
            if meta:
                out.append((text(member), float(score), {text(k): text(v) for k, v in meta.items()}))
        return out

    async def count_signin_failure(self, client: str, window_s: int) -> int:
        key = self._keys.console_signin(client_key(client))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=window_s, nx=True)
            pipe.incr(key)
            _, count = await pipe.execute()
        return int(count)

    async def signin_failures(self, client: str) -> int:
        raw: Any = await self._redis.get(self._keys.console_signin(client_key(client)))
        return int(text(raw)) if raw is not None else 0
