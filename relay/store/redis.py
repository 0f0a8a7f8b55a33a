"""Redis-backed `Store`: shared state for horizontally scaled instances, kept off the audio path.

Key layout (P is the prefix, default ``relay:``; every value is UTF-8)::

    P call:{sid}:meta      hash    call metadata: from, to, started (ISO 8601), instance, dialect,
                                   model, stream_sid, ended, end_reason ... (HSET merges fields)
    P call:{sid}:entries   list    conversation entries, one JSON object each, oldest first (RPUSH)
    P call:{sid}:usage     hash    token counts by kind, summed (HINCRBY)
    P call:{sid}:summary   string  rolling conversation summary
    P call:{sid}:applied   hash    writer id -> last applied write sequence; makes a retried batch
                                   append entries / add usage exactly once
    P caller:{hash}        string  caller memory; {hash} = HMAC-SHA256 hex of the normalized
                                   E.164 number, keyed by the caller-key secret; TTL caller_memory_ttl_s
    P once:{key}           string  claim_once marker (SET NX EX ttl)
    P live:{sid}           string  the instance id whose stream of this call is live (SET NX PX,
                                   refreshed by that stream's heartbeat, compare-and-delete at its end)

TTLs: a batch that creates a call key (the first write of its kind for that call) gives all five
of the call's keys ``EXPIRE state_ttl_s``, so no key is ever left without one; so does the write
that ends the call (``ended`` in its metadata), so a finished call's keys expire together. In
between, a call's TTLs are refreshed at most once per `ttl_refresh_s`, not with every write: each
``EXPIRE`` is a command of its own, and five per write were most of the writer's work.

Writes (the non-async methods) only append to a bounded in-process queue. One writer task sends
what is queued (up to `batch_max` ops) as one non-transactional pipeline, after letting writes
collect for `linger_s` (a call's turn produces several at once; ``flush()``, ``close()`` and the
write that ends a call cut the wait short). A batch stays at the head of the queue until Redis
confirms it, so per-call order survives retries; when the queue is full the oldest ops are
dropped and counted. Appends and increments go through a small Lua script guarded by the
``applied`` sequence, because a batch that timed out may still have been executed by Redis (a
stalled server runs what is in its socket buffer when it wakes up) and replaying it must not
duplicate entries or token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final, TypeVar

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from .base import CallRecord, StoreUnavailable, encode_entry, hash_number

__all__ = ["RedisStore"]

_T = TypeVar("_T")

# Appends an entry ("e") or adds usage counts ("u") unless this writer already applied `seq`
# for this call. KEYS: target, applied-hash. ARGV: writer id, seq, mode, payload...
_APPLY_ONCE: Final = b"""
local seen = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local seq = tonumber(ARGV[2])
if seq <= seen then return 0 end
if ARGV[3] == 'e' then
  redis.call('RPUSH', KEYS[1], ARGV[4])
else
  for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""
_APPLY_ONCE_SHA: Final = hashlib.sha1(_APPLY_ONCE).hexdigest()

# Live-stream ownership: act only while ARGV[1] still holds KEYS[1]. ARGV: owner [, ttl ms].
_REFRESH_LIVE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LIVE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Failures worth retrying: the connection, the clock, or a server that is temporarily unable to
# accept writes. Anything else returned for a command is a permanent refusal of that op.
_TRANSIENT_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_TRANSIENT_REPLIES: Final = (ReadOnlyError, OutOfMemoryError, TryAgainError, RedisConnectionError)

_META, _ENTRY, _USAGE, _SUMMARY, _CALLER = "meta", "entry", "usage", "summary", "caller"
_CALL_KEY_SUFFIXES: Final = ("meta", "entries", "usage", "summary", "applied")
_SUFFIXES_WRITTEN: Final = {
    _META: frozenset({"meta"}),
    _ENTRY: frozenset({"entries", "applied"}),
    _USAGE: frozenset({"usage", "applied"}),
    _SUMMARY: frozenset({"summary"}),
}
_TTL_STATE_MAX: Final = 100_000


class _RetryBatch(Exception):
    """Redis answered, but the batch must be sent again (script cache flushed, read-only ...)."""


