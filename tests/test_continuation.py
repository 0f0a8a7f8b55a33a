"""What the caller hears once a stream ends without the call ending.

The voice webhook's TwiML is <Connect><Stream> followed by a <Redirect> to the continuation
webhook, which Twilio POSTs (signed) to whichever instance the load balancer picks when the stream
ends. A call the relay ended on purpose is hung up; a lost stream (the Realtime API unreachable,
an instance gone) gets the spoken apology and the fallback number, never silence and a click.
Real relays on loopback, the simulated Realtime API and caller, the real twilio signature code and
Redis shared by two instances.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
import textwrap
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from conftest import AUTH_TOKEN, greeted, make_caller, relay_settings, talk, wait_for
from tools_support import ACCOUNT_SID, TwilioApiRecorder, outputs
from twilio.request_validator import RequestValidator

from relay.config import Settings
from relay.metrics import usage_cost
from relay.realtime.dialect import flatten_usage
from relay.sim.caller import TWILIO_RECONNECT_S, CallerConfig, SimulatedCaller, TwilioCall
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig

FALLBACK = "+15550009999"
APOLOGY = Settings.apology_say
PUBLIC = "https://relay.example.com"


def verbs(body: str) -> list[tuple[str, str, dict[str, str]]]:
    """The TwiML document's verbs in order: (tag, text, attributes)."""
    root = ET.fromstring(body)
    assert root.tag == "Response"
    return [(verb.tag, (verb.text or "").strip(), dict(verb.attrib)) for verb in root]


def apology_then(fallback: str | None) -> list[tuple[str, str, dict[str, str]]]:
    return [("Say", APOLOGY, {}), ("Dial", "", {}) if fallback else ("Hangup", "", {})]


def ending_sim() -> RealtimeSimulator:
    """A session whose model calls end_call when the caller keys 5#."""
    return RealtimeSimulator(
        SimConfig(
            function_calls_on_text={"entered 5 #": [("end_call", "{}")]},
            realtime_factor=8.0,
            greeting_reply_ms=200,
            reply_ms=300,
        )
    )


def twilio_call(relay: LocalRelay, delay_s: float = TWILIO_RECONNECT_S) -> TwilioCall:
    """A call Twilio carries through the TwiML, all its requests to this one relay."""
    config = CallerConfig(base_url=relay.base_url, auth_token=AUTH_TOKEN)
    return TwilioCall(config, [relay.base_url], reconnect_delay_s=delay_s)


async def test_the_stream_is_followed_by_a_redirect_to_the_continuation_webhook(sim: RealtimeSimulator) -> None:
    async with LocalRelay(relay_settings(sim.url, public_url=PUBLIC)) as relay:
        caller = make_caller(relay, public_url=PUBLIC)
        status, body = await caller.webhook()
    assert status == 200
    document = verbs(body)
    assert [tag for tag, _, _ in document] == ["Connect", "Redirect"]
    assert document[1][1:] == (f"{PUBLIC}/continue-call", {"method": "POST"})


async def test_a_call_the_assistant_ended_is_hung_up_by_the_continuation() -> None:
    sim = ending_sim()
    await sim.start()
    try:
        async with LocalRelay(relay_settings(sim.url, end_call_mark_timeout_s=1.0)) as relay:
            caller = await greeted(relay)
            await caller.enter("5#")
            assert await caller.wait_closed(timeout=5) == 1000
            status, body = await caller.continuation()
    finally:
        await sim.stop()
    assert status == 200
    assert verbs(body) == [("Hangup", "", {})]


