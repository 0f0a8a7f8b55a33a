"""What the caller hears once a stream ends without the call ending.

The voice webhook's TwiML is <Connect><Stream> followed by a <Redirect> to the continuation
webhook, which Twilio POSTs (signed) to whichever instance the load balancer picks when the stream
ends. A call the relay ended on purpose is hung up; a lost stream (the Realtime API unreachable,
an instance gone) gets the spoken apology and the fallback number, never silence and a click.
Real relays on loopback, the simulated Realtime API and caller, the real twilio signature code and
Redis shared by two instances.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from conftest import AUTH_TOKEN, make_caller, relay_settings, wait_for
from tools_support import ACCOUNT_SID, TwilioApiRecorder
from twilio.request_validator import RequestValidator

from relay.config import Settings
from relay.sim.caller import SimulatedCaller
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


async def greeted(relay: LocalRelay, **config: Any) -> SimulatedCaller:
    caller = make_caller(relay, **config)
    await caller.connect()
    assert await caller.wait_for_audio(200, timeout=5)
    assert await caller.wait_idle(timeout=5)
    return caller


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
    with TwilioApiRecorder() as api:
        settings = relay_settings(
            sim.url,
            reconnect_attempts=1,
            twilio_account_sid=ACCOUNT_SID,
            twilio_api_base=api.url,
            fallback_number=fallback,
        )
        async with LocalRelay(settings) as relay:
            caller = make_caller(relay)
            await caller.connect()
            await caller.wait_for_audio(100, timeout=5)
            await sim.stop()
            assert await caller.wait_closed(timeout=10) == 1000
            assert await wait_for(lambda: not relay.runtime.calls)
            record = await relay.runtime.store.get_call(caller.call_sid)
            status, body = await caller.continuation()
        rest_requests = list(api.requests)
    assert record is not None and record.meta["end_reason"] == "realtime_unavailable"
    assert rest_requests == []  # the continuation's TwiML does it, with or without REST credentials
    assert status == 200
    assert verbs(body) == apology_then(fallback)
    if fallback:
        dial = ET.fromstring(body).find("Dial")
        assert dial is not None and [n.text for n in dial.findall("Number")] == [fallback]


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
            lost_status, lost_body = await lost.continuation()  # nothing recorded an ending: apology
            await lost.hangup()
    finally:
        await sim.stop()
    assert (ended_status, verbs(ended_body)) == (200, [("Hangup", "", {})])
    assert (lost_status, verbs(lost_body)) == (200, apology_then(FALLBACK))


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
