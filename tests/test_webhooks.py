"""The post-call webhook: one signed call.completed document per finished call, delivered at least once
from the store's queue, retried on failures that may pass, and surviving a restart of the relay."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import standardwebhooks
from conftest import AUTH_TOKEN, make_caller, relay_settings, wait_for
from ops_support import RelayProcess, caller_for, metric, parse_metrics
from test_startup_config import refused
from webhook_support import SECRET, SECRET_KEY, Receiver, Script

from relay.config import Settings
from relay.env import ConfigError
from relay.metrics import Metrics
from relay.profiles import Profiles
from relay.sim import ulaw
from relay.sim.caller import CallerConfig, TwilioCall
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig
from relay.store import RedisStore
from relay.store.base import CallRecord
from relay.store.webhook_queue import QueuedEvent
from relay.webhook_signing import decode_secret, signed_headers
from relay.webhooks import (
    CALL_COMPLETED,
    RECORDING_COMPLETED,
    Webhooks,
    call_completed_document,
    event_id,
    outcome,
)

PRICES = {"input_text": 4.0, "input_audio": 32.0, "cached": 0.4, "output_text": 16.0, "output_audio": 64.0}
FAST_RETRIES = {"webhook_backoff_s": 0.05, "webhook_backoff_max_s": 0.2}


def webhook_settings(sim: RealtimeSimulator, receiver: Receiver, **overrides: Any) -> Settings:
    return relay_settings(
        sim.url, webhook_url=receiver.url, webhook_secret=decode_secret(SECRET), **{**FAST_RETRIES, **overrides}
    )


def tool_sim() -> RealtimeSimulator:
    """A session whose model looks up order 10042 when the caller keys 4 2 #."""
    return RealtimeSimulator(
        SimConfig(
            function_calls_on_text={"entered 4 2 #": [("lookup_order", '{"order_id": "10042"}')]},
            realtime_factor=8.0,
            greeting_reply_ms=300,
            reply_ms=400,
        )
    )


