"""Where the Redis store keeps what, in one place, so the writer, the reads and ownership agree.

Key layout (P is the prefix, default ``relay:``; every value is UTF-8)::

    P call:{sid}:meta      hash    call metadata: from, to, started (ISO 8601), instance, dialect,
                                   model, stream_sid, ended, end_reason ... (HSET merges fields);
                                   cost_usd, frames_in, frames_out summed over the call's streams
                                   (HINCRBYFLOAT, applied once like usage)
    P call:{sid}:entries   list    conversation entries, one JSON object each, oldest first (RPUSH)
    P call:{sid}:usage     hash    token counts by kind, summed (HINCRBY)
    P call:{sid}:summary   string  rolling conversation summary
    P call:{sid}:applied   hash    writer id -> last applied write sequence; makes a retried batch
                                   append entries / add usage and totals exactly once
    P call:{sid}:disposition string  "ended" once the relay ended the call on purpose ("unavailable": the
                                   Realtime API is unreachable; "handed_off": a hand-off, deleted by the
                                   continuation that resumes it), written before its stream closes
                                   (read by the continuation webhook); TTL state_ttl_s
    P call:{sid}:continuations string  continuations of the call in the current loop-guard window (SET NX
                                   EX window, then INCR)
    P caller:{hash}        string  caller memory; {hash} = HMAC-SHA256 hex of the normalized
                                   E.164 number, keyed by the caller-key secret; TTL caller_memory_ttl_s
    P once:{key}           string  claim_once marker (SET NX EX ttl)
    P live:{sid}           string  the instance id whose stream of this call is live (SET NX PX,
                                   refreshed by that instance's heartbeat, compare-and-delete at its end)
    P livecall:{sid}       hash    the live call as its owner describes it: call_sid, instance, started,
                                   direction, profile, phase; written with the hold, TTL LIVE_RECORD_TTL_S,
                                   deleted by its instance at the end
    P livecalls            zset    call SIDs with a livecall record, scored by its last write (epoch ms)
    P instance:{id}        hash    an instance's heartbeat: instance, started, state (ready/draining),
                                   beat (epoch s); TTL LIVE_TTL_S, so a dead instance is gone within it
    P instances            zset    instance ids with a heartbeat, scored by its last write (epoch ms)
    P outbound:active      zset    references of the outbound calls in progress, scored by when each was
                                   placed (epoch ms): the cluster-wide RELAY_MAX_OUTBOUND_CALLS cap
    P outbound:rate        string  outbound calls placed in the current minute (SET EX 60, then INCR)
    P outbound:ref:{ref}   string  the call SID of the outbound call whose stream token names {ref}
    P outbound:key:{hash}  string  an idempotency key's call SID ("" while it is being placed); one day
    P console:events       channel the console's live feed: one JSON event per message ({"call_sid", "kind",
                                   "t", ...}: started, transcript lines, interruptions, keypad entries,
                                   tool calls and results, latency, console actions, ended), published
                                   by the instance holding the call, read by every console
    P console:ended        zset    call SIDs of ended calls, scored by their end (epoch s): the console's
                                   history; members older than state_ttl_s are dropped on each add,
                                   TTL state_ttl_s
    P console:signin:{h}   string  failed console sign-ins of one client address ({h}: SHA-256 of it),
                                   in the current window (SET NX EX window, then INCR)
    P presence:{id}        channel subscribed by instance {id} for as long as its process lives (PUBSUB
                                   NUMSUB 0: the process is gone; nothing is published on it)
    P webhooks:events      hash    outgoing webhook event id -> the queued event (JSON: id, type, url, body,
                                   created); HSETNX, deleted once delivered or given up
    P webhooks:due         zset    event ids scored by when each is due (epoch ms): its next attempt, or the
                                   end of the lease of the attempt under way
    P webhooks:attempts    hash    event id -> attempts leased so far (HINCRBY; the lease's fence)

The webhook keys have no TTL: an event stays until it is delivered or given up (relay/webhooks.py,
at most a day); relay/store/webhook_queue.py has the scripts that lease and settle them.

The two sorted sets are indexes so listing needs no SCAN; each has a LIVE_RECORD_TTL_S TTL renewed
with every write, and its members outlive the keys they name by at most that (readers drop older ones).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["CALL_KEY_SUFFIXES", "RedisKeys", "describe", "milliseconds", "text"]

CALL_KEY_SUFFIXES: Final = ("meta", "entries", "usage", "summary", "applied")


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The key names under one prefix."""

    prefix: str

    def call(self, call_sid: str, suffix: str) -> str:
        return f"{self.prefix}call:{call_sid}:{suffix}"

    def caller(self, hashed_number: str) -> str:
        return f"{self.prefix}caller:{hashed_number}"

    def once(self, key: str) -> str:
        return f"{self.prefix}once:{key}"

    def live(self, call_sid: str) -> str:
        return f"{self.prefix}live:{call_sid}"

    def live_call(self, call_sid: str) -> str:
        return f"{self.prefix}livecall:{call_sid}"

    @property
    def live_calls(self) -> str:
        return f"{self.prefix}livecalls"

    @property
    def outbound_active(self) -> str:
        return f"{self.prefix}outbound:active"

    @property
    def outbound_rate(self) -> str:
        return f"{self.prefix}outbound:rate"

    def outbound_ref(self, ref: str) -> str:
        return f"{self.prefix}outbound:ref:{ref}"

    def outbound_idempotency(self, key: str) -> str:
        return f"{self.prefix}outbound:key:{hashlib.sha256(key.encode()).hexdigest()}"

    @property
    def console_events(self) -> str:
        return f"{self.prefix}console:events"

    @property
    def ended_calls(self) -> str:
        return f"{self.prefix}console:ended"

    def console_signin(self, client_hash: str) -> str:
        return f"{self.prefix}console:signin:{client_hash}"

    def presence(self, instance_id: str) -> str:
        return f"{self.prefix}presence:{instance_id}"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{instance_id}"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    @property
    def webhooks_events(self) -> str:
        return f"{self.prefix}webhooks:events"

    @property
    def webhooks_due(self) -> str:
        return f"{self.prefix}webhooks:due"

    @property
    def webhooks_attempts(self) -> str:
        return f"{self.prefix}webhooks:attempts"


def describe(exc: BaseException) -> str:
    """An exception for a log line: its type, and its text when it has one."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def milliseconds(seconds: float) -> int:
    """A TTL in whole milliseconds (PX, PEXPIRE), at least 1."""
    if seconds <= 0:
        raise ValueError("ttl_s must be > 0")
    return max(1, int(seconds * 1000))


def text(raw: Any) -> str:
    """A stored value as text (the client returns bytes)."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