@pytest.mark.parametrize("fallback", [FALLBACK, None])
async def test_a_lost_realtime_api_gives_the_apology_not_silence(sim: RealtimeSimulator, fallback: str | None) -> None:
    """Default reconnect settings; Twilio follows the TwiML after </Connect> with its own delay."""
    with TwilioApiRecorder() as api:
        settings = relay_settings(
            sim.url, twilio_account_sid=ACCOUNT_SID, twilio_api_base=api.url, fallback_number=fallback
        )
        async with LocalRelay(settings) as relay:
            call = twilio_call(relay)
            await call.start()
            assert await call.leg.wait_for_audio(100, timeout=5)
            await sim.stop()
            lost = time.monotonic()
            outcome = await call.wait_ended(timeout=15)
            said_at = next(t for t, kind, _ in call.events if kind == "say")
            assert await wait_for(lambda: not relay.runtime.calls)
            record = await relay.runtime.store.get_call(call.call_sid)
        rest_requests = list(api.requests)
    assert record is not None and record.meta["end_reason"] == "realtime_unavailable"
    assert rest_requests == []  # the continuation's TwiML does it, with or without REST credentials
    assert outcome == ("dialled" if fallback else "hung_up")
    assert call.said == [APOLOGY]
    assert call.dialled == ([fallback] if fallback else [])
    assert len(call.legs) == 1 and call.leg.close_code == 1000
    print(f"\nRealtime API lost: the caller heard the apology {said_at - lost:.2f} s later")
    assert said_at - lost < 5.0


async def test_any_instance_answers_the_continuation_from_the_shared_store(redis_url: str, store_prefix: str) -> None:
    sim = ending_sim()
    await sim.start()
    try:
        shared: dict[str, Any] = {
            "redis_url": redis_url,
            "redis_prefix": store_prefix,
            "end_call_mark_timeout_s": 1.0,
            "public_url": PUBLIC,  # both instances behind one load balancer
        }
        async with (
            LocalRelay(relay_settings(sim.url, **shared)) as first,
            LocalRelay(relay_settings(sim.url, fallback_number=FALLBACK, **shared)) as second,
        ):
            ended = await greeted(first, public_url=PUBLIC)
            await ended.enter("5#")
            assert await ended.wait_closed(timeout=5) == 1000
            lost = await greeted(first, public_url=PUBLIC)
            assert lost.call_sid in first.runtime.calls  # live on the first instance, nothing recorded
            ended.config.base_url = lost.config.base_url = second.base_url  # the load balancer picked the other
            ended_status, ended_body = await ended.continuation()
            lost_status, lost_body = await lost.continuation()  # nothing recorded an ending: it resumes
            await lost.hangup()
    finally:
        await sim.stop()
    assert (ended_status, verbs(ended_body)) == (200, [("Hangup", "", {})])
    assert (lost_status, [tag for tag, _, _ in verbs(lost_body)]) == (200, ["Connect", "Redirect"])


async def test_the_continuation_is_refused_without_a_valid_signature_and_while_draining(
    sim: RealtimeSimulator,
) -> None:
    async with LocalRelay(relay_settings(sim.url)) as relay:
        url = relay.base_url + "/continue-call"
        form = {"CallSid": "CA" + "1" * 32, "AccountSid": ACCOUNT_SID, "CallStatus": "in-progress"}
        good = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
        forged = RequestValidator("not-the-auth-token").compute_signature(url, form)
        async with httpx.AsyncClient(trust_env=False) as client:
            refused = await client.post(url, data=form, headers={"X-Twilio-Signature": forged})
            unsigned = await client.post(url, data=form)
            answered = await client.post(url, data=form, headers={"X-Twilio-Signature": good})
            relay.runtime.start_drain()
            draining = await client.post(url, data=form, headers={"X-Twilio-Signature": good})
    assert (refused.status_code, unsigned.status_code) == (403, 403)
    assert answered.status_code == 200 and verbs(answered.text) == apology_then(None)
    assert draining.status_code == 503 and draining.headers["retry-after"] == "1"


async def test_a_dead_store_still_gives_the_caller_the_apology(sim: RealtimeSimulator) -> None:
    dead = "redis://127.0.0.1:9/0"  # nothing listens on the discard port
    async with LocalRelay(relay_settings(sim.url, redis_url=dead, fallback_number=FALLBACK)) as relay:
        url = relay.base_url + "/continue-call"
        form = {"CallSid": "CA" + "2" * 32, "AccountSid": ACCOUNT_SID, "CallStatus": "in-progress"}
        signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
        async with httpx.AsyncClient(trust_env=False) as client:
            answered = await client.post(url, data=form, headers={"X-Twilio-Signature": signature})
    assert answered.status_code == 200
    assert verbs(answered.text) == apology_then(FALLBACK)


