"""State layer against a real Redis (no mocks), and the in-process store against the same rules."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis

from relay.store import (
    CallRecord,
    MemoryStore,
    RedisStore,
    Store,
    StoreUnavailable,
    caller_memory_refusal,
    hash_number,
    make_store,
)

if TYPE_CHECKING:
    from conftest import RedisProcess

pytestmark = pytest.mark.timeout(30)

LOGGER = "relay.store"
CALLER = "+1 (415) 555-0100"
CALLER_E164 = "+14155550100"
STATE_TTL = 1_000
CALLER_TTL = 5_000
CALLER_KEY = b"store-test-caller-key"


def _redis_store(url: str, prefix: str, **kw: Any) -> RedisStore:
    kw.setdefault("state_ttl_s", STATE_TTL)
    kw.setdefault("caller_memory_ttl_s", CALLER_TTL)
    kw.setdefault("caller_key_secret", CALLER_KEY)
    return RedisStore(url, prefix=prefix, **kw)


def _keys(url: str, prefix: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        client.close()


def _ttls(url: str, keys: list[str]) -> dict[str, int]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return {k: int(client.ttl(k)) for k in keys}
    finally:
        client.close()


@contextlib.asynccontextmanager
async def _started_store(url: str, prefix: str, **kw: Any) -> AsyncIterator[tuple[RedisStore, redis.Redis]]:
    """A started RedisStore and a plain client on the same server to look at what it wrote."""
    store = _redis_store(url, prefix, **kw)
    await store.start()
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        yield store, client
    finally:
        await store.close()
        client.close()


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def _wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


@pytest.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, store_prefix: str) -> AsyncIterator[Store]:
    """Each behavioural test runs on both backends."""
    s: Store
    if request.param == "redis":
        s = _redis_store(request.getfixturevalue("redis_url"), store_prefix)
    else:
        s = MemoryStore(state_ttl_s=STATE_TTL, caller_memory_ttl_s=CALLER_TTL, caller_key_secret=CALLER_KEY)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def caplog_store(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    yield caplog


# --- behaviour shared by both backends ---------------------------------------------------------


async def test_call_record_round_trip(store: Store) -> None:
    store.call_started("CA1", {"from": CALLER_E164, "to": "+15550001111", "dialect": "ga"})
    for i in range(50):
        store.add_entry("CA1", {"kind": "caller" if i % 2 else "assistant", "t": 1000.0 + i, "i": i})
    store.add_usage("CA1", {"input_text": 10, "output_audio": 5})
    store.add_usage("CA1", {"input_text": 7})
    store.add_usage("CA1", {})
    store.set_summary("CA1", "first")
    store.set_summary("CA1", "caller wants a refund")
    store.call_updated("CA1", {"ended": "2025-01-01T00:00:00Z", "end_reason": "hangup", "dialect": "beta"})
    assert await store.flush(5)

    record = await store.get_call("CA1")
    assert isinstance(record, CallRecord)
    assert record.meta == {
        "from": CALLER_E164,
        "to": "+15550001111",
        "dialect": "beta",
        "ended": "2025-01-01T00:00:00Z",
        "end_reason": "hangup",
    }
    assert [e["i"] for e in record.entries] == list(range(50))
    assert record.entries[0] == {"kind": "assistant", "t": 1000.0, "i": 0}
    assert record.usage == {"input_text": 17, "output_audio": 5}
    assert record.summary == "caller wants a refund"

    assert [e["i"] for e in await store.recent_entries("CA1", 3)] == [47, 48, 49]
    assert len(await store.recent_entries("CA1", 500)) == 50
    assert await store.recent_entries("CA1", 0) == []
    assert await store.recent_entries("nope", 5) == []
    assert await store.get_call("nope") is None
    assert store.dropped_writes == 0


async def test_totals_add_up_across_writers(store: Store) -> None:
    store.call_started("CA4", {"from": CALLER_E164, "frames_in": "5"})
    store.add_totals("CA4", {"frames_in": 120, "cost_usd": 0.0125})
    store.add_totals("CA4", {"frames_in": 30, "cost_usd": 0.0075, "frames_out": 44})
    store.add_totals("CA4", {})
    store.add_totals("CA4", {"cost_usd": "lots"})  # type: ignore[dict-item]
    assert await store.flush(5)
    record = await store.get_call("CA4")
    assert record is not None
    meta = record.meta
    assert (meta["from"], meta["frames_in"], meta["frames_out"]) == (CALLER_E164, "155", "44")
    assert float(meta["cost_usd"]) == pytest.approx(0.02, rel=1e-12)
    assert store.dropped_writes == 1


async def test_a_disposition_is_taken_only_while_it_is_the_one_expected(store: Store) -> None:
    await store.set_disposition("CA5", "handed_off")
    assert await store.take_disposition("CA5", "ended") is False
    assert await store.get_disposition("CA5") == "handed_off"
    assert await store.take_disposition("CA5", "handed_off") is True
    assert await store.take_disposition("CA5", "handed_off") is False  # a second reader gets nothing
    assert await store.get_disposition("CA5") is None
    assert await store.take_disposition("CA-none", "handed_off") is False


async def test_get_call_json_shape(store: Store) -> None:
    store.call_started("CA2", {"from": CALLER_E164})
    store.add_entry("CA2", {"kind": "tool_call", "t": 1.5, "name": "lookup", "args": {"id": [1, 2]}})
    store.add_usage("CA2", {"total": 3})
    assert await store.flush(5)
    record = await store.get_call("CA2")
    assert record is not None
    doc = record.to_json()
    assert doc == {
        "call_sid": "CA2",
        "meta": {"from": CALLER_E164},
        "entries": [{"kind": "tool_call", "t": 1.5, "name": "lookup", "args": {"id": [1, 2]}}],
        "summary": None,
        "usage": {"total": 3},
    }
    assert orjson.loads(orjson.dumps(doc)) == doc


async def test_entries_are_snapshots_and_bad_writes_never_raise(store: Store) -> None:
    entry: dict[str, Any] = {"kind": "system", "t": 2.0, "at": dt.datetime(2025, 1, 1, tzinfo=dt.UTC)}
    store.add_entry("CA3", entry)
    entry["kind"] = "mutated"
    store.add_usage("CA3", {"tokens": "lots"})  # type: ignore[dict-item]
    store.call_updated("CA3", None)  # type: ignore[arg-type]
    assert await store.flush(5)
    entries = await store.recent_entries("CA3", 10)
    assert entries == [{"kind": "system", "t": 2.0, "at": "2025-01-01T00:00:00+00:00"}]
    assert store.dropped_writes == 2


async def test_caller_memory_by_normalized_number(store: Store) -> None:
    store.set_caller_memory(CALLER, "prefers Spanish")
    assert await store.flush(5)
    assert await store.get_caller_memory(CALLER_E164) == "prefers Spanish"
    assert await store.get_caller_memory("+1-415-555-0100") == "prefers Spanish"
    assert await store.get_caller_memory("+14155550199") is None


async def test_claim_once(store: Store) -> None:
    assert await store.claim_once("token-a", 60) is True
    assert await store.claim_once("token-a", 60) is False
    assert await store.claim_once("token-b", 60) is True


async def test_observability_and_ping(store: Store) -> None:
    assert store.kind in ("redis", "memory")
    assert store.queue_depth == 0
    assert store.dropped_writes == 0
    assert await store.ping() is True
    assert isinstance(store, Store)
    for name in (
        "call_started",
        "call_updated",
        "add_entry",
        "add_usage",
        "add_totals",
        "set_summary",
        "set_caller_memory",
    ):
        assert not inspect.iscoroutinefunction(getattr(store, name)), name


# --- Redis specifics ---------------------------------------------------------------------------


async def test_every_call_key_gets_a_ttl_when_created_and_all_expire_together_at_the_end(
    redis_url: str, store_prefix: str
) -> None:
    """Keys created in separate batches each get a TTL at once; later writes of an existing key do not
    refresh TTLs (within the refresh interval); the write that ends the call sets all five again."""
    keys = [f"{store_prefix}call:CA7:{s}" for s in ("meta", "entries", "usage", "summary", "applied")]
    async with _started_store(redis_url, store_prefix, linger_s=0.0) as (store, client):
        store.call_started("CA7", {"from": CALLER, "to": "+15550001111"})
        assert await store.flush(5)
        assert 0 < client.ttl(keys[0]) <= STATE_TTL
        store.add_entry("CA7", {"kind": "caller", "t": 1.0, "text": "hi"})
        assert await store.flush(5)
        store.add_usage("CA7", {"input": 1})
        assert await store.flush(5)
        store.set_summary("CA7", "short")
        assert await store.flush(5)
        assert all(0 < client.ttl(key) <= STATE_TTL for key in keys)

        for key in keys:
            client.expire(key, 50)
        store.add_entry("CA7", {"kind": "assistant", "t": 2.0, "text": "hello"})
        store.add_usage("CA7", {"input": 2})
        store.call_updated("CA7", {"stream_sid": "MZ1"})
        assert await store.flush(5)
        assert all(0 < client.ttl(key) <= 50 for key in keys)  # no EXPIRE for keys that have one

        store.call_updated("CA7", {"ended": "2026-01-01T00:00:00+00:00", "end_reason": "caller_hung_up"})
        assert await store.flush(5)
        assert all(STATE_TTL - 5 < client.ttl(key) <= STATE_TTL for key in keys)  # all five, together
        assert [e["text"] for e in await store.recent_entries("CA7", 10)] == ["hi", "hello"]


async def test_call_ttls_are_refreshed_after_the_refresh_interval(redis_url: str, store_prefix: str) -> None:
    key = f"{store_prefix}call:CA8:entries"
    async with _started_store(redis_url, store_prefix, linger_s=0.0, ttl_refresh_s=0.3) as (store, client):
        store.add_entry("CA8", {"kind": "caller", "t": 1.0, "text": "one"})
        assert await store.flush(5)
        client.expire(key, 50)
        store.add_entry("CA8", {"kind": "caller", "t": 2.0, "text": "two"})
        assert await store.flush(5)
        assert client.ttl(key) <= 50
        await asyncio.sleep(0.4)
        store.add_entry("CA8", {"kind": "caller", "t": 3.0, "text": "three"})
        assert await store.flush(5)
        assert client.ttl(key) > STATE_TTL - 5


async def test_writes_collect_for_the_linger_time_unless_flushed(redis_url: str, store_prefix: str) -> None:
    key = f"{store_prefix}call:CA5:usage"
    async with _started_store(redis_url, store_prefix, linger_s=0.3) as (store, client):
        await asyncio.sleep(0.05)  # the writer is waiting for work
        store.add_usage("CA5", {"input_tokens": 1})
        await asyncio.sleep(0.1)
        assert client.hgetall(key) == {}  # still collecting
        store.call_updated("CA5", {"model": "m"})
        await asyncio.sleep(0.4)
        assert client.hgetall(key) == {"input_tokens": "1"}  # both, in one pipeline, without anyone asking
        assert client.hgetall(f"{store_prefix}call:CA5:meta") == {"model": "m"}
        store.add_usage("CA5", {"input_tokens": 2})
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await store.flush(5)
        assert loop.time() - started < 0.25  # flush() does not wait out the linger
        assert client.hgetall(key) == {"input_tokens": "3"}


async def test_what_a_resumed_stream_is_seeded_with_is_not_held_back_by_the_linger(
    redis_url: str, store_prefix: str
) -> None:
    """An instance killed mid-linger must not take the latest turns and the summary with it."""
    async with _started_store(redis_url, store_prefix, linger_s=2.0) as (store, client):
        await asyncio.sleep(0.05)  # the writer is waiting for work
        store.add_usage("CA7", {"input_tokens": 5})
        await asyncio.sleep(0.2)
        assert client.hgetall(f"{store_prefix}call:CA7:usage") == {}  # still collecting
        store.add_entry("CA7", {"kind": "caller", "t": 1.0, "text": "my order number is 42"})
        await asyncio.sleep(0.2)  # well under the 2 s linger
        assert client.llen(f"{store_prefix}call:CA7:entries") == 1
        assert client.hgetall(f"{store_prefix}call:CA7:usage") == {"input_tokens": "5"}  # queued before it
        store.set_summary("CA7", "The caller gave order 42.")
        await asyncio.sleep(0.2)
        assert client.get(f"{store_prefix}call:CA7:summary") == "The caller gave order 42."


async def test_the_write_that_ends_a_call_is_not_held_back_by_the_linger(redis_url: str, store_prefix: str) -> None:
    """GET /calls/{sid} right after hang-up must show how the call ended, even with a long linger."""
    async with _started_store(redis_url, store_prefix, linger_s=2.0) as (store, client):
        await asyncio.sleep(0.05)  # the writer is waiting for work
        store.call_started("CA6", {"from": CALLER, "started": "1"})
        store.add_usage("CA6", {"input_tokens": 1})
        await asyncio.sleep(0.2)
        assert client.hgetall(f"{store_prefix}call:CA6:meta") == {}  # still collecting
        store.call_updated("CA6", {"ended": "2", "end_reason": "caller_hangup"})
        await asyncio.sleep(0.3)  # well under the 2 s linger
        meta = client.hgetall(f"{store_prefix}call:CA6:meta")
        assert meta["end_reason"] == "caller_hangup"
        assert client.hgetall(f"{store_prefix}call:CA6:usage") == {"input_tokens": "1"}


async def test_a_burst_of_reads_waits_for_connections_instead_of_failing(redis_url: str, store_prefix: str) -> None:
    """300 calls setting up at once read Redis twice each; more readers than the pool has connections
    must queue for one (within the I/O timeout), not fail with "Too many connections"."""
    store = _redis_store(redis_url, store_prefix, max_connections=8)
    await store.start()
    try:
        store.set_caller_memory(CALLER, "likes jazz")
        assert await store.flush(5)
        results = await asyncio.gather(
            *(store.get_caller_memory(CALLER) for _ in range(150)),
            *(store.claim_once(f"token-{i}", 30) for i in range(150)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    assert results == ["likes jazz"] * 150 + [True] * 150


async def test_key_layout_ttls_and_no_raw_number(redis_url: str, store_prefix: str) -> None:
    store = _redis_store(redis_url, store_prefix)
    await store.start()
    store.call_started("CA9", {"from": CALLER_E164, "to": "+15550001111"})
    store.add_entry("CA9", {"kind": "caller", "t": 1.0, "text": "hi"})
    store.add_usage("CA9", {"input": 1})
    store.set_summary("CA9", "short")
    store.set_caller_memory(CALLER, "likes jazz")
    assert await store.claim_once("stream-token", 30)
    assert await store.flush(5)
    await store.close()

    p = store_prefix
    caller_key = f"{p}caller:{hmac.new(CALLER_KEY, CALLER_E164.encode(), hashlib.sha256).hexdigest()}"
    call_keys = [f"{p}call:CA9:{s}" for s in ("applied", "entries", "meta", "summary", "usage")]
    keys = _keys(redis_url, p)
    assert keys == sorted([*call_keys, caller_key, f"{p}once:stream-token"])
    ttls = _ttls(redis_url, keys)
    for key in call_keys:
        assert 0 < ttls[key] <= STATE_TTL, key
    assert STATE_TTL < ttls[caller_key] <= CALLER_TTL
    assert 0 < ttls[f"{p}once:stream-token"] <= 30
    for raw in (CALLER, CALLER_E164, "4155550100", "555-0100", "5550100"):
        assert not any(raw in k for k in keys), raw


async def test_claim_once_across_instances(redis_url: str, store_prefix: str) -> None:
    a = _redis_store(redis_url, store_prefix)
    b = _redis_store(redis_url, store_prefix)
    try:
        assert await a.claim_once("CAx:token", 60) is True
        assert await b.claim_once("CAx:token", 60) is False
        assert await b.claim_once("CAy:token", 60) is True
        assert await a.claim_once("CAy:token", 60) is False
    finally:
        await a.close()
        await b.close()


async def test_overflow_drops_oldest(redis_url: str, store_prefix: str, caplog_store: pytest.LogCaptureFixture) -> None:
    store = _redis_store(redis_url, store_prefix, queue_size=5)
    for i in range(8):  # writer not started yet: everything stays queued
        store.add_entry("CA4", {"kind": "caller", "t": float(i), "i": i})
    assert store.queue_depth == 5
    assert store.dropped_writes == 3
    assert not await store.flush(0.1)  # nothing drains without a writer
    await store.start()
    assert await store.flush(5)
    assert [e["i"] for e in await store.recent_entries("CA4", 10)] == [3, 4, 5, 6, 7]
    assert len(_messages(caplog_store, "queue full")) == 1
    await store.close()


async def test_refused_write_is_dropped_not_retried_forever(
    redis_url: str, store_prefix: str, caplog_store: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set(f"{store_prefix}call:CAbad:entries", "not a list")
    client.close()
    store = _redis_store(redis_url, store_prefix)
    await store.start()
    store.add_entry("CAbad", {"kind": "caller", "t": 1.0})
    store.add_entry("CAbad", {"kind": "caller", "t": 2.0})
    store.add_entry("CAgood", {"kind": "caller", "t": 3.0})
    assert await store.flush(5)
    assert [e["t"] for e in await store.recent_entries("CAgood", 5)] == [3.0]
    assert store.dropped_writes == 2
    assert len(_messages(caplog_store, "redis refused")) == 1
    with pytest.raises(StoreUnavailable):
        await store.recent_entries("CAbad", 5)  # WRONGTYPE surfaces as unavailable, not a crash
    await store.close()


async def test_writes_stay_sync_while_redis_is_stalled(
    private_redis: RedisProcess, store_prefix: str, caplog_store: pytest.LogCaptureFixture
) -> None:
    store = _redis_store(private_redis.url, store_prefix, io_timeout_s=0.3)
    await store.start()
    store.call_started("CA5", {"from": CALLER_E164})
    assert await store.flush(5)  # the pooled connection is established before the stall

    private_redis.pause()
    try:
        for i in range(1000):  # no await anywhere: these cannot be waiting on the stalled server
            store.add_entry("CA5", {"kind": "caller", "t": float(i), "i": i})
            store.add_usage("CA5", {"audio": 1})
        assert store.queue_depth == 2000

        # let the writer send into the stalled server, time out and retry a few times
        await _wait_for(lambda: bool(_messages(caplog_store, "redis unavailable")))
        with pytest.raises(StoreUnavailable):
            await store.get_call("CA5")
        assert await store.ping() is False
        await asyncio.sleep(0.5)
    finally:
        private_redis.resume()

    assert await store.flush(10)
    record = await store.get_call("CA5")
    assert record is not None
    # the timed-out batch was also run by Redis when it woke up: replays must not duplicate
    assert [e["i"] for e in record.entries] == list(range(1000))
    assert record.usage == {"audio": 1000}
    assert store.dropped_writes == 0
    assert len(_messages(caplog_store, "redis unavailable")) == 1
    recovered = _messages(caplog_store, "redis reachable again")
    assert len(recovered) == 1 and "0 writes dropped" in recovered[0].getMessage()
    await store.close()


async def test_kill_and_restart_mid_stream(
    private_redis: RedisProcess, store_prefix: str, caplog_store: pytest.LogCaptureFixture
) -> None:
    store = _redis_store(private_redis.url, store_prefix, queue_size=20, io_timeout_s=0.3)
    await store.start()
    for i in range(5):
        store.add_entry("CA6", {"kind": "caller", "t": float(i), "phase": "before", "i": i})
    assert await store.flush(5)

    private_redis.kill()
    for i in range(50):  # 20 fit in the queue: the 30 oldest are dropped
        store.add_entry("CA6", {"kind": "caller", "t": 100.0 + i, "phase": "outage", "i": i})
    await _wait_for(lambda: bool(_messages(caplog_store, "redis unavailable")))
    assert store.queue_depth == 20
    assert store.dropped_writes == 30
    for read in (
        store.get_call("CA6"),
        store.recent_entries("CA6", 5),
        store.get_caller_memory(CALLER),
        store.claim_once("t", 5),
    ):
        with pytest.raises(StoreUnavailable):
            await read
    assert await store.ping() is False
    await asyncio.sleep(0.3)  # a few retries, still one warning

    private_redis.restart()  # empty: no persistence, so the "before" entries are gone with it
    assert await store.flush(10)
    for i in range(5):
        store.add_entry("CA6", {"kind": "caller", "t": 200.0 + i, "phase": "after", "i": i})
    assert await store.flush(5)

    entries = await store.recent_entries("CA6", 100)
    assert [(e["phase"], e["i"]) for e in entries] == [("outage", i) for i in range(30, 50)] + [
        ("after", i) for i in range(5)
    ]
    assert store.dropped_writes == 30
    assert len(_messages(caplog_store, "redis unavailable")) == 1
    recovered = _messages(caplog_store, "redis reachable again")
    assert len(recovered) == 1 and "30 writes dropped" in recovered[0].getMessage()
    assert not _messages(caplog_store, "queue full")  # the outage lines already tell the story
    keys = _keys(private_redis.url, store_prefix)
    assert all(t > 0 for t in _ttls(private_redis.url, keys).values())
    await store.close()


async def test_close_leaves_no_tasks(redis_url: str, store_prefix: str) -> None:
    before = _other_tasks()
    store = _redis_store(redis_url, store_prefix)
    await store.start()
    store.add_entry("CA7", {"kind": "caller", "t": 1.0})
    await store.close()
    assert _other_tasks() == before
    await store.close()  # idempotent
    store.add_entry("CA7", {"kind": "caller", "t": 2.0})  # after close: counted, never raises
    assert store.dropped_writes == 1
    assert await store.ping() is False
    with pytest.raises(StoreUnavailable):
        await store.get_call("CA7")
    reopened = _redis_store(redis_url, store_prefix)
    assert [e["t"] for e in await reopened.recent_entries("CA7", 5)] == [1.0]  # close flushed
    await reopened.close()


async def test_close_while_redis_is_down_reports_lost_writes(
    private_redis: RedisProcess, store_prefix: str, caplog_store: pytest.LogCaptureFixture
) -> None:
    before = _other_tasks()
    store = _redis_store(private_redis.url, store_prefix, io_timeout_s=0.3)
    await store.start()
    private_redis.kill()
    for i in range(10):
        store.add_entry("CA8", {"kind": "caller", "t": float(i)})
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.close(flush_timeout=0.3)
    assert loop.time() - started < 2.0
    assert _other_tasks() == before
    assert store.dropped_writes == 10
    assert store.queue_depth == 0
    assert len(_messages(caplog_store, "10 queued writes not written")) == 1


# --- in-process store, hashing, factory -------------------------------------------------------


async def test_memory_store_expiry() -> None:
    now = [0.0]
    store = MemoryStore(state_ttl_s=100, caller_memory_ttl_s=1000, caller_key_secret=CALLER_KEY, clock=lambda: now[0])
    store.add_entry("CA1", {"kind": "caller", "t": 1.0})
    store.set_caller_memory(CALLER, "remember me")
    assert await store.claim_once("tok", 10) is True
    now[0] = 50.0
    store.add_usage("CA1", {"input": 1})  # a write refreshes the call's TTL, like EXPIRE in Redis
    now[0] = 120.0
    assert await store.get_call("CA1") is not None
    assert await store.claim_once("tok", 10) is True  # the first claim expired
    now[0] = 151.0
    assert await store.get_call("CA1") is None
    assert await store.get_caller_memory(CALLER_E164) == "remember me"
    now[0] = 1001.0
    assert await store.get_caller_memory(CALLER_E164) is None
    assert store.queue_depth == 0 and store.kind == "memory"


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("", "no caller number"),
        ("  ", "no caller number"),
        ("Anonymous", "the caller number is not an E.164 number"),
        ("Restricted", "the caller number is not an E.164 number"),
        ("Unavailable", "the caller number is not an E.164 number"),
        ("+266696687", "the caller withheld the number"),
        ("+7378742833", "the caller withheld the number"),
        ("+86282452253", "the caller withheld the number"),
        ("+8656696", "the caller withheld the number"),
        ("+2562533", "the caller withheld the number"),
        ("14155550100", "the caller number is not an E.164 number"),  # no +
        ("+04155550100", "the caller number is not an E.164 number"),  # no country code starts with 0
        ("+123456", "the caller number is not an E.164 number"),  # too short
        ("+1234567890123456", "the caller number is not an E.164 number"),  # 16 digits: too long
        ("sip:alice@example.com", "the caller number is not an E.164 number"),
        ("client:alice", "the caller number is not an E.164 number"),
        (CALLER, None),
        ("+14155550100", None),
        ("+1234567", None),
        ("+123456789012345", None),
    ],
)
def test_caller_memory_only_for_a_plausible_e164_number(number: str, reason: str | None) -> None:
    assert caller_memory_refusal(number) == reason


def test_hash_number_is_keyed() -> None:
    expected = hmac.new(b"pepper", CALLER_E164.encode(), hashlib.sha256).hexdigest()
    assert hash_number(CALLER_E164, b"pepper") == expected
    assert hash_number(" +1 (415) 555-0100 ", b"pepper") == expected
    assert hash_number("+1.415.555.0100", b"pepper") == expected
    assert hash_number(CALLER_E164, b"salt") != expected
    assert expected != hashlib.sha256(CALLER_E164.encode()).hexdigest()
    with pytest.raises(ValueError):
        hash_number(CALLER_E164, b"")


async def test_make_store(redis_url: str, store_prefix: str, caplog_store: pytest.LogCaptureFixture) -> None:
    memory = make_store(None, caller_key_secret=CALLER_KEY)
    assert isinstance(memory, MemoryStore) and memory.kind == "memory"
    warnings = [r for r in caplog_store.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "single instance" in warnings[0].getMessage()

    store = make_store(redis_url, prefix=store_prefix, queue_size=10, caller_key_secret=CALLER_KEY)
    assert isinstance(store, RedisStore) and store.kind == "redis"
    assert len([r for r in caplog_store.records if r.levelno == logging.WARNING]) == 1
    await store.start()
    assert await store.ping()
    await store.close()
