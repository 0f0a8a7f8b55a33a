"""The simulated caller must look exactly like Twilio to the relay, or every other test lies.

A tiny Twilio-facing fake relay (Starlette on a real uvicorn socket) checks signatures with
twilio's own RequestValidator, answers with TwiML from twilio's VoiceResponse, and lets each
test drive the stream side by hand: send audio, marks, ``clear``, or hang up.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Start, VoiceResponse
from websockets.exceptions import InvalidStatus

from relay.sim.caller import CallClosed, CallerConfig, CallRejected, SimulatedCaller, TwimlStream
from relay.sim.caller.clock import MAX_BURST_FRAMES, Pacer
from relay.sim.ulaw import FRAME_BYTES, FRAME_MS, ULAW_BYTES_PER_MS, read_wav, synth_speech

AUTH_TOKEN = "12345678901234567890123456789012"
PUBLIC_URL = "https://relay.example.com"
STREAM_URL = "wss://relay.example.com/media-stream"
TICK_S = FRAME_MS / 1000
SLACK_S = 0.05  # scheduling noise allowed on top of one tick; never a tight timing assert


def assistant_audio(ms: int, seed: int = 0) -> bytes:
    """Recognisable relay audio that never contains 0xFF/0x7F, so it can be found in `heard`."""
    return bytes(1 + (i * 7 + seed) % 120 for i in range(ms * ULAW_BYTES_PER_MS))


@dataclass
class FakeRelay:
    """What the relay saw, and a handle to answer the caller from the test."""

    base_url: str = ""
    tamper: dict[str, str] = field(default_factory=dict)
    webhooks: list[tuple[dict[str, str], bool]] = field(default_factory=list)
    upgrade_signature_ok: bool | None = None
    inbox: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    ws: WebSocket | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    disconnect_code: int | None = None
    stream_sid: str = ""
    refuse_with: int | None = None  # close code to answer the upgrade with, before any message

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_text(orjson.dumps({**message, "streamSid": self.stream_sid}).decode())

    async def play(self, audio: bytes, mark: str | None = None) -> None:
        await self.send({"event": "media", "media": {"payload": base64.b64encode(audio).decode()}})
        if mark is not None:
            await self.send({"event": "mark", "mark": {"name": mark}})

    def messages(self, event: str | None = None) -> list[dict[str, Any]]:
        return [m for _, m in self.inbox if event is None or m.get("event") == event]

    def echoed_marks(self) -> list[str]:
        return [m["mark"]["name"] for m in self.messages("mark")]


def build_app(fake: FakeRelay) -> Starlette:
    validator = RequestValidator(AUTH_TOKEN)

    async def incoming_call(request: Request) -> Response:
        # Parsed by hand: python-multipart (Request.form) is not a project dependency.
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        form.update(fake.tamper)  # a man in the middle rewriting a field
        signature = request.headers.get("X-Twilio-Signature", "")
        ok = validator.validate(PUBLIC_URL + "/incoming-call", form, signature)
        fake.webhooks.append((form, ok))
        if not ok:
            return Response("invalid signature", status_code=403)
        response = VoiceResponse()
        connect = Connect()
        stream = connect.stream(url=STREAM_URL)
        stream.parameter(name="token", value="tok-" + form["CallSid"])
        stream.parameter(name="from", value=form["From"])
        response.append(connect)
        return Response(str(response), media_type="text/xml")

    async def media_stream(ws: WebSocket) -> None:
        signature = ws.headers.get("x-twilio-signature", "")
        fake.upgrade_signature_ok = validator.validate(STREAM_URL, {}, signature)
        if fake.refuse_with == 403:
            await ws.close(code=1008)  # before accept: uvicorn answers the upgrade with HTTP 403
            return
        await ws.accept()
        fake.ws = ws
        if fake.refuse_with is not None:
            await ws.close(code=fake.refuse_with)
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                fake.disconnect_code = message.get("code")
                break
            data = orjson.loads(message["text"])
            fake.inbox.append((time.monotonic(), data))
            if data.get("event") == "start":
                fake.stream_sid = data["streamSid"]
                fake.started.set()
        fake.ended.set()

    routes = [
        Route("/incoming-call", incoming_call, methods=["POST"]),
        WebSocketRoute("/media-stream", media_stream),
    ]
    return Starlette(routes=routes)


@pytest.fixture
async def relay() -> AsyncIterator[FakeRelay]:
    fake = FakeRelay()
    config = uvicorn.Config(
        build_app(fake), host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="websockets-sansio"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, 5)
    port = server.servers[0].sockets[0].getsockname()[1]
    fake.base_url = f"http://127.0.0.1:{port}"
    yield fake
    server.should_exit = True
    await task


def caller_for(relay: FakeRelay, **overrides: Any) -> SimulatedCaller:
    options: dict[str, Any] = {"base_url": relay.base_url, "auth_token": AUTH_TOKEN, "public_url": PUBLIC_URL}
    options.update(overrides)
    return SimulatedCaller(CallerConfig(**options))


async def eventually(condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
    """Poll a condition the test cannot await directly (the fake relay's view of the call)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.005) + 1):
        if condition():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    assert condition(), "condition not reached in time"


def event_times(caller: SimulatedCaller, kind: str, **match: Any) -> list[float]:
    return [
        t
        for t, k, details in caller.events
        if k == kind and all(details.get(name) == value for name, value in match.items())
    ]


async def assert_no_new_tasks(before: set[asyncio.Task[Any]]) -> None:
    """Every task born during the call (caller's and websockets') must be gone after it."""
    current = asyncio.current_task()
    leftover: set[asyncio.Task[Any]] = set()
    for _ in range(100):
        leftover = {t for t in asyncio.all_tasks() if t not in before and t is not current}
        if not leftover:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"tasks still running after the call: {sorted(t.get_name() for t in leftover)}")


