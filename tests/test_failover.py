"""Calls outlive their instance: two real `python -m relay serve` processes behind one balancer, real
Redis, the simulated Realtime API, and the simulated Twilio following each call's TwiML. SIGTERM hands
each call off at a natural pause; after SIGKILL, Twilio's continuation reaches the other instance,
which takes the calls over from the dead one. Figures are printed for the record (pytest -s)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import AUTH_TOKEN, wait_for
from ops_support import API_TOKEN, RelayProcess

from relay.sim import ulaw
from relay.sim.caller import TWILIO_RECONNECT_S, Balancer, CallerConfig, SimulatedCaller, TwilioCall
from relay.sim.realtime import RealtimeSimulator
from relay.sim.realtime.record import SimSession

PUBLIC = "https://relay.example.com"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
CALLS = 20


def spread(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


def speech(ms: int, seed: int) -> bytes:
    return ulaw.synth_speech(ms, seed=seed)


def first_turn(index: int) -> bytes:
    return speech(300 + 100 * index, seed=index)


def frame_of(audio: bytes) -> str:
    """The media payload of the audio's first frame, as it reaches the Realtime session."""
    return base64.b64encode(audio[:160]).decode()


def transcripts(items: list[dict[str, Any]]) -> list[str]:
    return [item["text"] for item in items if item["type"] == "message" and item.get("text")]


