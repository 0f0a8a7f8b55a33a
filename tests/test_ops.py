"""Operations endpoints: health, readiness, admission control, and Prometheus metrics that move with calls."""

from __future__ import annotations

import asyncio
import dataclasses
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from conftest import RedisProcess, make_caller, relay_settings, wait_for
from ops_support import Samples, metric, parse_metrics
from prometheus_client import CollectorRegistry

from relay.config import Settings
from relay.metrics import Metrics, usage_cost
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator

PRICES = {"input_text": 4.0, "input_audio": 32.0, "cached": 0.4, "output_text": 16.0, "output_audio": 64.0}
FAMILIES = [
    "relay_active_calls",
    "relay_calls_started",
    "relay_calls_ended",
    "relay_calls_refused",
    "relay_hop_latency_seconds",
    "relay_mouth_to_ear_seconds",
    "relay_barge_ins",
    "relay_truncations",
    "relay_realtime_errors",
    "relay_upstream_reconnects",
    "relay_tool_calls",
    "relay_tool_duration_seconds",
    "relay_tokens",
    "relay_cost_usd",
    "relay_call_cost_usd",
    "relay_responses",
    "relay_store_queue_depth",
    "relay_store_dropped_writes",
    "relay_draining",
]

# ---- helpers ---------------------------------------------------------------------------------


async def scrape(base_url: str) -> Samples:
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(base_url + "/metrics")
    assert response.status_code == 200
    return parse_metrics(response.text)[1]


async def get(base_url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as http:
        return await http.get(base_url + path)


async def wait_for_metric(base_url: str, name: str, minimum: float, /, timeout: float = 5.0, **labels: str) -> float:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = metric(await scrape(base_url), name, **labels)
        if value >= minimum or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.05)


def overflow_verbs(body: str) -> list[str]:
    root = ET.fromstring(body)
    assert root.tag == "Response"
    return [child.tag for child in root]


# ---- endpoints -------------------------------------------------------------------------------


async def test_health_ready_and_metrics_need_no_signature_and_speak_prometheus(relay: LocalRelay) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        health = await http.get(relay.base_url + "/healthz")
        ready = await http.get(relay.base_url + "/readyz")
        scraped = await http.get(relay.base_url + "/metrics")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["draining"] is False
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    types, _ = parse_metrics(scraped.text)
    missing = [name for name in FAMILIES if name not in types]
    assert not missing
    assert types["relay_hop_latency_seconds"] == "histogram"
    assert types["relay_mouth_to_ear_seconds"] == "histogram"
    assert types["relay_tool_duration_seconds"] == "histogram"
    assert types["relay_calls_ended"] == "counter"
    assert types["relay_active_calls"] == "gauge"
    assert types["relay_store_dropped_writes"] == "counter"


async def test_metrics_can_be_switched_off(sim: RealtimeSimulator) -> None:
    async with LocalRelay(relay_settings(sim.url, metrics_enabled=False)) as relay:
        assert (await get(relay.base_url, "/metrics")).status_code == 404
        assert (await get(relay.base_url, "/healthz")).status_code == 200


# ---- admission control: MAX_CALLS and overflow TwiML -----------------------------------------


