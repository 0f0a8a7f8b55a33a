"""SIGTERM on a real `python -m relay serve` process with live simulated calls: drain, goodbye, exit.

Also several worker processes sharing one port: calls on both, metrics summed over both,
and one SIGTERM to the parent drains them all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for as eventually
from ops_support import API_TOKEN, RelayProcess, caller_for, metric, parse_metrics

from relay.runtime import DRAIN_GOODBYE
from relay.sim import ulaw
from relay.sim.caller import SimulatedCaller
from relay.sim.realtime import RealtimeSimulator, SimSession

pytestmark = pytest.mark.timeout(90)


def session_of(sim: RealtimeSimulator, caller: SimulatedCaller) -> SimSession:
    """The Realtime session that received this caller's first (tagged) frame."""
    assert caller.sent_payloads
    sessions = [s for s in sim.sessions if caller.sent_payloads[0] in s.appended[:5]]
    assert len(sessions) == 1, f"{len(sessions)} Realtime sessions received this caller's first frame"
    return sessions[0]


def goodbye_requests(session: SimSession) -> list[dict[str, Any]]:
    creates = [event for _, event in session.received if event.get("type") == "response.create"]
    return [event for event in creates if DRAIN_GOODBYE in str(event.get("response", {}).get("instructions"))]


# ---- one process ---------------------------------------------------------------------------------


