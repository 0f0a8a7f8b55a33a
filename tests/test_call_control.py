"""Call control through Twilio's REST API: the real twilio client against a recording HTTP server
on loopback (no patched client methods), end_call after the goodbye's marks, transfers with <Dial>."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import httpx
import orjson
import pytest
import websockets
from conftest import AUTH_TOKEN, greeted, make_caller, relay_settings, wait_for
from tools_support import (
    ACCOUNT_SID,
    TWILIO_AUTH,
    TwilioApiRecorder,
    errors_sent,
    function_calls_sent,
    only_session,
    outputs,
    received,
)
from twilio.base.exceptions import TwilioRestException

from relay.agent_settings import AgentSettings
from relay.config import Settings
from relay.runtime import WHISPER_TTL_S, Runtime
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig
from relay.twilio import twiml
from relay.twilio.rest import TwilioControl

CALL_SID = "CA" + "fedcba9876543210" * 2
XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>'
STREAM_SECRET = b"test-stream-secret-0123456789"  # conftest.relay_settings


# ---- the REST requests themselves ------------------------------------------------------------------


async def test_hangup_and_redirect_send_exactly_what_twilio_expects() -> None:
    with TwilioApiRecorder() as api:
        control = TwilioControl(ACCOUNT_SID, TWILIO_AUTH, api_base=api.url)
        await control.hangup(CALL_SID)
        twiml = f"{XML_DECL}<Response><Dial><Number>+15550003333</Number></Dial></Response>"
        await control.redirect(CALL_SID, twiml)
    hangup, redirect = api.requests
    for request in (hangup, redirect):
        assert request.method == "POST"
        assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"
        assert request.basic_auth == (ACCOUNT_SID, TWILIO_AUTH)
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert request.headers["user-agent"].startswith("twilio-python/")
    assert hangup.form == {"Status": ["completed"]}
    assert hangup.body == b"Status=completed"
    assert redirect.form == {"Twiml": [twiml]}


async def test_rest_client_is_rebased_from_the_environment_and_errors_surface() -> None:
    with TwilioApiRecorder() as api:
        env = {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": TWILIO_AUTH,
            "TWILIO_API_BASE": api.url,
        }
        runtime = Runtime(Settings.from_env(env))
        assert runtime.twilio_control is not None
        await runtime.twilio_control.hangup(CALL_SID)
        assert [r.path for r in api.requests] == [api.calls_path(CALL_SID)]
        api.status = 404
        with pytest.raises(TwilioRestException) as info:
            await runtime.twilio_control.hangup(CALL_SID)
        assert info.value.status == 404
    # no account SID: no REST control at all (tools that need it fail cleanly)
    assert Runtime(Settings.from_env({"TWILIO_AUTH_TOKEN": TWILIO_AUTH})).twilio_control is None


async def test_rest_calls_never_block_the_event_loop() -> None:
    with TwilioApiRecorder() as api:
        api.delay_s = 0.5
        control = TwilioControl(ACCOUNT_SID, TWILIO_AUTH, api_base=api.url)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await control.hangup(CALL_SID)
        task.cancel()
    assert ticks >= 25  # the loop kept running during the 0.5 s request


# ---- end_call ------------------------------------------------------------------------------------


def control_settings(sim: RealtimeSimulator, api: TwilioApiRecorder, **overrides: Any) -> Settings:
    return relay_settings(sim.url, twilio_account_sid=ACCOUNT_SID, twilio_api_base=api.url, **overrides)


def control_sim(calls: list[tuple[str, str]], **config: Any) -> RealtimeSimulator:
    config.setdefault("realtime_factor", 8.0)
    config.setdefault("greeting_reply_ms", 200)
    config.setdefault("reply_ms", 300)
    return RealtimeSimulator(SimConfig(function_calls_on_text={"entered 5 #": calls}, **config))


async def end_reason(relay: LocalRelay, call_sid: str) -> str:
    assert await wait_for(lambda: call_sid not in relay.runtime.calls, timeout=5)
    record = await relay.runtime.store.get_call(call_sid)
    assert record is not None
    return str(record.meta["end_reason"])


async def test_end_call_hangs_up_only_after_the_goodbye_has_played() -> None:
    goodbye_ms = 800
    sim = control_sim([("end_call", '{"reason": "caller said bye"}')], speech_before_calls_ms=goodbye_ms)
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, end_call_mark_timeout_s=5.0)) as relay:
                caller = await greeted(relay)
                await caller.enter("5#")
                pressed_at = time.monotonic()
                assert await caller.wait_closed(timeout=8) == 1000
                reason = await end_reason(relay, caller.call_sid)
            session = only_session(sim)
            assert await wait_for(lambda: session.closed, timeout=5)
    finally:
        await sim.stop()
    (hangup,) = api.requests
    assert hangup.method == "POST"
    assert hangup.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json"
    assert hangup.form == {"Status": ["completed"]}
    assert hangup.basic_auth == (ACCOUNT_SID, AUTH_TOKEN)
    # the goodbye was sent, played and acknowledged in full before the hang-up
    marks_in = [d["name"] for _, kind, d in caller.events if kind == "mark_in"]
    echoes = [(t, d["name"]) for t, kind, d in caller.events if kind == "mark_echo"]
    assert [name for _, name in echoes] == marks_in
    last_echo = echoes[-1][0]
    assert last_echo <= hangup.at
    assert caller.played_bytes >= (200 + goodbye_ms) * ulaw.ULAW_BYTES_PER_MS
    assert hangup.at - pressed_at >= goodbye_ms / 1000
    # ... and the relay did not sit on the mark timeout once the last mark came back
    assert hangup.at - last_echo < 1.0
    assert reason == "assistant_ended"
    # the Realtime session is closed; nothing more was asked of the model after end_call
    assert function_calls_sent(session)[0]["arguments"] == '{"reason": "caller said bye"}'
    assert outputs(session) == []
    assert [e["type"] for e in received(session)].count("response.create") == 2
    assert errors_sent(session) == []


class SilentPhone:
    """A Twilio stream that plays nothing: it streams caller frames but never echoes a mark."""

    def __init__(self, relay: LocalRelay) -> None:
        self.relay = relay
        self.caller = make_caller(relay)
        self.ws: Any = None
        self.media_in = 0
        self.marks_in = 0
        self.frame_times: list[float] = []
        self.close_code: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stream_sid = "MZ" + "ab" * 16

    async def connect(self) -> None:
        status, body = await self.caller.webhook()
        assert status == 200
        stream = self.caller.parse_twiml(body)
        self.ws = await websockets.connect(self.relay.base_url.replace("http", "ws") + "/media-stream")
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": self.stream_sid,
                "start": {
                    "streamSid": self.stream_sid,
                    "accountSid": ACCOUNT_SID,
                    "callSid": self.caller.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": stream.parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
        self._tasks = [asyncio.create_task(self._microphone()), asyncio.create_task(self._receive())]

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def _microphone(self) -> None:
        payload = base64.b64encode(ulaw.silence(20)).decode()
        chunk = 0
        with_closed = (websockets.ConnectionClosed,)
        try:
            while True:
                chunk += 1
                await self._send(
                    {
                        "event": "media",
                        "sequenceNumber": str(chunk + 1),
                        "streamSid": self.stream_sid,
                        "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20),
                                  "payload": payload},
                    }
                )  # fmt: skip
                await asyncio.sleep(0.02)
        except with_closed:
            pass

    async def _receive(self) -> None:
        try:
            async for raw in self.ws:
                event = orjson.loads(raw)["event"]
                self.media_in += event == "media"
                self.marks_in += event == "mark"
        except websockets.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code

    async def press(self, digit: str) -> None:
        await self._send(
            {"event": "dtmf", "sequenceNumber": "0", "streamSid": self.stream_sid,
             "dtmf": {"track": "inbound_track", "digit": digit}}
        )  # fmt: skip

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ws.close()


async def test_end_call_hangs_up_after_the_timeout_when_marks_never_come() -> None:
    timeout_s = 0.8
    sim = control_sim([("end_call", "{}")], speech_before_calls_ms=600)
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, end_call_mark_timeout_s=timeout_s)) as relay:
                phone = SilentPhone(relay)
                await phone.connect()
                assert await wait_for(lambda: phone.marks_in > 0, timeout=5)  # the greeting arrived
                await phone.press("5")
                await phone.press("#")
                pressed_at = time.monotonic()
                assert await wait_for(lambda: api.requests, timeout=5)
                assert await wait_for(lambda: phone.close_code is not None, timeout=5)
                reason = await end_reason(relay, phone.caller.call_sid)
                await phone.close()
    finally:
        await sim.stop()
    (hangup,) = api.requests
    assert hangup.form == {"Status": ["completed"]}
    assert hangup.path == api.calls_path(phone.caller.call_sid)
    waited = hangup.at - pressed_at
    assert timeout_s <= waited < timeout_s + 1.5, waited
    assert phone.close_code == 1000
    assert reason == "assistant_ended"
    assert sim.sessions[0].closed


async def test_end_call_without_rest_credentials_still_ends_the_stream() -> None:
    sim = control_sim([("end_call", "{}")])
    await sim.start()
    try:
        async with LocalRelay(relay_settings(sim.url, end_call_mark_timeout_s=1.0)) as relay:
            assert relay.runtime.twilio_control is None
            caller = await greeted(relay)
            await caller.enter("5#")
            assert await caller.wait_closed(timeout=5) == 1000
            assert await end_reason(relay, caller.call_sid) == "assistant_ended"
    finally:
        await sim.stop()


# ---- transfer_call --------------------------------------------------------------------------------

BILLING = "+15550003333"


def whisper_sig(text: str, expires: str) -> str:
    mac = hmac.new(STREAM_SECRET, f"whisper:{expires}:".encode() + text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


async def test_transfer_dials_the_profile_number() -> None:
    sim = control_sim([("transfer_call", '{"destination": "billing", "reason": "invoice question"}')])
    agent = AgentSettings(transfer_numbers={"billing": BILLING, "sales": "+15550004444"})
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, agent=agent)) as relay:
                caller = await greeted(relay)
                await caller.enter("5#")
                assert await caller.wait_closed(timeout=5) == 1000
                reason = await end_reason(relay, caller.call_sid)
    finally:
        await sim.stop()
    (redirect,) = api.requests
    assert redirect.method == "POST"
    assert redirect.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json"
    assert redirect.basic_auth == (ACCOUNT_SID, AUTH_TOKEN)
    assert redirect.form == {"Twiml": [f"{XML_DECL}<Response><Dial><Number>{BILLING}</Number></Dial></Response>"]}
    assert reason == "transferred"
    session = only_session(sim)
    # the model was told which destinations exist on this number
    tools = {t["name"]: t for t in received(session)[0]["session"]["tools"]}
    assert tools["transfer_call"]["parameters"]["properties"]["destination"]["enum"] == ["billing", "sales"]
    assert session.closed


async def test_an_invented_number_is_refused_and_the_call_goes_on() -> None:
    sim = control_sim([("transfer_call", '{"destination": "+15559999999"}')])
    agent = AgentSettings(transfer_numbers={"billing": BILLING})
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, agent=agent)) as relay:
                caller = await greeted(relay)
                heard = caller.played_bytes
                await caller.enter("5#")
                session = only_session(sim)
                assert await wait_for(lambda: outputs(session), timeout=5)
                assert await caller.wait_for_audio(heard // 8 + 300, timeout=5)
                assert caller.close_code is None and relay.runtime.calls
                await caller.hangup()
    finally:
        await sim.stop()
    assert api.requests == []
    output = orjson.loads(outputs(session)[0]["output"])
    assert output == {
        "error": {
            "type": "tool_error",
            "message": "unknown destination '+15559999999'; available destinations: billing",
        }
    }


async def test_any_number_when_the_profile_allows_it() -> None:
    sim = control_sim([("transfer_call", '{"destination": "+15559999999"}')])
    agent = AgentSettings(allow_any_transfer_number=True)
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, agent=agent)) as relay:
                caller = await greeted(relay)
                await caller.enter("5#")
                assert await caller.wait_closed(timeout=5) == 1000
                assert await end_reason(relay, caller.call_sid) == "transferred"
    finally:
        await sim.stop()
    (redirect,) = api.requests
    assert redirect.form == {"Twiml": [f"{XML_DECL}<Response><Dial><Number>+15559999999</Number></Dial></Response>"]}


async def test_transfer_with_a_whisper_for_the_human() -> None:
    sim = control_sim([("transfer_call", '{"destination": "billing", "reason": "invoice question"}')])
    agent = AgentSettings(transfer_numbers={"billing": BILLING}, whisper_summary=True)
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, agent=agent)) as relay:
                caller = await greeted(relay)
                bridge = relay.runtime.calls[caller.call_sid]
                assert bridge.call is not None
                bridge.call.summary = "Caller Ann asks why invoice 7 was charged twice."
                await caller.enter("5#")
                assert await caller.wait_closed(timeout=5) == 1000
                (redirect,) = api.requests
                twiml = redirect.form["Twiml"][0]
                text = "Incoming transfer. invoice question. Caller Ann asks why invoice 7 was charged twice."
                number = ET.fromstring(twiml).find("./Dial/Number")
                assert number is not None
                expires = parse_qs(urlsplit(number.get("url", "")).query)["expires"][0]
                assert time.time() + 290 < int(expires) <= time.time() + 300  # valid for five minutes
                sig = whisper_sig(text, expires)
                url = f"{relay.base_url}/transfer-whisper?text={quote_plus(text)}&expires={expires}&sig={sig}"
                escaped = url.replace("&", "&amp;")
                assert twiml == (
                    f'{XML_DECL}<Response><Dial><Number method="POST" url="{escaped}">{BILLING}</Number>'
                    "</Dial></Response>"
                )
                assert number.get("url") == url
                # Twilio fetches the whisper URL when the human answers: it says the text to them
                async with httpx.AsyncClient() as http:
                    whisper = await http.post(url)
                    assert whisper.status_code == 200
                    assert whisper.headers["content-type"].startswith("application/xml")
                    assert whisper.text == f"{XML_DECL}<Response><Say>{text}</Say></Response>"
                    query = parse_qs(urlsplit(url).query)
                    forged = {"text": "Transfer: give this caller a full refund.", "expires": expires, "sig": sig}
                    assert (await http.post(f"{relay.base_url}/transfer-whisper", params=forged)).status_code == 403
                    bad_sig = {"text": text, "expires": expires, "sig": query["sig"][0][:-2] + "AA"}
                    assert (await http.post(f"{relay.base_url}/transfer-whisper", params=bad_sig)).status_code == 403
                    unsigned = await http.get(f"{relay.base_url}/transfer-whisper", params={"text": text})
                    assert unsigned.status_code == 403
    finally:
        await sim.stop()


async def test_whisper_urls_expire_and_refuse_any_altered_part() -> None:
    text = "Incoming transfer. Caller Ann asks about invoice 7."
    async with LocalRelay(relay_settings("ws://127.0.0.1:9")) as relay:
        runtime = relay.runtime

        def parts(url: str | None) -> dict[str, str]:
            assert url is not None and url.startswith(f"{relay.base_url}/transfer-whisper?")
            return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}

        async with httpx.AsyncClient() as http:

            async def status(params: dict[str, str]) -> int:
                return (await http.post(f"{relay.base_url}/transfer-whisper", params=params)).status_code

            fresh = parts(runtime.whisper_url(text))
            assert sorted(fresh) == ["expires", "sig", "text"]
            answer = await http.post(f"{relay.base_url}/transfer-whisper", params=fresh)
            assert answer.status_code == 200
            assert answer.text == f"{XML_DECL}<Response><Say>{text}</Say></Response>"
            # minted WHISPER_TTL_S + 1 seconds ago: its five minutes are over
            stale = parts(runtime.whisper_url(text, now=time.time() - WHISPER_TTL_S - 1))
            assert await status(stale) == 403
            assert await status({**fresh, "text": text + " Give them a refund."}) == 403
            assert await status({**fresh, "expires": str(int(fresh["expires"]) + 3600)}) == 403
            assert await status({**fresh, "sig": ""}) == 403
            assert await status({"text": text, "sig": fresh["sig"]}) == 403  # no expiry at all
            # other spellings of the same instant (a lax int() would accept them all)
            digits = fresh["expires"]
            arabic_indic = digits.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
            for spelling in ("0" + digits, "+" + digits, f" {digits}", f"{digits} ", f"{digits}\n", arabic_indic):
                assert await status({**fresh, "expires": spelling}) == 403, spelling
            assert await status(fresh) == 200  # still valid: nothing above was a replay counter


async def test_the_whisper_is_a_few_sentences_of_this_call_only() -> None:
    sim = control_sim([("transfer_call", '{"destination": "billing", "reason": "invoice question"}')])
    agent = AgentSettings(transfer_numbers={"billing": BILLING}, whisper_summary=True)
    memory = "Caller Ann is a VIP customer with a disputed loan. She lives at 12 Elm Street."
    details = [f"She also mentioned detail {i:02d} of her account." for i in range(12)]
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            async with LocalRelay(control_settings(sim, api, agent=agent, caller_memory=True)) as relay:
                relay.runtime.store.set_caller_memory("+15550001111", memory)
                caller = await greeted(relay, from_number="+15550001111")
                bridge = relay.runtime.calls[caller.call_sid]
                assert bridge.call is not None
                assert bridge.caller_memory == memory  # the model was given it for this call
                # the model's summary repeats the notes from earlier calls and goes on for too long
                repeated = "Caller Ann is a VIP customer with a disputed loan."
                bridge.call.summary = " ".join([repeated, "Ann asks why invoice 7 was charged twice.", *details])
                await caller.enter("5#")
                assert await caller.wait_closed(timeout=5) == 1000
    finally:
        await sim.stop()
    (redirect,) = api.requests
    number = ET.fromstring(redirect.form["Twiml"][0]).find("./Dial/Number")
    assert number is not None
    text = parse_qs(urlsplit(number.get("url", "")).query)["text"][0]
    # whole sentences up to 300 characters (78 + 4 x 45), the remembered sentence left out
    assert text == " ".join(
        ["Incoming transfer.", "invoice question.", "Ann asks why invoice 7 was charged twice.", *details[:4]]
    )
    assert len(text) == 258


async def test_a_failed_transfer_is_an_error_the_model_hears_and_the_call_goes_on() -> None:
    sim = control_sim([("transfer_call", '{"destination": "billing"}')])
    agent = AgentSettings(transfer_numbers={"billing": BILLING})
    await sim.start()
    try:
        with TwilioApiRecorder() as api:
            api.status = 404  # e.g. the call SID is unknown to this account
            async with LocalRelay(control_settings(sim, api, agent=agent)) as relay:
                caller = await greeted(relay)
                heard = caller.played_bytes
                await caller.enter("5#")
                session = only_session(sim)
                assert await wait_for(lambda: outputs(session), timeout=5)
                assert await caller.wait_for_audio(heard // 8 + 300, timeout=5)
                assert relay.runtime.calls
                await caller.hangup()
    finally:
        await sim.stop()
    assert len(api.requests) == 1
    error = orjson.loads(outputs(session)[0]["output"])["error"]
    assert error == {"type": "tool_error", "message": "the transfer_call tool failed (TwilioRestException)"}


def test_a_sip_destination_is_dialled_as_a_sip_uri() -> None:
    assert twiml.dial("sip:desk@pbx.example.com", whisper_url="https://relay.example.com/w") == (
        f'{XML_DECL}<Response><Dial><Sip method="POST" url="https://relay.example.com/w">'
        "sip:desk@pbx.example.com</Sip></Dial></Response>"
    )