@pytest.mark.parametrize("dial", [None, "+15550009999"])
async def test_full_instance_answers_overflow_twiml_and_is_not_ready(sim: RealtimeSimulator, dial: str | None) -> None:
    sim.config.greeting_reply_ms = 200
    settings = relay_settings(sim.url, max_calls=1, overflow_dial=dial, overflow_say="All lines are busy.")
    async with LocalRelay(settings) as relay:
        first = make_caller(relay)
        await first.connect()
        assert await first.wait_for_audio(100, timeout=5)
        ready = await get(relay.base_url, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["active_calls"] == 1 and ready.json()["max_calls"] == 1

        second = make_caller(relay)
        status, body = await second.webhook()
        assert status == 200
        assert "<Stream" not in body
        root = ET.fromstring(body)
        if dial is None:
            assert overflow_verbs(body) == ["Say", "Hangup"]
            assert root.findtext("Say") == "All lines are busy."
        else:
            assert overflow_verbs(body) == ["Dial"]
            assert root.findtext("Dial/Number") == dial
        samples = await scrape(relay.base_url)
        assert metric(samples, "relay_calls_refused_total", reason="full") == 1

        await first.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
        assert (await get(relay.base_url, "/readyz")).status_code == 200
        status, body = await make_caller(relay).webhook()
        assert status == 200 and "<Connect><Stream" in body
    assert sim.connections == 1


async def test_draining_instance_is_not_ready_and_turns_calls_away(sim: RealtimeSimulator, relay: LocalRelay) -> None:
    relay.runtime.start_drain()  # what SIGTERM does (the real signal is tested in test_drain.py)
    ready = await get(relay.base_url, "/readyz")
    assert ready.status_code == 503 and ready.json()["draining"] is True
    status, body = await make_caller(relay).webhook()
    assert status == 503 and "<Response" not in body  # another instance can take it: no "lines busy" TwiML
    samples = await scrape(relay.base_url)
    assert metric(samples, "relay_draining") == 1
    assert metric(samples, "relay_calls_refused_total", reason="draining") == 1


async def test_readiness_follows_redis(sim: RealtimeSimulator, private_redis: RedisProcess) -> None:
    async with LocalRelay(relay_settings(sim.url, redis_url=private_redis.url)) as relay:
        ready = await get(relay.base_url, "/readyz")
        assert ready.status_code == 200 and ready.json()["store"] == "redis" and ready.json()["store_ok"] is True
        private_redis.kill()
        ready = await get(relay.base_url, "/readyz")
        assert ready.status_code == 503 and ready.json()["store_ok"] is False
        assert (await get(relay.base_url, "/healthz")).status_code == 200  # alive, just not ready
        assert (await get(relay.base_url, "/metrics")).status_code == 200  # scrapes never wait on Redis
        private_redis.start()
        assert await wait_for_ready(relay.base_url)


async def wait_for_ready(base_url: str, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if (await get(base_url, "/readyz")).status_code == 200:
            return True
        await asyncio.sleep(0.1)
    return False


# ---- metrics move with real (simulated) calls --------------------------------------------------


async def test_call_metrics_move_with_a_call(sim: RealtimeSimulator) -> None:
    """One call with a greeting, a barge-in, a tool call and a dropped Realtime socket; one refused session."""
    sim.config.greeting_reply_ms = 4000
    sim.config.reply_ms = 500
    sim.config.function_calls_on_turn = {1: [("lookup_order", '{"order_id": "10042"}')]}
    settings = relay_settings(sim.url, price_per_1k_tokens=PRICES)
    async with LocalRelay(settings) as relay:
        base = relay.base_url
        before = await scrape(base)
        assert metric(before, "relay_active_calls") == 0

        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(600, timeout=5)
        during = await scrape(base)
        assert metric(during, "relay_active_calls") == 1
        assert metric(during, "relay_calls_started_total") == 1
        # mouth-to-ear of the greeting: first audio sent, then first mark acknowledged
        assert metric(during, "relay_mouth_to_ear_seconds_count", stage="sent") == 1
        assert metric(during, "relay_mouth_to_ear_seconds_count", stage="played") == 1
        assert metric(during, "relay_hop_latency_seconds_count", direction="caller_to_realtime") >= 1
        assert metric(during, "relay_hop_latency_seconds_count", direction="realtime_to_caller") >= 1

        # barge-in during the long greeting; that utterance is turn 1, answered with a tool call
        caller.say(ulaw.synth_speech(600) + ulaw.silence(800))
        assert await wait_for(lambda: bool(sim.sessions[0].truncates), timeout=5)
        assert await wait_for_metric(base, "relay_tool_calls_total", 1, name="lookup_order", outcome="ok") == 1
        assert await caller.wait_for_audio(4000 // 8 + 300, timeout=5)  # the answer after the tool
        await caller.wait_idle(timeout=5)

        # the Realtime socket drops: the relay opens a new session and the call goes on
        await sim.drop_all()
        assert await wait_for(lambda: sim.connections == 2 and sim.sessions[1].session != {}, timeout=5)
        assert await wait_for_metric(base, "relay_upstream_reconnects_total", 1, reason="dropped") == 1
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)

        # a second call whose Realtime session is refused (bad key): an error by code
        sim.config.expected_api_key = "sk-not-the-configured-key-0000"
        refused = make_caller(relay)
        await refused.connect()
        assert await refused.wait_closed(timeout=5) == 1000
        assert await wait_for(lambda: not relay.runtime.calls)

        after = await scrape(base)
    assert metric(after, "relay_active_calls") == 0
    assert metric(after, "relay_calls_started_total") == 2
    assert metric(after, "relay_calls_ended_total", reason="caller_hung_up") == 1
    assert metric(after, "relay_calls_ended_total", reason="realtime_error:invalid_api_key") == 1
    assert metric(after, "relay_barge_ins_total") == 1  # the one barge-in, during the greeting
    assert metric(after, "relay_truncations_total") == 1  # of the greeting's one item
    assert metric(after, "relay_realtime_errors_total", code="invalid_api_key") == 1
    assert metric(after, "relay_tool_duration_seconds_count", name="lookup_order") == 1
    assert metric(after, "relay_tool_duration_seconds_sum", name="lookup_order") > 0
    for kind in ("input_text", "input_audio", "output_text", "output_audio"):
        assert metric(after, "relay_tokens_total", kind=kind) > 0, kind
    assert metric(after, "relay_tokens_total", kind="total") == 0  # details only, never double counted
    assert metric(after, "relay_responses_total", status="completed") >= 2
    # the cost of every ended call is observed once; it adds up to the running total
    assert metric(after, "relay_call_cost_usd_count") == 2
    assert metric(after, "relay_call_cost_usd_sum") > 0
    assert metric(after, "relay_cost_usd_total") == pytest.approx(metric(after, "relay_call_cost_usd_sum"))
    hop_counts = {
        direction: metric(after, "relay_hop_latency_seconds_count", direction=direction)
        for direction in ("caller_to_realtime", "realtime_to_caller")
    }
    assert all(count >= 2 for count in hop_counts.values()), hop_counts
    assert metric(after, "relay_hop_latency_seconds_sum", direction="caller_to_realtime") > 0
    # the per-call record carries the same estimate
    record = await relay.runtime.store.get_call(caller.call_sid)
    assert record is not None and float(record.meta["cost_usd"]) > 0


async def test_store_queue_and_dropped_writes_move_when_redis_is_down(
    sim: RealtimeSimulator, private_redis: RedisProcess
) -> None:
    sim.config.greeting_reply_ms = 300
    settings = relay_settings(sim.url, redis_url=private_redis.url, store_queue_size=10)
    async with LocalRelay(settings) as relay:
        base = relay.base_url
        private_redis.kill()
        callers = []
        for _ in range(3):  # each call queues several writes (record, transcript, usage, end)
            caller = make_caller(relay)
            await caller.connect()
            assert await caller.wait_for_audio(200, timeout=5)  # audio flows without Redis
            await caller.wait_idle(timeout=5)
            await caller.hangup()
            callers.append(caller)
        assert await wait_for(lambda: not relay.runtime.calls)
        samples = await scrape(base)
        assert metric(samples, "relay_store_queue_depth") == 10
        assert metric(samples, "relay_store_dropped_writes_total") > 0
        dropped = relay.runtime.store.dropped_writes
        assert metric(samples, "relay_store_dropped_writes_total") == dropped
        # Redis comes back: the queue drains, the dropped counter never goes down
        private_redis.start()
        assert await wait_for(lambda: relay.runtime.store.queue_depth == 0, timeout=10)
        samples = await scrape(base)
        assert metric(samples, "relay_store_queue_depth") == 0
        assert metric(samples, "relay_store_dropped_writes_total") == dropped


# ---- units: cost, token kinds, label bounds, price settings -------------------------------------


def test_cost_estimate_uses_per_kind_prices_and_bills_cached_input_at_the_cached_price() -> None:
    usage = {
        "total": 1500,
        "input": 1000,
        "output": 500,
        "input_text": 400,
        "input_audio": 600,
        "input_cached": 500,
        "output_text": 100,
        "output_audio": 400,
    }
    # the 500 cached tokens are all 400 text tokens and 100 of the audio ones
    expected = ((400 - 400) * 4.0 + (600 - 100) * 32.0 + 500 * 0.4 + 100 * 16.0 + 400 * 64.0) / 1000
    assert usage_cost(usage, PRICES) == pytest.approx(expected)
    # without a cached price, cached tokens cost what the same input costs uncached
    no_cache = {k: v for k, v in PRICES.items() if k != "cached"}
    assert usage_cost(usage, no_cache) == pytest.approx((400 * 4.0 + 600 * 32.0 + 100 * 16.0 + 400 * 64.0) / 1000)
    assert usage_cost(usage, {}) == 0.0
    assert usage_cost(usage, {"output_audio": 64.0}) == pytest.approx(400 * 64.0 / 1000)


def test_token_kinds_are_counted_once() -> None:
    metrics = Metrics(CollectorRegistry())
    cost = metrics.record_usage({"total": 30, "input": 10, "output": 20, "input_text": 10, "output_audio": 20}, PRICES)
    assert cost == pytest.approx((10 * 4.0 + 20 * 64.0) / 1000)
    metrics.record_usage({"total": 5, "input": 5}, {})  # no details for a side: its total is the kind
    _, samples = parse_metrics(metrics.render().decode())
    assert metric(samples, "relay_tokens_total", kind="input_text") == 10
    assert metric(samples, "relay_tokens_total", kind="output_audio") == 20
    assert metric(samples, "relay_tokens_total", kind="input") == 5
    assert metric(samples, "relay_tokens_total", kind="total") == 0
    assert metric(samples, "relay_cost_usd_total") == pytest.approx(cost)


def test_free_form_labels_are_bounded() -> None:
    metrics = Metrics(CollectorRegistry())
    for i in range(200):
        metrics.observe("realtime_errors", 1.0, f"weird_code_{i}")
        metrics.call_ended(f"realtime_error:code_{i}")
    metrics.tool_call("made_up_by_the_model", "unknown_tool", 0.0)
    _, samples = parse_metrics(metrics.render().decode())
    codes = {lab["code"] for n, lab, _ in samples if n == "relay_realtime_errors_total"}
    assert len(codes) == 51 and "other" in codes
    assert metric(samples, "relay_realtime_errors_total") == 200
    reasons = {lab["reason"] for n, lab, _ in samples if n == "relay_calls_ended_total"}
    assert len(reasons) == 51
    assert metric(samples, "relay_tool_calls_total", name="unknown", outcome="unknown_tool") == 1


def test_store_counters_are_copied_as_a_monotonic_counter() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.sync_store(5, 3)
    metrics.sync_store(2, 7)
    metrics.sync_store(0, 7)
    _, samples = parse_metrics(metrics.render().decode())
    assert metric(samples, "relay_store_queue_depth") == 0
    assert metric(samples, "relay_store_dropped_writes_total") == 7


def test_prices_come_from_the_environment() -> None:
    env: dict[str, Any] = {
        "RELAY_INSECURE_DEV": "1",
        "RELAY_PRICE_INPUT_TEXT_PER_1K": "0.004",
        "RELAY_PRICE_INPUT_AUDIO_PER_1K": "0.032",
        "RELAY_PRICE_CACHED_PER_1K": "0.0004",
        "RELAY_PRICE_OUTPUT_TEXT_PER_1K": "0.016",
        "RELAY_PRICE_OUTPUT_AUDIO_PER_1K": "0.064",
        "MAX_CALLS": "7",
        "DRAIN_SECONDS": "2.5",
        "RELAY_OVERFLOW_DIAL": "+15550009999",
        "LOG_LEVEL": "debug",
    }
    settings = Settings.from_env(env)
    assert settings.price_per_1k_tokens == {
        "input_text": 0.004,
        "input_audio": 0.032,
        "cached": 0.0004,
        "output_text": 0.016,
        "output_audio": 0.064,
    }
    assert (settings.max_calls, settings.drain_seconds, settings.overflow_dial) == (7, 2.5, "+15550009999")
    assert settings.log_level == "DEBUG"
    assert dataclasses.replace(settings, price_per_1k_tokens={}).price_per_1k_tokens == {}
