"""Hostile input, limits, authentication under attack, and faults mid-call: nothing lost, no one let in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import string
from typing import Any

import httpx
import orjson
import pytest
import websockets
from conftest import AUTH_TOKEN, assert_relayed_across_sessions, make_caller, relay_settings, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.agent_settings import AgentSettings
from relay.app import create_app
from relay.call import Call
from relay.config import Settings
from relay.env import ConfigError
from relay.logbound import lines_for
from relay.profiles import parse_profiles
from relay.realtime import events as ev
from relay.realtime.dialect import get_dialect
from relay.runtime import Runtime
from relay.sim import ulaw
from relay.sim.caller import SimulatedCaller
from relay.sim.local import LocalRelay
from relay.sim.netfault import FaultProxy
from relay.sim.realtime import RealtimeSimulator
from relay.twilio import messages as tw

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
TWILIO_EVENTS = ["connected", "start", "media", "mark", "dtmf", "stop", "other"]
SERVER_TYPES = [
    "response.output_audio.delta",
    "response.audio.delta",
    "response.output_audio.done",
    "response.created",
    "response.done",
    "response.output_item.added",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "conversation.item.added",
    "conversation.item.created",
    "conversation.item.truncated",
    "conversation.item.deleted",
    "session.created",
    "session.updated",
    "error",
    "response.function_call_arguments.done",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed",
    "response.output_audio_transcript.done",
    "response.audio_transcript.done",
    "response.output_text.done",
    "rate_limits.updated",
    "brand.new",
]
FIELD_NAMES = [
    "media",
    "payload",
    "mark",
    "name",
    "dtmf",
    "digit",
    "start",
    "streamSid",
    "callSid",
    "customParameters",
    "response",
    "id",
    "item",
    "item_id",
    "response_id",
    "delta",
    "output",
    "usage",
    "error",
    "code",
    "audio_end_ms",
    "audio_start_ms",
    "call_id",
    "arguments",
    "metadata",
    "session",
    "transcript",
    "status",
    "type",
    "event",
]


def shaped(kinds: list[str], key: str) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects that look like real events: a known type plus plausible-but-wrong fields."""
    inner = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6)
    return st.builds(
        lambda kind, fields, nested: {**fields, key: kind, **nested},
        st.sampled_from(kinds),
        st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6),
        st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    )


# ---- parsers never raise anything but their named error ---------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        json_values.map(lambda v: orjson.dumps(v)),
        shaped(TWILIO_EVENTS, "event").map(orjson.dumps),
        st.binary(max_size=200),
        st.text(max_size=200),
    )
)
def test_twilio_parser_only_raises_malformed_message(raw: bytes | str) -> None:
    try:
        event = tw.parse(raw)
    except tw.MalformedMessage:
        return
    if isinstance(event, tw.Media):
        assert tw.is_base64(event.payload)  # goes into our JSON unescaped: must be base64


B64_ISH = st.text(alphabet='ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\\"é -', max_size=40)


def _media_frame(seq: str, track: str, chunk: str, stamp: str, payload: str, sid: str) -> str:
    """Twilio's own layout, with each value pasted in raw (so some are not valid JSON on purpose)."""
    return (
        f'{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{track}","chunk":"{chunk}",'
        f'"timestamp":"{stamp}","payload":"{payload}"}},"streamSid":"{sid}"}}'
    )


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        st.builds(
            _media_frame,
            st.from_regex(r"[0-9]{1,20}|[0-9a-z\"]{0,3}", fullmatch=True),
            st.sampled_from(["inbound", "outbound", "both", 'in\\"bound', ""]),
            st.from_regex(r"[0-9]{1,20}|[0-9a-z]{0,3}", fullmatch=True),
            st.from_regex(r"[0-9]{1,20}|[0-9a-z]{0,3}", fullmatch=True),
            B64_ISH,
            st.from_regex(r"[A-Za-z0-9]{0,66}|MZ[a-z\"\\]{1,4}", fullmatch=True),
        ),
        st.builds(  # the same fields through a JSON encoder, in other orders and spacings
            lambda payload, track, spaced: (
                orjson.dumps({"streamSid": "MZ1", "event": "media", "media": {"payload": payload, "track": track}})
                .decode()
                .replace(",", ", " if spaced else ",")
            ),
            B64_ISH,
            st.sampled_from(["inbound", "outbound"]),
            st.booleans(),
        ),
    )
)
def test_media_fast_path_agrees_with_the_json_parser(frame: str) -> None:
    """Twilio's exact media layout skips the JSON parser; every frame must still get the same answer."""
    try:
        expected: tw.TwilioEvent | type[tw.MalformedMessage] = tw.parse_json(frame)
    except tw.MalformedMessage:
        expected = tw.MalformedMessage
    try:
        got: tw.TwilioEvent | type[tw.MalformedMessage] = tw.parse(frame)
    except tw.MalformedMessage:
        got = tw.MalformedMessage
    assert got == expected


