"""The `Store` contract shared by the Redis and in-process backends.

Writes are plain (non-async) methods because they are called from the audio path: they must
never wait for I/O and never raise. Reads are awaited and raise `StoreUnavailable`, so each
caller decides whether a missing memory feature matters.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

if TYPE_CHECKING:
    from .webhook_queue import WebhookQueue

__all__ = [
    "ENTRY_KINDS",
    "LIVE_HEARTBEAT_S",
    "LIVE_RECORD_TTL_S",
    "LIVE_STORE_TIMEOUT_S",
    "LIVE_TTL_S",
    "OUTBOUND_STALE_S",
    "CallRecord",
    "InstanceRecord",
    "LiveCall",
    "LiveCallRecord",
    "Store",
    "StoreUnavailable",
    "caller_memory_refusal",
    "encode_entry",
    "format_total",
    "hash_number",
    "normalize_number",
]

# One live stream per call across instances: the instance serving it holds the call in the store
# for LIVE_TTL_S and renews that every LIVE_HEARTBEAT_S, so a crashed instance lets go within seconds.
LIVE_TTL_S = 5.0
# An outbound call's place under the cap is freed by its final status callback, or after this long
# (longer than any call: the ring timeout, Twilio's 4 h default time limit and a margin).
OUTBOUND_STALE_S = 5 * 3600
LIVE_HEARTBEAT_S = 1.5
LIVE_STORE_TIMEOUT_S = 1.0
# An instance's heartbeat lives LIVE_TTL_S like its holds; a live-call record outlives both by far, so
# a call whose instance died is still listed (orphaned) until another takes it or the record expires.
LIVE_RECORD_TTL_S = 60.0

#: Conversation entry kinds callers are expected to use (not enforced: the store only orders them).
ENTRY_KINDS = frozenset(
    {"caller", "assistant", "dtmf", "tool_call", "tool_result", "interruption", "summary", "system"}
)

# Formatting characters people and carriers add to numbers; none of them is part of E.164.
_NUMBER_NOISE = str.maketrans("", "", " -().\t\u00a0")

# What Twilio sends as From when the caller withheld the number: besides words ("Anonymous",
# "Restricted", ...) the words spelled on a phone keypad (ANONYMOUS, RESTRICTED, UNAVAILABLE,
# UNKNOWN, BLOCKED), which look like E.164 numbers but are shared by every such caller (Twilio's
# support article "Why am I getting calls from these strange numbers").
WITHHELD_NUMBERS = frozenset({"+266696687", "+7378742833", "+86282452253", "+8656696", "+2562533"})
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


class StoreUnavailable(Exception):
    """The backend did not answer a read in time; the caller picks the fallback."""


@dataclass(slots=True)
class CallRecord:
    """Everything stored for one call, as returned by `Store.get_call`."""

    call_sid: str
    meta: dict[str, str] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    summary: str | None = None
    usage: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict (copies, so the caller may mutate it freely)."""
        return {
            "call_sid": self.call_sid,
            "meta": dict(self.meta),
            "entries": [dict(e) for e in self.entries],
            "summary": self.summary,
            "usage": dict(self.usage),
        }


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One instance's heartbeat, as every instance can read it."""

    instance: str
    started: str  # ISO 8601
    state: str  # "ready" or "draining"
    beat: float  # epoch seconds of the heartbeat

    def fields(self) -> dict[str, str]:
        return {"instance": self.instance, "started": self.started, "state": self.state, "beat": f"{self.beat:.3f}"}

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> InstanceRecord | None:
        """The record stored as `raw`, or None for a missing or malformed one."""
        try:
            return cls(raw["instance"], raw["started"], raw["state"], float(raw["beat"]))
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class LiveCallRecord:
    """A live call as the instance holding it describes it, written with each renewal of its hold."""

    call_sid: str
    instance: str
    started: str  # ISO 8601
    direction: str  # "inbound" or "outbound"
    profile: str
    phase: str  # what the call is doing now, e.g. "connecting", "live", "ending", "handed_off"

    def fields(self) -> dict[str, str]:
        return {
            "call_sid": self.call_sid,
            "instance": self.instance,
            "started": self.started,
            "direction": self.direction,
            "profile": self.profile,
            "phase": self.phase,
        }

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> LiveCallRecord | None:
        """The record stored as `raw`, or None for a missing or malformed one."""
        try:
            return cls(raw["call_sid"], raw["instance"], raw["started"], raw["direction"], raw["profile"], raw["phase"])
        except KeyError:
            return None


