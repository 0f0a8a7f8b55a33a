"""Ownership on Redis: which instance holds which call, the live-call records and instance heartbeats.

A hold is a string set if absent with a millisecond TTL; renewing, releasing and handing it off
act only while the caller still holds it, so each is a small Lua script (a GET and a write in one
atomic step). A call's live-call record is written by the same script that takes or renews its
hold, so a record never names an instance that lost the call without knowing it. Heartbeats and
records are also indexed in sorted sets scored by their last write, so listing needs no SCAN.
See relay/store/redis_keys.py for the layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .base import LIVE_RECORD_TTL_S, InstanceRecord, LiveCall, LiveCallRecord, is_listed
from .redis_keys import RedisKeys, describe, milliseconds, text

__all__ = ["RedisOwnership"]

log = logging.getLogger("relay.store")

PRESENCE_READ_S = 5.0
PRESENCE_RETRY_S = 1.0

# Written after a hold is taken or renewed, when the record's keys are given. KEYS: hold, record,
# index. ARGV: owner, hold ttl ms, record ttl ms, now ms, call sid, field, value ...
_WRITE_RECORD: Final = """
if #KEYS == 3 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 6))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 1
"""
_CLAIM: Final = "if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end" + _WRITE_RECORD
_RENEW: Final = (
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\nredis.call('PEXPIRE', KEYS[1], ARGV[2])"
    + _WRITE_RECORD
)
# The beat's renewal of a hold whose record this process has written: only the phase changes, so
# only the phase is sent (the beat runs for every call every LIVE_HEARTBEAT_S; its arguments are
# the relay's CPU). KEYS: hold, record. ARGV: owner, hold ttl ms, record ttl ms, phase.
# Returns 0: not held; 1: renewed; 2: renewed, but the record was gone (sent whole next beat).
_RENEW_PHASE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 0 then return 2 end
redis.call('HSET', KEYS[2], 'phase', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
# Compare-and-delete of the hold, and of the record while it still names the owner.
# KEYS: hold, record, index. ARGV: owner, call sid.
_RELEASE: Final = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then released = redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[2], 'instance') == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return released
"""
# A resuming stream takes the call from an instance that is gone (the compare, then the claim's set
# and record). KEYS: hold[, record, index]. ARGV: gone, then the claim's ARGV.
_TAKE_OVER: Final = (
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\ntable.remove(ARGV, 1)\n"
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])" + _WRITE_RECORD
)
# The owner lets go on purpose: the hold goes at once, the record says so. KEYS: hold, record. ARGV: owner.
_HAND_OFF: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], 'instance') == ARGV[1] then redis.call('HSET', KEYS[2], 'phase', 'handed_off') end
return 1
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