async def short_call(relay: LocalRelay, *, keys: str = "") -> str:
    """A call: the greeting, one caller turn and its answer, optionally a keypad entry, then the caller
    hangs up. Returns its call SID once its stream is gone."""
    caller = make_caller(relay)
    await caller.connect()
    assert await caller.wait_for_audio(200, timeout=5)
    await caller.wait_idle(timeout=5)
    before = caller.played_bytes
    await caller.say_and_wait(ulaw.synth_speech(500, seed=1))
    assert await caller.wait_for_audio(before // 8 + 200, timeout=10)
    await caller.wait_idle(timeout=10)
    if keys:
        before = caller.played_bytes
        await caller.enter(keys)
        assert await caller.wait_for_audio(before // 8 + 200, timeout=10)
        await caller.wait_idle(timeout=10)
    await caller.hangup()
    assert await wait_for(lambda: not relay.runtime.calls, timeout=5)
    return caller.call_sid


async def metrics_of(base_url: str) -> Any:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        return parse_metrics((await http.get(base_url + "/metrics")).text)[1]


# ---- signing: both official verifiers accept what the relay sends ---------------------------------------


def test_deliveries_verify_with_standardwebhooks_and_with_the_openai_package() -> None:
    body = orjson.dumps({"type": CALL_COMPLETED, "timestamp": "2026-12-02T10:00:00Z", "data": {"call_sid": "CA1"}})
    now = int(time.time())
    headers = signed_headers(decode_secret(SECRET), "msg_0123456789abcdef", now, body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["webhook-timestamp"] == str(now) and headers["content-type"] == "application/json"
    assert headers["webhook-signature"].startswith("v1,")
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == orjson.loads(body)
    client = openai.OpenAI(api_key="sk-test-unused", webhook_secret=SECRET)
    client.webhooks.verify_signature(body, headers)
    assert client.webhooks.unwrap(body, headers).type == CALL_COMPLETED  # type: ignore[comparison-overlap]
    altered = body.replace(b"CA1", b"CA2")
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(altered, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(altered, headers)


def test_a_raw_secret_signs_with_its_own_bytes() -> None:
    raw = "9c1f4e7a2b8d5036c1e4f7a2b8d50369"
    body = b'{"type":"recording.completed"}'
    headers = signed_headers(decode_secret(raw), "msg_raw", int(time.time()), body)
    openai.OpenAI(api_key="sk-test-unused", webhook_secret=raw).webhooks.verify_signature(body, headers)
    as_whsec = "whsec_" + base64.b64encode(raw.encode()).decode()
    assert standardwebhooks.Webhook(as_whsec).verify(body, headers) == {"type": "recording.completed"}


# ---- the document of a real call -------------------------------------------------------------------


async def test_a_call_sends_one_signed_call_completed_document_of_its_stored_record(
    redis_url: str, store_prefix: str
) -> None:
    sim = tool_sim()
    await sim.start()
    try:
        async with Receiver() as receiver:
            settings = webhook_settings(
                sim, receiver, redis_url=redis_url, redis_prefix=store_prefix, price_per_1k_tokens=PRICES
            )
            async with LocalRelay(settings) as relay:
                call_sid = await short_call(relay, keys="42#")
                assert await receiver.wait(1)
                relay.runtime.webhooks.call_ended(call_sid)  # emitted again after its delivery: a no-op
                await asyncio.sleep(0.6)  # one more poll of the queue: nothing else is sent
                record = await relay.runtime.store.get_call(call_sid)
                depth = await relay.runtime.store.webhook_queue().depth()
    finally:
        await sim.stop()
    assert record is not None
    assert len(receiver.deliveries) == 1 and depth == 0
    (delivery,) = receiver.deliveries
    assert delivery.verified and delivery.id == event_id(CALL_COMPLETED, call_sid)
    openai.OpenAI(api_key="sk-test-unused", webhook_secret=SECRET).webhooks.verify_signature(
        delivery.body, delivery.headers
    )
    document = delivery.document
    assert set(document) == {"type", "timestamp", "data"} and document["type"] == "call.completed"
    data = document["data"]
    meta = record.meta
    assert set(data) == {
        "call_sid",
        "direction",
        "from",
        "to",
        "profile",
        "started",
        "ended",
        "duration_s",
        "end_reason",
        "outcome",
        "transcript",
        "summary",
        "tool_calls",
        "usage",
        "cost_usd",
        "mouth_to_ear",
    }
    assert data["call_sid"] == call_sid and data["direction"] == "inbound"
    assert (data["from"], data["to"], data["profile"]) == ("+15550001111", "+15550002222", "default")
    assert (data["started"], data["ended"]) == (meta["started"], meta["ended"])
    elapsed = datetime.fromisoformat(meta["ended"]) - datetime.fromisoformat(meta["started"])
    assert data["duration_s"] == round(elapsed.total_seconds(), 1) and data["duration_s"] > 0
    assert (data["end_reason"], data["outcome"]) == ("caller_hung_up", "caller_hung_up")
    assert data["transcript"] == record.entries
    assert [e["kind"] for e in data["transcript"]].count("tool_call") == 1
    assert data["summary"] == record.summary
    (tool,) = data["tool_calls"]
    assert (tool["name"], orjson.loads(tool["arguments"])) == ("lookup_order", {"order_id": "10042"})
    assert tool["result"]["ok"] is True and orjson.loads(tool["result"]["output"])["status"] == "shipped"
    assert data["usage"] == record.usage and data["usage"]["total"] > 0
    assert data["cost_usd"] == float(meta["cost_usd"]) and data["cost_usd"] > 0
    # the greeting and the answer to the caller's turn, each measured from where the caller's wait began
    latency = data["mouth_to_ear"]
    assert latency == {k.removeprefix("m2e_"): int(v) for k, v in meta.items() if k.startswith("m2e_")}
    assert (latency["sent_count"], latency["played_count"]) == (2, 2)
    assert 0 < latency["sent_p50_ms"] <= latency["sent_max_ms"] <= latency["played_max_ms"]


def test_the_document_carries_amd_recording_and_latency_when_the_record_has_them() -> None:
    meta = {
        "from": "+15550001111",
        "to": "+15550002222",
        "direction": "outbound",
        "profile": "sales",
        "started": "2026-12-02T10:00:00+00:00",
        "ended": "2026-12-02T10:01:00+00:00",
        "duration_s": "60.0",
        "end_reason": "assistant_ended",
        "cost_usd": "0.0100",
        "answered_by": "machine_end_beep",
        "recording_sid": "RE0123",
        "recording_url": "https://api.twilio.com/2010-04-01/Accounts/AC1/Recordings/RE0123",
        "recording_duration_s": "58",
        "m2e_played_p50_ms": "640",
        "m2e_played_count": "3",
    }
    record = CallRecord("CA1", meta=meta, entries=[], summary=None, usage={})
    data = call_completed_document(record, 0.0)["data"]
    assert data["direction"] == "outbound" and data["outcome"] == "voicemail"
    assert data["answered_by"] == "machine_end_beep"
    assert data["recording"] == {"sid": "RE0123", "url": meta["recording_url"], "duration_s": 58.0}
    assert data["mouth_to_ear"] == {"played_count": 3, "played_p50_ms": 640}


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"end_reason": "caller_hung_up"}, "caller_hung_up"),
        ({"end_reason": "caller_disconnected"}, "caller_hung_up"),
        ({"end_reason": "assistant_ended"}, "completed"),
        ({"end_reason": "shutdown"}, "completed"),
        ({"end_reason": "transferred"}, "transferred"),
        ({"end_reason": "realtime_unavailable"}, "failed"),
        ({"end_reason": "realtime_error:invalid_api_key"}, "failed"),
        ({"end_reason": "assistant_ended", "answered_by": "machine_start"}, "voicemail"),
        ({"end_reason": "", "status": "no-answer"}, "no_answer"),
        ({"end_reason": "", "status": "busy"}, "busy"),
        ({"end_reason": "", "status": "failed"}, "failed"),
        ({"end_reason": "", "status": "canceled"}, "canceled"),
    ],
)
def test_the_outcome_follows_the_end_reason_and_what_twilio_reported(meta: dict[str, str], expected: str) -> None:
    assert outcome(meta) == expected