def test_media_fast_path_takes_twilios_layout() -> None:
    frame = _media_frame("4", "inbound", "2", "40", "/////w==", "MZ18ad3ab5a668481ce02b83e7395059f0")
    assert tw._MEDIA_FRAME.fullmatch(frame) is not None  # the documented example takes the fast path
    assert tw.parse(frame) == tw.Media("/////w==", "inbound")
    with pytest.raises(tw.MalformedMessage):  # base64 of a wrong length is refused on the fast path too
        tw.parse(frame.replace('"payload":"/////w=="', '"payload":"/////w="'))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["ga", "beta"]), st.lists(shaped(SERVER_TYPES, "type"), max_size=12))
def test_realtime_parser_and_call_survive_any_server_events(dialect: str, raws: list[dict[str, Any]]) -> None:
    d = get_dialect(dialect)
    call = Call(call_sid="CA1", stream_sid="MZ1", dialect=d, agent=AgentSettings(), model="m")
    call.upstream_opened()
    for raw in raws:
        try:
            event = d.parse(orjson.dumps(raw))
        except ev.MalformedEvent:
            continue
        call.upstream_event(event)  # must not raise
        to_twilio, to_upstream, _ = call.take_output()
        for text in to_twilio + to_upstream:
            orjson.loads(text)  # everything we would send is valid JSON


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=4) | json_values)
def test_profile_parser_only_raises_config_error(data: Any) -> None:
    try:
        parse_profiles(data if isinstance(data, dict) else {"profiles": data}, AgentSettings())
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def webhook_app() -> Any:
    settings_ = Settings(twilio_auth_token=AUTH_TOKEN, stream_secret=b"s" * 32, public_url="https://relay.example")
    runtime = Runtime(settings_)
    runtime.started = True
    return create_app(settings_, runtime)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=3000), signature=st.one_of(st.none(), st.text(max_size=40)))
async def test_webhook_never_errors_on_arbitrary_bodies(webhook_app: Any, body: bytes, signature: str | None) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if signature is not None and signature.isascii() and signature.isprintable():
        headers["x-twilio-signature"] = signature
    transport = httpx.ASGITransport(app=webhook_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal:8000") as http:
        response = await http.post("/incoming-call", content=body, headers=headers)
    assert response.status_code in (400, 403, 413)
    assert AUTH_TOKEN not in response.text


async def test_webhook_body_limit(webhook_app: Any) -> None:
    transport = httpx.ASGITransport(app=webhook_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal:8000") as http:
        response = await http.post("/incoming-call", content=b"a=" + b"x" * 70_000)
    assert response.status_code == 413


# ---- live calls: junk, floods and oversized frames ---------------------------------------------


def junk_frames(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    frames: list[str] = []
    for _ in range(count):
        kind = rng.randrange(6)
        if kind == 0:
            frames.append("".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 80))))
        elif kind == 1:
            frames.append(
                orjson.dumps({"event": "media", "media": {"payload": rng.choice(["", "***", 5, None])}}).decode()
            )
        elif kind == 2:
            kinds = [k for k in TWILIO_EVENTS if k != "stop"]  # a stop, however odd, ends the call
            frames.append(orjson.dumps({"event": rng.choice(kinds), rng.choice(FIELD_NAMES): rng.random()}).decode())
        elif kind == 3:
            frames.append(
                orjson.dumps({"event": "mark", "mark": {"name": f"{rng.randrange(99)}.{rng.randrange(99)}"}}).decode()
            )
        elif kind == 4:
            frames.append(orjson.dumps([rng.random() for _ in range(5)]).decode())
        else:
            frames.append('{"event":"dtmf","dtmf":{"digit":"' + rng.choice("Zx!") + '"}}')
    return frames