async def test_a_lost_stream_resumes_on_another_instance_with_its_conversation(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": store_prefix, "public_url": PUBLIC}
    async with (
        LocalRelay(relay_settings(sim.url, **shared)) as first,
        LocalRelay(relay_settings(sim.url, **shared)) as second,
    ):
        caller = await greeted(first, public_url=PUBLIC)
        await talk(caller, 400, seed=1)
        await talk(caller, 400, seed=2)
        assert await first.runtime.store.flush(2.0)
        await caller.drop()  # the connection is lost without a stop: Twilio runs the continuation
        assert await wait_for(lambda: not first.runtime.calls, timeout=5)
        caller.config.base_url = second.base_url  # the load balancer picked the other instance
        status, body = await caller.continuation()
        assert status == 200
        assert [tag for tag, _, _ in verbs(body)] == ["Connect", "Redirect"]
        resumed = make_caller(second, public_url=PUBLIC, call_sid=caller.call_sid)
        await resumed.connect(resumed.parse_twiml(body))
        assert await wait_for(lambda: caller.call_sid in second.runtime.calls, timeout=5)
        assert await wait_for(lambda: len(sim.sessions) == 2 and sim.sessions[1].session.get("instructions"))
        await talk(resumed, 400, seed=3)
        await resumed.hangup()
        assert await wait_for(lambda: not second.runtime.calls, timeout=5)
        record = await second.runtime.store.get_call(caller.call_sid)
    _, second_session = sim.sessions
    update = next(e for _, e in second_session.received if e["type"] == "session.update")
    instructions = update["session"]["instructions"]
    assert "already in progress" in instructions
    assert "Caller: caller turn 1 (" in instructions and "Caller: caller turn 2 (" in instructions
    # the only response.create the new session got answers the caller's turn: no second greeting
    creates = [e for _, e in second_session.received if e["type"] == "response.create"]
    assert len(creates) == 0
    assert record is not None
    assert record.meta["streams"] == "2" and record.meta["started"] < record.meta["resumed"]
    # the new session numbers its turns afresh; the call's record goes on across both streams
    assert [e["text"].split(" (")[0] for e in record.entries if e["kind"] == "caller"] == [
        "caller turn 1",
        "caller turn 2",
        "caller turn 1",
    ]


async def test_a_call_whose_stream_keeps_dropping_gets_the_apology_after_the_loop_guard(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    settings = relay_settings(
        sim.url, redis_url=redis_url, redis_prefix=store_prefix, max_continuations=2, fallback_number=FALLBACK
    )
    async with LocalRelay(settings) as relay:
        call = twilio_call(relay, delay_s=0.05)
        await call.start()
        for streams in (2, 3, 4):
            assert await wait_for(lambda: call.call_sid in relay.runtime.calls, timeout=5)  # resumed: no greeting
            await call.leg.drop()
            if streams < 4:
                assert await call.wait_legs(streams, timeout=10)
        outcome = await call.wait_ended(timeout=10)
    assert len(call.legs) == 3  # the first stream and two continuations
    assert (outcome, call.said, call.dialled) == ("dialled", [APOLOGY], [FALLBACK])


async def test_a_call_the_assistant_ended_is_hung_up_when_twilio_follows_the_twiml() -> None:
    sim = ending_sim()
    await sim.start()
    try:
        async with LocalRelay(relay_settings(sim.url, end_call_mark_timeout_s=1.0)) as relay:
            call = twilio_call(relay)
            await call.start()
            assert await call.leg.wait_for_audio(200, timeout=5)
            await call.leg.enter("5#")
            outcome = await call.wait_ended(timeout=10)
    finally:
        await sim.stop()
    assert (outcome, call.said, len(call.legs)) == ("hung_up", [], 1)


async def test_a_replayed_continuation_after_the_caller_hung_up_resumes_nothing(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    settings = relay_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    async with LocalRelay(settings) as relay:
        caller = await greeted(relay)
        await caller.hangup()  # Twilio's stop: the call is over
        assert await wait_for(lambda: not relay.runtime.calls, timeout=5)
        status, body = await caller.continuation()  # a captured request, replayed
        sessions = len(sim.sessions)
    assert (status, verbs(body)) == (200, [("Hangup", "", {})])
    assert sessions == 1


async def test_a_call_that_is_not_in_progress_is_not_resumed(sim: RealtimeSimulator) -> None:
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = await greeted(relay)
        await caller.drop()
        assert await wait_for(lambda: not relay.runtime.calls, timeout=5)
        caller.config.extra_form["CallStatus"] = "completed"
        status, body = await caller.continuation()
    assert (status, verbs(body)) == (200, apology_then(None))


async def test_a_dropped_stream_resumes_on_the_same_instance_while_the_old_one_winds_down(
    sim: RealtimeSimulator,
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    async with LocalRelay(relay_settings(sim.url)) as relay:  # one instance, the in-process store
        caller = await greeted(relay)
        await talk(caller, 400, seed=1)
        await caller.drop()
        status, body = await caller.continuation()  # at once: the old stream may still be tearing down
        assert (status, [tag for tag, _, _ in verbs(body)]) == (200, ["Connect", "Redirect"])
        resumed = make_caller(relay, call_sid=caller.call_sid)
        await resumed.connect(resumed.parse_twiml(body))
        assert await wait_for(lambda: len(sim.sessions) == 2 and configured(sim.sessions[1]), timeout=8)
        await talk(resumed, 400, seed=2)
        await resumed.hangup()
        assert resumed.close_code == 1000
    update = next(e for _, e in sim.sessions[1].received if e["type"] == "session.update")
    assert "Caller: caller turn 1 (" in update["session"]["instructions"]


def configured(session: Any) -> bool:
    return any(e["type"] == "session.update" for _, e in session.received)


RESUME_LINE = "Sorry about that, the line dropped for a moment. Where were we?"


@contextlib.asynccontextmanager
async def lost_then_resumed(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str, **settings: Any
) -> AsyncIterator[tuple[LocalRelay, LocalRelay, SimulatedCaller, SimulatedCaller]]:
    """Two instances sharing Redis; a call greeted on the first with one answered turn, whose stream is
    then lost and resumed on the second: yields (first, second, lost caller, resumed caller) once the
    new session is configured."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": store_prefix, "public_url": PUBLIC, **settings}
    async with (
        LocalRelay(relay_settings(sim.url, **shared)) as first,
        LocalRelay(relay_settings(sim.url, **shared)) as second,
    ):
        caller = await greeted(first, public_url=PUBLIC)
        await talk(caller, 400, seed=1)
        assert await first.runtime.store.flush(2.0)
        await caller.drop()
        assert await wait_for(lambda: not first.runtime.calls, timeout=5)
        caller.config.base_url = second.base_url
        _, body = await caller.continuation()
        resumed = make_caller(second, public_url=PUBLIC, call_sid=caller.call_sid)
        await resumed.connect(resumed.parse_twiml(body))
        assert await wait_for(lambda: len(sim.sessions) == 2 and configured(sim.sessions[1]), timeout=8)
        yield first, second, caller, resumed


async def resumed_on_another_instance(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str, profiles: str | None
) -> tuple[SimulatedCaller, int]:
    """The resumed caller once it heard what the new session says by itself, with the bytes it heard."""
    async with lost_then_resumed(sim, redis_url, store_prefix, profiles_file=profiles) as (_, second, _, resumed):
        await resumed.wait_for_audio(300, timeout=3)  # whatever the new session says by itself
        await resumed.wait_idle(timeout=5)
        heard = resumed.played_bytes
        await resumed.hangup()
        assert await wait_for(lambda: not second.runtime.calls, timeout=5)
    return resumed, heard


async def test_a_resumed_call_hears_the_profiles_resumption_line_once(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str, tmp_path: Any
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[profiles.default]\nresume_line = "{RESUME_LINE}"\n', encoding="utf-8")
    _, heard = await resumed_on_another_instance(sim, redis_url, store_prefix, str(profiles))
    first_session, second_session = sim.sessions
    creates = [e for _, e in second_session.received if e["type"] == "response.create"]
    assert len(creates) == 1
    instructions = creates[0]["response"]["instructions"]
    assert instructions.endswith(f"Say exactly this and nothing else: {RESUME_LINE}")
    assert "already in progress" in instructions and "Do not greet the caller again" in instructions
    assert heard == 300 * 8  # the line, as long as the simulator's instructed replies
    # the first stream's greeting was the call's only one
    assert sum(e["type"] == "response.create" for _, e in first_session.received) == 1


async def test_a_resumed_call_without_a_resumption_line_waits_for_the_caller(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    _, heard = await resumed_on_another_instance(sim, redis_url, store_prefix, None)
    _, second_session = sim.sessions
    assert [e for _, e in second_session.received if e["type"] == "response.create"] == []
    assert heard == 0


BOOKING_TOOL = """
import asyncio
from relay.tools import ToolContext, tool

RUNS: list[str] = []


@tool(description="Book a table (takes a second).")
async def book_table(ctx: ToolContext, time: str) -> dict[str, str]:
    RUNS.append("started")
    await asyncio.sleep(1.0)
    RUNS.append("finished")
    return {"booked": time, "table": "7"}
"""


@pytest.fixture
def booking_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    name = f"booking_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(BOOKING_TOOL))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield importlib.import_module(name)
    sys.modules.pop(name, None)


async def test_a_hand_off_while_a_tool_runs_waits_for_it_and_the_next_stream_gives_its_answer(
    redis_url: str, store_prefix: str, booking_tool: ModuleType
) -> None:
    sim = RealtimeSimulator(
        SimConfig(
            function_calls_on_text={"entered 5 #": [("book_table", '{"time": "8pm"}')]},
            realtime_factor=8.0,
            greeting_reply_ms=300,
            reply_ms=400,
        )
    )
    await sim.start()
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": store_prefix,
        "public_url": PUBLIC,
        "handler_modules": (booking_tool.__name__,),
    }
    try:
        async with (
            LocalRelay(relay_settings(sim.url, **shared)) as first,
            LocalRelay(relay_settings(sim.url, **shared)) as second,
        ):
            caller = await greeted(first, public_url=PUBLIC)
            await caller.enter("5#")
            assert await wait_for(lambda: booking_tool.RUNS == ["started"], timeout=5)
            # the drain's bound (RELAY_HANDOFF_MAX_WAIT) runs out while the tool still runs
            handed_off = await first.runtime.calls[caller.call_sid].hand_off(0.1)
            tool_runs = list(booking_tool.RUNS)
            assert await caller.wait_closed(timeout=5) == 1000
            assert await wait_for(lambda: not first.runtime.calls, timeout=5)
            caller.config.base_url = second.base_url
            _, body = await caller.continuation()
            resumed = make_caller(second, public_url=PUBLIC, call_sid=caller.call_sid)
            await resumed.connect(resumed.parse_twiml(body))
            assert await wait_for(lambda: len(sim.sessions) == 2 and configured(sim.sessions[1]), timeout=8)
            assert await resumed.wait_for_audio(300, timeout=5)  # the booking's answer, from the new session
            await resumed.wait_idle(timeout=5)
            await resumed.hangup()
            assert await wait_for(lambda: not second.runtime.calls, timeout=5)
            record = await second.runtime.store.get_call(caller.call_sid)
    finally:
        await sim.stop()
    assert handed_off is True
    assert tool_runs == ["started", "finished"]  # it ran to its end before the stream closed
    first_session, second_session = sim.sessions
    assert outputs(first_session) == []  # the old session was not asked to answer a call it was leaving
    assert record is not None
    results = [e for e in record.entries if e["kind"] == "tool_result"]
    assert [(json.loads(e["output"]), e["ok"]) for e in results] == [({"booked": "8pm", "table": "7"}, True)]
    hand_off = next(e for e in record.entries if e.get("event") == "handed_off")
    assert hand_off["waited_for_tools"] == 1
    update = next(e for _, e in second_session.received if e["type"] == "session.update")
    assert 'Tool result: {"booked":"8pm","table":"7"}' in update["session"]["instructions"]
    creates = [e for _, e in second_session.received if e["type"] == "response.create"]
    assert len(creates) == 1
    assert creates[0]["response"]["instructions"].endswith("tell the caller what it means for them.")


PRICES = {"input_text": 0.004, "input_audio": 0.032, "cached": 0.0004, "output_text": 0.016, "output_audio": 0.064}


async def test_a_resumed_calls_record_adds_up_both_streams(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    async with lost_then_resumed(sim, redis_url, store_prefix, price_per_1k_tokens=PRICES) as (
        _,
        second,
        caller,
        resumed,
    ):
        await talk(resumed, 400, seed=2)
        await resumed.hangup()
        assert await wait_for(lambda: not second.runtime.calls, timeout=5)
        record = await second.runtime.store.get_call(caller.call_sid)
    assert record is not None
    usages = [
        flatten_usage(e["response"]["usage"]) for s in sim.sessions for e in s.sent if e["type"] == "response.done"
    ]
    assert len(sim.sessions) == 2
    total: dict[str, int] = {}
    for usage in usages:
        for kind, count in usage.items():
            total[kind] = total.get(kind, 0) + count
    assert record.usage == total
    assert float(record.meta["cost_usd"]) == pytest.approx(sum(usage_cost(u, PRICES) for u in usages), rel=1e-9)
    # each stream's own figures are on its "call ended" line; the record has their sums
    streams = [
        r for r in caplog.records if r.getMessage() == "call ended" and r.__dict__.get("call_sid") == caller.call_sid
    ]
    assert [r.__dict__["reason"] for r in streams] == ["caller_disconnected", "caller_hung_up"]
    assert int(record.meta["frames_in"]) == sum(r.__dict__["frames_in"] for r in streams)
    assert int(record.meta["frames_out"]) == sum(r.__dict__["frames_out"] for r in streams)
    assert int(record.meta["frames_out"]) == len(caller.received_payloads) + len(resumed.received_payloads)
    # the call lasted from its first stream's start to its last stream's end
    call_s = (
        datetime.fromisoformat(record.meta["ended"]) - datetime.fromisoformat(record.meta["started"])
    ).total_seconds()
    assert float(record.meta["duration_s"]) == round(call_s, 1)
    assert float(record.meta["duration_s"]) > sum(r.__dict__["duration_s"] for r in streams[1:])


def tags(body: str) -> list[str]:
    return [tag for tag, _, _ in verbs(body)]


def next_stream(caller: SimulatedCaller, relay: LocalRelay, body: str) -> SimulatedCaller:
    """The caller of the call's next stream, which Twilio opens from the continuation's TwiML and
    follows, when it ends, with that TwiML's <Redirect> (the same continuation URL)."""
    following = make_caller(relay, public_url=PUBLIC, call_sid=caller.call_sid)
    following.continue_url = caller.continue_url
    return following


async def test_hand_offs_do_not_count_toward_the_loop_guard_but_lost_streams_do(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": store_prefix,
        "public_url": PUBLIC,
        "max_continuations": 1,
        "fallback_number": FALLBACK,
    }
    async with (
        LocalRelay(relay_settings(sim.url, **shared)) as first,
        LocalRelay(relay_settings(sim.url, **shared)) as second,
    ):

        def serving(relay: LocalRelay, call_sid: str) -> bool:
            call = relay.runtime.calls.get(call_sid)
            return call is not None and call.call is not None and call.call.session_ready

        moved = await greeted(first, public_url=PUBLIC)
        sid = moved.call_sid
        handed_off_answers = []
        for owner, other in [(first, second), (second, first)]:  # two deploys within the minute
            assert await owner.runtime.calls[sid].hand_off(1.0) is True
            assert await moved.wait_closed(timeout=5) == 1000
            moved.config.base_url = other.base_url
            _, body = await moved.continuation()
            handed_off_answers.append(tags(body))
            moved = next_stream(moved, other, body)
            await moved.connect(moved.parse_twiml(body))
            assert await wait_for(lambda other=other: serving(other, sid), timeout=8)
        await moved.hangup()

        lost = await greeted(first, public_url=PUBLIC)
        sid_lost = lost.call_sid
        lost_answers = []
        for _ in range(2):  # the connection drops twice within the minute
            await lost.drop()
            assert await wait_for(lambda: sid_lost not in first.runtime.calls, timeout=5)
            _, body = await lost.continuation()
            lost_answers.append(verbs(body))
            if tags(body) == ["Connect", "Redirect"]:
                lost = next_stream(lost, first, body)
                await lost.connect(lost.parse_twiml(body))
                assert await wait_for(lambda: serving(first, sid_lost), timeout=8)
    assert handed_off_answers == [["Connect", "Redirect"]] * 2
    assert [[tag for tag, _, _ in answer] for answer in lost_answers[:1]] == [["Connect", "Redirect"]]
    assert lost_answers[1] == apology_then(FALLBACK)


EARLIER_NOTES = "Ana, prefers Spanish, asked about a refund last week."


def final_summaries(record: Any) -> list[str]:
    return [e["text"] for e in record.entries if e["kind"] == "summary" and e["final"]]


async def test_a_dropped_stream_leaves_the_caller_memory_to_the_stream_that_ends_the_call(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": store_prefix,
        "public_url": PUBLIC,
        "caller_memory": True,
        "stream_token_ttl_s": 2,
        "start_timeout_s": 0.5,
    }
    async with (
        LocalRelay(relay_settings(sim.url, **shared)) as first,
        LocalRelay(relay_settings(sim.url, **shared)) as second,
    ):
        store = first.runtime.store
        store.set_caller_memory("+15550001111", EARLIER_NOTES)
        caller = await greeted(first, public_url=PUBLIC)
        await talk(caller, 400, seed=1)
        await talk(caller, 400, seed=2)
        await caller.drop()
        assert await wait_for(lambda: not first.runtime.calls, timeout=8)
        assert await store.flush(2.0)
        after_drop = await store.get_caller_memory("+15550001111")
        caller.config.base_url = second.base_url
        _, body = await caller.continuation()
        resumed = make_caller(second, public_url=PUBLIC, call_sid=caller.call_sid)
        await resumed.connect(resumed.parse_twiml(body))
        assert await wait_for(lambda: len(sim.sessions) == 2 and configured(sim.sessions[1]), timeout=8)
        await talk(resumed, 400, seed=3)
        await resumed.hangup()
        assert await wait_for(lambda: not second.runtime.calls, timeout=8)
        assert await second.runtime.store.flush(2.0)
        record = await store.get_call(caller.call_sid)
        at_the_end = await store.get_caller_memory("+15550001111")
        # the dropped stream's summary waited on the first instance; it sees the call resumed
        assert await wait_for(lambda: first.runtime.later_memory.waiting == 0, timeout=15)
        assert await store.flush(2.0)
        settled = await store.get_caller_memory("+15550001111")
    assert after_drop == EARLIER_NOTES  # not this call's notes, mid-call
    update = next(e for _, e in sim.sessions[1].received if e["type"] == "session.update")
    assert EARLIER_NOTES in update["session"]["instructions"]  # the resumed stream knows the earlier calls
    assert record is not None
    dropped_summary, last_summary = final_summaries(record)
    assert dropped_summary != last_summary
    assert at_the_end == settled == last_summary  # the whole call's, from its last stream


async def test_a_dropped_stream_nobody_resumes_still_becomes_the_callers_memory(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    settings = relay_settings(sim.url, caller_memory=True, stream_token_ttl_s=2, start_timeout_s=0.5)
    async with LocalRelay(settings) as relay:
        store = relay.runtime.store
        store.set_caller_memory("+15550001111", EARLIER_NOTES)
        caller = await greeted(relay)
        await talk(caller, 400, seed=1)
        await caller.drop()  # and Twilio never asks for the continuation: the call ended with it
        assert await wait_for(lambda: not relay.runtime.calls, timeout=8)
        right_after = await store.get_caller_memory("+15550001111")
        assert await wait_for(lambda: relay.runtime.later_memory.waiting == 0, timeout=20)
        later = await store.get_caller_memory("+15550001111")
        record = await store.get_call(caller.call_sid)
    assert right_after == EARLIER_NOTES
    assert record is not None
    assert later == final_summaries(record)[0]


async def test_a_summary_still_waiting_when_the_instance_stops_is_written_then(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    async with LocalRelay(relay_settings(sim.url, caller_memory=True)) as relay:  # a wait of over a minute
        store = relay.runtime.store
        caller = await greeted(relay)
        await talk(caller, 400, seed=1)
        await caller.drop()
        assert await wait_for(lambda: not relay.runtime.calls, timeout=8)
        before_stop = await store.get_caller_memory("+15550001111")
    record = await store.get_call(caller.call_sid)
    assert before_stop is None
    assert record is not None
    assert await store.get_caller_memory("+15550001111") == final_summaries(record)[0]
