"""The `Store` contract shared by the Redis and in-process backends.

Writes are plain (non-async) methods because they are called from the audio path: they must
never wait for I/O and never raise. Reads are awaited and raise `StoreUnavailable`, so each
caller decides whether a missing memory feature matters.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

__all__ = [
    "ENTRY_KINDS",
    "CallRecord",
    "Store",
    "StoreUnavailable",
    "encode_entry",
    "hash_number",
    "normalize_number",
]

#: Conversation entry kinds callers are expected to use (not enforced: the store only orders them).
ENTRY_KINDS = frozenset(
    {"caller", "assistant", "dtmf", "tool_call", "tool_result", "interruption", "summary", "system"}
)

# Formatting characters people and carriers add to numbers; none of them is part of E.164.
_NUMBER_NOISE = str.maketrans("", "", " -().\t\u00a0")


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


def encode_entry(entry: Mapping[str, Any]) -> bytes:
    """Serialize an entry once, at write time, so later mutation by the caller cannot leak in.

    Values JSON cannot express (datetimes, enums, objects) are stored as their `str()`, because a
    write must never fail on the audio path.
    """
    as_dict = entry if isinstance(entry, dict) else dict(entry)
    return orjson.dumps(as_dict, default=str, option=orjson.OPT_NON_STR_KEYS)


def normalize_number(number: str) -> str:
    """Strip formatting so "+1 (415) 555-0100" and "+14155550100" hash the same."""
    return number.strip().translate(_NUMBER_NOISE)


def hash_number(number: str, salt: str = "") -> str:
    """Hex digest identifying a phone number without storing it.

    Without a salt this is sha256 of the normalized number (stable across deployments). With a
    salt it is HMAC-SHA256 keyed by the salt, which makes brute-forcing the small space of phone
    numbers from a leaked key list impractical.
    """
    data = normalize_number(number).encode("utf-8")
    if salt:
        return hmac.new(salt.encode("utf-8"), data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


@runtime_checkable
class Store(Protocol):
    """Per-call state, caller memory and one-time claims; see the module docstring for rules."""

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

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        """True for the first claim of `key` within `ttl_s` across all instances, else False."""
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