def is_listed(record: LiveCallRecord, holder: str | None, alive: set[str]) -> bool:
    """Whether a live-call record describes a call that is live, handed off, or orphaned.

    A record whose instance is alive but no longer holds the call is left over (a release that
    failed, a claim that timed out after it ran): not listed. One whose instance stopped beating
    is listed as orphaned until another instance takes the call or the record expires."""
    return record.instance not in alive or holder == record.instance or record.phase == "handed_off"


@dataclass(frozen=True, slots=True)
class LiveCall:
    """A live-call record as listed: `orphaned` when the instance it names no longer heart-beats."""

    record: LiveCallRecord
    orphaned: bool


@dataclass(frozen=True, slots=True)
class EndedCall:
    """An ended call as the console's history lists it: when it ended (epoch s) and its metadata."""

    call_sid: str
    ended_at: float
    meta: dict[str, str]


EVENT_TEXT_MAX = 2000  # characters of one string field of a console event


def encode_event(event: Mapping[str, Any]) -> bytes:
    """A console event as published: JSON, its long strings clipped (a tool's output may be large)."""
    clipped = {str(k): (v[:EVENT_TEXT_MAX] if isinstance(v, str) else v) for k, v in event.items()}
    return orjson.dumps(clipped, default=str, option=orjson.OPT_NON_STR_KEYS)


def encode_entry(entry: Mapping[str, Any]) -> bytes:
    """Serialize an entry once, at write time, so later mutation by the caller cannot leak in.

    Values JSON cannot express (datetimes, enums, objects) are stored as their `str()`, because a
    write must never fail on the audio path.
    """
    as_dict = entry if isinstance(entry, dict) else dict(entry)
    return orjson.dumps(as_dict, default=str, option=orjson.OPT_NON_STR_KEYS)


def format_total(value: float) -> str:
    """A summed metadata field as stored (``add_totals``): ``12`` for whole numbers, else up to 15 digits."""
    return f"{value:.15g}"


def normalize_number(number: str) -> str:
    """Strip formatting so "+1 (415) 555-0100" and "+14155550100" hash the same."""
    return number.strip().translate(_NUMBER_NOISE)


def caller_memory_refusal(number: str) -> str | None:
    """Why caller memory must not be keyed by this From, or None if it may be.

    Memory is keyed by the number, so a value many callers share (a withheld number, a word, an
    empty From) would hand one caller's notes to the next: only a plausible E.164 number qualifies.
    """
    normalized = normalize_number(number)
    if not normalized:
        return "no caller number"
    if normalized in WITHHELD_NUMBERS:
        return "the caller withheld the number"
    if not _E164.fullmatch(normalized):
        return "the caller number is not an E.164 number"
    return None


def hash_number(number: str, key: bytes) -> str:
    """Hex digest identifying a phone number without storing it: HMAC-SHA256 keyed by `key`.

    Phone numbers are few enough to enumerate, so a plain hash of one is as good as the number;
    without the key, a leaked key list says nothing. Every instance must use the same key.
    """
    if not key:
        raise ValueError("hash_number needs a non-empty key")
    return hmac.new(key, normalize_number(number).encode("utf-8"), hashlib.sha256).hexdigest()


