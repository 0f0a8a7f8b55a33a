"""How a batch of queued store writes becomes the commands of one Redis pipeline.

Appends and increments go through a Lua script guarded by the call's ``applied`` hash (writer
id -> last applied sequence): a batch that timed out may still have been executed by a stalled
server, and sending it again must not duplicate entries or token counts. A batch also carries
the ``EXPIRE`` of the calls it touches, but only when their TTLs need setting: on a call key's
first write, on the write that ends the call, and otherwise at most once per `ttl_refresh_s`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final

from redis.asyncio.client import Pipeline

from .redis_keys import CALL_KEY_SUFFIXES, RedisKeys

__all__ = ["CALLER", "ENTRY", "META", "SUMMARY", "TOTALS", "USAGE", "BatchBuilder", "Op"]

# Appends an entry ("e"), adds usage counts ("u") or adds to metadata totals ("f") unless this
# writer already applied `seq` for this call. KEYS: target, applied-hash. ARGV: writer id, seq, mode, payload...
_APPLY_ONCE: Final = b"""
local seen = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local seq = tonumber(ARGV[2])
if seq <= seen then return 0 end
if ARGV[3] == 'e' then
  redis.call('RPUSH', KEYS[1], ARGV[4])
elseif ARGV[3] == 'f' then
  for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
else
  for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""
_APPLY_ONCE_SHA: Final = hashlib.sha1(_APPLY_ONCE).hexdigest()

META, ENTRY, USAGE, TOTALS, SUMMARY, CALLER = "meta", "entry", "usage", "totals", "summary", "caller"
_SUFFIXES_WRITTEN: Final = {
    META: frozenset({"meta"}),
    ENTRY: frozenset({"entries", "applied"}),
    USAGE: frozenset({"usage", "applied"}),
    TOTALS: frozenset({"meta", "applied"}),
    SUMMARY: frozenset({"summary"}),
}
_TTL_STATE_MAX: Final = 100_000


@dataclass(slots=True)
class Op:
    """One queued write; `seq` orders ops and lets the Lua guard recognise replays."""

    seq: int
    kind: str
    target: str  # call SID, or the hashed caller number for CALLER
    value: bytes = b""
    fields: dict[str, str] | None = None
    counts: dict[str, int] | None = None
    totals: dict[str, float] | None = None


class BatchBuilder:
    """Builds pipelines for one writer and remembers which calls' TTLs are already set."""

    def __init__(
        self, keys: RedisKeys, writer_id: str, *, state_ttl_s: int, caller_memory_ttl_s: int, ttl_refresh_s: float
    ) -> None:
        self._keys = keys
        self._writer_id = writer_id
        self._state_ttl = state_ttl_s
        self._caller_ttl = caller_memory_ttl_s
        self._ttl_refresh = ttl_refresh_s
        self.script_loaded = False
        # call SID -> (when its TTLs were last set, the key suffixes that existed then); only
        # calls in progress: the entry goes with the write that ends the call
        self._ttl_state: dict[str, tuple[float, frozenset[str]]] = {}
        self._ttl_pending: dict[str, tuple[float, frozenset[str]] | None] = {}

    def server_lost(self) -> None:
        """The server may have restarted with an empty script cache and without the keys: load the
        script and set TTLs with the next batch again."""
        self.script_loaded = False
        self._ttl_state.clear()

    def discard(self) -> None:
        """The last built batch was not written and will not be sent again."""
        self._ttl_pending = {}

    def build(self, pipe: Pipeline, batch: list[Op]) -> list[Op | None]:
        """Queue the batch's commands on `pipe`; returns the op behind each command, in order."""
        owners: list[Op | None] = []
        if not self.script_loaded:
            pipe.script_load(_APPLY_ONCE)
            owners.append(None)
        touched: dict[str, set[str]] = {}  # call SID -> suffixes this batch writes (insertion-ordered)
        ended: set[str] = set()
        for op in batch:
            if op.kind == CALLER:
                pipe.set(self._keys.caller(op.target), op.value, ex=self._caller_ttl)
            elif op.kind == META and op.fields:
                fields: Mapping[Any, str] = op.fields  # redis-py's Mapping key type is invariant
                pipe.hset(self._keys.call(op.target, "meta"), mapping=fields)
            elif op.kind == ENTRY:
                self._apply_once(pipe, op, "entries", b"e", [op.value])
            elif op.kind == USAGE and op.counts:
                flat: list[bytes | str | int] = []
                for name, count in op.counts.items():
                    flat += [name, count]
                self._apply_once(pipe, op, "usage", b"u", flat)
            elif op.kind == TOTALS and op.totals:
                amounts: list[bytes | str | int] = []
                for name, amount in op.totals.items():
                    amounts += [name, repr(amount)]
                self._apply_once(pipe, op, "meta", b"f", amounts)
            elif op.kind == SUMMARY:
                pipe.set(self._keys.call(op.target, "summary"), op.value)
            else:
                continue
            owners.append(op)
            if op.kind != CALLER:
                touched.setdefault(op.target, set()).update(_SUFFIXES_WRITTEN[op.kind])
                if op.kind == META and op.fields and "ended" in op.fields:
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
            for suffix in CALL_KEY_SUFFIXES:
                pipe.expire(self._keys.call(call_sid, suffix), self._state_ttl)
                owners.append(None)
            existing = written if known is None else written | known[1]
            self._ttl_pending[call_sid] = None if call_sid in ended else (now, frozenset(existing))
        return owners

    def written(self) -> None:
        """The last built batch was sent: remember the TTLs it set (or forget calls that ended)."""
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

    def _apply_once(self, pipe: Pipeline, op: Op, suffix: str, mode: bytes, payload: list[bytes | str | int]) -> None:
        pipe.evalsha(
            _APPLY_ONCE_SHA,
            2,
            self._keys.call(op.target, suffix),
            self._keys.call(op.target, "applied"),
            self._writer_id,
            op.seq,
            mode,
            *payload,
        )