# ---- retries --------------------------------------------------------------------------------------


async def test_a_receiver_failing_three_times_gets_the_same_webhook_id_four_times(fast_sim: RealtimeSimulator) -> None:
    async with Receiver(Script([500, 503, 500])) as receiver:
        async with LocalRelay(webhook_settings(fast_sim, receiver)) as relay:
            call_sid = await short_call(relay)
            assert await receiver.wait(4)
            await asyncio.sleep(0.6)
            samples = await metrics_of(relay.base_url)
            depth = await relay.runtime.store.webhook_queue().depth()
    assert [d.status for d in receiver.deliveries] == [500, 503, 500, 200]
    assert {d.id for d in receiver.deliveries} == {event_id(CALL_COMPLETED, call_sid)}
    assert all(d.verified for d in receiver.deliveries)
    assert len({d.body for d in receiver.deliveries}) == 1  # the same document every time
    stamps = [int(d.headers["webhook-timestamp"]) for d in receiver.deliveries]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 10
    assert metric(samples, "relay_webhook_retries_total", reason="status_500") == 2
    assert metric(samples, "relay_webhook_retries_total", reason="status_503") == 1
    assert metric(samples, "relay_webhooks_delivered_total", type="call.completed") == 1
    assert metric(samples, "relay_webhooks_abandoned_total") == 0
    assert depth == 0


async def test_a_400_is_not_retried_and_counts_as_abandoned(fast_sim: RealtimeSimulator) -> None:
    async with Receiver(Script([400])) as receiver:
        async with LocalRelay(webhook_settings(fast_sim, receiver)) as relay:
            await short_call(relay)
            assert await receiver.wait(1)
            await asyncio.sleep(1.0)  # two polls of the queue: long enough for any retry
            samples = await metrics_of(relay.base_url)
            depth = await relay.runtime.store.webhook_queue().depth()
    assert [d.status for d in receiver.deliveries] == [400]
    assert metric(samples, "relay_webhooks_abandoned_total", reason="status_400") == 1
    assert metric(samples, "relay_webhook_retries_total") == 0
    assert metric(samples, "relay_webhooks_delivered_total") == 0
    assert depth == 0


async def test_a_429_is_retried_after_its_retry_after(fast_sim: RealtimeSimulator) -> None:
    async with Receiver(Script([(429, {"Retry-After": "1"})])) as receiver:
        settings = webhook_settings(fast_sim, receiver, webhook_backoff_s=0.05, webhook_backoff_max_s=5.0)
        async with LocalRelay(settings) as relay:
            await short_call(relay)
            assert await receiver.wait(2)
    first, second = receiver.deliveries
    assert (first.status, second.status) == (429, 200) and first.id == second.id
    assert 1.0 <= second.at - first.at < 1.8