def played_audio(heard: bytearray) -> bytes:
    return bytes(heard).replace(b"\xff", b"")


# ---------------------------------------------------------------------------- webhook and TwiML


async def test_webhook_signature_covers_public_url_and_every_param(relay: FakeRelay) -> None:
    caller = caller_for(relay, extra_form={"FromCountry": "US"})
    status, body = await caller.webhook()
    assert status == 200, body
    form, ok = relay.webhooks[-1]
    assert ok
    assert form == {
        "CallSid": caller.call_sid,
        "AccountSid": caller.config.account_sid,
        "From": "+15550001111",
        "To": "+15550002222",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
        "Caller": "+15550001111",
        "Called": "+15550002222",
        "FromCountry": "US",
    }
    assert caller.call_sid.startswith("CA") and len(caller.call_sid) == 34
    assert SimulatedCaller.parse_twiml(body) == TwimlStream(
        url=STREAM_URL, parameters={"token": "tok-" + caller.call_sid, "from": "+15550001111"}
    )

    relay.tamper = {"FromCountry": "CA"}
    assert (await caller.webhook())[0] == 403
    relay.tamper = {}
    assert (await caller_for(relay, auth_token="0" * 32).webhook())[0] == 403
    # Signed over the internal address instead of the one Twilio "called": refused.
    assert (await caller_for(relay, public_url=None).webhook())[0] == 403
    assert [ok for _, ok in relay.webhooks] == [True, False, False, False]

    with pytest.raises(CallRejected) as rejected:
        await caller_for(relay, auth_token="0" * 32).connect()
    assert rejected.value.status == 403


def test_parse_twiml_needs_a_bidirectional_stream() -> None:
    fork_only = VoiceResponse()
    start = Start()
    start.stream(url=STREAM_URL)
    fork_only.append(start)
    say_only = VoiceResponse()
    say_only.say("hello")
    not_response = "<Other><Connect><Stream url='wss://x/y'/></Connect></Other>"
    for body in (str(fork_only), str(say_only), "not xml <", not_response):
        with pytest.raises(ValueError):
            SimulatedCaller.parse_twiml(body)


# ---------------------------------------------------------------------------- the stream


