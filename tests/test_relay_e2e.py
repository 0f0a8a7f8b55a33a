"""Whole calls through the real relay (uvicorn on loopback), the Realtime simulator and the simulated caller."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
from typing import Any

import orjson
import pytest
import websockets
from conftest import API_KEY, AUTH_TOKEN, make_caller, relay_settings, wait_for
from openai.types.beta.realtime import RealtimeClientEvent as BetaClientEvent
from openai.types.realtime import RealtimeClientEvent as GaClientEvent
from pydantic import TypeAdapter
from twilio.request_validator import RequestValidator

from relay.agent_settings import AgentSettings, DtmfSettings, VadSettings
from relay.security import mint_stream_token
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig
from relay.websockets_internals import RealtimeConnection

CLIENT_TYPES = {"ga": TypeAdapter(GaClientEvent), "beta": TypeAdapter(BetaClientEvent)}


def sent_audio(sim: RealtimeSimulator, session_index: int = 0) -> list[str]:
    """Audio deltas the simulator sent, in order, in either dialect."""
    session = sim.sessions[session_index]
    return [e["delta"] for e in session.sent if e["type"] in ("response.output_audio.delta", "response.audio.delta")]


@pytest.mark.parametrize(
    ("dialect", "ws_protocol"),
    [("ga", None), ("beta", None), ("ga", "websockets-sansio")],
    ids=["ga", "beta", "ga-plain-asgi"],
)
async def test_call_relays_every_frame_untouched_and_speaks_valid_protocol(dialect: str, ws_protocol: Any) -> None:
    """`ga-plain-asgi`: uvicorn's own WebSocket protocol, which offers no direct path (relay/asgi_direct.py),
    so every message goes through Starlette and ASGI as under any other server."""
    sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=800, reply_ms=600))
    await sim.start()
    settings = relay_settings(sim.url, dialect=dialect)
    try:
        async with LocalRelay(settings, ws_protocol=ws_protocol) as relay:
            caller = make_caller(relay)
            await caller.connect()
            assert await wait_for(lambda: bool(relay.runtime.calls))
            bridge = next(iter(relay.runtime.calls.values()))
            assert (bridge._direct is None) == (ws_protocol is not None)
            assert await caller.wait_for_audio(800, timeout=5)  # greeting first
            assert isinstance(bridge.upstream, RealtimeConnection)
            assert (bridge.upstream.on_text is None) == (ws_protocol is not None)
            await caller.wait_idle(timeout=5)
            await caller.say_and_wait(ulaw.synth_speech(600) + ulaw.silence(800))
            assert await caller.wait_for_audio(1400, timeout=5)  # the reply
            await caller.wait_idle(timeout=5)
            await caller.hangup()
            assert await wait_for(lambda: not relay.runtime.calls)
    finally:
        await sim.stop()
    session = sim.sessions[0]
    assert session.dialect == dialect
    # every caller frame reached the model as the very same base64 string, in order
    assert session.appended == caller.sent_payloads
    # every delta reached the caller as the very same string, in order, nothing else
    assert caller.received_payloads == sent_audio(sim)
    # one mark per media message
    kinds = [kind for _, kind, _ in caller.events]
    assert kinds.count("mark_in") == kinds.count("media_in")
    # the relay asked for exactly one response itself (the greeting): server VAD answered the turn
    types = [event["type"] for _, event in session.received]
    assert types.count("response.create") == 1
    assert types[0] == "session.update"
    for _, event in session.received:
        CLIENT_TYPES[dialect].validate_python(event)
    assert not caller.errors


async def test_barge_in_truncates_at_what_the_caller_heard(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 8000
    sim.config.reply_ms = 500
    sim.config.realtime_factor = 1.0  # the greeting is still being generated when the caller barges in
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(1500, timeout=5)
        caller.say(ulaw.synth_speech(700) + ulaw.silence(700))
        assert await wait_for(lambda: any(kind == "clear" for _, kind, _ in caller.events), timeout=5)
        heard_ms = caller.played_bytes / ulaw.ULAW_BYTES_PER_MS
        clear_index = next(i for i, (_, kind, _) in enumerate(caller.events) if kind == "clear")
        assert await wait_for(lambda: bool(sim.sessions[0].truncates), timeout=5)
        truncate = sim.sessions[0].truncates[0]
        assert abs(truncate["audio_end_ms"] - heard_ms) <= 20, (truncate, heard_ms)
        assert truncate["ok"]
        # nothing of the interrupted greeting is heard after the clear
        greeting_item = truncate["item_id"]
        session = sim.sessions[0]
        greeting_deltas = {
            e["delta"]
            for e in session.sent
            if e["type"] == "response.output_audio.delta" and e["item_id"] == greeting_item
        }
        media_after_clear = [details for _, kind, details in caller.events[clear_index:] if kind == "media_in"]
        received_after = caller.received_payloads[len(caller.received_payloads) - len(media_after_clear) :]
        assert not greeting_deltas & set(received_after)
        # ... although the simulator, like the service, still sent deltas of it after speech started
        kinds = [e["type"] for e in session.sent]
        late = session.sent[kinds.index("input_audio_buffer.speech_started") : kinds.index("response.done")]
        assert [e["item_id"] for e in late if e["type"] == "response.output_audio.delta"] == [greeting_item] * 2
        await caller.wait_idle(timeout=5)
        await caller.hangup()


def received_types(session: Any) -> list[str]:
    return [event["type"] for _, event in session.received]


def relay_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warning lines of the call's own loggers (the store's start-up notice is not about the call)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(("relay.call", "relay.bridge"))
    ]


async def test_barge_in_with_server_vad_draws_no_cancel_and_no_warning(
    sim: RealtimeSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """interrupt_response (default true): the server cancels the response itself at speech start."""
    sim.config.realtime_factor = 1.0  # the greeting is still being generated when the caller speaks
    sim.config.greeting_reply_ms = 6000
    sim.config.reply_ms = 400
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(1000, timeout=5)
        caller.say(ulaw.synth_speech(600) + ulaw.silence(700))
        assert await wait_for(lambda: bool(sim.sessions[0].truncates), timeout=5)
        assert await wait_for(lambda: len(sim.sessions[0].responses) == 2, timeout=10)  # greeting, answer
        await caller.wait_idle(timeout=5)
        await caller.hangup()
    session = sim.sessions[0]
    assert session.responses[0]["status_details"]["reason"] == "turn_detected"
    assert received_types(session).count("response.cancel") == 0
    assert [e for e in session.sent if e["type"] == "error"] == []
    assert relay_warnings(caplog) == []


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_without_server_vad_the_relay_ends_the_turn_and_the_caller_is_answered(
    sim: RealtimeSimulator, caplog: pytest.LogCaptureFixture, dialect: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 800
    agent = AgentSettings(vad=VadSettings(type="none", silence_duration_ms=400))
    async with LocalRelay(relay_settings(sim.url, agent=agent, dialect=dialect)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(300, timeout=5)
        await caller.wait_idle(timeout=5)
        await caller.say_and_wait(ulaw.synth_speech(700) + ulaw.silence(600))
        assert await caller.wait_for_audio(300 + 800, timeout=5)  # the answer
        await caller.wait_idle(timeout=5)
        await caller.hangup()
    session = sim.sessions[0]
    configured = session.session["audio"]["input"] if dialect == "ga" else session.session
    assert configured["turn_detection"] is None
    assert session.speech_started_at == []  # the simulator ran no VAD of its own
    types = received_types(session)
    assert types.count("input_audio_buffer.commit") == 1
    assert types.count("response.create") == 2  # the greeting's, then the answer's
    commit = types.index("input_audio_buffer.commit")
    assert types.index("response.create", commit) == commit + 1
    assert session.turns == 1
    assert [r["status"] for r in session.responses] == ["completed", "completed"]
    assert [e for e in session.sent if e["type"] == "error"] == []
    for _, event in session.received:
        CLIENT_TYPES[dialect].validate_python(event)
    assert relay_warnings(caplog) == []


async def test_create_response_false_gets_one_answer_per_committed_turn(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 500
    agent = AgentSettings(vad=VadSettings(create_response=False))
    async with LocalRelay(relay_settings(sim.url, agent=agent)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(300, timeout=5)
        await caller.wait_idle(timeout=5)
        for turn in range(2):
            before = caller.played_bytes // ulaw.ULAW_BYTES_PER_MS
            await caller.say_and_wait(ulaw.synth_speech(500, seed=turn) + ulaw.silence(700))
            assert await caller.wait_for_audio(before + 500, timeout=5)
            await caller.wait_idle(timeout=5)
        await caller.hangup()
    session = sim.sessions[0]
    assert session.turns == 2
    assert received_types(session).count("response.create") == 3  # the greeting's and one per turn
    assert [e for e in session.sent if e["type"] == "error"] == []
    assert len(session.responses) == 3


async def test_a_keypad_entry_is_one_user_item_and_one_response(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 200
    settings = relay_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    async with LocalRelay(settings) as relay:
        caller = make_caller(relay)
        await caller.connect()
        await caller.wait_for_audio(200, timeout=5)
        await caller.wait_idle(timeout=5)
        await caller.enter("4512#")
        assert await wait_for(lambda: len(sim.sessions[0].responses) == 2, timeout=5)
        await caller.wait_idle(timeout=5)
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
        assert await relay.runtime.store.flush(5)
        record = await relay.runtime.store.get_call(caller.call_sid)
    session = sim.sessions[0]
    typed = [item for item in session.items() if item["type"] == "message" and item["role"] == "user"]
    assert [item["text"] for item in typed] == ["The caller entered 4 5 1 2 #"]
    assert received_types(session).count("response.create") == 2  # the greeting's and the entry's
    assert record is not None
    dtmf = [e for e in record.entries if e["kind"] == "dtmf"]
    assert [(e["digits"], e["ended"]) for e in dtmf] == [("4512#", "terminator")]


async def test_a_keypad_entry_also_ends_after_a_pause(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 200
    agent = AgentSettings(dtmf=DtmfSettings(timeout_ms=300))
    async with LocalRelay(relay_settings(sim.url, agent=agent)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        await caller.wait_for_audio(200, timeout=5)
        await caller.wait_idle(timeout=5)
        await caller.enter("42", gap_s=0.1)
        assert await wait_for(lambda: len(sim.sessions[0].responses) == 2, timeout=5)
        await caller.hangup()
    typed = [item["text"] for item in sim.sessions[0].items() if item.get("role") == "user"]
    assert typed == ["The caller entered 4 2"]


async def test_a_key_press_interrupts_the_greeting_at_what_the_caller_heard(
    sim: RealtimeSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    sim.config.realtime_factor = 1.0  # the greeting is still being generated at the key press
    sim.config.greeting_reply_ms = 8000
    sim.config.reply_ms = 300
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(1500, timeout=5)
        await caller.press("1")
        assert await wait_for(lambda: any(kind == "clear" for _, kind, _ in caller.events), timeout=5)
        heard_ms = caller.played_bytes / ulaw.ULAW_BYTES_PER_MS
        assert await wait_for(lambda: bool(sim.sessions[0].truncates), timeout=5)
        await caller.press("#")
        assert await wait_for(lambda: len(sim.sessions[0].responses) == 2, timeout=5)
        await caller.wait_idle(timeout=5)
        await caller.hangup()
    session = sim.sessions[0]
    truncate = session.truncates[0]
    assert abs(truncate["audio_end_ms"] - heard_ms) <= 20, (truncate, heard_ms)
    assert truncate["ok"]
    # no server VAD saw a key press: the relay cancelled the greeting itself, exactly once
    assert received_types(session).count("response.cancel") == 1
    assert session.responses[0]["status_details"]["reason"] == "client_cancelled"
    assert [e for e in session.sent if e["type"] == "error"] == []
    assert relay_warnings(caplog) == []


async def test_tampered_webhook_and_stream_are_refused_before_any_realtime_session(
    sim: RealtimeSimulator, relay: LocalRelay
) -> None:
    # a webhook whose form was changed after signing
    caller = make_caller(relay)
    form = caller.webhook_form()
    url = relay.base_url + "/incoming-call"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    import httpx

    async with httpx.AsyncClient() as http:
        ok = await http.post(url, data=form, headers={"X-Twilio-Signature": signature})
        assert ok.status_code == 200 and "<Connect><Stream" in ok.text
        tampered = await http.post(
            url, data={**form, "From": "+15559999999"}, headers={"X-Twilio-Signature": signature}
        )
        assert tampered.status_code == 403
        other_url = await http.post(url + "?x=1", data=form, headers={"X-Twilio-Signature": signature})
        assert other_url.status_code == 403
        unsigned = await http.post(url, data=form)
        assert unsigned.status_code == 403
    stream = caller.parse_twiml(ok.text)

    # a stream token minted for another call, a forged one, an expired one, none at all
    numbers = {"caller": stream.parameters["from"], "called": stream.parameters["to"]}
    other = mint_stream_token(b"test-stream-secret-0123456789", "CA" + "9" * 32, 60, **numbers)
    expired = mint_stream_token(b"test-stream-secret-0123456789", caller.call_sid, -5, **numbers)
    forged = stream.parameters["token"][:-4] + "AAAA"
    for token in (other, expired, forged, ""):
        bad = make_caller(relay, call_sid=caller.call_sid)
        await bad.connect(stream, parameters_override={**stream.parameters, "token": token})
        assert await bad.wait_closed(timeout=5) == 1008
    # a wrong signature on the upgrade request
    wrong_sig = make_caller(relay, call_sid=caller.call_sid, auth_token="not-the-token")
    await wrong_sig.connect(stream)
    assert await wrong_sig.wait_closed(timeout=5) == 1008
    assert sim.connections == 0

    # the genuine stream works, once; replaying its token is refused
    good = make_caller(relay, call_sid=caller.call_sid)
    await good.connect(stream)
    assert await good.wait_for_audio(100, timeout=5)
    replay = make_caller(relay, call_sid=caller.call_sid)
    await replay.connect(stream)
    assert await replay.wait_closed(timeout=5) == 1008
    await good.hangup()
    assert sim.connections == 1


async def test_socket_without_start_is_closed(sim: RealtimeSimulator, relay: LocalRelay) -> None:
    async with websockets.connect(relay.base_url.replace("http", "ws") + "/media-stream") as ws:
        await ws.send(orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode())
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert sim.connections == 0


async def test_malformed_frames_are_skipped_and_the_call_continues(
    sim: RealtimeSimulator, relay: LocalRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caller = make_caller(relay)
    await caller.connect()
    assert await caller.wait_for_audio(100, timeout=5)
    ws = caller._ws
    assert ws is not None
    for junk in [
        "{not json",
        "[1,2]",
        '{"event":"media","media":{"payload":"***"}}',
        '{"event":"media","media":"x"}',
        '{"event":"dtmf","dtmf":{"digit":"X"}}',
        '{"event":"brand_new","foo":1}',
        '{"event":"mark","mark":{"name":"9999.1"}}',
    ]:
        await ws.send(junk)
    before = sim.sessions[0].append_count
    assert await wait_for(lambda: sim.sessions[0].append_count > before + 10, timeout=5)
    await caller.hangup()
    warnings = [r for r in caplog.records if "malformed Twilio frame" in r.getMessage()]
    assert len(warnings) == 5
    assert all(getattr(r, "call_sid", "") == caller.call_sid for r in warnings)
    assert sim.sessions[0].appended == caller.sent_payloads


async def test_twenty_concurrent_calls_keep_every_frame_in_order(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 1000
    sim.config.reply_ms = 600
    async with LocalRelay(relay_settings(sim.url)) as relay:
        callers = [make_caller(relay) for _ in range(20)]
        await asyncio.gather(*(c.connect() for c in callers))

        async def converse(c: Any, seed: int) -> None:
            await c.wait_for_audio(1000, timeout=10)
            await c.wait_idle(timeout=10)
            await c.say_and_wait(ulaw.synth_speech(500, seed=seed) + ulaw.silence(700))
            await c.wait_for_audio(1600, timeout=10)
            await c.wait_idle(timeout=10)
            await c.hangup()

        await asyncio.gather(*(converse(c, i) for i, c in enumerate(callers)))
        assert await wait_for(lambda: not relay.runtime.calls, timeout=10)
    by_call = {s.query.get("x") or i: s for i, s in enumerate(sim.sessions)}
    assert len(by_call) == 20
    appended = sorted(tuple(s.appended) for s in sim.sessions)
    sent = sorted(tuple(c.sent_payloads) for c in callers)
    assert appended == sent
    deltas = sorted(tuple(sent_audio(sim, i)) for i in range(20))
    heard = sorted(tuple(c.received_payloads) for c in callers)
    assert deltas == heard
    assert all(len(c.received_payloads) > 10 for c in callers)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_hundred_calls_leave_no_tasks_or_sockets(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 100
    sim.config.record_audio = False
    async with LocalRelay(relay_settings(sim.url)) as relay:

        async def one_call(hang_up: bool) -> None:
            caller = make_caller(relay)
            await caller.connect()
            await caller.wait_for_audio(60, timeout=10)
            if hang_up:
                await caller.hangup()
            else:  # the caller's socket just goes away, without a stop message
                assert caller._ws is not None
                await caller._ws.close()
                await caller.wait_closed(timeout=5)

        await one_call(True)
        await asyncio.sleep(0.2)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        fds_before = _open_fds()
        for _ in range(5):
            await asyncio.gather(*(one_call(i % 2 == 0) for i in range(20)))
        assert await wait_for(lambda: not relay.runtime.calls, timeout=10)
        await asyncio.sleep(0.3)
        gc.collect()
        assert len(asyncio.all_tasks()) <= tasks_before
        assert _open_fds() <= fds_before + 2
        assert not sim.active_sessions()
        assert sim.connections == 101


async def test_realtime_close_ends_the_call_cleanly_when_it_cannot_come_back(sim: RealtimeSimulator) -> None:
    async with LocalRelay(relay_settings(sim.url, reconnect_attempts=0)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(100, timeout=5)
        await sim.drop_all()
        assert await caller.wait_closed(timeout=5) == 1000
        assert await wait_for(lambda: not relay.runtime.calls)
        record = await relay.runtime.store.get_call(caller.call_sid)
        assert record is not None and record.meta["end_reason"] == "realtime_unavailable"


async def test_fatal_realtime_error_is_not_retried(sim: RealtimeSimulator) -> None:
    sim.config.expected_api_key = "sk-some-other-key-000000"
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_closed(timeout=5) == 1000
        assert await wait_for(lambda: not relay.runtime.calls)
        record = await relay.runtime.store.get_call(caller.call_sid)
        assert record is not None
        assert record.meta["end_reason"] == "realtime_error:invalid_api_key"
    assert sim.connections == 1
    assert API_KEY not in str(record.to_json())


def test_payload_string_is_never_decoded_on_the_way() -> None:
    """Non-canonical but valid base64 (padding bits set) would change if decoded and re-encoded."""
    odd = "/////x=="  # decodes to 4 bytes; canonical re-encoding is "/////w=="
    assert base64.b64encode(base64.b64decode(odd)).decode() != odd
    from relay.realtime import client

    assert orjson.loads(client.append_audio(odd))["audio"] == odd


async def test_a_failing_side_task_is_logged_with_the_call_at_once_and_the_call_goes_on(
    sim: RealtimeSimulator, relay: LocalRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caller = make_caller(relay)
    await caller.connect()
    assert await caller.wait_for_audio(300, timeout=10)
    bridge = relay.runtime.calls[caller.call_sid]

    async def broken() -> None:
        raise RuntimeError("a bug in a side task")

    with caplog.at_level(logging.ERROR, logger="relay.bridge"):
        bridge._spawn(broken(), "broken")
        assert await wait_for(lambda: any("task broken" in r.getMessage() for r in caplog.records), timeout=5)
    (line,) = [r for r in caplog.records if "task broken" in r.getMessage()]
    assert line.call_sid == caller.call_sid  # type: ignore[attr-defined]
    assert line.exc_info is not None and str(line.exc_info[1]) == "a bug in a side task"
    await caller.wait_idle(timeout=10)
    await caller.say_and_wait(ulaw.synth_speech(400) + ulaw.silence(700))
    heard = caller.played_bytes
    assert await caller.wait_for_audio(heard // 8 + 300, timeout=10)  # still answered
    await caller.hangup()


async def test_a_failing_effect_costs_that_effect_and_the_call_goes_on(
    sim: RealtimeSimulator, relay: LocalRelay, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in performing one effect (here: the store refuses every usage report) is logged with
    the call and skipped; the Realtime session and the call go on."""

    def broken(call_sid: str, usage: dict[str, int]) -> None:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(relay.runtime.store, "add_usage", broken)
    caller = make_caller(relay)
    with caplog.at_level(logging.ERROR, logger="relay.bridge"):
        await caller.connect()
        assert await caller.wait_for_audio(300, timeout=10)  # the greeting
        await caller.wait_idle(timeout=10)
        await caller.say_and_wait(ulaw.synth_speech(400) + ulaw.silence(700))
        heard = caller.played_bytes
        assert await caller.wait_for_audio(heard // 8 + 300, timeout=10)  # still answered
        await caller.wait_idle(timeout=10)
        assert len(sim.sessions) == 1  # the same session all along
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls, timeout=5)
    lines = [r for r in caplog.records if r.getMessage().startswith("effect UsageReport failed")]
    assert [r.getMessage() for r in lines] == ["effect UsageReport failed; skipped"] * 2  # greeting, answer
    assert lines[0].call_sid == caller.call_sid  # type: ignore[attr-defined]
    assert lines[0].exc_info is not None and str(lines[0].exc_info[1]) == "a bug in the store"
    assert not lines[1].exc_info  # the traceback once per kind
