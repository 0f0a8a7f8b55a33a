"""The Redis store's write path: a bounded in-process queue drained by one task in pipelines.

Writes only append to the queue, so the audio path never waits on Redis. One writer task sends
what is queued (up to `batch_max` ops) as one non-transactional pipeline, after letting writes
collect for `linger_s` (a call's turn produces several at once; ``flush()``, ``close()``, the
write that ends a call and the writes a resumed stream is seeded with cut the wait short). A
batch stays at the head of the queue until Redis confirms it, so per-call order survives
retries (a replayed batch applies its appends and increments once: relay/store/redis_batch.py
builds each pipeline and sets the TTLs); when the queue is full the oldest ops are dropped and
counted. An outage is one warning and, when Redis answers again, one line with what was dropped
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Mapping
from itertools import islice
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from .base import encode_entry
from .redis_batch import CALLER, ENTRY, META, SUMMARY, TOTALS, USAGE, BatchBuilder, Op
from .redis_keys import RedisKeys, describe

__all__ = ["BatchWriter"]

# Failures worth retrying: the connection, the clock, or a server that is temporarily unable to
# accept writes. Anything else returned for a command is a permanent refusal of that op.
_TRANSIENT_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_TRANSIENT_REPLIES: Final = (ReadOnlyError, OutOfMemoryError, TryAgainError, RedisConnectionError)


class _RetryBatch(Exception):
    """Redis answered, but the batch must be sent again (script cache flushed, read-only ...)."""


class BatchWriter:
    """The queue and the task that writes it to Redis; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        *,
        state_ttl_s: int,
        caller_memory_ttl_s: int,
        queue_size: int,
        batch_max: int,
        linger_s: float,
        ttl_refresh_s: float,
        io_timeout_s: float,
        backoff_base_s: float,
        backoff_cap_s: float,
        logger: logging.Logger,
    ) -> None:
        if queue_size < 1 or batch_max < 1:
            raise ValueError("queue_size and batch_max must be >= 1")
        if linger_s < 0:
            raise ValueError("linger_s must be >= 0")
        self._redis = redis
        self._queue_size = queue_size
        self._batch_max = batch_max
        self._linger = linger_s
        self._io_timeout = io_timeout_s
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        self._log = logger
        self._batches = BatchBuilder(
            keys,
            uuid.uuid4().hex[:16],
            state_ttl_s=state_ttl_s,
            caller_memory_ttl_s=caller_memory_ttl_s,
            ttl_refresh_s=ttl_refresh_s,
        )
        self._queue: deque[Op] = deque()
        self._seq = 0
        self.dropped = 0
        # ops of the batch being sent that producers evicted meanwhile; they count as dropped
        # unless the batch succeeds after all
        self._inflight_last = 0
        self._inflight_evicted = 0
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

    def start(self) -> None:
        """Start the writer task (it touches Redis only once there is something to write)."""
        if self._closed:
            raise RuntimeError("store is closed")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._writer_loop(), name="relay-store-writer")
            self._task.add_done_callback(self._writer_exited)

    async def close(self, flush_timeout: float) -> None:
        """Flush within `flush_timeout`, stop the writer, count and report what was not written."""
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
            self.dropped += lost
            self._queue.clear()
            self._log.warning("store closed with %d queued writes not written to redis", lost)

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

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # writes: called from the audio path; append to the queue and return -------------------------

    def put_meta(self, call_sid: str, meta: Mapping[str, str]) -> None:
        try:
            fields = {str(k): str(v) for k, v in meta.items() if v is not None}
            if fields:
                self._enqueue(META, call_sid, fields=fields)
        except Exception as exc:
            self.reject(exc)

    def write_now(self) -> None:
        """End the current linger: what is queued is read right away (a finished call)."""
        self._write_now.set()

    def put_entry(self, call_sid: str, entry: Mapping[str, Any]) -> None:
        try:
            self._enqueue(ENTRY, call_sid, value=encode_entry(entry))
        except Exception as exc:
            self.reject(exc)

    def put_usage(self, call_sid: str, usage: Mapping[str, int]) -> None:
        try:
            counts = {str(k): int(v) for k, v in usage.items()}
            if counts:
                self._enqueue(USAGE, call_sid, counts=counts)
        except Exception as exc:
            self.reject(exc)

    def put_totals(self, call_sid: str, amounts: Mapping[str, float]) -> None:
        try:
            totals = {str(k): float(v) for k, v in amounts.items()}
            if totals:
                self._enqueue(TOTALS, call_sid, totals=totals)
        except Exception as exc:
            self.reject(exc)

    def put_summary(self, call_sid: str, summary: str) -> None:
        try:
            self._enqueue(SUMMARY, call_sid, value=str(summary).encode("utf-8"))
        except Exception as exc:
            self.reject(exc)

    def put_caller_memory(self, hashed_number: str, summary: str) -> None:
        try:
            self._enqueue(CALLER, hashed_number, value=str(summary).encode("utf-8"))
        except Exception as exc:
            self.reject(exc)

    def reject(self, exc: Exception) -> None:
        """Count a write whose data could not be queued; log each kind of problem once."""
        self.dropped += 1
        self._log_once(
            f"rejected:{type(exc).__name__}",
            "store write rejected (logged once per error type): %s",
            describe(exc),
        )

    # queue ----------------------------------------------------------------------------------------

    def _enqueue(
        self,
        kind: str,
        target: str,
        *,
        value: bytes = b"",
        fields: dict[str, str] | None = None,
        counts: dict[str, int] | None = None,
        totals: dict[str, float] | None = None,
    ) -> None:
        """Append without awaiting; evict the oldest op when full (fresh state matters more)."""
        if self._closed:
            self.dropped += 1
            return
        self._seq += 1
        queue = self._queue
        if len(queue) >= self._queue_size:
            evicted = queue.popleft()
            self.dropped += 1
            if evicted.seq <= self._inflight_last:
                self._inflight_evicted += 1
            self._overflowed = True  # reported by the writer: no logging on the audio path
        queue.append(Op(self._seq, kind, str(target), value, fields, counts, totals))
        self._wakeup.set()
        if len(queue) >= self._batch_max:
            self._write_now.set()  # a full batch is waiting: no point lingering

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
                self._batches.server_lost()
                failures += 1
                self._outage_started(exc)
                await self._backoff(failures)
                continue
            except Exception:  # a bug, not an outage: drop the batch rather than spin on it
                self._log.exception("store writer failed on a batch of %d ops; dropping it", len(batch))
                lost = len(batch)
                self._batches.discard()
            self._batches.written()
            self._batch_done(batch[-1].seq, lost)
            failures = 0
            self._report_success()

    async def _send(self, batch: list[Op]) -> int:
        """Write one batch; returns how many of its ops Redis refused permanently."""
        async with self._redis.pipeline(transaction=False) as pipe:
            owners = self._batches.build(pipe, batch)
            # socket timeouts bound each read/write; this bounds the whole exchange
            async with asyncio.timeout(self._io_timeout * 3):
                results = await pipe.execute(raise_on_error=False)
        refused: list[Exception] = []
        for owner, result in zip(owners, results, strict=True):
            if not isinstance(result, Exception):
                continue
            if isinstance(result, (NoScriptError, *_TRANSIENT_REPLIES)):
                raise _RetryBatch(describe(result))
            if owner is not None:  # helper commands' failures surface on the ops that need them
                refused.append(result)
        self._batches.script_loaded = True
        if refused:
            self._log_once(
                f"refused:{type(refused[0]).__name__}",
                "redis refused %d store writes, dropped (logged once per error type): %s",
                len(refused),
                describe(refused[0]),
            )
        return len(refused)

    def _batch_done(self, last_seq: int, lost: int) -> None:
        queue = self._queue
        while queue and queue[0].seq <= last_seq:
            queue.popleft()
        # ops evicted while in flight were written after all; `lost` counts the refused ones
        self.dropped += lost - self._inflight_evicted
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
            self._log.warning("redis unavailable: %s; buffering writes", describe(exc))

    def _report_success(self) -> None:
        """End an outage (one info line), or report an overflow while Redis was up but slow."""
        dropped = self.dropped - self._dropped_at_success
        self._dropped_at_success = self.dropped
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