@dataclass(slots=True)
class _Op:
    """One queued write; `seq` orders ops and lets the Lua guard recognise replays."""

    seq: int
    kind: str
    target: str  # call SID, or the hashed caller number for _CALLER
    value: bytes = b""
    fields: dict[str, str] | None = None
    counts: dict[str, int] | None = None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError("ttl_s must be > 0")
    return max(1, int(seconds * 1000))


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


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
    """`Store` on Redis; see the module docstring for the key layout and write path."""

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
        if queue_size < 1 or batch_max < 1:
            raise ValueError("queue_size and batch_max must be >= 1")
        if linger_s < 0:
            raise ValueError("linger_s must be >= 0")
        if state_ttl_s < 1 or caller_memory_ttl_s < 1:
            raise ValueError("TTLs must be >= 1 s")
        self._prefix = prefix
        self._state_ttl = state_ttl_s
        self._caller_ttl = caller_memory_ttl_s
        self._queue_size = queue_size
        self._batch_max = batch_max
        self._linger = linger_s
        self._ttl_refresh = ttl_refresh_s
        # call SID -> (when its TTLs were last set, the key suffixes that existed then); only
        # calls in progress: the entry goes with the write that ends the call
        self._ttl_state: dict[str, tuple[float, frozenset[str]]] = {}
        self._ttl_pending: dict[str, tuple[float, frozenset[str]] | None] = {}
        self._io_timeout = io_timeout_s
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        if not caller_key_secret:
            raise ValueError("caller_key_secret must not be empty")
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
        self._refresh_live = self._redis.register_script(_REFRESH_LIVE)
        self._release_live = self._redis.register_script(_RELEASE_LIVE)
        self._writer_id = uuid.uuid4().hex[:16]
        self._queue: deque[_Op] = deque()
        self._seq = 0
        self._dropped = 0
        # ops of the batch being sent that producers evicted meanwhile; they count as dropped
        # unless the batch succeeds after all
        self._inflight_last = 0
        self._inflight_evicted = 0
        self._script_loaded = False
        self._wakeup = asyncio.Event()
        self._hurry = asyncio.Event()
        self._write_now = asyncio.Event()  # ends the current linger (flush, close, a full batch, a call end)
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._outage_since: float | None = None
        self._dropped_at_success = 0  # drops before the writer notices an outage belong to it
        self._overflowed = False
        self._overflow_logged = False
        self._logged_once: set[str] = set()

    # lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer; does not touch Redis, so start-up never waits on it."""
        if self._closed:
            raise RuntimeError("store is closed")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._writer_loop(), name="relay-store-writer")
            self._task.add_done_callback(self._writer_exited)

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Flush within `flush_timeout`, stop the writer, report lost writes, close the pool."""
        if self._closed:
            return
        task = self._task
        if task is not None and not task.done() and self._queue:
            self._hurry.set()  # skip the current backoff wait: this is the last chance
            await self.flush(flush_timeout)
        self._closed = True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._task = None
        lost = len(self._queue)
        if lost:
            self._dropped += lost
            self._queue.clear()
            self._log.warning("store closed with %d queued writes not written to redis", lost)
        await self._redis.aclose()

    # writes: called from the audio path; append to the queue and return -------------------------

    def call_started(self, call_sid: str, meta: Mapping[str, str]) -> None:
        self._put_meta(call_sid, meta)

    def call_updated(self, call_sid: str, meta: Mapping[str, str]) -> None:
        self._put_meta(call_sid, meta)
        if isinstance(meta, Mapping) and "ended" in meta:
            # A finished call is read right away (GET /calls/{sid}, the next call's memory):
            # its last writes go out now instead of waiting out the linger.
            self._write_now.set()

    def add_entry(self, call_sid: str, entry: Mapping[str, Any]) -> None:
        try:
            self._enqueue(_ENTRY, call_sid, value=encode_entry(entry))
        except Exception as exc:
            self._reject(exc)

    def add_usage(self, call_sid: str, usage: Mapping[str, int]) -> None:
        try:
            counts = {str(k): int(v) for k, v in usage.items()}
            if counts:
                self._enqueue(_USAGE, call_sid, counts=counts)
        except Exception as exc:
            self._reject(exc)

    def set_summary(self, call_sid: str, summary: str) -> None:
        try:
            self._enqueue(_SUMMARY, call_sid, value=str(summary).encode("utf-8"))
        except Exception as exc:
            self._reject(exc)

    def set_caller_memory(self, caller_number: str, summary: str) -> None:
        try:
            hashed = hash_number(caller_number, self._caller_key)
            self._enqueue(_CALLER, hashed, value=str(summary).encode("utf-8"))
        except Exception as exc:
            self._reject(exc)

    # reads: awaited, bounded, StoreUnavailable on failure ----------------------------------------

    async def get_call(self, call_sid: str) -> CallRecord | None:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:  # one consistent snapshot
                pipe.hgetall(self._call_key(call_sid, "meta"))
                pipe.lrange(self._call_key(call_sid, "entries"), 0, -1)
                pipe.get(self._call_key(call_sid, "summary"))
                pipe.hgetall(self._call_key(call_sid, "usage"))
                return await pipe.execute()

        meta_raw, entries_raw, summary_raw, usage_raw = await self._read("get_call", read)
        if not (meta_raw or entries_raw or summary_raw is not None or usage_raw):
            return None
        return CallRecord(
            call_sid=call_sid,
            meta={_text(k): _text(v) for k, v in meta_raw.items()},
            entries=_decode_entries(entries_raw),
            summary=None if summary_raw is None else _text(summary_raw),
            usage={_text(k): int(v) for k, v in usage_raw.items()},
        )

    async def recent_entries(self, call_sid: str, n: int) -> list[dict[str, Any]]:
        if n <= 0:
            return []
        key = self._call_key(call_sid, "entries")

        async def read() -> list[Any]:
            return list(await self._redis.lrange(key, -n, -1))

        return _decode_entries(await self._read("recent_entries", read))

    async def get_caller_memory(self, caller_number: str) -> str | None:
        key = f"{self._prefix}caller:{hash_number(caller_number, self._caller_key)}"

        async def read() -> Any:
            return await self._redis.get(key)

        raw = await self._read("get_caller_memory", read)
        return None if raw is None else _text(raw)

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        full_key = f"{self._prefix}once:{key}"

        async def claim() -> Any:
            return await self._redis.set(full_key, b"1", nx=True, ex=ttl_s)

        return bool(await self._read("claim_once", claim))

    async def claim_live(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        key = self._live_key(call_sid)

        async def claim() -> Any:
            return await self._redis.set(key, owner.encode(), nx=True, px=_ms(ttl_s))

        return bool(await self._read("claim_live", claim))

    async def refresh_live(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        key = self._live_key(call_sid)

        async def refresh() -> Any:
            return await self._refresh_live(keys=[key], args=[owner.encode(), _ms(ttl_s)])

        return bool(await self._read("refresh_live", refresh))

    async def refresh_live_many(self, call_sids: Sequence[str], owner: str, ttl_s: float) -> list[bool]:
        if not call_sids:
            return []
        args: list[bytes | int] = [owner.encode(), _ms(ttl_s)]

        async def refresh() -> Any:
            async with self._redis.pipeline(transaction=False) as pipe:
                for call_sid in call_sids:
                    await self._refresh_live(keys=[self._live_key(call_sid)], args=args, client=pipe)
                return await pipe.execute()

        return [bool(renewed) for renewed in await self._read("refresh_live_many", refresh)]

    async def release_live(self, call_sid: str, owner: str) -> bool:
        key = self._live_key(call_sid)

        async def release() -> Any:
            return await self._release_live(keys=[key], args=[owner.encode()])

        return bool(await self._read("release_live", release))

    async def live_owner(self, call_sid: str) -> str | None:
        key = self._live_key(call_sid)

        async def read() -> Any:
            return await self._redis.get(key)

        raw = await self._read("live_owner", read)
        return None if raw is None else _text(raw)

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
        target = self._seq
        self._write_now.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue and self._queue[0].seq <= target:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._task is None or self._task.done():
                return False
            progress = self._progress
            try:
                async with asyncio.timeout(remaining):
                    await progress.wait()
            except TimeoutError:
                return False
        return True

    # observability -------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def dropped_writes(self) -> int:
        return self._dropped

    @property
    def kind(self) -> str:
        return "redis"

    # queue ---------------------------------------------------------------------------------------

    def _put_meta(self, call_sid: str, meta: Mapping[str, str]) -> None:
        try:
            fields = {str(k): str(v) for k, v in meta.items() if v is not None}
            if fields:
                self._enqueue(_META, call_sid, fields=fields)
        except Exception as exc:
            self._reject(exc)

    def _enqueue(
        self,
        kind: str,
        target: str,
        *,
        value: bytes = b"",
        fields: dict[str, str] | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        """Append without awaiting; evict the oldest op when full (fresh state matters more)."""
        if self._closed:
            self._dropped += 1
            return
        self._seq += 1
        queue = self._queue
        if len(queue) >= self._queue_size:
            evicted = queue.popleft()
            self._dropped += 1
            if evicted.seq <= self._inflight_last:
                self._inflight_evicted += 1
            self._overflowed = True  # reported by the writer: no logging on the audio path
        queue.append(_Op(self._seq, kind, str(target), value, fields, counts))
        self._wakeup.set()
        if len(queue) >= self._batch_max:
            self._write_now.set()  # a full batch is waiting: no point lingering

    def _reject(self, exc: Exception) -> None:
        """Count a write whose data could not be queued; log each kind of problem once."""
        self._dropped += 1
        self._log_once(
            f"rejected:{type(exc).__name__}",
            "store write rejected (logged once per error type): %s",
            _describe(exc),
        )

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        """Warn about a recurring data problem once, not once per op (bounded memory)."""
        if key not in self._logged_once and len(self._logged_once) < 64:
            self._logged_once.add(key)
            self._log.warning(msg, *args)

    # writer --------------------------------------------------------------------------------------

    async def _writer_loop(self) -> None:
        failures = 0
        while True:
            if not self._queue:
                self._overflowed = self._overflow_logged = False
                self._wakeup.clear()
                await self._wakeup.wait()
                await self._linger_for_more()
                continue
            batch = list(islice(self._queue, self._batch_max))
            self._inflight_last = batch[-1].seq
            self._inflight_evicted = 0
            try:
                lost = await self._send(batch)
            except (*_TRANSIENT_ERRORS, _RetryBatch) as exc:
                self._inflight_last = 0  # evicted ops of this attempt stay counted as dropped
                self._script_loaded = False  # the server may have restarted with an empty cache
                self._ttl_state.clear()  # ... and without the keys: TTLs go with the next write again
                failures += 1
                self._outage_started(exc)
                await self._backoff(failures)
                continue
            except Exception:  # a bug, not an outage: drop the batch rather than spin on it
                self._log.exception("store writer failed on a batch of %d ops; dropping it", len(batch))
                lost = len(batch)
                self._ttl_pending = {}
            self._ttls_set()
            self._batch_done(batch[-1].seq, lost)
            failures = 0
            self._report_success()

    async def _send(self, batch: list[_Op]) -> int:
        """Write one batch; returns how many of its ops Redis refused permanently."""
        async with self._redis.pipeline(transaction=False) as pipe:
            owners = self._build(pipe, batch)
            # socket timeouts bound each read/write; this bounds the whole exchange
            async with asyncio.timeout(self._io_timeout * 3):
                results = await pipe.execute(raise_on_error=False)
        refused: list[Exception] = []
        for owner, result in zip(owners, results, strict=True):
            if not isinstance(result, Exception):
                continue
            if isinstance(result, (NoScriptError, *_TRANSIENT_REPLIES)):
                raise _RetryBatch(_describe(result))
            if owner is not None:  # helper commands' failures surface on the ops that need them
                refused.append(result)
        self._script_loaded = True
        if refused:
            self._log_once(
                f"refused:{type(refused[0]).__name__}",
                "redis refused %d store writes, dropped (logged once per error type): %s",
                len(refused),
                _describe(refused[0]),
            )
        return len(refused)

    def _build(self, pipe: Pipeline, batch: list[_Op]) -> list[_Op | None]:
        """Queue the batch's commands on `pipe`; returns the op behind each command, in order."""
        owners: list[_Op | None] = []
        if not self._script_loaded:
            pipe.script_load(_APPLY_ONCE)
            owners.append(None)
        touched: dict[str, set[str]] = {}  # call SID -> suffixes this batch writes (insertion-ordered)
        ended: set[str] = set()
        for op in batch:
            if op.kind == _CALLER:
                pipe.set(f"{self._prefix}caller:{op.target}", op.value, ex=self._caller_ttl)
            elif op.kind == _META and op.fields:
                fields: Mapping[Any, str] = op.fields  # redis-py's Mapping key type is invariant
                pipe.hset(self._call_key(op.target, "meta"), mapping=fields)
            elif op.kind == _ENTRY:
                self._apply_once(pipe, op, "entries", b"e", [op.value])
            elif op.kind == _USAGE and op.counts:
                flat: list[bytes | str | int] = []
                for name, count in op.counts.items():
                    flat += [name, count]
                self._apply_once(pipe, op, "usage", b"u", flat)
            elif op.kind == _SUMMARY:
                pipe.set(self._call_key(op.target, "summary"), op.value)
            else:
                continue
            owners.append(op)
            if op.kind != _CALLER:
                touched.setdefault(op.target, set()).update(_SUFFIXES_WRITTEN[op.kind])
                if op.kind == _META and op.fields and "ended" in op.fields:
                    ended.add(op.target)
        now = time.monotonic()
        self._ttl_pending = {}
        for call_sid, written in touched.items():
            known = self._ttl_state.get(call_sid)
            if (
                known is not None
                and call_sid not in ended
                and written <= known[1]
                and now - known[0] < self._ttl_refresh
            ):
                continue
            for suffix in _CALL_KEY_SUFFIXES:
                pipe.expire(self._call_key(call_sid, suffix), self._state_ttl)
                owners.append(None)
            existing = written if known is None else written | known[1]
            self._ttl_pending[call_sid] = None if call_sid in ended else (now, frozenset(existing))
        return owners

    def _ttls_set(self) -> None:
        """The batch that set these TTLs was written: remember it (or forget calls that ended)."""
        state = self._ttl_state
        for call_sid, value in self._ttl_pending.items():
            if value is None:
                state.pop(call_sid, None)
            else:
                state[call_sid] = value
        self._ttl_pending = {}
        if len(state) > _TTL_STATE_MAX:  # calls whose last write never came: refreshing them again is harmless
            for call_sid in list(islice(state, len(state) // 2)):
                del state[call_sid]

    def _apply_once(self, pipe: Pipeline, op: _Op, suffix: str, mode: bytes, payload: list[bytes | str | int]) -> None:
        pipe.evalsha(
            _APPLY_ONCE_SHA,
            2,
            self._call_key(op.target, suffix),
            self._call_key(op.target, "applied"),
            self._writer_id,
            op.seq,
            mode,
            *payload,
        )

    def _batch_done(self, last_seq: int, lost: int) -> None:
        queue = self._queue
        while queue and queue[0].seq <= last_seq:
            queue.popleft()
        # ops evicted while in flight were written after all; `lost` counts the refused ones
        self._dropped += lost - self._inflight_evicted
        self._inflight_last = 0
        self._inflight_evicted = 0
        self._progress.set()
        self._progress = asyncio.Event()

    async def _linger_for_more(self) -> None:
        """Let a burst of writes collect into one pipeline (each batch costs a round trip and the
        TTL refresh of every call it touches); cut short by a full batch's worth or flush()."""
        if self._linger <= 0 or len(self._queue) >= self._batch_max or self._hurry.is_set():
            self._write_now.clear()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._linger):
                await self._write_now.wait()
        self._write_now.clear()

    async def _backoff(self, failures: int) -> None:
        """Exponential backoff with jitter; close() cuts one wait short so shutdown gets a try."""
        delay = min(self._backoff_cap, self._backoff_base * 2 ** min(failures - 1, 16))
        delay *= random.uniform(0.5, 1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._hurry.wait()
        self._hurry.clear()  # one early retry, not a busy loop while close() waits

    def _outage_started(self, exc: BaseException) -> None:
        """One warning per outage, however many retries it takes."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._log.warning("redis unavailable: %s; buffering writes", _describe(exc))

    def _report_success(self) -> None:
        """End an outage (one info line), or report an overflow while Redis was up but slow."""
        dropped = self._dropped - self._dropped_at_success
        self._dropped_at_success = self._dropped
        if self._outage_since is not None:
            elapsed = time.monotonic() - self._outage_since
            self._outage_since = None
            self._overflow_logged = self._overflowed  # the line below already reports the drops
            self._log.info(
                "redis reachable again after %.1f s; %d writes dropped during the outage",
                elapsed,
                dropped,
            )
        elif self._overflowed and not self._overflow_logged:
            self._overflow_logged = True
            self._log.warning(
                "store write queue full (%d ops): redis is not keeping up; %d oldest writes dropped",
                self._queue_size,
                dropped,
            )

    def _writer_exited(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("store writer stopped unexpectedly", exc_info=task.exception())

    # helpers -------------------------------------------------------------------------------------

    def _call_key(self, call_sid: str, suffix: str) -> str:
        return f"{self._prefix}call:{call_sid}:{suffix}"

    def _live_key(self, call_sid: str) -> str:
        return f"{self._prefix}live:{call_sid}"

    async def _read(self, what: str, fn: Callable[[], Awaitable[_T]]) -> _T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        try:
            async with asyncio.timeout(self._io_timeout * 2):
                return await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis {what} failed: {_describe(exc)}") from exc