class RedisOwnership:
    """The ownership commands of `RedisStore`; each method is one or two round trips, unbounded in
    time (the store bounds them and turns failures into `StoreUnavailable`)."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._renew_phase = redis.register_script(_RENEW_PHASE)
        # calls whose whole record this process wrote with their hold: the beat renews only the phase
        self._recorded: set[str] = set()
        self._release = redis.register_script(_RELEASE)
        self._hand_off = redis.register_script(_HAND_OFF)
        self._take_over = redis.register_script(_TAKE_OVER)

    def _record_keys_args(self, record: LiveCallRecord) -> tuple[list[str], list[bytes | str | int]]:
        keys = self._keys
        flat: list[bytes | str | int] = [milliseconds(LIVE_RECORD_TTL_S), _now_ms(), record.call_sid]
        for name, value in record.fields().items():
            flat += [name, value]
        return [keys.live(record.call_sid), keys.live_call(record.call_sid), keys.live_calls], flat

    async def claim(self, call_sid: str, owner: str, ttl_s: float, record: LiveCallRecord | None) -> bool:
        head: list[bytes | str | int] = [owner.encode(), milliseconds(ttl_s)]
        if record is None:
            return bool(await self._claim(keys=[self._keys.live(call_sid)], args=head))
        keys, tail = self._record_keys_args(record)
        claimed = bool(await self._claim(keys=keys, args=head + tail))
        if claimed:
            self._recorded.add(call_sid)
        return claimed

    async def refresh(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        args: list[bytes | str | int] = [owner.encode(), milliseconds(ttl_s)]
        return bool(await self._renew(keys=[self._keys.live(call_sid)], args=args))

    async def beat(self, instance: InstanceRecord, calls: Sequence[LiveCallRecord], ttl_s: float) -> list[bool]:
        owner = instance.instance
        keys = self._keys
        head: list[bytes | str | int] = [owner.encode(), milliseconds(ttl_s)]
        record_ttl = milliseconds(LIVE_RECORD_TTL_S)
        recorded = self._recorded
        now = _now_ms()
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in calls:
                sid = record.call_sid
                if sid in recorded:
                    args = [*head, record_ttl, record.phase]
                    await self._renew_phase(keys=[keys.live(sid), keys.live_call(sid)], args=args, client=pipe)
                else:  # taken without a record, or the record was lost: written whole
                    record_keys, tail = self._record_keys_args(record)
                    await self._renew(keys=record_keys, args=head + tail, client=pipe)
            if calls:  # one index update for every call of the beat
                pipe.zadd(keys.live_calls, {record.call_sid: now for record in calls})
                pipe.pexpire(keys.live_calls, record_ttl)
            fields: Mapping[Any, str] = instance.fields()  # redis-py's Mapping key type is invariant
            pipe.hset(keys.instance(owner), mapping=fields)
            pipe.pexpire(keys.instance(owner), milliseconds(ttl_s))
            pipe.zadd(keys.instances, {owner: now})
            pipe.pexpire(keys.instances, record_ttl)
            results = await pipe.execute()
        renewed: list[bool] = []
        for record, result in zip(calls, results, strict=False):
            if result == 1 and record.call_sid not in recorded:
                recorded.add(record.call_sid)  # renewed by the whole-record script
            elif result != 1:
                recorded.discard(record.call_sid)  # not held, or its record is to be sent whole
            renewed.append(bool(result))
        return renewed

    async def release(self, call_sid: str, owner: str) -> bool:
        self._recorded.discard(call_sid)
        keys = [self._keys.live(call_sid), self._keys.live_call(call_sid), self._keys.live_calls]
        return bool(await self._release(keys=keys, args=[owner.encode(), call_sid]))

    async def hand_off(self, call_sid: str, owner: str) -> bool:
        self._recorded.discard(call_sid)
        keys = [self._keys.live(call_sid), self._keys.live_call(call_sid)]
        return bool(await self._hand_off(keys=keys, args=[owner.encode()]))

    async def take_over(
        self, call_sid: str, gone: str, owner: str, ttl_s: float, record: LiveCallRecord | None
    ) -> bool:
        head: list[bytes | str | int] = [gone.encode(), owner.encode(), milliseconds(ttl_s)]
        if record is None:
            return bool(await self._take_over(keys=[self._keys.live(call_sid)], args=head))
        keys, tail = self._record_keys_args(record)
        taken = bool(await self._take_over(keys=keys, args=head + tail))
        if taken:
            self._recorded.add(call_sid)
        return taken

    async def keep_presence(self, instance_id: str, on_message: Callable[[bytes], None] | None) -> None:
        """Hold the instance's presence subscription open, re-subscribing after a lost connection;
        what other instances send to this one (`send`) goes to `on_message`."""
        channel = self._keys.presence(instance_id)
        failing = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                if failing:
                    failing = False
                    log.info("presence subscription back", extra={"instance": instance_id})
                while True:  # reading also notices a lost connection
                    message = await pubsub.get_message(timeout=PRESENCE_READ_S)
                    if message is not None and message.get("type") == "message" and on_message is not None:
                        data = message.get("data")
                        if isinstance(data, bytes):
                            on_message(data)
            except (RedisError, OSError) as exc:
                if not failing:
                    failing = True
                    log.warning(
                        "lost this instance's presence subscription (%s); other instances may take over "
                        "its calls' resumed streams, and cannot reach its calls, until it is back",
                        describe(exc),
                        extra={"instance": instance_id},
                    )
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(PRESENCE_RETRY_S)

    async def send(self, instance_id: str, message: bytes) -> bool:
        return bool(await self._redis.publish(self._keys.presence(instance_id), message))

    async def gone(self, instance_id: str, stale_s: float) -> bool:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.pubsub_numsub(self._keys.presence(instance_id))
            pipe.hget(self._keys.instance(instance_id), "beat")
            numsub, beat = await pipe.execute()
        subscribed = bool(numsub) and int(numsub[0][1]) > 0
        if not subscribed or beat is None:
            return True
        try:
            return time.time() - float(text(beat)) > stale_s
        except ValueError:
            return True

    async def owner(self, call_sid: str) -> str | None:
        raw = await self._redis.get(self._keys.live(call_sid))
        return None if raw is None else text(raw)

    async def instances(self) -> list[InstanceRecord]:
        """Instances with a heartbeat and a presence: one whose process died is left out at once."""
        ids = await self._indexed(self._keys.instances)
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hgetall(self._keys.instance(instance_id))
            pipe.pubsub_numsub(*(self._keys.presence(instance_id) for instance_id in ids))
            *raw, numsub = await pipe.execute()
        present = {text(channel) for channel, count in numsub if int(count) > 0}
        found = (
            InstanceRecord.from_fields(_decoded(fields))
            for instance_id, fields in zip(ids, raw, strict=True)
            if self._keys.presence(instance_id) in present
        )
        return sorted((record for record in found if record is not None), key=lambda r: r.instance)

    async def calls(self) -> list[LiveCall]:
        alive = {record.instance for record in await self.instances()}
        sids = await self._indexed(self._keys.live_calls)
        async with self._redis.pipeline(transaction=False) as pipe:
            for call_sid in sids:
                pipe.hgetall(self._keys.live_call(call_sid))
                pipe.get(self._keys.live(call_sid))
            raw = await pipe.execute()
        listed: list[LiveCall] = []
        for fields, hold in zip(raw[::2], raw[1::2], strict=True):
            record = LiveCallRecord.from_fields(_decoded(fields))
            if record is not None and is_listed(record, None if hold is None else text(hold), alive):
                listed.append(LiveCall(record, orphaned=record.instance not in alive))
        return sorted(listed, key=lambda live: live.record.call_sid)

    async def _indexed(self, index: str) -> list[str]:
        """The members of an index, after dropping those older than any key they could name."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(index, "-inf", _now_ms() - milliseconds(LIVE_RECORD_TTL_S))
            pipe.zrange(index, 0, -1)
            _, members = await pipe.execute()
        return [text(member) for member in members]
