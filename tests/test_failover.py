"""Calls outlive their instance: two real `python -m relay serve` processes behind one public URL,
real Redis, the simulated Realtime API and callers. SIGTERM hands each call off at a natural pause;
SIGKILL leaves the call to the continuation webhook, and the other instance resumes it once the dead
instance's hold lapses. Figures are printed for the record (pytest -s)."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

from conftest import AUTH_TOKEN, wait_for
from ops_support import API_TOKEN, RelayProcess

from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.realtime import RealtimeSimulator
from relay.sim.realtime.record import SimSession

PUBLIC = "https://relay.example.com"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
CALLS = 20


def pair(sim: RealtimeSimulator, redis_url: str, prefix: str) -> tuple[RelayProcess, RelayProcess]:
    env = {"REDIS_URL": redis_url, "RELAY_REDIS_PREFIX": prefix, "PUBLIC_URL": PUBLIC, "DRAIN_SECONDS": "30"}
    return RelayProcess(sim.url, **env), RelayProcess(sim.url, **env)


def caller_on(relay: RelayProcess, call_sid: str | None = None) -> SimulatedCaller:
    return SimulatedCaller(
        CallerConfig(
            base_url=relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC, call_sid=call_sid, keep_audio=False
        )
    )


async def resume_on(relay: RelayProcess, lost: SimulatedCaller) -> tuple[SimulatedCaller, float]:
    """Twilio's part once the stream is gone: the continuation (to the instance the balancer picked),
    then the new stream; returns the new caller and when it was connected."""
    lost.config.base_url = relay.base_url
    status, body = await lost.continuation()
    assert status == 200, body
    resumed = caller_on(relay, lost.call_sid)
    await resumed.connect(resumed.parse_twiml(body))
    return resumed, time.monotonic()


async def answered(caller: SimulatedCaller, seed: int) -> bool:
    before = caller.played_bytes
    await caller.say_and_wait(ulaw.synth_speech(400, seed=seed))
    return await caller.wait_for_audio(before // 8 + 200, timeout=15)


def configured(session: SimSession) -> bool:
    return any(e["type"] == "session.update" for _, e in session.received)


def spread(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


async def test_sigterm_hands_every_call_to_the_other_instance(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    a, b = pair(fast_sim, redis_url, store_prefix)
    callers = [caller_on(a) for _ in range(CALLS)]
    resumed: list[SimulatedCaller] = []
    try:
        await a.start()
        await b.start()
        await asyncio.gather(*(c.connect() for c in callers))
        assert all(await asyncio.gather(*(c.wait_for_audio(200, timeout=15) for c in callers)))
        sessions_before = len(fast_sim.sessions)
        term = time.monotonic()
        a.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(c.wait_closed(timeout=10) for c in callers))
        assert codes == [1000] * CALLS
        exit_code = await a.wait(timeout=15)
        drained_s = time.monotonic() - term
        assert exit_code == 0
        assert drained_s < 10  # DRAIN_SECONDS is 30
        resumed = [r for r, _ in await asyncio.gather(*(resume_on(b, c) for c in callers))]
        assert await wait_for(lambda: len(fast_sim.sessions) == sessions_before + CALLS, timeout=10)
        assert await wait_for(lambda: all(configured(s) for s in fast_sim.sessions[sessions_before:]), timeout=15)
        assert all(await asyncio.gather(*(answered(r, i) for i, r in enumerate(resumed))))
        new_sessions = fast_sim.sessions[sessions_before:]
        # resumed, not restarted: no greeting on any new session
        assert [sum(e["type"] == "response.create" for _, e in s.received) for s in new_sessions] == [0] * CALLS
        handed = [c.events[-1][0] - term for c in callers]
        print(f"\nhand-off of {CALLS} calls after SIGTERM: {spread(handed)}; instance exited 0 after {drained_s:.2f} s")
    finally:
        for c in [*callers, *resumed]:
            await c.hangup()
        await asyncio.sleep(0.5)  # the last writes of b's calls
        records = [(await b.get(f"/calls/{c.call_sid}", headers=AUTH)).json() for c in callers]
        await a.close()
        await b.close()
    assert "Traceback" not in a.output() + b.output()
    handed_off = [line for line in a.lines if line.get("msg", "").startswith("call handed off")]
    assert len(handed_off) == CALLS
    # one record per call across both streams, ended once (on b)
    assert [(r["meta"]["end_reason"], r["meta"]["streams"], "handed_off" in r["meta"]) for r in records] == [
        ("caller_hung_up", "2", True)
    ] * CALLS


async def test_sigkill_leaves_the_calls_to_the_other_instance(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    a, b = pair(fast_sim, redis_url, store_prefix)
    callers = [caller_on(a) for _ in range(CALLS)]
    resumed: list[SimulatedCaller] = []
    try:
        await a.start()
        await b.start()
        await asyncio.gather(*(c.connect() for c in callers))
        assert all(await asyncio.gather(*(c.wait_for_audio(200, timeout=15) for c in callers)))
        assert all(await asyncio.gather(*(answered(c, i) for i, c in enumerate(callers))))
        await asyncio.sleep(0.3)  # the transcripts reach Redis (the writer lingers 100 ms)
        sessions_before = len(fast_sim.sessions)
        a.signal(signal.SIGKILL)
        assert await a.wait(timeout=5) is not None
        killed = time.monotonic()
        await asyncio.gather(*(c.drop() for c in callers))  # Twilio sees the sockets go
        resumed = [r for r, _ in await asyncio.gather(*(resume_on(b, c) for c in callers))]
        assert await wait_for(lambda: len(fast_sim.sessions) == sessions_before + CALLS, timeout=15)
        assert await wait_for(lambda: all(configured(s) for s in fast_sim.sessions[sessions_before:]), timeout=15)
        opened = [s.connected_at - killed for s in fast_sim.sessions[sessions_before:]]
        new_sessions = fast_sim.sessions[sessions_before:]
        for session in new_sessions:
            update = next(e for _, e in session.received if e["type"] == "session.update")
            assert "already in progress" in update["session"]["instructions"]
            assert "Caller: caller turn 1 (" in update["session"]["instructions"]
        assert [sum(e["type"] == "response.create" for _, e in s.received) for s in new_sessions] == [0] * CALLS
        assert all(await asyncio.gather(*(answered(r, i) for i, r in enumerate(resumed))))
        print(f"\nafter SIGKILL, the {CALLS} resumed calls' new sessions opened {spread(opened)} after the kill")
    finally:
        for c in [*callers, *resumed]:
            await c.hangup()
        await a.close()
        await b.close()
    assert "Traceback" not in b.output()