async def test_hundreds_of_junk_frames_never_stop_relaying(
    sim: RealtimeSimulator, relay: LocalRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caller = make_caller(relay)
    await caller.connect()
    assert await caller.wait_for_audio(200, timeout=5)
    assert caller._ws is not None
    for frame in junk_frames(300, seed=7):
        await caller._ws.send(frame)
    await caller.say_and_wait(ulaw.synth_speech(400))
    assert await caller.wait_for_audio(caller.played_bytes // 8 + 200, timeout=5)
    await caller.hangup()
    assert await wait_for(lambda: not relay.runtime.calls)
    assert sim.sessions[0].appended == caller.sent_payloads
    skipped = [r for r in caplog.records if "malformed Twilio frame" in r.getMessage()]
    assert all(getattr(r, "call_sid", None) == caller.call_sid for r in skipped)
    ended = next(r for r in caplog.records if r.getMessage() == "call ended")
    assert getattr(ended, "malformed_frames", 0) > 100
    # the first ones one by one, then a running count at 10, 100: no log flood
    assert len(skipped) == lines_for(ended.malformed_frames) == 7
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def _steady_call(relay: LocalRelay) -> SimulatedCaller:
    caller = make_caller(relay)
    await caller.connect()
    assert await caller.wait_for_audio(100, timeout=5)
    return caller


@pytest.mark.parametrize("abuse", ["oversized", "media_flood", "dtmf_flood"])
async def test_abusive_stream_is_closed_without_touching_other_calls(sim: RealtimeSimulator, abuse: str) -> None:
    sim.config.greeting_reply_ms = 3000
    async with LocalRelay(relay_settings(sim.url)) as relay:
        bystander = await _steady_call(relay)
        abuser = await _steady_call(relay)
        ws = abuser._ws
        assert ws is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            if abuse == "oversized":
                await ws.send(orjson.dumps({"event": "media", "media": {"payload": "A" * 100_000}}).decode())
                await asyncio.wait_for(ws.wait_closed(), timeout=5)
            for i in range(2000):
                if abuse == "media_flood":
                    frame = {"event": "media", "streamSid": abuser.stream_sid, "media": {"payload": "/" * 216}}
                    await ws.send(orjson.dumps(frame).decode())
                elif abuse == "dtmf_flood":
                    await ws.send(orjson.dumps({"event": "dtmf", "dtmf": {"digit": str(i % 10)}}).decode())
        assert await abuser.wait_closed(timeout=5) == (1009 if abuse == "oversized" else 1008)
        await bystander.say_and_wait(ulaw.synth_speech(300))
        played = bystander.played_bytes
        assert await bystander.wait_for_audio(played // 8 + 100, timeout=5)
        await bystander.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
    bystander_session = next(s for s in sim.sessions if s.appended and s.appended[0] == bystander.sent_payloads[0])
    assert bystander_session.appended == bystander.sent_payloads


async def test_two_hundred_unauthenticated_sockets_do_not_disturb_twenty_calls(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 600
    sim.config.record_audio = True
    async with LocalRelay(relay_settings(sim.url, start_timeout_s=1.5)) as relay:
        callers = [make_caller(relay) for _ in range(20)]
        await asyncio.gather(*(c.connect() for c in callers))
        ws_url = relay.base_url.replace("http", "ws") + "/media-stream"
        bad_start = orjson.dumps(
            {
                "event": "start",
                "start": {
                    "streamSid": "MZ" + "0" * 32,
                    "callSid": "CA" + "0" * 32,
                    "customParameters": {"token": "v1.1.x"},
                },
            }
        ).decode()

        async def intruder(i: int) -> int | None:
            try:
                async with websockets.connect(ws_url, open_timeout=10) as ws:
                    if i % 2:
                        with contextlib.suppress(websockets.ConnectionClosed):  # closed already: evicted
                            await ws.send(bad_start)  # a forged start
                    await asyncio.wait_for(ws.wait_closed(), timeout=10)  # silence: the start timeout
                    return ws.close_code
            except (OSError, websockets.WebSocketException, TimeoutError):
                return None

        intruders = asyncio.gather(*(intruder(i) for i in range(200)))

        async def converse(c: SimulatedCaller, seed: int) -> None:
            await c.wait_for_audio(600, timeout=15)
            await c.say_and_wait(ulaw.synth_speech(400, seed=seed))
            await c.wait_for_audio(800, timeout=15)
            await c.hangup()

        await asyncio.gather(*(converse(c, i) for i, c in enumerate(callers)))
        codes = await intruders
    # each is closed 1008: for its forged start, for its silence, or (over RELAY_MAX_PENDING_STREAMS)
    # to make room for a newer socket
    assert codes.count(1008) == 200
    assert sim.connections == 20
    appended = sorted(tuple(s.appended) for s in sim.sessions)
    assert appended == sorted(tuple(c.sent_payloads) for c in callers)


# ---- faults mid-call -------------------------------------------------------------------------------


async def test_twilio_socket_dropped_without_stop(sim: RealtimeSimulator, redis_url: str, store_prefix: str) -> None:
    settings_ = relay_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    async with LocalRelay(settings_) as relay:
        caller = await _steady_call(relay)
        tasks_before = len(asyncio.all_tasks())
        assert caller._ws is not None
        caller._ws.transport.abort()  # no close frame, no stop: the TCP connection just dies
        assert await wait_for(lambda: not relay.runtime.calls, timeout=5)
        await relay.runtime.store.flush(5)
        record = await relay.runtime.store.get_call(caller.call_sid)
        await asyncio.sleep(0.2)
        assert len(asyncio.all_tasks()) < tasks_before
        assert not sim.active_sessions()
    assert record is not None and record.meta["end_reason"] == "caller_disconnected"
    assert sim.sessions[0].appended == caller.sent_payloads[: len(sim.sessions[0].appended)]


async def test_half_open_realtime_socket_is_detected_by_ping_timeout(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 300
    host, port = sim.url.split("//")[1].split("/")[0].split(":")
    proxy = FaultProxy(host, int(port))
    proxy_port = await proxy.start()
    url = f"ws://127.0.0.1:{proxy_port}/v1/realtime"
    settings_ = relay_settings(url, ws_ping_interval_s=0.3, ws_ping_timeout_s=0.3)
    try:
        async with LocalRelay(settings_) as relay:
            caller = await _steady_call(relay)
            await caller.wait_idle(timeout=5)
            proxy.blackhole()  # the upstream goes silent: no data, no close
            assert await wait_for(
                lambda: len(sim.sessions) == 2 and sim.sessions[1].session.get("instructions"), timeout=5
            )
            before = caller.played_bytes
            await caller.say_and_wait(ulaw.synth_speech(400))
            assert await caller.wait_for_audio(before // 8 + 200, timeout=5)
            await caller.hangup()
            assert await wait_for(lambda: not relay.runtime.calls)
    finally:
        await proxy.stop()
    assert_relayed_across_sessions(sim.sessions[0], sim.sessions[1], caller.sent_payloads)


async def test_slow_realtime_handshake_keeps_the_newest_audio_and_counts_what_it_drops(
    sim: RealtimeSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The Realtime handshake takes 4.5 s: the relay holds 3 s of caller audio meanwhile. The session
    then hears an unbroken run up to the hang-up, and every older frame is counted and logged."""
    caplog.set_level(logging.INFO)
    host, port = sim.url.split("//")[1].split("/")[0].split(":")
    proxy = FaultProxy(host, int(port), connect_delay_s=4.5)
    proxy_port = await proxy.start()
    try:
        async with LocalRelay(relay_settings(f"ws://127.0.0.1:{proxy_port}/v1/realtime")) as relay:
            caller = make_caller(relay)
            await caller.connect()
            assert await wait_for(lambda: sim.sessions and sim.sessions[0].session.get("instructions"), timeout=10)
            await asyncio.sleep(0.5)
            await caller.hangup()
            assert await wait_for(lambda: not relay.runtime.calls)
            dropped = relay.runtime.metrics.caller_audio_dropped._value.get()
    finally:
        await proxy.stop()
    sent, heard = caller.sent_payloads, sim.sessions[0].appended
    assert len(sent) >= 240  # 4.5 s of waiting and 0.5 s of live audio, at 50 frames a second
    assert heard == sent[len(sent) - len(heard) :]  # the newest frames, none missing in between
    assert len(heard) >= 150  # the 3 s held while the session opened, then live audio
    assert dropped == len(sent) - len(heard) > 0
    warnings = [r for r in caplog.records if "caller audio older than that is being dropped" in r.getMessage()]
    assert len(warnings) == 1  # once per call, not once per frame
    ended = next(r for r in caplog.records if r.getMessage() == "call ended")
    assert ended.audio_dropped_frames == dropped


async def test_session_update_never_answered_ends_the_call_cleanly(sim: RealtimeSimulator) -> None:
    sim.config.answer_session_update = False
    settings_ = relay_settings(sim.url, session_update_timeout_s=0.4, reconnect_attempts=1)
    async with LocalRelay(settings_) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_closed(timeout=10) == 1000
        assert await wait_for(lambda: not relay.runtime.calls)
        record = await relay.runtime.store.get_call(caller.call_sid)
    assert record is not None and record.meta["end_reason"] == "realtime_unavailable"
    assert sim.connections == 2
    assert caller.played_bytes == 0


HARMLESS_ERRORS = [
    ("invalid_request_error", "invalid_value"),
    ("invalid_request_error", "response_cancel_not_active"),
    ("invalid_request_error", "conversation_already_has_active_response"),
    ("invalid_request_error", "item_not_found"),
    ("server_error", "server_error"),
    ("rate_limit_error", "rate_limit_exceeded"),
    ("invalid_request_error", None),
]
FATAL_ERRORS = ["invalid_api_key", "insufficient_quota", "model_not_found", "beta_api_shape_disabled"]


@pytest.mark.parametrize(("kind", "code"), HARMLESS_ERRORS)
async def test_non_fatal_realtime_errors_keep_the_call_going(
    sim: RealtimeSimulator, relay: LocalRelay, kind: str, code: str | None
) -> None:
    caller = await _steady_call(relay)
    await caller.wait_idle(timeout=5)
    sim.inject(
        {
            "type": "error",
            "error": {"type": kind, "code": code, "message": "simulated", "param": None, "event_id": None},
        }
    )
    await caller.say_and_wait(ulaw.synth_speech(400))
    assert await caller.wait_for_audio(caller.played_bytes // 8 + 200, timeout=5)
    assert caller.close_code is None
    await caller.hangup()
    assert sim.connections == 1


@pytest.mark.parametrize("code", FATAL_ERRORS)
async def test_fatal_realtime_errors_end_the_call_without_retry(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str, code: str
) -> None:
    settings_ = relay_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    async with LocalRelay(settings_) as relay:
        caller = await _steady_call(relay)
        sim.inject(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": "simulated fatal",
                    "param": None,
                    "event_id": None,
                },
            }
        )
        assert await caller.wait_closed(timeout=5) == 1000
        assert await wait_for(lambda: not relay.runtime.calls)
        await relay.runtime.store.flush(5)
        record = await relay.runtime.store.get_call(caller.call_sid)
    assert sim.connections == 1
    assert record is not None and record.meta["end_reason"] == f"realtime_error:{code}"
    assert record.meta["ended"]


async def test_session_expired_error_rolls_over_to_a_new_session(sim: RealtimeSimulator, relay: LocalRelay) -> None:
    caller = await _steady_call(relay)
    await caller.wait_idle(timeout=5)
    sim.inject(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "session_expired",
                "message": "Your session hit the maximum duration of 60 minutes.",
                "param": None,
                "event_id": None,
            },
        }
    )
    assert await wait_for(lambda: sim.connections == 2, timeout=5)
    await caller.say_and_wait(ulaw.synth_speech(400))
    assert await caller.wait_for_audio(caller.played_bytes // 8 + 200, timeout=5)
    await caller.hangup()


async def test_sigterm_during_twenty_active_calls(sim: RealtimeSimulator, redis_url: str, store_prefix: str) -> None:
    """A real `serve` process: every call gets its goodbye, every frame arrives, every record is complete."""
    from ops_support import API_TOKEN, RelayProcess, caller_for

    from relay.runtime import DRAIN_GOODBYE

    sim.config.greeting_reply_ms = 300
    relay = RelayProcess(
        sim.url, DRAIN_SECONDS="2", REDIS_URL=redis_url, RELAY_REDIS_PREFIX=store_prefix, LOG_LEVEL="warning"
    )
    await relay.start()
    try:
        callers = [caller_for(relay) for _ in range(20)]
        await asyncio.gather(*(c.connect() for c in callers))
        assert all(await asyncio.gather(*(c.wait_for_audio(300, timeout=10) for c in callers)))
        relay.signal()
        codes = await asyncio.gather(*(c.wait_closed(timeout=20) for c in callers))
        assert codes == [1000] * 20
        assert await relay.wait(timeout=20) == 0
    finally:
        await relay.close()
    for caller in callers:
        session = next(s for s in sim.sessions if s.appended and s.appended[0] == caller.sent_payloads[0])
        # the caller's audio reached the model in order up to the close (a frame sent as the socket
        # closed may be in flight), and the goodbye was asked for and heard
        assert session.appended == caller.sent_payloads[: len(session.appended)]
        assert len(caller.sent_payloads) - len(session.appended) <= 2
        goodbyes = [e for _, e in session.received if DRAIN_GOODBYE in str(e.get("response", {}).get("instructions"))]
        assert len(goodbyes) == 1
        assert (
            caller.received_payloads
            == [e["delta"] for e in session.sent if e["type"] == "response.output_audio.delta"][
                : len(caller.received_payloads)
            ]
        )
    checker = LocalRelay(
        relay_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix, relay_api_token=API_TOKEN)
    )
    await checker.__aenter__()
    try:
        async with httpx.AsyncClient(base_url=checker.base_url) as http:
            for caller in callers:
                record = (
                    await http.get(f"/calls/{caller.call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"})
                ).json()
                assert record["meta"]["end_reason"] == "shutdown"
                assert record["meta"]["ended"]
                assert any(e.get("event") == "drain_goodbye" for e in record["entries"])
    finally:
        await checker.stop()


async def test_a_backlog_after_a_stall_is_not_mistaken_for_a_flood(sim: RealtimeSimulator, relay: LocalRelay) -> None:
    """Frames that queued up while the relay (or network) stalled arrive at once; that is real time, not abuse."""
    caller = make_caller(relay)
    await caller.connect()
    assert await caller.wait_for_audio(100, timeout=5)
    ws = caller._ws
    assert ws is not None
    await asyncio.sleep(12.0)  # the caller's own frames keep flowing; then 12 s of "queued" audio lands at once
    frame = orjson.dumps({"event": "media", "streamSid": caller.stream_sid, "media": {"payload": "/" * 216}}).decode()
    for _ in range(600):
        await ws.send(frame)
    await caller.say_and_wait(ulaw.synth_speech(300))
    assert caller.close_code is None
    await caller.hangup()