async def answered(leg: SimulatedCaller, audio: bytes) -> bool:
    before = leg.played_bytes
    await leg.say_and_wait(audio)
    return await leg.wait_for_audio(before // 8 + 200, timeout=15)


def configured(session: SimSession) -> bool:
    return any(e["type"] == "session.update" for _, e in session.received)


def creates(session: SimSession) -> int:
    return sum(e["type"] == "response.create" for _, e in session.received)


async def listed(relay: RelayProcess) -> list[dict[str, Any]]:
    response = await relay.get("/calls", headers=AUTH)
    assert response.status_code == 200, response.text
    calls: list[dict[str, Any]] = response.json()["calls"]
    return calls


@contextlib.asynccontextmanager
async def twenty_calls_on_a(
    sim: RealtimeSimulator, redis_url: str, prefix: str, delay_s: float
) -> AsyncIterator[tuple[RelayProcess, RelayProcess, Balancer, list[TwilioCall]]]:
    """Instances a and b; CALLS calls placed while the balancer knows only a, each greeted and with one
    answered turn of its own length (`first_turn`); then b joins the balancer. Everything is hung up
    and closed after."""
    env = {"REDIS_URL": redis_url, "RELAY_REDIS_PREFIX": prefix, "PUBLIC_URL": PUBLIC, "DRAIN_SECONDS": "30"}
    a, b = RelayProcess(sim.url, **env), RelayProcess(sim.url, **env)
    balancer = Balancer([a.base_url])
    config = {"auth_token": AUTH_TOKEN, "public_url": PUBLIC}
    calls = [
        TwilioCall(CallerConfig(base_url=a.base_url, **config), balancer, reconnect_delay_s=delay_s)
        for _ in range(CALLS)
    ]
    try:
        await a.start()
        await b.start()
        await asyncio.gather(*(call.start() for call in calls))
        assert all(await asyncio.gather(*(call.leg.wait_for_audio(200, timeout=15) for call in calls)))
        assert all(await asyncio.gather(*(call.leg.wait_idle(timeout=15) for call in calls)))  # the whole greeting
        turns = [answered(call.leg, first_turn(i)) for i, call in enumerate(calls)]
        assert all(await asyncio.gather(*turns))
        balancer.instances.append(b.base_url)
        yield a, b, balancer, calls
    finally:
        for call in calls:
            await call.hangup()
        await a.close()
        await b.close()
    assert "Traceback" not in b.output()


@pytest.mark.parametrize("delay_s", [0.0, TWILIO_RECONNECT_S], ids=["no-reconnect-delay", "twilio-reconnect-delay"])
async def test_sigkill_leaves_the_calls_to_the_other_instance(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str, delay_s: float
) -> None:
    async with twenty_calls_on_a(fast_sim, redis_url, store_prefix, delay_s) as (a, b, _, calls):
        rows = await listed(a)
        # either instance lists the same live calls (their phases move on between the two requests)
        assert [{**r, "phase": ""} for r in await listed(b)] == [{**r, "phase": ""} for r in rows]
        assert sorted(r["call_sid"] for r in rows) == sorted(c.call_sid for c in calls)
        assert {(r["instance"], r["orphaned"]) for r in rows} == {(rows[0]["instance"], False)}
        sessions_before = len(fast_sim.sessions)
        first_sessions = [
            next(s for s in fast_sim.sessions if frame_of(first_turn(i)) in s.appended) for i in range(CALLS)
        ]

        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await a.wait(timeout=5) is not None
        if delay_s:  # Twilio has not come back yet: b lists a's calls as orphaned
            orphans = await listed(b)
            assert time.monotonic() - killed < delay_s
            assert [(r["call_sid"], r["orphaned"]) for r in orphans] == [(r["call_sid"], True) for r in rows]
        # what Redis had when a died, against what a's sessions had said and heard
        records = {c.call_sid: (await b.get(f"/calls/{c.call_sid}", headers=AUTH)).json() for c in calls}
        said = [transcripts(session.items()) for session in first_sessions]
        stored = [
            [e["text"] for e in records[c.call_sid]["entries"] if e["kind"] in ("caller", "assistant")] for c in calls
        ]
        lost = sum(len(set(texts) - set(kept)) for texts, kept in zip(said, stored, strict=True))
        assert [len(texts) for texts in said] == [3] * CALLS  # greeting, the caller's turn, the answer
        assert lost == 0

        assert all(await asyncio.gather(*(c.wait_legs(2, timeout=15) for c in calls)))
        assert [c.leg_instances for c in calls] == [[a.base_url, b.base_url]] * CALLS
        assert await wait_for(lambda: len(fast_sim.sessions) == sessions_before + CALLS, timeout=10)
        new_sessions = fast_sim.sessions[sessions_before:]
        assert await wait_for(lambda: all(configured(s) for s in new_sessions), timeout=15)
        opened = [s.connected_at - killed for s in new_sessions]
        taken_over = await listed(b)
        assert {(r["instance"], r["orphaned"]) for r in taken_over} == {(taken_over[0]["instance"], False)}
        assert len(taken_over) == CALLS and taken_over[0]["instance"] != rows[0]["instance"]

        after = [speech(400, seed=100 + i) for i in range(CALLS)]
        assert all(await asyncio.gather(*(answered(c.leg, audio) for c, audio in zip(calls, after, strict=True))))

    gaps = [gap for c in calls for gap in c.audio_gaps()]
    assert len(gaps) == CALLS
    for call, audio in zip(calls, after, strict=True):
        (session,) = [s for s in new_sessions if frame_of(audio) in s.appended]
        update = next(e for _, e in session.received if e["type"] == "session.update")
        instructions = update["session"]["instructions"]
        assert "already in progress" in instructions
        spoken = [e for e in records[call.call_sid]["entries"] if e["kind"] in ("caller", "assistant")]
        assert [e["kind"] for e in spoken] == ["assistant", "caller", "assistant"]
        assert all(e["text"] in instructions for e in spoken), (call.call_sid, spoken, instructions)
        assert creates(session) == 0  # resumed, not restarted: no second greeting
        # the new stream's caller audio reached the new session in order, none lost or repeated
        assert session.appended == call.leg.sent_payloads[: len(session.appended)]
        assert len(session.appended) >= len(call.leg.sent_payloads) - 10  # all but the last frames before hang-up
    print(
        f"\nafter SIGKILL (reconnect delay {delay_s * 1000:.0f} ms): the {CALLS} calls' new sessions opened "
        f"{spread(opened)} after the kill; caller audio gap per call {spread(gaps)}; conversation entries "
        f"lost to the kill: {lost} of {sum(map(len, said))}"
    )


async def test_sigterm_hands_every_call_to_the_other_instance(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    async with twenty_calls_on_a(fast_sim, redis_url, store_prefix, TWILIO_RECONNECT_S) as (a, b, _, calls):
        sessions_before = len(fast_sim.sessions)
        term = time.monotonic()
        a.signal(signal.SIGTERM)
        assert all(await asyncio.gather(*(c.wait_legs(2, timeout=15) for c in calls)))
        exit_code = await a.wait(timeout=15)
        drained_s = time.monotonic() - term
        assert exit_code == 0
        assert drained_s < 10  # DRAIN_SECONDS is 30
        assert [c.outcome for c in calls] == [None] * CALLS  # 0 calls ended
        assert [c.legs[0].close_code for c in calls] == [1000] * CALLS
        assert [c.leg_instances for c in calls] == [[a.base_url, b.base_url]] * CALLS
        assert await wait_for(lambda: len(fast_sim.sessions) == sessions_before + CALLS, timeout=10)
        new_sessions = fast_sim.sessions[sessions_before:]
        assert await wait_for(lambda: all(configured(s) for s in new_sessions), timeout=15)
        after = [speech(400, seed=100 + i) for i in range(CALLS)]
        assert all(await asyncio.gather(*(answered(c.leg, audio) for c, audio in zip(calls, after, strict=True))))
        assert [creates(s) for s in new_sessions] == [0] * CALLS  # resumed, not restarted: no greeting
        handed = [next(t for t, kind, _ in c.events if kind == "stream_closed") - term for c in calls]
        gaps = [gap for c in calls for gap in c.audio_gaps()]
        for call in calls:
            await call.hangup()
        await asyncio.sleep(0.5)  # the last writes of b's calls
        records = [(await b.get(f"/calls/{c.call_sid}", headers=AUTH)).json() for c in calls]
    assert "Traceback" not in a.output()
    handed_off = [line for line in a.lines if line.get("msg", "").startswith("call handed off")]
    assert len(handed_off) == CALLS
    # one record per call across both streams, ended once (on b)
    assert [(r["meta"]["end_reason"], r["meta"]["streams"], "handed_off" in r["meta"]) for r in records] == [
        ("caller_hung_up", "2", True)
    ] * CALLS
    print(
        f"\nhand-off of {CALLS} calls after SIGTERM: stream closed {spread(handed)} after the signal; "
        f"instance exited 0 after {drained_s:.2f} s; caller audio gap per call {spread(gaps)} "
        f"(Twilio reconnect delay {TWILIO_RECONNECT_S * 1000:.0f} ms)"
    )


async def test_the_failover_demo_shows_a_call_surviving_its_instance(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OPENAI_", "TWILIO_"))}
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "demo",
        "--failover",
        env={**env, "REDIS_URL": redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(demo.communicate(), timeout=90)
    text = out.decode()
    assert demo.returncode == 0, text + err.decode()
    lines = [line.split("s  ", 1)[-1] for line in text.splitlines()]
    kill = next(i for i, line in enumerate(lines) if line.startswith("assistant is 1.5 s into its answer: SIGKILL"))
    carrier = lines[kill].split("SIGKILL ")[1].split(" (")[0]
    other = "instance A" if carrier == "instance B" else "instance B"
    assert f"Twilio opens media stream 1 on {carrier}" in lines[:kill]
    assert lines[kill + 1 : kill + 4] == [
        f"media stream on {carrier} is gone (code 1006); Twilio goes on with the TwiML after </Connect>",
        f"Twilio POSTs the <Redirect> /continue-call -> {other}: 200, a new <Connect><Stream>",
        f"Twilio opens media stream 2 on {other}",
    ]
    assert f"assistant answers on {other}" in lines
    assert "  greetings on the new session: 0; the caller heard a second greeting: False" in lines
    assert "    Caller: caller turn 1 (" in text