@runtime_checkable
class Store(Protocol):
    """Per-call state, caller memory, one-time claims and live-stream ownership; see the module docstring."""

    # lifecycle
    async def start(self) -> None:
        """Start background work (the Redis writer); a no-op for the in-process store."""
        ...

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Flush what can be flushed within `flush_timeout`, stop tasks, close connections."""
        ...

    # non-blocking writes: never await I/O, never raise
    def call_started(self, call_sid: str, meta: Mapping[str, str]) -> None:
        """Record call metadata (from, to, started, instance, dialect, model, stream_sid ...)."""
        ...

    def call_updated(self, call_sid: str, meta: Mapping[str, str]) -> None:
        """Merge metadata fields (e.g. ended, end_reason)."""
        ...

    def add_entry(self, call_sid: str, entry: Mapping[str, Any]) -> None:
        """Append one conversation entry ({"kind": ..., "t": epoch seconds, ...}); order is kept."""
        ...

    def add_usage(self, call_sid: str, usage: Mapping[str, int]) -> None:
        """Add token counts by kind to the call's running totals."""
        ...

    def add_totals(self, call_sid: str, amounts: Mapping[str, float]) -> None:
        """Add amounts to numeric metadata fields of the call (``cost_usd``, ``frames_in`` …), so each
        stream of a call, on whichever instance, adds its share instead of overwriting the others'."""
        ...

    def set_summary(self, call_sid: str, summary: str) -> None:
        """Replace the call's rolling summary."""
        ...

    def set_caller_memory(self, caller_number: str, summary: str) -> None:
        """Remember something about a caller, keyed by the hashed number, with its own TTL."""
        ...

    # reads: off the audio path; raise StoreUnavailable on failure
    async def get_call(self, call_sid: str) -> CallRecord | None:
        """The whole call record, or None if nothing is stored for it."""
        ...

    async def recent_entries(self, call_sid: str, n: int) -> list[dict[str, Any]]:
        """The last `n` entries, oldest first."""
        ...

    async def get_caller_memory(self, caller_number: str) -> str | None:
        """What was remembered about this caller, if it has not expired."""
        ...

    async def set_disposition(self, call_sid: str, disposition: str) -> None:
        """Record at once (awaited, not queued behind other writes) how the call goes on, before its
        stream closes: ended on purpose (``ended``), the Realtime API unreachable (``unavailable``) or
        handed off to another instance (``handed_off``, taken by the continuation that resumes it).
        Twilio asks the continuation webhook, on any instance, what to do next as soon as the stream
        is gone. Raises StoreUnavailable."""
        ...

    async def get_disposition(self, call_sid: str) -> str | None:
        """What `set_disposition` recorded for the call, or None."""
        ...

    async def take_disposition(self, call_sid: str, disposition: str) -> bool:
        """Remove the call's disposition if it is `disposition` (compare-and-delete); True if this
        call removed it, so of two readers only one acts on it. Raises StoreUnavailable."""
        ...

    async def count_continuation(self, call_sid: str, window_s: int) -> int:
        """Count one continuation of the call; returns how many there were in the current window of
        `window_s` seconds, this one included (the continuation webhook's loop guard)."""
        ...

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        """True for the first claim of `key` within `ttl_s` across all instances, else False."""
        ...

    # outbound calls (POST /calls): the cluster-wide cap and rate, idempotency keys, and the stream
    # token's reference to the call SID Twilio gave the call once placed.
    async def outbound_admit(self, ref: str, cap: int, per_minute: int) -> str | None:
        """Take a place for the outbound call `ref` unless `cap` calls are in progress ("cap") or
        `per_minute` were placed this minute ("rate"); None when taken, atomically across instances."""
        ...

    async def outbound_done(self, ref: str) -> None:
        """The outbound call `ref` is over (or was never placed): its place is free again."""
        ...

    async def claim_idempotency_key(self, key: str, ttl_s: int) -> str | None:
        """None when `key` is new (now claimed for `ttl_s`); else the call SID it names ("" while the
        call is still being placed)."""
        ...

    async def set_idempotency_key(self, key: str, call_sid: str, ttl_s: int) -> None:
        """The claimed `key` names `call_sid` from now on."""
        ...

    async def drop_idempotency_key(self, key: str) -> None:
        """Forget a claimed `key` whose call could not be placed, so a retry may place it."""
        ...

    async def link_outbound(self, ref: str, call_sid: str, ttl_s: int) -> None:
        """The outbound call whose stream token names `ref` has the SID `call_sid`."""
        ...

    async def outbound_call_sid(self, ref: str) -> str | None:
        """The call SID `link_outbound` recorded for `ref`, or None."""
        ...

    # live-stream ownership: at most one live stream per call across instances. The owner (an
    # instance id) holds ``live:{call_sid}`` for `ttl_s` and keeps refreshing it while its stream
    # lives; an owner that stops (crash, lost network) loses the call when the TTL runs out.
    # relay/ownership.py is the only user; these are its primitives.
    async def claim_live(self, call_sid: str, owner: str, ttl_s: float, record: LiveCallRecord | None = None) -> bool:
        """Take the call for `owner` unless someone holds it (set-if-absent with a TTL); True if taken.

        With `record`, the call's live-call record is written in the same atomic step when taken."""
        ...

    async def refresh_live(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        """Extend `owner`'s hold to `ttl_s` from now; False (and nothing changed) if `owner` no longer holds it."""
        ...

    async def beat(self, instance: InstanceRecord, calls: Sequence[LiveCallRecord], ttl_s: float) -> list[bool]:
        """One instance's heartbeat, in one pipeline: write its `instance` record (TTL `ttl_s`) and,
        for each call whose hold it still has, extend the hold to `ttl_s` and bring the call's record
        up to date (TTL LIVE_RECORD_TTL_S; a store may send only what changes, the phase). Per call,
        True if the hold was renewed (False: not held by it, and nothing of that call was written)."""
        ...

    async def release_live(self, call_sid: str, owner: str) -> bool:
        """Let go of the call if `owner` still holds it (compare-and-delete); True if it was released.

        The call's live-call record goes too while it names `owner`."""
        ...

    async def hand_off(self, call_sid: str, owner: str) -> bool:
        """`owner` lets go of the call on purpose, so another instance may claim it at once; its record
        stays, in phase "handed_off", until the new owner's replaces it. False if `owner` did not hold it."""
        ...

    async def live_owner(self, call_sid: str) -> str | None:
        """Who holds the call now, or None when no stream of it is live."""
        ...

    async def keep_presence(self, instance_id: str, on_message: Callable[[bytes], None] | None = None) -> None:
        """Be present as `instance_id` until cancelled: a process's presence lasts exactly as long as
        the process (Redis: a pub/sub subscription, which the server drops when the process's
        connection closes, at once when the process dies). What `send_to_instance` sends to it goes
        to `on_message`. Never returns; a failure is logged and retried."""
        ...

    async def send_to_instance(self, instance_id: str, message: bytes) -> bool:
        """Send `message` to the live process of `instance_id` (at most once: pub/sub); False when
        no process of it was listening."""
        ...

    async def instance_gone(self, instance_id: str, stale_s: float) -> bool:
        """True when `instance_id` is certainly not serving: not present, or its heartbeat missing
        or older than `stale_s` (a machine that vanished without closing its connections)."""
        ...

    async def take_over_live(
        self, call_sid: str, gone: str, owner: str, ttl_s: float, record: LiveCallRecord | None = None
    ) -> bool:
        """Move the call's hold from `gone` (an instance `instance_gone` reported) to `owner`
        (compare-and-set, with its record like `claim_live`); False, and nothing changed, if `gone` no
        longer holds it."""
        ...

    async def live_instances(self) -> list[InstanceRecord]:
        """The instances whose heartbeat has not expired and which are present (`keep_presence`), by id."""
        ...

    async def live_calls(self) -> list[LiveCall]:
        """Every live-call record across instances, by call SID, orphaned where its instance is not
        live (`live_instances`: its heartbeat expired, or its process is gone)."""
        ...

    def webhook_queue(self) -> WebhookQueue:
        """The outgoing webhook queue (relay/store/webhook_queue.py): shared and durable on Redis,
        this process's own on the in-process store."""
        ...

    # the operations console (relay/console/): its live feed across instances, the index of ended
    # calls (written when a call's record gets its "ended" field) and failed sign-ins per client
    def publish_event(self, event: Mapping[str, Any]) -> None:
        """Publish a small call event ({"call_sid", "kind", "t", ...}) to every console; queued, never
        awaits, never raises; dropped when the queue is full."""
        ...

    def console_events(self) -> AsyncIterator[bytes]:
        """The events published from now on by any instance, each JSON; the first item is b"" once
        subscribed. Raises StoreUnavailable when the feed is lost."""
        ...

    async def ended_calls(self, since: float, until: float, limit: int) -> list[EndedCall]:
        """Calls that ended between `since` and `until` (epoch s), the latest first, at most `limit`."""
        ...

    async def count_signin_failure(self, client: str, window_s: int) -> int:
        """Count a failed console sign-in from `client`; returns how many in its current window."""
        ...

    async def signin_failures(self, client: str) -> int:
        """Failed console sign-ins from `client` in its current window."""
        ...

    async def ping(self) -> bool:
        """True if the backend answers now (readiness); never raises."""
        ...

    async def flush(self, timeout: float) -> bool:
        """Wait until every write queued before this call is stored; False on timeout."""
        ...

    # observability
    @property
    def queue_depth(self) -> int:
        """Writes queued and not yet confirmed by the backend."""
        ...

    @property
    def dropped_writes(self) -> int:
        """Writes discarded since start (queue overflow, invalid data, backend refusal)."""
        ...

    @property
    def kind(self) -> str:
        """Backend name: "redis" or "memory"."""
        ...