async def test_sigterm_drains_active_calls_then_says_goodbye_and_exits_cleanly(fast_sim: RealtimeSimulator) -> None:
    sim = fast_sim
    drain_s = 3.0
    relay = RelayProcess(sim.url, DRAIN_SECONDS=str(drain_s), MAX_CALLS="5", LOG_LEVEL="warning")
    await relay.start()
    try:
        leaves = caller_for(relay)  # hangs up by itself during the drain
        stays = caller_for(relay)  # still talking at the deadline: hears the goodbye
        late = caller_for(relay)  # webhook answered before SIGTERM, stream opened after
        for caller in (leaves, stays):
            await caller.connect()
        for caller in (leaves, stays):
            assert await caller.wait_for_audio(300, timeout=5)
            await caller.wait_idle(timeout=5)
        status, late_twiml = await late.webhook()
        assert status == 200
        late_stream = late.parse_twiml(late_twiml)
        assert (await relay.get("/readyz")).status_code == 200

        relay.signal(signal.SIGTERM)
        signalled = time.monotonic()
        # readiness is off at once
        ready = await relay.get("/readyz")
        while ready.status_code == 200 and time.monotonic() - signalled < 1.0:
            await asyncio.sleep(0.02)
            ready = await relay.get("/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert time.monotonic() - signalled < 0.5

        # new calls: 503 from the webhook (the proxy tries another instance); a stream opened now is refused (1013)
        status, body = await caller_for(relay).webhook()
        assert status == 503 and "<Response" not in body
        sessions_before = sim.connections
        await late.connect(late_stream)
        assert await late.wait_closed(timeout=5) == 1013
        assert sim.connections == sessions_before  # refused before any Realtime session

        # active calls go on: audio still flows both ways during the drain
        heard = stays.played_bytes
        await stays.say_and_wait(ulaw.synth_speech(300) + ulaw.silence(600))
        assert await stays.wait_for_audio(heard // 8 + 400, timeout=5)
        await stays.wait_idle(timeout=5)
        await leaves.hangup()
        assert leaves.close_code == 1000
        assert stays.close_code is None  # still connected
        assert time.monotonic() - signalled < drain_s

        # at the deadline: a spoken goodbye, then a clean close
        assert await stays.wait_closed(timeout=drain_s + 10) == 1000
        closed_after = time.monotonic() - signalled
        assert closed_after >= drain_s
        session = session_of(sim, stays)
        assert len(goodbye_requests(session)) == 1, [e for _, e in session.received][-5:]
        said_at = next(t for t, e in session.received if e in goodbye_requests(session))
        heard_after = [d for t, kind, d in stays.events if kind == "media_in" and t >= said_at]
        assert sum(d["bytes"] for d in heard_after) >= 300 * 8  # the goodbye reached the caller...
        marks_played = [kind for t, kind, _ in stays.events if kind == "mark_echo" and t >= said_at]
        assert len(marks_played) >= len(heard_after)  # ...and was played to the end before the close
        assert not goodbye_requests(session_of(sim, leaves))

        code = await relay.wait(timeout=15)
        assert code == 0, relay.output()[-3000:]
    finally:
        await relay.close()

    # LOG_LEVEL=warning is respected: the drain's warnings and nothing below them
    lines = relay.lines
    assert lines and all(line["level"] in ("warning", "error") for line in lines), lines
    assert any(line["msg"] == "stream refused: instance draining" for line in lines)
    refused = next(line for line in lines if line["msg"] == "stream refused: instance draining")
    assert (refused["call_sid"], refused["stream_sid"]) == (late.call_sid, late.stream_sid)
    assert not [line for line in lines if line["level"] == "error"], lines


async def test_a_second_signal_stops_at_once(fast_sim: RealtimeSimulator) -> None:
    relay = RelayProcess(fast_sim.url, DRAIN_SECONDS="60", LOG_LEVEL="info")
    await relay.start()
    try:
        caller = caller_for(relay)
        await caller.connect()
        assert await caller.wait_for_audio(200, timeout=5)
        relay.signal(signal.SIGTERM)
        await asyncio.sleep(1.3)  # a second signal within a second counts as the same one
        assert await relay.wait(timeout=0) is None  # draining for up to 60 s
        assert caller.close_code is None
        relay.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await relay.wait(timeout=10)
        assert code is not None and time.monotonic() - started < 8
        assert await caller.wait_closed(timeout=5) is not None
    finally:
        await relay.close()
    assert any("second signal" in line["msg"] for line in relay.lines)


async def test_a_drain_without_calls_exits_at_once(fast_sim: RealtimeSimulator) -> None:
    relay = RelayProcess(fast_sim.url, DRAIN_SECONDS="30")
    await relay.start()
    try:
        relay.signal(signal.SIGTERM)
        assert await relay.wait(timeout=10) == 0
    finally:
        await relay.close()


# ---- several processes ---------------------------------------------------------------------------


async def call_record(relay: RelayProcess, call_sid: str) -> dict[str, Any] | None:
    response = await relay.get(f"/calls/{call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"})
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


async def instance_of(relay: RelayProcess, caller: SimulatedCaller, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        record = await call_record(relay, caller.call_sid)
        if record is not None and record["meta"].get("instance"):
            return str(record["meta"]["instance"])
        assert time.monotonic() < deadline, f"no call record for {caller.call_sid}"
        await asyncio.sleep(0.05)


async def test_two_worker_processes_share_the_port_and_drain_together(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str, tmp_path: Path
) -> None:
    sim = fast_sim
    multiproc = tmp_path / "prometheus"
    relay = RelayProcess(
        sim.url,
        WEB_CONCURRENCY="2",
        REDIS_URL=redis_url,
        RELAY_REDIS_PREFIX=store_prefix,
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        DRAIN_SECONDS="2",
        MAX_CALLS="50",
        LOG_LEVEL="info",
    )
    await relay.start()
    try:
        # short calls until both workers have served some (the kernel picks the accepting process)
        instances: dict[str, str] = {}
        finished: list[SimulatedCaller] = []
        for _ in range(6):
            batch = [caller_for(relay) for _ in range(6)]
            await asyncio.gather(*(c.connect() for c in batch))
            for caller in batch:
                assert await caller.wait_for_audio(200, timeout=10)
                instances[caller.call_sid] = await instance_of(relay, caller)
            await asyncio.gather(*(c.hangup() for c in batch))
            finished += batch
            if len(set(instances.values())) >= 2:
                break
        assert len(set(instances.values())) == 2, instances
        worker_pids = {int(instance.rsplit("-", 1)[1]) for instance in instances.values()}
        assert relay.pid not in worker_pids

        # whichever worker answers the scrape, the counters are the sum over both processes
        async def ended_total() -> float:
            response = await relay.get("/metrics")
            return metric(parse_metrics(response.text)[1], "relay_calls_ended_total")

        assert await eventually_async(lambda: ended_total(), len(finished), timeout=10)
        for _ in range(6):
            assert await ended_total() == len(finished)
        assert list(multiproc.glob("*.db"))

        # live calls on both workers, then one SIGTERM to the parent
        live: list[SimulatedCaller] = []
        live_on: set[str] = set()
        for _ in range(20):
            caller = caller_for(relay)
            await caller.connect()
            assert await caller.wait_for_audio(200, timeout=10)
            live.append(caller)
            live_on.add(await instance_of(relay, caller))
            if len(live_on) == 2:
                break
        assert len(live_on) == 2
        samples = parse_metrics((await relay.get("/metrics")).text)[1]
        assert metric(samples, "relay_active_calls") == len(live)  # live gauges summed over the workers

        relay.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        for _ in range(4):  # both workers answer 503 now
            assert (await relay.get("/readyz")).status_code == 503
        codes = await asyncio.gather(*(c.wait_closed(timeout=15) for c in live))
        assert codes == [1000] * len(live)
        for caller in live:
            assert len(goodbye_requests(session_of(sim, caller))) == 1
        assert await relay.wait(timeout=15) == 0, relay.output()[-3000:]
    finally:
        await relay.close()

    lines = relay.lines
    started = [line for line in lines if line["msg"] == "relay worker starting"]
    assert {line["pid"] for line in started} == worker_pids
    assert all(line["metrics_multiprocess"] for line in started)
    drained = [line for line in lines if line["msg"] == "drain complete"]
    assert {line["pid"] for line in drained} == worker_pids
    assert any(line["msg"] == "all workers stopped" and line["exit_codes"] == [0, 0] for line in lines)


async def eventually_async(read: Any, want: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await read() == want:
            return True
        await asyncio.sleep(0.1)
    return bool(await read() == want)


def test_worker_count_comes_from_web_concurrency_or_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.logs
    import relay.server
    from relay.__main__ import main

    seen: list[int] = []
    monkeypatch.setattr(relay.server, "serve", lambda settings, workers=1: seen.append(workers))
    monkeypatch.setattr(relay.logs, "configure", lambda *args, **kwargs: None)  # pytest keeps its own handlers
    monkeypatch.setenv("RELAY_INSECURE_DEV", "1")
    monkeypatch.setenv("OPENAI_REALTIME_URL", "ws://127.0.0.1:9/v1/realtime")  # a loopback simulator: no key needed
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert main(["serve"]) == 0
    assert main(["serve", "--workers", "2"]) == 0
    monkeypatch.delenv("WEB_CONCURRENCY")
    assert main(["serve"]) == 0
    assert seen == [3, 2, 1]


async def test_a_crashed_worker_is_replaced(fast_sim: RealtimeSimulator) -> None:
    relay = RelayProcess(fast_sim.url, args=("--workers", "2"), LOG_LEVEL="info")
    await relay.start()
    try:

        def worker_pids() -> list[int]:
            return [line["pid"] for line in relay.lines if line["msg"] == "relay worker starting"]

        assert await eventually(lambda: len(worker_pids()) == 2, timeout=10)
        victim = worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert await eventually(lambda: len(worker_pids()) == 3, timeout=10)
        assert victim not in worker_pids()[2:]
        for _ in range(4):
            assert (await relay.get("/healthz")).status_code == 200
        relay.signal(signal.SIGTERM)
        assert await relay.wait(timeout=10) == 0
    finally:
        await relay.close()
    assert any(line["msg"].startswith(f"worker {victim} exited with -9") for line in relay.lines)