async def test_stream_start_framing_and_pacing(relay: FakeRelay) -> None:
    before = asyncio.all_tasks()
    caller = caller_for(relay)
    speech = synth_speech(290, seed=3)
    await caller.connect()
    connected_at = time.monotonic()
    caller.say(speech)
    await asyncio.sleep(1.0)
    await caller.hangup()
    await caller.hangup()  # idempotent
    async with asyncio.timeout(2):
        await relay.ended.wait()

    assert relay.upgrade_signature_ok is True
    messages = relay.messages()
    assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert messages[1] == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": caller.config.account_sid,
            "streamSid": caller.stream_sid,
            "callSid": caller.call_sid,
            "tracks": ["inbound"],
            "customParameters": {"token": "tok-" + caller.call_sid, "from": "+15550001111"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": caller.stream_sid,
    }
    assert caller.stream_sid.startswith("MZ") and len(caller.stream_sid) == 34
    assert [m["sequenceNumber"] for m in messages[1:]] == [str(n) for n in range(1, len(messages))]
    assert messages[-1] == {
        "event": "stop",
        "sequenceNumber": str(len(messages) - 1),
        "streamSid": caller.stream_sid,
        "stop": {"accountSid": caller.config.account_sid, "callSid": caller.call_sid},
    }

    media = relay.messages("media")
    assert {m["streamSid"] for m in media} == {caller.stream_sid}
    assert [m["media"]["chunk"] for m in media] == [str(n) for n in range(1, len(media) + 1)]
    assert [m["media"]["timestamp"] for m in media] == [str(n * FRAME_MS) for n in range(len(media))]
    assert {m["media"]["track"] for m in media} == {"inbound"}
    payloads = [m["media"]["payload"] for m in media]
    assert payloads == caller.sent_payloads
    assert {len(p) for p in payloads} == {216}
    frames = [base64.b64decode(p) for p in payloads]
    assert {len(f) for f in frames} == {FRAME_BYTES}

    # The utterance goes out whole and in order, padded to a frame with silence.
    stream_audio = b"".join(frames)
    padded = speech + b"\xff" * (-len(speech) % FRAME_BYTES)
    offset = stream_audio.find(padded)
    assert offset >= 0 and offset % FRAME_BYTES == 0
    assert stream_audio[:offset] == b"\xff" * offset
    assert set(stream_audio[offset + len(padded) :]) == {0xFF}
    (speech_start,) = event_times(caller, "speech_start", index=0)
    (speech_end,) = event_times(caller, "speech_end", index=0)
    assert 0.2 <= speech_end - speech_start <= 0.4  # 15 frames: 14 ticks apart

    # ~50 frames/s, loosely: paced, not bursted, not starved.
    media_times = [t for t, m in relay.inbox if m["event"] == "media"]
    rate = (len(media_times) - 1) / (media_times[-1] - media_times[0])
    assert 40 <= rate <= 60, rate
    assert 40 <= len(media) / (time.monotonic() - connected_at) <= 60

    assert caller.close_code == 1000
    assert relay.disconnect_code == 1000
    assert event_times(caller, "closed", code=1000)
    assert caller.errors == []
    await assert_no_new_tasks(before)