async def test_an_unreachable_receiver_is_retried_until_it_answers(fast_sim: RealtimeSimulator) -> None:
    receiver = Receiver()
    async with LocalRelay(webhook_settings(fast_sim, receiver)) as relay:
        call_sid = await short_call(relay)  # nothing listens yet: connection refused
        assert await wait_for(lambda: metric_value(relay, "relay_webhook_retries_total", "connect_error") >= 2)
        async with receiver:
            assert await receiver.wait(1)
    assert [(d.id, d.status, d.verified) for d in receiver.deliveries] == [
        (event_id(CALL_COMPLETED, call_sid), 200, True)
    ]


def metric_value(relay: LocalRelay, name: str, reason: str) -> float:
    value = relay.runtime.metrics.registry.get_sample_value(name, {"reason": reason})
    return value or 0.0


# ---- durable, and one deliverer at a time ---------------------------------------------------------


async def test_a_restart_between_attempts_loses_nothing(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    script = Script(then=503)
    async with Receiver(script) as receiver:
        env = {
            "REDIS_URL": redis_url,
            "RELAY_REDIS_PREFIX": store_prefix,
            "RELAY_WEBHOOK_URL": receiver.url,
            "RELAY_WEBHOOK_SECRET": SECRET,
            "RELAY_WEBHOOK_BACKOFF": "0.05",
            "RELAY_WEBHOOK_BACKOFF_MAX": "0.2",
            "DRAIN_SECONDS": "1",
        }
        a = await RelayProcess(fast_sim.url, **env).start()
        try:
            caller = caller_for(a)
            await caller.connect()
            assert await caller.wait_for_audio(200, timeout=5)
            await caller.hangup()
            assert await receiver.wait(2)  # A tried, and the receiver refused
            a.signal()
            assert await a.wait(15) == 0
        finally:
            await a.close()
        refused_by_a = len(receiver.deliveries)
        script.then = 200
        b = await RelayProcess(fast_sim.url, **env).start()
        try:
            assert await receiver.wait(refused_by_a + 1)
            await asyncio.sleep(0.6)
        finally:
            b.signal()
            await b.wait(15)
            await b.close()
    assert [d.status for d in receiver.deliveries] == [503] * refused_by_a + [200]
    assert {d.id for d in receiver.deliveries} == {event_id(CALL_COMPLETED, caller.call_sid)}
    assert all(d.verified for d in receiver.deliveries)
    assert receiver.deliveries[-1].document["data"]["end_reason"] == "caller_hung_up"
    assert any(
        line.get("msg") == f"call.completed webhook delivered (attempt {len(receiver.deliveries)})" for line in b.lines
    )


async def test_an_instance_killed_mid_delivery_leaves_the_event_to_another_once_its_lease_ends(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    script = Script(hold_s=60.0)  # A's POST is held until A is gone
    async with Receiver(script) as receiver:
        env = {
            "REDIS_URL": redis_url,
            "RELAY_REDIS_PREFIX": store_prefix,
            "RELAY_WEBHOOK_URL": receiver.url,
            "RELAY_WEBHOOK_SECRET": SECRET,
            "RELAY_WEBHOOK_TIMEOUT": "3",  # the lease: 3 + 5 s
        }
        a = await RelayProcess(fast_sim.url, **env).start()
        b = RelayProcess(fast_sim.url, **env)
        try:
            caller = caller_for(a)
            await caller.connect()
            assert await caller.wait_for_audio(200, timeout=5)
            await caller.hangup()
            assert await wait_for(lambda: len(receiver.deliveries) == 1, timeout=10)
            a.signal(signal.SIGKILL)
            assert await a.wait(10) == -signal.SIGKILL
            script.hold_s = 0.0
            await b.start()
            assert await wait_for(lambda: len(receiver.deliveries) == 2, timeout=15)
            assert await receiver.wait(2)
            await asyncio.sleep(0.6)
        finally:
            await a.close()
            if b.proc is not None:
                b.signal()
                await b.wait(15)
            await b.close()
    first, second = receiver.deliveries
    assert first.id == second.id == event_id(CALL_COMPLETED, caller.call_sid)
    assert first.verified and second.verified and second.status == 200
    assert 7.0 <= second.at - first.at < 10.0  # not before A's lease ran out
    assert any(line.get("msg") == "call.completed webhook delivered (attempt 2)" for line in b.lines)


def _event(n: int, url: str) -> QueuedEvent:
    body = orjson.dumps({"type": RECORDING_COMPLETED, "timestamp": "t", "data": {"call_sid": f"CA{n:032d}"}})
    return QueuedEvent(event_id(RECORDING_COMPLETED, f"CA{n:032d}"), RECORDING_COMPLETED, url, body, time.time())


async def test_two_instances_never_deliver_the_same_event_at_the_same_time(redis_url: str, store_prefix: str) -> None:
    settings = Settings(webhook_url="http://127.0.0.1:9/unused", webhook_secret=SECRET_KEY, **FAST_RETRIES)
    profiles = Profiles(default=settings.agent, by_number={}, by_name={})
    # every event fails twice (slowly, so the instances' attempts overlap in time), then is taken
    statuses: list[int | tuple[int, dict[str, str]]] = [500] * 24
    async with Receiver(Script(statuses, hold_s=0.15)) as receiver:
        stores = [RedisStore(redis_url, prefix=store_prefix, caller_key_secret=b"k" * 32) for _ in range(2)]
        instances = [Webhooks(settings, store, profiles, Metrics()) for store in stores]
        try:
            for store, webhooks in zip(stores, instances, strict=True):
                await store.start()
                webhooks.start()
            events = [_event(n, receiver.url) for n in range(12)]
            for event in events:
                assert await stores[0].webhook_queue().enqueue(event, event.created)
            assert await receiver.wait(36, timeout=20)
            await asyncio.sleep(0.6)
            depth = await stores[1].webhook_queue().depth()
        finally:
            for store, webhooks in zip(stores, instances, strict=True):
                await webhooks.stop()
                await store.close()
    assert len(receiver.deliveries) == 36 and depth == 0
    assert set(receiver.max_in_flight.values()) == {1}  # never two attempts of one event at once
    delivered = sorted(d.id for d in receiver.deliveries if d.status == 200)
    assert delivered == sorted(e.id for e in events)  # each exactly once
    counts = [
        m.registry.get_sample_value("relay_webhooks_delivered_total", {"type": RECORDING_COMPLETED}) or 0
        for m in (w.metrics for w in instances)
    ]
    assert sum(counts) == 12


async def test_leases_hand_each_due_event_to_one_taker(redis_url: str, store_prefix: str) -> None:
    stores = [RedisStore(redis_url, prefix=store_prefix, caller_key_secret=b"k" * 32) for _ in range(2)]
    try:
        first, second = (store.webhook_queue() for store in stores)
        now = time.time()
        events = [_event(n, "http://127.0.0.1:9/") for n in range(6)]
        for event in events:
            assert await first.enqueue(event, now)
        assert await first.enqueue(events[0], now) is False  # queued once
        a, b = await asyncio.gather(first.lease(now, 5.0, 4), second.lease(now, 5.0, 4))
        assert sorted(x.event.id for x in [*a, *b]) == sorted(e.id for e in events)
        assert await second.lease(now + 1.0, 5.0, 10) == []  # all leased
        # a taker that went away: once its lease has run out the event is due again, as attempt 2
        again = await second.lease(now + 5.1, 5.0, 10)
        assert sorted((x.event.id, x.attempt) for x in again) == sorted((e.id, 2) for e in events)
        assert await first.settle(a[0].event.id, 1) is False  # the stale lease settles nothing
        assert await second.settle(a[0].event.id, 2) is True
        assert await first.depth() == 5
    finally:
        for store in stores:
            await store.close()


# ---- only the call's final end is sent --------------------------------------------------------------


async def test_a_handed_off_stream_sends_nothing_only_the_calls_final_end_does(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    async with Receiver() as receiver:
        # both instances behind one load balancer, as Twilio sees them
        shared = {"redis_url": redis_url, "redis_prefix": store_prefix, "public_url": "https://relay.example.com"}
        async with (
            LocalRelay(webhook_settings(fast_sim, receiver, **shared)) as first,
            LocalRelay(webhook_settings(fast_sim, receiver, **shared)) as second,
        ):
            config = CallerConfig(
                base_url=first.base_url, auth_token=AUTH_TOKEN, public_url="https://relay.example.com"
            )
            call = TwilioCall(config, [first.base_url, second.base_url], reconnect_delay_s=0.05)
            await call.start()
            assert await call.leg.wait_for_audio(200, timeout=5)
            await call.leg.wait_idle(timeout=5)
            origin, other = (first, second) if call.call_sid in first.runtime.calls else (second, first)
            call.balancer.instances = [other.base_url]  # as a draining instance leaves the balancer
            assert await origin.runtime.calls[call.call_sid].hand_off(1.0) is True
            assert await call.wait_legs(2, timeout=10), (call.outcome, call.errors, call.events)
            assert await wait_for(lambda: call.call_sid in other.runtime.calls, timeout=5), call.events
            await asyncio.sleep(1.0)  # the hand-off's teardown is long done: nothing was sent for it
            after_hand_off = len(receiver.deliveries)
            await call.leg.say_and_wait(ulaw.synth_speech(400, seed=2))  # the call goes on, no second greeting
            assert await call.leg.wait_for_audio(100, timeout=5)
            await call.hangup()
            assert await receiver.wait(1)
            await asyncio.sleep(0.6)
            record = await other.runtime.store.get_call(call.call_sid)
    assert after_hand_off == 0, [d.document["data"]["end_reason"] for d in receiver.deliveries]
    assert record is not None and record.meta["streams"] == "2" and "handed_off" in record.meta
    (delivery,) = receiver.deliveries
    data = delivery.document["data"]
    assert delivery.verified and data["call_sid"] == call.call_sid
    assert (data["end_reason"], data["outcome"]) == ("caller_hung_up", "caller_hung_up")
    elapsed = datetime.fromisoformat(record.meta["ended"]) - datetime.fromisoformat(record.meta["started"])
    # from the call's start to its end, both streams, as the record has it
    assert data["duration_s"] == round(elapsed.total_seconds(), 1) == float(record.meta["duration_s"])


async def test_without_a_webhook_url_nothing_is_queued(fast_sim: RealtimeSimulator) -> None:
    async with LocalRelay(relay_settings(fast_sim.url)) as relay:
        assert relay.runtime.webhooks.enabled is False
        await short_call(relay)
        await asyncio.sleep(0.3)
        assert await relay.runtime.store.webhook_queue().depth() == 0


async def test_recording_completed_is_queued_for_the_call_and_delivered(fast_sim: RealtimeSimulator) -> None:
    async with Receiver() as receiver:
        async with LocalRelay(webhook_settings(fast_sim, receiver)) as relay:
            call_sid = await short_call(relay)
            assert await receiver.wait(1)
            fields = {
                "recording_sid": "RE" + "1" * 32,
                "recording_url": "https://api.twilio.com/r",
                "recording_duration_s": "9",
            }
            relay.runtime.webhooks.recording_completed(call_sid, fields)
            relay.runtime.webhooks.recording_completed(call_sid, fields)  # a repeat is queued once
            assert await receiver.wait(2)
            await asyncio.sleep(0.6)
    assert [d.document["type"] for d in receiver.deliveries] == ["call.completed", "recording.completed"]
    recording = receiver.deliveries[1]
    assert recording.verified and recording.id == event_id(RECORDING_COMPLETED, call_sid, fields["recording_sid"])
    assert recording.document["data"] == {
        "call_sid": call_sid,
        "recording": {"sid": fields["recording_sid"], "url": "https://api.twilio.com/r", "duration_s": 9.0},
    }


async def test_a_profile_sends_its_calls_to_its_own_webhook_url(fast_sim: RealtimeSimulator, tmp_path: Path) -> None:
    async with Receiver(path="/default") as default, Receiver(path="/sales") as sales:
        profiles = tmp_path / "profiles.toml"
        profiles.write_text(f'[profiles.sales]\nwebhook_url = "{sales.url}"\n[numbers]\n"+15550002222" = "sales"\n')
        settings = webhook_settings(fast_sim, default, profiles_file=str(profiles))
        async with LocalRelay(settings) as relay:
            call_sid = await short_call(relay)
            assert await sales.wait(1)
            await asyncio.sleep(0.6)
    assert default.deliveries == []
    assert [(d.document["data"]["call_sid"], d.document["data"]["profile"]) for d in sales.deliveries] == [
        (call_sid, "sales")
    ]


# ---- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RELAY_WEBHOOK_URL": "https://hooks.example.com/relay"},
            "RELAY_WEBHOOK_URL needs RELAY_WEBHOOK_SECRET to sign the deliveries with "
            "(whsec_ followed by `openssl rand -base64 32`)",
        ),
        (
            {"RELAY_WEBHOOK_URL": "ftp://hooks.example.com/relay", "RELAY_WEBHOOK_SECRET": SECRET},
            "RELAY_WEBHOOK_URL must be an http:// or https:// URL with a host, got 'ftp://hooks.example.com/relay'",
        ),
        (
            {"RELAY_WEBHOOK_URL": "https://user:pw@hooks.example.com/", "RELAY_WEBHOOK_SECRET": SECRET},
            "RELAY_WEBHOOK_URL must not carry credentials in the URL (the deliveries are signed instead)",
        ),
        (
            {"RELAY_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"x" * 24).decode()},
            "RELAY_WEBHOOK_SECRET decodes to 24 bytes; the key must be at least 32 random bytes "
            "(e.g. whsec_ followed by `openssl rand -base64 32`)",
        ),
        (
            {"RELAY_WEBHOOK_SECRET": "whsec_" + "!" * 44},
            "RELAY_WEBHOOK_SECRET is not valid base64 after whsec_",
        ),
        (
            {"RELAY_WEBHOOK_SECRET": "f3a9c2e17b5d4a8c9e0f1a2b3c4d5e6"},
            "RELAY_WEBHOOK_SECRET is 31 bytes; it must be at least 32 random bytes (e.g. `openssl rand -hex 32`)",
        ),
        (
            {"RELAY_WEBHOOK_SECRET": "REPLACE_ME"},
            "RELAY_WEBHOOK_SECRET is a placeholder ('REPLACE_ME'); set the real secret",
        ),
        (
            {"RELAY_WEBHOOK_SECRET": SECRET, "RELAY_WEBHOOK_BACKOFF": "20", "RELAY_WEBHOOK_BACKOFF_MAX": "10"},
            "RELAY_WEBHOOK_BACKOFF_MAX (10) must be >= RELAY_WEBHOOK_BACKOFF (20)",
        ),
    ],
)
def test_webhook_settings_that_cannot_work_stop_serve_with_one_line(env: dict[str, str], expected: str) -> None:
    message, _ = refused(env)
    assert message == expected
    assert SECRET not in message


def test_a_profile_webhook_url_without_a_secret_stops_serve(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.sales]\nwebhook_url = "https://crm.example.com/hooks"\n')
    message, _ = refused({"RELAY_PROFILES": str(profiles)})
    assert message == "profiles.sales.webhook_url needs RELAY_WEBHOOK_SECRET to sign the deliveries with"
    profiles.write_text('[profiles.sales]\nwebhook_url = "crm.example.com/hooks"\n')
    message, _ = refused({"RELAY_PROFILES": str(profiles), "RELAY_WEBHOOK_SECRET": SECRET})
    assert message == (
        f"RELAY_PROFILES ({profiles}): profiles.sales.webhook_url must be an http:// or https:// URL with a host, "
        "got 'crm.example.com/hooks'"
    )


def test_the_webhook_settings_are_read_from_the_environment() -> None:
    base = {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "RELAY_WEBHOOK_SECRET": SECRET}
    settings = Settings.from_env({**base, "RELAY_WEBHOOK_URL": "https://hooks.example.com/relay"})
    assert settings.webhook_url == "https://hooks.example.com/relay" and settings.webhook_secret == SECRET_KEY
    assert (settings.webhook_timeout_s, settings.webhook_backoff_s, settings.webhook_backoff_max_s) == (
        5.0,
        10.0,
        1800.0,
    )
    raw = Settings.from_env({**base, "RELAY_WEBHOOK_SECRET": "9c1f4e7a2b8d5036c1e4f7a2b8d50369"})
    assert raw.webhook_secret == b"9c1f4e7a2b8d5036c1e4f7a2b8d50369" and raw.webhook_url is None
    with pytest.raises(ConfigError):
        Settings.from_env({**base, "RELAY_WEBHOOK_TIMEOUT": "0"})
