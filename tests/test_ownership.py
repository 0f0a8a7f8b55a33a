"""Ownership (relay/ownership.py) on Redis and on the in-process store: holds, beats, hand-off, listing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis
from conftest import RedisProcess, free_port, wait_for

from relay.ownership import GONE_AFTER_S, CallHold, Ownership
from relay.store import MemoryStore, RedisStore, Store
from relay.store.base import LIVE_RECORD_TTL_S, LIVE_TTL_S, InstanceRecord, LiveCall, LiveCallRecord

SECRET = b"test-caller-key-secret"
SID = "CA" + "ab" * 16
OTHER = "CA" + "cd" * 16
ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("test.ownership")


class Clock:
    """A monotonic clock the test moves by hand (MemoryStore's TTLs)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def present(store: Store, *instance_ids: str) -> AsyncIterator[None]:
    """Each instance present on the store while the block runs, as a started Ownership makes it."""
    tasks = [asyncio.create_task(store.keep_presence(instance_id)) for instance_id in instance_ids]
    try:
        for instance_id in instance_ids:
            assert await wait_for_async(lambda i=instance_id: subscribed(store, i), True)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def subscribed(store: Store, instance_id: str) -> bool:
    """Whether the instance's presence has reached the store (its internals: only tests wait on this)."""
    if isinstance(store, MemoryStore):
        return instance_id in store._present
    assert isinstance(store, RedisStore)
    [(_, count)] = await store._redis.pubsub_numsub(store._keys.presence(instance_id))
    return int(count) > 0


async def wait_for_async(probe: Callable[[], Awaitable[bool]], wanted: bool, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while await probe() != wanted:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture(params=["redis", "memory"])
async def stores(request: pytest.FixtureRequest, store_prefix: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two clients of one store, as two instances have: two Redis connections, or one shared MemoryStore;
    instance-a present on the first, instance-b on the second."""
    pair: tuple[Store, Store]
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        pair = (
            RedisStore(url, prefix=store_prefix, caller_key_secret=SECRET),
            RedisStore(url, prefix=store_prefix, caller_key_secret=SECRET),
        )
    else:
        memory = MemoryStore(caller_key_secret=SECRET)
        pair = (memory, memory)
    for store in pair:
        await store.start()
    async with present(pair[0], "instance-a"), present(pair[1], "instance-b"):
        yield pair
    for store in pair:
        await store.close()


@pytest.fixture
async def on_redis(redis_url: str, store_prefix: str) -> AsyncIterator[tuple[RedisStore, redis.Redis]]:
    """A started RedisStore and a plain client of the same Redis, to look at the keys it writes."""
    store = RedisStore(redis_url, prefix=store_prefix, caller_key_secret=SECRET)
    await store.start()
    client = redis.Redis.from_url(redis_url)
    async with present(store, "instance-a"):
        yield store, client
    client.close()
    await store.close()


class Stream:
    """What a transport gives a hold: its phase and a way to end it."""

    def __init__(self) -> None:
        self.phase = "live"
        self.ended = 0

    async def end(self) -> None:
        self.ended += 1


def hold_for(ownership: Ownership, stream: Stream, call_sid: str = SID) -> CallHold:
    return ownership.hold(
        call_sid, profile="support", direction="inbound", phase=lambda: stream.phase, on_superseded=stream.end, log=log
    )


def live(hold: CallHold, instance: str, phase: str = "live", *, orphaned: bool = False) -> LiveCall:
    return LiveCall(LiveCallRecord(hold.call_sid, instance, hold.started, "inbound", "support", phase), orphaned)


async def test_a_hold_is_taken_renewed_and_released_only_by_its_instance(stores: tuple[Store, Store]) -> None:
    a, b = Ownership(stores[0], "instance-a"), Ownership(stores[1], "instance-b")
    await a.beat()  # what start() does first: the instance heart-beats before it takes any call
    await b.beat()
    stream = Stream()
    ours = hold_for(a, stream)
    assert await ours.take() is None
    assert ours.held is True
    theirs = hold_for(b, Stream())
    assert await theirs.take() == "instance-a"
    assert theirs.held is False
    assert await b.live_calls() == [live(ours, "instance-a")]

    stream.phase = "ending"
    await a.beat()
    await b.beat()
    assert await stores[1].live_owner(SID) == "instance-a"
    assert await b.live_calls() == [live(ours, "instance-a", "ending")]
    assert await stores[1].release_live(SID, "instance-b") is False  # compare-and-delete: not b's to release
    await theirs.release()
    assert await stores[1].live_owner(SID) == "instance-a"

    await ours.release()
    assert ours.held is False
    assert await stores[1].live_owner(SID) is None
    assert await b.live_calls() == []
    again = hold_for(b, Stream())
    assert await again.take() is None
    assert await a.live_calls() == [live(again, "instance-b")]
    assert stream.ended == 0


async def test_two_instances_competing_for_a_call_one_takes_it(stores: tuple[Store, Store]) -> None:
    a, b = Ownership(stores[0], "instance-a"), Ownership(stores[1], "instance-b")
    for call_sid in ("CA" + f"{n:02d}" * 16 for n in range(10)):
        outcomes = await asyncio.gather(hold_for(a, Stream(), call_sid).take(), hold_for(b, Stream(), call_sid).take())
        winner = "instance-a" if outcomes[0] is None else "instance-b"
        assert outcomes == ([None, "instance-a"] if winner == "instance-a" else ["instance-b", None])
        assert await stores[0].live_owner(call_sid) == winner


async def test_a_lost_hold_is_taken_back_and_a_call_taken_elsewhere_ends_here(stores: tuple[Store, Store]) -> None:
    a = Ownership(stores[0], "instance-a")
    stream = Stream()
    hold = hold_for(a, stream)
    assert await hold.take() is None

    assert await stores[0].release_live(SID, "instance-a") is True  # the store lost it (a restart, say)
    await a.beat()
    assert await wait_for(lambda: hold._reclaim is not None and hold._reclaim.done())
    assert await stores[0].live_owner(SID) == "instance-a"
    assert hold.held is True and stream.ended == 0

    assert await stores[0].release_live(SID, "instance-a") is True
    assert await stores[1].claim_live(SID, "instance-b", 5) is True  # ... and another instance took the call
    await a.beat()
    assert await wait_for(lambda: stream.ended == 1)
    assert hold.held is False
    await hold.release()
    assert await stores[1].live_owner(SID) == "instance-b"


async def test_hand_off_lets_another_instance_take_the_call_at_once(stores: tuple[Store, Store]) -> None:
    a, b = Ownership(stores[0], "instance-a"), Ownership(stores[1], "instance-b")
    await a.beat()
    await b.beat()
    stream = Stream()
    ours = hold_for(a, stream)
    assert await ours.take() is None
    assert await a.hand_off(OTHER) is False  # not held here
    assert await a.hand_off(SID) is True
    assert await a.hand_off(SID) is False
    assert await stores[1].live_owner(SID) is None
    assert await b.live_calls() == [live(ours, "instance-a", "handed_off")]

    theirs = hold_for(b, Stream())
    assert await theirs.take() is None
    await a.beat()  # the handed-off hold is neither renewed nor taken back
    await asyncio.sleep(0.05)
    assert ours._reclaim is None and stream.ended == 0
    await ours.release()
    assert await stores[0].live_owner(SID) == "instance-b"
    assert await a.live_calls() == [live(theirs, "instance-b")]
    assert await stores[0].hand_off(SID, "instance-a") is False


async def test_instances_are_listed_with_their_state(stores: tuple[Store, Store]) -> None:
    draining = False
    a = Ownership(stores[0], "instance-a", draining=lambda: draining)
    b = Ownership(stores[1], "instance-b")
    assert await a.live_instances() == []
    before = time.time()
    await a.beat()
    await b.beat()
    listed = await b.live_instances()
    assert listed is not None
    assert [(i.instance, i.started, i.state) for i in listed] == [
        ("instance-a", a.started, "ready"),
        ("instance-b", b.started, "ready"),
    ]
    assert all(before - 0.001 <= i.beat <= time.time() + 0.001 for i in listed)  # stored to the ms
    draining = True
    await a.beat()
    listed = await b.live_instances()
    assert listed is not None
    assert [i.state for i in listed] == ["draining", "ready"]


async def test_an_owner_that_stops_beating_is_orphaned_then_its_call_is_claimable_in_memory() -> None:
    clock = Clock()
    store = MemoryStore(caller_key_secret=SECRET, clock=clock)
    dead, alive = Ownership(store, "instance-dead"), Ownership(store, "instance-alive")
    async with present(store, "instance-dead", "instance-alive"):
        hold = hold_for(dead, Stream())
        assert await hold.take() is None
        await dead.beat()
        await alive.beat()
        assert await alive.live_calls() == [live(hold, "instance-dead")]
        clock.now += LIVE_TTL_S  # no beat from the dead one since
        await alive.beat()
        assert await alive.live_calls() == [live(hold, "instance-dead", orphaned=True)]
        instances = await alive.live_instances()
        assert instances is not None and [i.instance for i in instances] == ["instance-alive"]
        taker = hold_for(alive, Stream())
        assert await taker.take() is None
        assert await alive.live_calls() == [live(taker, "instance-alive")]
        clock.now += LIVE_RECORD_TTL_S
        assert await store.live_calls() == []


_DOOMED_OWNER = """
import asyncio, sys
from relay.ownership import Ownership
from relay.store import RedisStore

async def main() -> None:
    store = RedisStore(sys.argv[1], prefix=sys.argv[2], caller_key_secret=b"test-caller-key-secret")
    await store.start()
    ownership = Ownership(store, "instance-doomed")
    ownership.start()
    async def end() -> None: ...
    hold = ownership.hold(sys.argv[3], profile="support", direction="inbound", phase=lambda: "live",
                          on_superseded=end, log=ownership_log)
    assert await hold.take() is None
    while await store.instance_gone("instance-doomed", 10):  # present, heart-beating
        await asyncio.sleep(0.01)
    print("held", flush=True)
    await asyncio.sleep(3600)

import logging
ownership_log = logging.getLogger("doomed")
asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def doomed_owner(redis_url: str, store_prefix: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process, "instance-doomed", holding SID with its beat and presence running."""
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DOOMED_OWNER,
        redis_url,
        store_prefix,
        SID,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert doomed.stdout is not None
        assert await asyncio.wait_for(doomed.stdout.readline(), timeout=20) == b"held\n"
        yield doomed
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await asyncio.wait_for(doomed.wait(), timeout=5)


async def test_a_sigkilled_owner_is_reported_orphaned_within_seconds_then_its_call_is_claimable(
    redis_url: str, store_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=store_prefix, caller_key_secret=SECRET)
    await store.start()
    survivor = Ownership(store, "instance-survivor")
    try:
        async with present(store, "instance-survivor"), doomed_owner(redis_url, store_prefix) as doomed:
            await survivor.beat()
            calls = await survivor.live_calls()
            assert calls is not None and [(c.record.instance, c.orphaned) for c in calls] == [
                ("instance-doomed", False)
            ]
            doomed.send_signal(signal.SIGKILL)
            await asyncio.wait_for(doomed.wait(), timeout=5)
            killed_at = time.monotonic()

            async def orphaned() -> bool:
                listed = await survivor.live_calls()
                return listed is not None and [(c.record.instance, c.orphaned) for c in listed] == [
                    ("instance-doomed", True)
                ]

            while not await orphaned():  # at once: its presence went with its process
                assert time.monotonic() - killed_at < 0.5
                await asyncio.sleep(0.01)
            taker = hold_for(survivor, Stream())
            while (holder := await taker.take()) is not None:
                assert holder == "instance-doomed" and time.monotonic() - killed_at < LIVE_TTL_S + 1.0
                await asyncio.sleep(0.1)
            await survivor.beat()
            assert await survivor.live_calls() == [live(taker, "instance-survivor")]
    finally:
        await store.close()


async def test_a_resumed_stream_takes_its_call_from_a_killed_owner_at_once(redis_url: str, store_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=store_prefix, caller_key_secret=SECRET)
    await store.start()
    survivor = Ownership(store, "instance-survivor")
    try:
        async with present(store, "instance-survivor"), doomed_owner(redis_url, store_prefix) as doomed:
            # while its owner lives, a resuming stream does not take the call (it waits for the hold)
            assert await hold_for(survivor, Stream()).take(resumes=True) == "instance-doomed"
            doomed.send_signal(signal.SIGKILL)
            await asyncio.wait_for(doomed.wait(), timeout=5)
            assert await hold_for(survivor, Stream()).take() == "instance-doomed"  # a new call's stream still waits
            taker = hold_for(survivor, Stream())
            assert await taker.take(resumes=True) is None  # the hold itself has seconds left
            assert await store.live_owner(SID) == "instance-survivor"
            await survivor.beat()
            assert await survivor.live_calls() == [live(taker, "instance-survivor")]
    finally:
        await store.close()


async def test_a_resumed_stream_takes_its_call_from_an_owner_whose_heartbeat_stopped(
    stores: tuple[Store, Store],
) -> None:
    """A machine gone without closing its connections: still subscribed, but no longer beating."""
    a, b = Ownership(stores[0], "instance-a"), Ownership(stores[1], "instance-b")
    await a.beat()
    held = hold_for(a, Stream())
    assert await held.take() is None
    assert await hold_for(b, Stream()).take(resumes=True) == "instance-a"
    await stores[0].beat(InstanceRecord("instance-a", "", "ready", time.time() - GONE_AFTER_S - 0.5), [], 5)
    taker = hold_for(b, Stream())
    assert await taker.take(resumes=True) is None
    assert await stores[1].live_owner(SID) == "instance-b"


async def test_the_redis_layout_of_holds_records_and_heartbeats(
    on_redis: tuple[RedisStore, redis.Redis], store_prefix: str
) -> None:
    store, client = on_redis
    ownership = Ownership(store, "instance-a")
    hold = hold_for(ownership, Stream())
    assert await hold.take() is None
    await ownership.beat()
    assert client.get(f"{store_prefix}live:{SID}") == b"instance-a"
    assert 0 < client.pttl(f"{store_prefix}live:{SID}") <= LIVE_TTL_S * 1000
    record = client.hgetall(f"{store_prefix}livecall:{SID}")
    assert record == {
        b"call_sid": SID.encode(),
        b"instance": b"instance-a",
        b"started": hold.started.encode(),
        b"direction": b"inbound",
        b"profile": b"support",
        b"phase": b"live",
    }
    assert LIVE_TTL_S * 1000 < client.pttl(f"{store_prefix}livecall:{SID}") <= LIVE_RECORD_TTL_S * 1000
    assert client.zrange(f"{store_prefix}livecalls", 0, -1) == [SID.encode()]
    heartbeat = client.hgetall(f"{store_prefix}instance:instance-a")
    assert sorted(heartbeat) == [b"beat", b"instance", b"started", b"state"]
    assert heartbeat[b"state"] == b"ready"
    assert 0 < client.pttl(f"{store_prefix}instance:instance-a") <= LIVE_TTL_S * 1000
    assert client.zrange(f"{store_prefix}instances", 0, -1) == [b"instance-a"]
    await hold.release()
    assert sorted(client.keys(f"{store_prefix}*")) == [
        f"{store_prefix}instance:instance-a".encode(),
        f"{store_prefix}instances".encode(),
    ]


async def _never_raises(store: Store, caplog: pytest.LogCaptureFixture, elapsed_max: float) -> None:
    ownership = Ownership(store, "instance-a")
    stream = Stream()
    hold = hold_for(ownership, stream)
    timings: list[float] = []

    async def timed(step: Callable[[], object]) -> object:
        started = time.monotonic()
        result = step()
        if asyncio.iscoroutine(result):
            result = await result
        timings.append(time.monotonic() - started)
        return result

    with caplog.at_level(logging.INFO):
        assert await timed(hold.take) is None  # admitted on this instance's registry alone
        assert await timed(ownership.beat) is None
        assert await timed(ownership.beat) is None
        assert await timed(ownership.live_calls) is None
        assert await timed(ownership.live_instances) is None
        assert await timed(lambda: ownership.hand_off(SID)) is False  # never held in the store
        await asyncio.sleep(0)
        await timed(hold.release)
    assert stream.ended == 0
    assert max(timings) < elapsed_max, timings
    messages = [r.getMessage() for r in caplog.records if r.name in ("relay.ownership", "test.ownership")]
    assert sum("admitted on this instance's registry alone" in m for m in messages) == 1
    assert sum("could not write this instance's heartbeat" in m for m in messages) == 1
    assert sum("could not renew this call's live-stream hold" in m for m in messages) == 1
    assert sum("could not list the live calls" in m for m in messages) == 1
    assert sum("could not list the live instances" in m for m in messages) == 1


async def test_with_redis_down_nothing_raises_and_each_failure_is_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/15", caller_key_secret=SECRET)
    await store.start()
    try:
        await _never_raises(store, caplog, elapsed_max=1.5)
    finally:
        await store.close()


async def test_with_redis_stalled_every_ownership_call_gives_up_within_the_timeout(
    private_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(private_redis.url, caller_key_secret=SECRET, io_timeout_s=5.0)
    await store.start()
    private_redis.pause()
    try:
        await _never_raises(store, caplog, elapsed_max=1.5)  # LIVE_STORE_TIMEOUT_S, not the 5 s I/O timeout
    finally:
        private_redis.resume()
        await store.close()


async def test_each_beat_sends_a_held_call_s_phase_and_a_lost_record_whole_again(
    on_redis: tuple[RedisStore, redis.Redis], store_prefix: str
) -> None:
    store, client = on_redis
    monitor = client.monitor()
    ownership = Ownership(store, "instance-a")
    stream = Stream()
    hold = hold_for(ownership, stream)
    assert await hold.take() is None
    stream.phase = "tool_running"
    with monitor as commands:
        await ownership.beat()
        sent = []
        while not any(b"PEXPIRE" in c["command"].encode() and b"instances" in c["command"].encode() for c in sent):
            sent.append(commands.next_command())
    evals = [c["command"] for c in sent if c["command"].startswith("EVALSHA")]
    assert len(evals) == 1
    # the hold, the record, the two TTLs and the phase: not the record's other fields
    assert evals[0].split()[3:] == [
        f"{store_prefix}live:{SID}",
        f"{store_prefix}livecall:{SID}",
        "instance-a",
        str(int(LIVE_TTL_S * 1000)),
        str(int(LIVE_RECORD_TTL_S * 1000)),
        "tool_running",
    ]
    assert client.hget(f"{store_prefix}livecall:{SID}", "phase") == b"tool_running"
    client.delete(f"{store_prefix}livecall:{SID}")  # e.g. evicted, or a restored snapshot without it
    await ownership.beat()  # the hold is renewed; the record is missing
    assert client.exists(f"{store_prefix}livecall:{SID}") == 0
    await ownership.beat()  # and is written whole again
    assert client.hgetall(f"{store_prefix}livecall:{SID}")[b"profile"] == b"support"
    assert await ownership.live_calls() == [live(hold, "instance-a", "tool_running")]


async def test_a_record_left_over_by_a_failed_release_is_not_listed(
    on_redis: tuple[RedisStore, redis.Redis], store_prefix: str
) -> None:
    """The instance is alive but no longer holds the call (its release did not reach the store and
    the hold expired meanwhile): the call is over, neither live nor orphaned."""
    store, client = on_redis
    ownership = Ownership(store, "instance-a")
    hold = hold_for(ownership, Stream())
    assert await hold.take() is None
    await ownership.beat()
    assert await ownership.live_calls() == [live(hold, "instance-a")]
    client.delete(f"{store_prefix}live:{SID}")  # the hold expired; the record has 60 s to live
    assert client.exists(f"{store_prefix}livecall:{SID}") == 1
    assert await ownership.live_calls() == []