async def test_marks_are_echoed_only_after_their_audio_played(relay: FakeRelay, tmp_path: Path) -> None:
    before = asyncio.all_tasks()
    caller = caller_for(relay)
    await caller.connect()
    started_at = time.monotonic()
    async with asyncio.timeout(2):
        await relay.started.wait()
    first, second = assistant_audio(200, seed=1), assistant_audio(100, seed=2)
    await relay.play(first, mark="a")
    await relay.play(second, mark="b")
    assert await caller.wait_for_audio(300, timeout=2)
    assert await caller.wait_idle(timeout=2)
    await eventually(lambda: relay.echoed_marks() == ["a", "b"], 1)
    await relay.send({"event": "mark", "mark": {"name": "c"}})  # nothing queued: echoed on the next tick
    await eventually(lambda: caller.marks_echoed == ["a", "b", "c"], 1)
    await caller.hangup()

    arrived = event_times(caller, "media_in")
    assert len(arrived) == 2 and arrived[1] - arrived[0] < TICK_S
    (echo_a,) = event_times(caller, "mark_echo", name="a")
    (echo_b,) = event_times(caller, "mark_echo", name="b")
    assert arrived[0] + 0.2 - TICK_S <= echo_a <= arrived[0] + 0.2 + TICK_S + SLACK_S
    assert arrived[1] + 0.3 - TICK_S <= echo_b <= arrived[1] + 0.3 + TICK_S + SLACK_S
    (queued_c,) = event_times(caller, "mark_in", name="c")
    (echo_c,) = event_times(caller, "mark_echo", name="c")
    assert queued_c <= echo_c <= queued_c + TICK_S + SLACK_S
    (playback_start,) = event_times(caller, "playback_start")
    assert arrived[0] <= playback_start <= arrived[0] + TICK_S + SLACK_S

    assert relay.echoed_marks() == ["a", "b", "c"]
    for message in relay.messages("mark"):
        assert set(message) == {"event", "sequenceNumber", "streamSid", "mark"}
        assert message["streamSid"] == caller.stream_sid
    assert caller.received_payloads == [base64.b64encode(first).decode(), base64.b64encode(second).decode()]

    # What was heard is exactly the relay's audio, on a wall-clock timeline of 20 ms frames.
    assert caller.played_bytes == len(first) + len(second)
    assert played_audio(caller.heard) == first + second
    assert len(caller.heard) % FRAME_BYTES == 0
    heard_s = len(caller.heard) / ULAW_BYTES_PER_MS / 1000
    assert abs(heard_s - (time.monotonic() - started_at)) <= 0.1

    recording = tmp_path / "call.wav"
    caller.write_recording(str(recording))
    assert recording.read_bytes()[:4] == b"RIFF" and recording.read_bytes()[8:12] == b"WAVE"
    assert read_wav(recording) == bytes(caller.heard)
    assert caller.errors == []
    await assert_no_new_tasks(before)


async def test_clear_discards_unplayed_audio_and_echoes_pending_marks_at_once(relay: FakeRelay) -> None:
    before = asyncio.all_tasks()
    caller = caller_for(relay)
    await caller.connect()
    async with asyncio.timeout(2):
        await relay.started.wait()
    await relay.play(assistant_audio(1000, seed=1), mark="x")
    await relay.play(assistant_audio(1000, seed=2), mark="y")
    assert await caller.wait_for_audio(200, timeout=2)
    await relay.send({"event": "clear"})
    await eventually(lambda: relay.echoed_marks() == ["x", "y"], 1)

    ((cleared_at, _, cleared),) = [e for e in caller.events if e[1] == "clear"]
    assert cleared["marks"] == ["x", "y"]
    played_at_clear = caller.played_bytes
    assert cleared["discarded_bytes"] == 2000 * ULAW_BYTES_PER_MS - played_at_clear
    assert 200 * ULAW_BYTES_PER_MS <= played_at_clear <= 600 * ULAW_BYTES_PER_MS
    for name in ("x", "y"):
        (echoed_at,) = event_times(caller, "mark_echo", name=name)
        assert cleared_at <= echoed_at <= cleared_at + SLACK_S  # at once, not after playback
    await asyncio.sleep(0.1)
    assert caller.played_bytes == played_at_clear

    # Playback carries on normally after a clear.
    after = assistant_audio(100, seed=3)
    await relay.play(after, mark="z")
    await eventually(lambda: relay.echoed_marks() == ["x", "y", "z"], 1)
    (arrived_after,) = event_times(caller, "media_in")[-1:]
    (echo_z,) = event_times(caller, "mark_echo", name="z")
    assert echo_z >= arrived_after + 0.1 - TICK_S
    await caller.hangup()

    assert caller.played_bytes == played_at_clear + len(after)
    heard = played_audio(caller.heard)
    assert heard == assistant_audio(1000, seed=1)[:played_at_clear] + after
    assert caller.errors == []
    await assert_no_new_tasks(before)


