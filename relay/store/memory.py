"""In-process `Store` for a single instance (no REDIS_URL) and for tests.

It mirrors RedisStore's observable behaviour: entries round-trip through JSON (so callers see
the same types either way), call state and caller memory expire after their TTLs (checked on
read, plus an occasional sweep so an idle process does not grow forever), and claims, live-stream
holds, live-call records and instance heartbeats expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .base import (
    LIVE_RECORD_TTL_S,
    OUTBOUND_STALE_S,
    CallRecord,
    EndedCall,
    InstanceRecord,
    LiveCall,
    LiveCallRecord,
    encode_entry,
    encode_event,
    format_total,
    hash_number,
    is_listed,
)
from .webhook_queue import MemoryWebhookQueue

__all__ = ["MemoryStore"]

_SWEEP_EVERY = 1000  # writes between sweeps of expired state
_FEED_QUEUE_MAX = 2000  # console events waiting for one slow reader before it misses some


@dataclass(slots=True)
class _Call:
    expires_at: float
    meta: dict[str, str] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    summary: str | None = None


def _meta_fields(meta: Mapping[str, str]) -> dict[str, str]:
    return {str(k): str(v) for k, v in meta.items() if v is not None}


def _json_copy(entry: Mapping[str, Any]) -> dict[str, Any]:
    decoded = orjson.loads(encode_entry(entry))
    if not isinstance(decoded, dict):
        raise TypeError("entry must be a mapping")
    return decoded


class MemoryStore:
    """Dict-backed store; writes apply immediately, so there is never a queue or a drop."""

    def __init__(
        self,
        *,
        state_ttl_s: int = 7 * 24 * 3600,
        caller_memory_ttl_s: int = 30 * 24 * 3600,
        caller_key_secret: bytes,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state_ttl = float(state_ttl_s)
        self._caller_ttl = float(caller_memory_ttl_s)
        if not caller_key_secret:
            raise ValueError("caller_key_secret must not be empty")
        self._caller_key = caller_key_secret
        self._log = logger or logging.getLogger("relay.store")
        self._clock = clock
        self._calls: dict[str, _Call] = {}
        self._callers: dict[str, tuple[str, float]] = {}
        self._claims: dict[str, float] = {}
        self._dispositions: dict[str, tuple[str, float]] = {}  # call SID -> (disposition, expires at)
        self._continuations: dict[str, tuple[int, float]] = {}  # call SID -> (count, window ends at)
        self._live: dict[str, tuple[str, float]] = {}  # call SID -> (owner, expires at)
        self._live_calls: dict[str, tuple[LiveCallRecord, float]] = {}  # call SID -> (record, expires at)
        self._instances: dict[str, tuple[InstanceRecord, float]] = {}  # instance id -> (heartbeat, expires at)
        self._present: dict[str, int] = {}  # instance id -> how many keep_presence() of it run
        self._receivers: dict[str, list[Callable[[bytes], None]]] = {}  # instance id -> its on_message
        self._outbound: dict[str, float] = {}  # outbound call reference -> when it was placed
        self._outbound_rate: tuple[float, int] = (0.0, 0)  # (window start, calls placed in it)
        self._idempotency: dict[str, tuple[str, float]] = {}  # key -> (call SID or "", expires at)
        self._outbound_refs: dict[str, tuple[str, float]] = {}  # reference -> (call SID, expires at)
        self._webhooks = MemoryWebhookQueue()
        self._feeds: set[asyncio.Queue[bytes]] = set()  # the console's readers in this process
        self._ended: dict[str, float] = {}  # call SID -> when it ended (epoch s): the console's history
        self._signins: dict[str, tuple[int, float]] = {}  # client -> (failed sign-ins, window ends at)
        self._writes = 0
        self._rejected = 0
        self._rejected_logged = False

    # lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to start: writes are applied synchronously."""

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Nothing to flush; state stays readable so tests can inspect it after close."""

    # writes --------------------------------------------------------------------------------------

    def call_started(self, call_sid: str, meta: Mapping[str, str]) -> None:
        self._apply(lambda: self._merge_meta(call_sid, meta))

    def call_updated(self, call_sid: str, meta: Mapping[str, str]) -> None:
        self._apply(lambda: self._merge_meta(call_sid, meta))
        if isinstance(meta, Mapping) and meta.get("ended"):
            self._ended[call_sid] = time.time()

    def add_entry(self, call_sid: str, entry: Mapping[str, Any]) -> None:
        def apply() -> None:
            copy = _json_copy(entry)
            self._call(call_sid).entries.append(copy)

        self._apply(apply)

    def add_usage(self, call_sid: str, usage: Mapping[str, int]) -> None:
        def apply() -> None:
            deltas = {str(k): int(v) for k, v in usage.items()}
            if not deltas:
                return
            totals = self._call(call_sid).usage
            for k, v in deltas.items():
                totals[k] = totals.get(k, 0) + v

        self._apply(apply)

    def add_totals(self, call_sid: str, amounts: Mapping[str, float]) -> None:
        def apply() -> None:
            deltas = {str(k): float(v) for k, v in amounts.items()}
            meta = self._call(call_sid).meta
            for k, v in deltas.items():
                meta[k] = format_total(float(meta.get(k) or 0) + v)

        self._apply(apply)

    def set_summary(self, call_sid: str, summary: str) -> None:
        def apply() -> None:
            self._call(call_sid).summary = str(summary)

        self._apply(apply)

    def set_caller_memory(self, caller_number: str, summary: str) -> None:
        def apply() -> None:
            key = hash_number(caller_number, self._caller_key)
            self._callers[key] = (str(summary), self._clock() + self._caller_ttl)

        self._apply(apply)

    # reads ---------------------------------------------------------------------------------------

    async def get_call(self, call_sid: str) -> CallRecord | None:
        call = self._live_call(call_sid)
        if call is None:
            return None
        return CallRecord(
            call_sid=call_sid,
            meta=dict(call.meta),
            entries=[dict(e) for e in call.entries],
            summary=call.summary,
            usage=dict(call.usage),
        )

    async def recent_entries(self, call_sid: str, n: int) -> list[dict[str, Any]]:
        call = self._live_call(call_sid)
        if call is None or n <= 0:
            return []
        return [dict(e) for e in call.entries[-n:]]

    async def get_caller_memory(self, caller_number: str) -> str | None:
        key = hash_number(caller_number, self._caller_key)
        item = self._callers.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._callers[key]
            return None
        return item[0]

    async def set_disposition(self, call_sid: str, disposition: str) -> None:
        self._dispositions[call_sid] = (str(disposition), self._clock() + self._state_ttl)

    async def get_disposition(self, call_sid: str) -> str | None:
        item = self._dispositions.get(call_sid)
        if item is None or item[1] <= self._clock():
            return None
        return item[0]

    async def take_disposition(self, call_sid: str, disposition: str) -> bool:
        if await self.get_disposition(call_sid) != disposition:
            return False
        del self._dispositions[call_sid]
        return True

    async def count_continuation(self, call_sid: str, window_s: int) -> int:
        now = self._clock()
        count, window_ends = self._continuations.get(call_sid, (0, now + window_s))
        if window_ends <= now:
            count, window_ends = 0, now + window_s
        self._continuations[call_sid] = (count + 1, window_ends)
        return count + 1

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        now = self._clock()
        expires = self._claims.get(key)
        if expires is not None and expires > now:
            return False
        self._claims[key] = now + ttl_s
        return True

    async def outbound_admit(self, ref: str, cap: int, per_minute: int) -> str | None:
        now = self._clock()
        stale = now - OUTBOUND_STALE_S
        self._outbound = {r: at for r, at in self._outbound.items() if at > stale}
        if len(self._outbound) >= cap:
            return "cap"
        window, placed = self._outbound_rate
        if now - window >= 60:
            window, placed = now, 0
        if placed >= per_minute:
            return "rate"
        self._outbound_rate = (window, placed + 1)
        self._outbound[ref] = now
        return None

    async def outbound_done(self, ref: str) -> None:
        self._outbound.pop(ref, None)

    async def claim_idempotency_key(self, key: str, ttl_s: int) -> str | None:
        now = self._clock()
        held = self._idempotency.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._idempotency[key] = ("", now + ttl_s)
        return None

    async def set_idempotency_key(self, key: str, call_sid: str, ttl_s: int) -> None:
        self._idempotency[key] = (call_sid, self._clock() + ttl_s)

    async def drop_idempotency_key(self, key: str) -> None:
        self._idempotency.pop(key, None)

    async def link_outbound(self, ref: str, call_sid: str, ttl_s: int) -> None:
        self._outbound_refs[ref] = (call_sid, self._clock() + ttl_s)

    async def outbound_call_sid(self, ref: str) -> str | None:
        held = self._outbound_refs.get(ref)
        return held[0] if held is not None and held[1] > self._clock() else None

    async def claim_live(self, call_sid: str, owner: str, ttl_s: float, record: LiveCallRecord | None = None) -> bool:
        if self._holder(call_sid) is not None:
            return False
        self._live[call_sid] = (owner, self._clock() + ttl_s)
        if record is not None:
            self._live_calls[call_sid] = (record, self._clock() + LIVE_RECORD_TTL_S)
        return True

    async def refresh_live(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        if self._holder(call_sid) != owner:
            return False
        self._live[call_sid] = (owner, self._clock() + ttl_s)
        return True

    async def beat(self, instance: InstanceRecord, calls: Sequence[LiveCallRecord], ttl_s: float) -> list[bool]:
        now = self._clock()
        self._instances[instance.instance] = (instance, now + ttl_s)
        renewed: list[bool] = []
        for record in calls:
            held = await self.refresh_live(record.call_sid, instance.instance, ttl_s)
            if held:
                self._live_calls[record.call_sid] = (record, now + LIVE_RECORD_TTL_S)
            renewed.append(held)
        return renewed

    async def release_live(self, call_sid: str, owner: str) -> bool:
        record = self._live_call_record(call_sid)
        if record is not None and record.instance == owner:
            del self._live_calls[call_sid]
        if self._holder(call_sid) != owner:
            return False
        del self._live[call_sid]
        return True

    async def hand_off(self, call_sid: str, owner: str) -> bool:
        if self._holder(call_sid) != owner:
            return False
        del self._live[call_sid]
        record = self._live_call_record(call_sid)
        if record is not None and record.instance == owner:
            self._live_calls[call_sid] = (replace(record, phase="handed_off"), self._live_calls[call_sid][1])
        return True

    async def live_owner(self, call_sid: str) -> str | None:
        return self._holder(call_sid)

    async def keep_presence(self, instance_id: str, on_message: Callable[[bytes], None] | None = None) -> None:
        self._present[instance_id] = self._present.get(instance_id, 0) + 1
        receivers = self._receivers.setdefault(instance_id, [])
        if on_message is not None:
            receivers.append(on_message)
        try:
            await asyncio.Event().wait()
        finally:
            left = self._present.pop(instance_id) - 1
            if left:
                self._present[instance_id] = left
            if on_message is not None:
                receivers.remove(on_message)

    async def send_to_instance(self, instance_id: str, message: bytes) -> bool:
        receivers = list(self._receivers.get(instance_id, ()))
        for receive in receivers:
            asyncio.get_running_loop().call_soon(receive, message)  # delivered later, as over Redis
        return bool(receivers)

    async def instance_gone(self, instance_id: str, stale_s: float) -> bool:
        if instance_id not in self._present:
            return True
        heartbeat = self._instances.get(instance_id)
        now = self._clock()
        return heartbeat is None or heartbeat[1] <= now or time.time() - heartbeat[0].beat > stale_s

    async def take_over_live(
        self, call_sid: str, gone: str, owner: str, ttl_s: float, record: LiveCallRecord | None = None
    ) -> bool:
        if self._holder(call_sid) != gone:
            return False
        del self._live[call_sid]
        return await self.claim_live(call_sid, owner, ttl_s, record)

    async def live_instances(self) -> list[InstanceRecord]:
        now = self._clock()
        live = (r for r, expires in self._instances.values() if expires > now and r.instance in self._present)
        return sorted(live, key=lambda r: r.instance)

    async def live_calls(self) -> list[LiveCall]:
        alive = {record.instance for record in await self.live_instances()}
        now = self._clock()
        records = sorted((r for r, expires in self._live_calls.values() if expires > now), key=lambda r: r.call_sid)
        return [
            LiveCall(record, orphaned=record.instance not in alive)
            for record in records
            if is_listed(record, self._holder(record.call_sid), alive)
        ]

    def _live_call_record(self, call_sid: str) -> LiveCallRecord | None:
        held = self._live_calls.get(call_sid)
        if held is None or held[1] <= self._clock():
            return None
        return held[0]

    def _holder(self, call_sid: str) -> str | None:
        held = self._live.get(call_sid)
        if held is None:
            return None
        if held[1] <= self._clock():
            del self._live[call_sid]
            return None
        return held[0]

    def webhook_queue(self) -> MemoryWebhookQueue:
        return self._webhooks

    # the console ------------------------------------------------------------------------------------

    def publish_event(self, event: Mapping[str, Any]) -> None:
        encoded: list[bytes] = []
        self._apply(lambda: encoded.append(encode_event(event)))
        if not encoded:
            return
        data = encoded[0]
        for feed in self._feeds:
            if feed.qsize() < _FEED_QUEUE_MAX:
                feed.put_nowait(data)

    async def console_events(self) -> AsyncIterator[bytes]:
        feed: asyncio.Queue[bytes] = asyncio.Queue()
        self._feeds.add(feed)
        try:
            yield b""
            while True:
                yield await feed.get()
        finally:
            self._feeds.discard(feed)

    async def ended_calls(self, since: float, until: float, limit: int) -> list[EndedCall]:
        found: list[EndedCall] = []
        for sid, ended in sorted(self._ended.items(), key=lambda item: item[1], reverse=True):
            if len(found) >= limit:
                break
            call = self._live_call(sid)
            if call is None:
                continue
            if since <= ended <= until:
                found.append(EndedCall(sid, ended, dict(call.meta)))
        return found

    async def count_signin_failure(self, client: str, window_s: int) -> int:
        now = self._clock()
        count, ends = self._signins.get(client, (0, 0.0))
        if ends <= now:
            count, ends = 0, now + window_s
        self._signins[client] = (count + 1, ends)
        return count + 1

    async def signin_failures(self, client: str) -> int:
        count, ends = self._signins.get(client, (0, 0.0))
        return count if ends > self._clock() else 0

    async def ping(self) -> bool:
        return True

    async def flush(self, timeout: float) -> bool:
        return True

    # observability -------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def dropped_writes(self) -> int:
        """Only writes with unusable data (e.g. non-integer usage) are ever dropped here."""
        return self._rejected

    @property
    def kind(self) -> str:
        return "memory"

    # internals -----------------------------------------------------------------------------------

    def _apply(self, fn: Callable[[], None]) -> None:
        """Run a write, keeping the never-raise promise even for malformed input."""
        try:
            fn()
        except Exception as exc:
            self._rejected += 1
            if not self._rejected_logged:
                self._rejected_logged = True
                self._log.warning("store write rejected (logged once): %r", exc)
            return
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep()

    def _merge_meta(self, call_sid: str, meta: Mapping[str, str]) -> None:
        fields = _meta_fields(meta)
        if fields:
            self._call(call_sid).meta.update(fields)

    def _call(self, call_sid: str) -> _Call:
        """The live record for a write, created if needed, with its TTL refreshed (like EXPIRE)."""
        expires_at = self._clock() + self._state_ttl
        call = self._live_call(call_sid)
        if call is None:
            call = self._calls[call_sid] = _Call(expires_at=expires_at)
        else:
            call.expires_at = expires_at
        return call

    def _live_call(self, call_sid: str) -> _Call | None:
        call = self._calls.get(call_sid)
        if call is not None and call.expires_at <= self._clock():
            del self._calls[call_sid]
            return None
        return call

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [s for s, c in self._calls.items() if c.expires_at <= now]:
            del self._calls[sid]
        for key in [k for k, (_, exp) in self._callers.items() if exp <= now]:
            del self._callers[key]
        for key in [k for k, exp in self._claims.items() if exp <= now]:
            del self._claims[key]
        for key in [k for k, (_, exp) in self._idempotency.items() if exp <= now]:
            del self._idempotency[key]
        for key in [k for k, (_, exp) in self._outbound_refs.items() if exp <= now]:
            del self._outbound_refs[key]
        for sid in [s for s, (_, exp) in self._dispositions.items() if exp <= now]:
            del self._dispositions[sid]
        for sid in [s for s, (_, ends) in self._continuations.items() if ends <= now]:
            del self._continuations[sid]
        for sid in [s for s in self._ended if s not in self._calls]:
            del self._ended[sid]
        for key in [k for k, (_, ends) in self._signins.items() if ends <= now]:
            del self._signins[key]
        for sid in [s for s, (_, exp) in self._live.items() if exp <= now]:
            del self._live[sid]
        for sid in [s for s, (_, exp) in self._live_calls.items() if exp <= now]:
            del self._live_calls[sid]
        for name in [i for i, (_, exp) in self._instances.items() if exp <= now]:
            del self._instances[name]
