"""SIP mode end to end: the relay behind the simulated SIP connector (relay/sim/sip) on loopback,
state in the shared Redis. OpenAI signs and offers the call, the relay accepts or rejects it over
the REST API and runs it over the sideband on the same call core as a Media Stream."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import make_caller, relay_settings, wait_for
from openai.types.realtime import RealtimeClientEvent
from openai.types.realtime.call_accept_params import CallAcceptParams
from pydantic import TypeAdapter

from relay.config import Settings
from relay.profiles import Profiles, parse_profiles
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig
from relay.sim.sip import SimCall, SipSimulator

SECRET = "whsec_" + base64.b64encode(b"sip-test-webhook-secret-0123456789ab").decode()
ACCEPT: TypeAdapter[Any] = TypeAdapter(CallAcceptParams)
CLIENT_EVENT: TypeAdapter[Any] = TypeAdapter(RealtimeClientEvent)
API_TOKEN = "test-api-token-abcdef0123456789abcdef"


@pytest.fixture
async def sip_sim() -> AsyncIterator[SipSimulator]:
    sim = SipSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=400, reply_ms=500), webhook_secret=SECRET)
    await sim.start()
    yield sim
    await sim.stop()


def sip_settings(sim: SipSimulator, redis_url: str, store_prefix: str, **overrides: Any) -> Settings:
    overrides.setdefault("end_call_mark_timeout_s", 2.0)
    return relay_settings(
        sim.url,
        openai_api_base=sim.api_base,
        openai_webhook_secret=SECRET,
        redis_url=redis_url,
        redis_prefix=store_prefix,
        **overrides,
    )


def profiles_for(settings: Settings, data: dict[str, Any]) -> Profiles:
    return parse_profiles(data, settings.agent, {})


def sent_to_sideband(call: SimCall) -> list[dict[str, Any]]:
    return [event for session in call.sessions for _, event in session.received]


def webhook(relay: LocalRelay) -> str:
    return f"{relay.base_url}/openai/webhook"


async def accepted(sim: SipSimulator, relay: LocalRelay, **call_fields: Any) -> SimCall:
    call = await sim.offer(webhook(relay), **call_fields)
    assert await wait_for(lambda: call.state == "accepted" and bool(call.sessions), timeout=5)
    return call


async def greeted(call: SimCall) -> None:
    assert await wait_for(lambda: len(call.stopped_at) >= 1, timeout=5)


async def ended(relay: LocalRelay) -> None:
    assert await wait_for(lambda: not relay.runtime.calls and not relay.runtime.sip_tasks, timeout=10)


def accept_body(call: SimCall) -> dict[str, Any]:
    [(_, body)] = [request for request in call.requests if request[0] == "accept"]
    return body


# ---- the webhook ------------------------------------------------------------------------------


async def test_bad_stale_unsigned_and_replayed_webhooks_open_nothing(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix)) as relay:
        url = webhook(relay)
        forged = sip_sim.new_call()
        wrong_key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        assert await sip_sim.deliver(url, forged, secret=wrong_key) == 401
        stale = sip_sim.new_call()
        assert await sip_sim.deliver(url, stale, timestamp=int(time.time()) - 301) == 401
        unsigned = sip_sim.new_call()
        assert await sip_sim.deliver(url, unsigned, headers={"content-type": "application/json"}) == 400
        altered = sip_sim.new_call()
        body = sip_sim.webhook_body(altered)
        signature = (await _signature_of(sip_sim, altered, body)).copy()
        tampered = body.replace(b"+15550002222", b"+15550009999")
        assert await sip_sim.deliver(url, altered, body=tampered, headers=signature) == 401
        await asyncio.sleep(0.3)
        assert sip_sim.rest == []
        assert sip_sim.connections == 0
        # a delivery made again (OpenAI retries with the same webhook-id) is acted on once
        call = sip_sim.new_call()
        assert await sip_sim.deliver(url, call) == 200
        assert await sip_sim.deliver(url, call) == 200
        assert await wait_for(lambda: bool(call.sessions), timeout=5)
        await greeted(call)
        assert [action for action, _ in call.requests] == ["accept"]
        assert len(call.sessions) == 1
        await sip_sim.caller_hangs_up(call)
        await ended(relay)


async def _signature_of(sim: SipSimulator, call: SimCall, body: bytes) -> dict[str, str]:
    from relay.sim.sip import sign_webhook

    stamp = int(time.time())
    return {
        "content-type": "application/json",
        "webhook-id": call.webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign_webhook(SECRET, call.webhook_id, stamp, body),
    }


async def test_a_replay_reaching_another_instance_is_not_acted_on(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    """Two instances share Redis: the same delivery to each is accepted once."""
    settings = sip_settings(sip_sim, redis_url, store_prefix)
    async with LocalRelay(settings) as first, LocalRelay(settings) as second:
        call = sip_sim.new_call()
        assert await sip_sim.deliver(webhook(first), call) == 200
        assert await sip_sim.deliver(webhook(second), call) == 200
        assert await wait_for(lambda: bool(call.sessions), timeout=5)
        await asyncio.sleep(0.3)
        assert [action for action, _ in call.requests] == ["accept"]
        await sip_sim.caller_hangs_up(call)
        await ended(first)
        await ended(second)


# ---- accept, profiles, capacity -----------------------------------------------------------------


async def test_the_accept_carries_the_media_stream_session_of_the_profile_chosen_by_to(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    settings = sip_settings(sip_sim, redis_url, store_prefix)
    profiles = profiles_for(
        settings,
        {
            "profiles": {
                "sales": {
                    "instructions": "You sell.",
                    "voice": "cedar",
                    "tools": ["lookup_order", "end_call"],
                    "mcp_servers": [{"server_label": "crm", "server_url": "https://crm.example.com/mcp"}],
                },
                "vip": {"instructions": "You serve VIPs.", "allow_sip_profile_header": True},
                "internal": {"instructions": "Internal only."},
            },
            "numbers": {"+15550003333": "sales"},
        },
    )
    async with LocalRelay(settings, profiles=profiles) as relay:
        call = await accepted(sip_sim, relay, called="+15550003333", to_uri="<tel:+15550003333>")
        await greeted(call)
        body = accept_body(call)
        assert set(body) <= set(CallAcceptParams.__annotations__)
        assert ACCEPT.validate_python(body) == body
        assert body["instructions"] == "You sell."
        assert body["audio"]["output"]["voice"] == "cedar"
        assert body["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert [tool.get("name") or tool["server_label"] for tool in body["tools"]] == [
            "lookup_order",
            "end_call",
            "crm",
        ]
        assert body["tools"][2] == {
            "type": "mcp",
            "server_label": "crm",
            "server_url": "https://crm.example.com/mcp",
            "require_approval": "never",
        }
        # the very session a Media Stream's session.update configures (one function builds both)
        update = next(e for e in sent_to_sideband(call) if e["type"] == "session.update")
        assert update["session"] == body
        CLIENT_EVENT.validate_python(update)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{relay.base_url}/calls", headers={"Authorization": f"Bearer {API_TOKEN}"})
        live = answer.json()
        [listed] = live["calls"]
        assert (listed["call_sid"], listed["direction"], listed["profile"]) == (call.call_id, "inbound", "sales")
        await sip_sim.caller_hangs_up(call)
        await ended(relay)
        # X-Relay-Profile counts only for a profile that allows it
        vip = await accepted(sip_sim, relay, called="+15550003333", extra_headers={"X-Relay-Profile": "vip"})
        internal = await accepted(sip_sim, relay, called="+15550003333", extra_headers={"X-Relay-Profile": "internal"})
        assert accept_body(vip)["instructions"] == "You serve VIPs."
        assert accept_body(internal)["instructions"] == "You sell."
        # an unknown or malformed To gets the default profile
        odd = await accepted(sip_sim, relay, to_uri="<sip:alice@example.com>")
        assert accept_body(odd)["instructions"] == settings.agent.instructions
        for each in (vip, internal, odd):
            await sip_sim.caller_hangs_up(each)
        await ended(relay)


async def test_a_caller_gone_before_the_accept_costs_an_info_line_and_nothing_else(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix)) as relay:
        call = sip_sim.new_call()
        await sip_sim.caller_hangs_up(call)  # hung up while the webhook was on its way
        with caplog.at_level(logging.INFO):
            assert await sip_sim.deliver(webhook(relay), call) == 200
            assert await wait_for(lambda: bool(sip_sim.rest), timeout=5)
            await ended(relay)
        record = await relay.runtime.store.get_call(call.call_id)
    assert [path for _, path, _ in sip_sim.rest] == [f"/v1/realtime/calls/{call.call_id}/accept"]
    assert call.sessions == [] and record is None
    mine = [r for r in caplog.records if getattr(r, "call_sid", "") == call.call_id]
    assert [r.levelname for r in mine if r.levelno >= logging.WARNING] == []
    assert "SIP call gone before it was accepted (404); nothing to do" in [r.getMessage() for r in mine]


async def test_over_capacity_the_call_is_rejected_with_486(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix, max_calls=1)) as relay:
        first = await accepted(sip_sim, relay)
        second = await sip_sim.offer(webhook(relay))
        assert await wait_for(lambda: second.state == "rejected", timeout=5)
        assert second.requests == [("reject", {"status_code": 486})]
        assert second.sessions == []
        await sip_sim.caller_hangs_up(first)
        await ended(relay)


async def test_a_draining_instance_rejects_with_486(sip_sim: SipSimulator, redis_url: str, store_prefix: str) -> None:
    settings = sip_settings(sip_sim, redis_url, store_prefix, drain_seconds=0.5, drain_mode="goodbye")
    async with LocalRelay(settings) as relay:
        drain = relay.runtime.start_drain()  # what SIGTERM does
        call = await sip_sim.offer(webhook(relay))
        assert await wait_for(lambda: call.state == "rejected", timeout=5)
        assert call.requests == [("reject", {"status_code": 486})]
        assert call.sessions == []
        await drain


# ---- the call on the sideband -------------------------------------------------------------------


async def test_a_tool_call_gives_its_output_and_exactly_one_response_create(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    sip_sim.config.function_calls_on_turn = {1: [("lookup_order", '{"order_id": "10042"}')]}
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix)) as relay:
        call = await accepted(sip_sim, relay)
        await greeted(call)
        await sip_sim.caller_says(call, 600)
        assert await wait_for(
            lambda: any(e.get("item", {}).get("type") == "function_call_output" for e in sent_to_sideband(call)),
            timeout=5,
        )
        await asyncio.sleep(0.5)
        sent = sent_to_sideband(call)
        at = next(i for i, e in enumerate(sent) if e.get("item", {}).get("type") == "function_call_output")
        output = sent[at]["item"]
        assert '"order_id":"10042"' in output["output"]
        after = [e["type"] for e in sent[at + 1 :]]
        assert after.count("response.create") == 1
        await sip_sim.caller_hangs_up(call)
        await ended(relay)


async def test_end_call_hangs_up_once_the_goodbye_has_played(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    sip_sim.config.function_calls_on_turn = {1: [("end_call", '{"reason": "done"}')]}
    sip_sim.config.speech_before_calls_ms = 1600  # the goodbye, generated in 200 ms (8x)
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix)) as relay:
        call = await accepted(sip_sim, relay)
        await greeted(call)
        call.playback_factor = 2.0  # and played in 800 ms: its response is done long before
        await sip_sim.caller_says(call, 600)
        assert await wait_for(lambda: call.state == "ended", timeout=8)
        await ended(relay)
        record = await relay.runtime.store.get_call(call.call_id)
    assert [action for action, _ in call.requests] == ["accept", "hangup"]
    assert len(call.stopped_at) == 2  # the greeting's, then the goodbye's
    goodbye_done, played, hung_up = call.responses_done_at[-1], call.stopped_at[-1], call.request_times[-1]
    assert played - goodbye_done >= 0.5
    assert 0 <= hung_up - played < 0.1
    assert record is not None and record.meta["end_reason"] == "assistant_ended"


async def test_end_call_hangs_up_at_the_timeout_when_playback_is_never_reported(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    sip_sim.config.function_calls_on_turn = {1: [("end_call", '{"reason": "done"}')]}
    sip_sim.config.speech_before_calls_ms = 800
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix, end_call_mark_timeout_s=1.0)) as relay:
        call = await accepted(sip_sim, relay)
        call.playback_stops = False
        await asyncio.sleep(0.5)
        await sip_sim.caller_says(call, 600)
        said = time.monotonic()
        assert await wait_for(lambda: any(e[0] == "hangup" for e in call.requests), timeout=8)
        await ended(relay)
    assert call.stopped_at == []
    # the goodbye was generated within ~0.3 s of the caller's turn; the hang-up waited out the timeout
    assert call.ended_at is not None and call.ended_at - said >= 1.0


@pytest.mark.parametrize(
    ("destination", "target_uri"), [("billing", "tel:+15550004444"), ("desk", "sip:desk@pbx.example.com")]
)
async def test_transfer_call_refers_to_the_profile_destination_only(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str, destination: str, target_uri: str
) -> None:
    settings = sip_settings(sip_sim, redis_url, store_prefix)
    transfers = {"billing": "+15550004444", "desk": "sip:desk@pbx.example.com"}
    profiles = profiles_for(
        settings, {"profiles": {"support": {"transfer_numbers": transfers}}, "default_profile": "support"}
    )
    sip_sim.config.function_calls_on_turn = {
        1: [("transfer_call", '{"destination": "sip:attacker@evil.example"}')],
        2: [("transfer_call", f'{{"destination": "{destination}"}}')],
    }
    async with LocalRelay(settings, profiles=profiles) as relay:
        call = await accepted(sip_sim, relay)
        await greeted(call)
        await sip_sim.caller_says(call, 600, seed=1)
        assert await wait_for(
            lambda: any(e.get("item", {}).get("type") == "function_call_output" for e in sent_to_sideband(call)),
            timeout=5,
        )
        assert call.state == "accepted"
        await asyncio.sleep(0.5)
        await sip_sim.caller_says(call, 600, seed=2)
        assert await wait_for(lambda: call.state == "referred", timeout=8)
        await ended(relay)
        record = await relay.runtime.store.get_call(call.call_id)
    assert [request for request in call.requests if request[0] == "refer"] == [("refer", {"target_uri": target_uri})]
    assert record is not None and record.meta["end_reason"] == "transferred"


async def test_keypad_events_are_keypad_entries(sip_sim: SipSimulator, redis_url: str, store_prefix: str) -> None:
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix)) as relay:
        call = await accepted(sip_sim, relay)
        await greeted(call)
        sip_sim.caller_keys(call, "42#")
        entered = {"type": "input_text", "text": "The caller entered 4 2 #"}
        assert await wait_for(
            lambda: any(e.get("item", {}).get("content") == [entered] for e in sent_to_sideband(call)), timeout=5
        )
        await asyncio.sleep(0.3)
        sent = sent_to_sideband(call)
        at = next(i for i, e in enumerate(sent) if e.get("item", {}).get("content") == [entered])
        assert [e["type"] for e in sent[at + 1 :]].count("response.create") == 1
        await sip_sim.caller_hangs_up(call)
        await ended(relay)
        record = await relay.runtime.store.get_call(call.call_id)
    assert record is not None
    assert [(e["digits"], e["ended"]) for e in record.entries if e["kind"] == "dtmf"] == [("42#", "terminator")]


async def test_a_dropped_sideband_is_reopened_for_the_same_call(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    async with LocalRelay(sip_settings(sip_sim, redis_url, store_prefix)) as relay:
        call = await accepted(sip_sim, relay)
        await greeted(call)
        await sip_sim.drop_sideband(call)
        assert await wait_for(lambda: len(call.sessions) == 2 and not call.sessions[1].closed, timeout=5)
        assert call.sessions[1].query == {"call_id": call.call_id}
        assert relay.runtime.calls  # the call goes on
        await sip_sim.caller_says(call, 600)
        assert await wait_for(lambda: len(call.sessions[1].responses) >= 1, timeout=5)
        await sip_sim.caller_hangs_up(call)
        await ended(relay)
        record = await relay.runtime.store.get_call(call.call_id)
    assert record is not None
    assert [e["event"] for e in record.entries if e["kind"] == "system"] == ["realtime_reconnected", "call_ended"]
    assert record.meta["end_reason"] == "caller_hung_up"


# ---- the record ---------------------------------------------------------------------------------


async def test_a_sip_call_is_stored_as_a_media_stream_call_is(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    """Transcripts, summary, caller memory and the post-call record: the same for both ways in."""
    sip_sim.config.function_calls_on_turn = {1: [("end_call", '{"reason": "done"}')]}
    sip_sim.config.speech_before_calls_ms = 800
    media_sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=400, reply_ms=500))
    media_sim.config.function_calls_on_turn = {1: [("end_call", '{"reason": "done"}')]}
    media_sim.config.speech_before_calls_ms = 800
    await media_sim.start()
    try:
        settings = sip_settings(sip_sim, redis_url, store_prefix, caller_memory=True)
        async with LocalRelay(settings) as relay:
            call = await accepted(sip_sim, relay, caller="+15550007777")
            await greeted(call)
            await sip_sim.caller_says(call, 600)
            assert await wait_for(lambda: call.state == "ended", timeout=8)
            await ended(relay)
            sip_record = await relay.runtime.store.get_call(call.call_id)
            sip_memory = await relay.runtime.store.get_caller_memory("+15550007777")
            async with httpx.AsyncClient() as client:
                served = await client.get(
                    f"{relay.base_url}/calls/{call.call_id}", headers={"Authorization": f"Bearer {API_TOKEN}"}
                )
            assert served.status_code == 200 and served.json()["meta"]["end_reason"] == "assistant_ended"
        media_settings = relay_settings(
            media_sim.url, redis_url=redis_url, redis_prefix=store_prefix, caller_memory=True
        )
        async with LocalRelay(media_settings) as relay:
            caller = make_caller(relay, from_number="+15550008888")
            status, twiml = await caller.webhook()
            assert status == 200
            await caller.connect(caller.parse_twiml(twiml))
            await caller.wait_for_audio(300, timeout=5)
            await caller.wait_idle(timeout=5)
            await caller.say_and_wait(ulaw.synth_speech(600, seed=1))
            assert await wait_for(lambda: not relay.runtime.calls, timeout=10)
            media_record = await relay.runtime.store.get_call(caller.call_sid)
            media_memory = await relay.runtime.store.get_caller_memory("+15550008888")
    finally:
        await media_sim.stop()
    assert sip_record is not None and media_record is not None
    # the same record; the mouth-to-ear figures differ by what each mode can measure (a Media Stream's
    # audio sent and played, a SIP call's playback as OpenAI reports it)
    assert {k for k in sip_record.meta if not k.startswith("m2e_")} == {
        k for k in media_record.meta if not k.startswith("m2e_")
    }
    assert set(sip_record.to_json()) == set(media_record.to_json())
    # latency entries are measurements, taken where each mode can (a SIP call's from OpenAI's playback)
    sip_entries = [e for e in sip_record.entries if e["kind"] != "latency"]
    media_entries = [e for e in media_record.entries if e["kind"] != "latency"]
    kinds = [e["kind"] for e in sip_entries]
    assert kinds == [e["kind"] for e in media_entries]
    assert [e["text"][:13] for e in sip_record.entries if e["kind"] == "caller"] == ["caller turn 1"]
    assert [set(e) for e in sip_entries] == [set(e) for e in media_entries]
    assert sip_record.summary is not None and sip_record.summary == sip_memory
    assert media_record.summary is not None and media_record.summary == media_memory
    assert sip_record.meta["end_reason"] == media_record.meta["end_reason"] == "assistant_ended"
    assert sip_record.meta["stream_sid"] == "" and sip_record.meta["frames_in"] == "0"


async def test_at_the_drain_deadline_a_sip_call_hears_the_goodbye_and_is_hung_up(
    sip_sim: SipSimulator, redis_url: str, store_prefix: str
) -> None:
    settings = sip_settings(sip_sim, redis_url, store_prefix, drain_seconds=0.3, drain_mode="goodbye")
    async with LocalRelay(settings) as relay:
        call = await accepted(sip_sim, relay)
        await greeted(call)
        await relay.runtime.start_drain()
        await ended(relay)
        record = await relay.runtime.store.get_call(call.call_id)
    assert [action for action, _ in call.requests] == ["accept", "hangup"]
    assert len(call.stopped_at) == 2  # the greeting, then the goodbye, played before the hang-up
    assert call.ended_at is not None and call.ended_at >= call.stopped_at[-1]
    assert record is not None and record.meta["end_reason"] == "shutdown"
    assert [e["event"] for e in record.entries if e["kind"] == "system"] == ["drain_goodbye", "call_ended"]