async def test_relay_hanging_up_ends_the_call_cleanly(relay: FakeRelay) -> None:
    before = asyncio.all_tasks()
    caller = caller_for(relay, sign_upgrade=False, keep_audio=False)
    await caller.connect(parameters_override={"token": "forged"})
    async with asyncio.timeout(2):
        await relay.started.wait()
    assert relay.upgrade_signature_ok is False
    assert relay.messages("start")[0]["start"]["customParameters"] == {"token": "forged"}

    speaking = asyncio.create_task(caller.say_and_wait(synth_speech(2000)))
    await asyncio.sleep(0.2)
    assert relay.ws is not None
    await relay.ws.close(code=4000)
    assert await caller.wait_closed(timeout=2) == 4000
    with pytest.raises(CallClosed):
        await speaking
    with pytest.raises(CallClosed):
        await caller.press("1")
    await caller.hangup()  # nothing left to hang up: no stop after the relay closed
    assert relay.messages("stop") == []
    assert caller.close_code == 4000
    assert event_times(caller, "closed", code=4000)
    assert len(relay.messages("media")) >= 5
    assert caller.sent_payloads == [] and caller.heard == bytearray()  # keep_audio=False
    await assert_no_new_tasks(before)


async def test_relay_refusing_the_stream(relay: FakeRelay) -> None:
    before = asyncio.all_tasks()
    relay.refuse_with = 403
    with pytest.raises(InvalidStatus):
        await caller_for(relay).connect()

    relay.refuse_with = 4403  # accepted, then closed at once (e.g. a bad stream token)
    caller = caller_for(relay)
    await caller.connect()
    assert await caller.wait_closed(timeout=2) == 4403
    await caller.hangup()
    assert relay.messages("stop") == []
    await assert_no_new_tasks(before)


async def test_dtmf_and_mouth_to_ear(relay: FakeRelay) -> None:
    before = asyncio.all_tasks()
    caller = caller_for(relay)
    assert await caller.wait_closed(timeout=0.01) is None
    await caller.connect()
    async with asyncio.timeout(2):
        await relay.started.wait()
    await caller.press("5")
    with pytest.raises(ValueError):
        await caller.press("x")

    await caller.say_and_wait(synth_speech(100, seed=1))
    await asyncio.sleep(0.1)  # the "model" thinks
    await relay.play(assistant_audio(100))
    assert await caller.wait_for_audio(100, timeout=2)
    await caller.say_and_wait(synth_speech(60, seed=2))  # never answered
    assert not await caller.wait_for_audio(200, timeout=0.1)
    await caller.hangup()

    (dtmf,) = relay.messages("dtmf")
    assert dtmf == {
        "event": "dtmf",
        "sequenceNumber": dtmf["sequenceNumber"],
        "streamSid": caller.stream_sid,
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    (latency,) = caller.mouth_to_ear_ms()
    assert 100 - 5 <= latency <= 100 + (TICK_S + SLACK_S) * 1000
    assert caller.errors == []
    await assert_no_new_tasks(before)


async def test_relay_messages_for_another_stream_are_refused(relay: FakeRelay) -> None:
    async with caller_for(relay) as caller:
        await caller.connect()
        async with asyncio.timeout(2):
            await relay.started.wait()
        assert relay.ws is not None
        foreign = {"event": "media", "streamSid": "MZwrong", "media": {"payload": "/////w=="}}
        await relay.ws.send_text(orjson.dumps(foreign).decode())
        await relay.send({"event": "surprise"})
        await eventually(lambda: bool(caller.errors) and bool(event_times(caller, "unknown")), 1)
    assert caller.close_code == 1000
    assert caller.received_payloads == [] and caller.played_bytes == 0
    assert "MZwrong" in caller.errors[0]


# ---------------------------------------------------------------------------- the clock


async def test_pacer_catches_up_without_a_long_burst_and_does_not_drift() -> None:
    epoch = time.monotonic()
    pacer = Pacer(epoch, TICK_S)
    for _ in range(5):
        assert await pacer.next_tick() == 0
    stall_until = time.monotonic() + 0.2  # block the loop for ten ticks, as a GC pause would
    while time.monotonic() < stall_until:
        pass
    burst = 0
    forgiven = 0
    while True:
        tick_began = time.monotonic()
        forgiven += await pacer.next_tick()
        if time.monotonic() - tick_began > TICK_S / 2:
            break
        burst += 1
    assert 1 <= burst <= MAX_BURST_FRAMES
    assert forgiven >= 5
    # After re-anchoring, ticks stay on the absolute grid: 25 more ticks take 0.5 s, not more.
    grid_start = time.monotonic()
    for _ in range(25):
        await pacer.next_tick()
    assert 0.45 <= time.monotonic() - grid_start <= 0.6
