"""Conversation state in Redis, caller memory across instances, and calls that outlive their Realtime socket."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis
from conftest import (
    AUTH_TOKEN,
    RedisProcess,
    assert_relayed_across_sessions,
    free_port,
    greeted,
    make_caller,
    relay_settings,
    talk,
    wait_for,
)
from ops_support import API_TOKEN as OPS_API_TOKEN
from ops_support import RelayProcess

from relay.config import derive_caller_key_secret
from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator
from relay.store import hash_number

API_TOKEN = "test-api-token-abcdef0123456789abcdef"


async def test_full_call_is_recorded_in_redis_in_order_with_ttls(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 2500
    sim.config.reply_ms = 600
    settings = relay_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix, state_ttl_s=3600)
    async with LocalRelay(settings) as relay:
        caller = make_caller(relay)
        await caller.connect()
        assert await caller.wait_for_audio(800, timeout=5)
        caller.say(ulaw.synth_speech(600, seed=3))  # interrupts the greeting
        await caller.wait_for_audio(caller.played_bytes // 8 + 400, timeout=10)
        await caller.wait_idle(timeout=10)
        await caller.enter("7#")
        await asyncio.sleep(0.3)
        await caller.wait_idle(timeout=10)
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
        assert await relay.runtime.store.flush(5)
        async with httpx.AsyncClient(base_url=relay.base_url) as http:
            unauthorized = await http.get(f"/calls/{caller.call_sid}")
            wrong = await http.get(f"/calls/{caller.call_sid}", headers={"Authorization": "Bearer nope"})
            ok = await http.get(f"/calls/{caller.call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert unauthorized.status_code == 401 and wrong.status_code == 401
    assert ok.status_code == 200
    record = ok.json()
    kinds = [e["kind"] for e in record["entries"]]
    # the greeting was interrupted, the caller spoke, the assistant answered, then a key press
    assert kinds.index("interruption") < kinds.index("caller") < kinds.index("dtmf")
    assert kinds[-1] == "system"
    interruption = next(e for e in record["entries"] if e["kind"] == "interruption")
    assert 0 < interruption["audio_end_ms"] < 2500
    assert next(e for e in record["entries"] if e["kind"] == "dtmf")["digits"] == "7#"
    assert any(e["kind"] == "assistant" for e in record["entries"])
    times = [e["t"] for e in record["entries"]]
    assert times == sorted(times)
    meta = record["meta"]
    assert meta["from"] == "+15550001111" and meta["to"] == "+15550002222"
    assert meta["end_reason"] == "caller_hung_up" and meta["dialect"] == "ga" and meta["model"] == "gpt-realtime-2.1"
    assert meta["started"] and meta["ended"] and meta["instance"]
    assert record["usage"]["total"] > 0 and record["usage"]["output_audio"] > 0
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{store_prefix}call:{caller.call_sid}:*"))
    assert len(keys) >= 3
    for key in keys:
        assert 0 < client.ttl(key) <= 3600
    client.close()


async def test_long_conversation_is_summarized_out_of_band_and_trimmed(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 300
    settings = relay_settings(
        sim.url, redis_url=redis_url, redis_prefix=store_prefix, summary_max_turns=4, summary_keep_turns=2
    )
    async with LocalRelay(settings) as relay:
        caller = await greeted(relay, heard_ms=300)
        for turn in range(3):
            await talk(caller, 400, seed=turn)
        assert await wait_for(lambda: relay.runtime.calls[caller.call_sid].call.summary is not None, timeout=5)
        heard_before = len(caller.received_payloads)
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
        await relay.runtime.store.flush(5)
        record = await relay.runtime.store.get_call(caller.call_sid)
    session = sim.sessions[0]
    sent = [event for _, event in session.received]
    summary_requests = [
        e for e in sent if e["type"] == "response.create" and e.get("response", {}).get("conversation") == "none"
    ]
    assert summary_requests and summary_requests[0]["response"]["metadata"]["purpose"] == "summary"
    deleted = [e["item_id"] for e in sent if e["type"] == "conversation.item.delete"]
    assert deleted
    context = [e for e in sent if e["type"] == "conversation.item.create" and e.get("previous_item_id") == "root"]
    assert len(context) >= 1 and "Summary" in context[0]["item"]["content"][0]["text"]
    # the summary was never spoken: every delta the caller got belongs to a conversation response
    oob_ids = {
        e["response"]["id"]
        for e in session.sent
        if e["type"] == "response.created"
        and e["response"].get("conversation_id") is None
        and e["response"].get("metadata")
    }
    relayed = [e for e in session.sent if e["type"] == "response.output_audio.delta"]
    assert not {e["response_id"] for e in relayed} & oob_ids
    assert heard_before == len(relayed)
    assert record is not None and record.summary


async def test_caller_memory_reaches_the_next_call_on_another_instance_process(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 300
    env = {
        "REDIS_URL": redis_url,
        "RELAY_REDIS_PREFIX": store_prefix,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "RELAY_STREAM_SECRET": "shared-secret-between-instances-4d9e",
        "OPENAI_REALTIME_URL": sim.url,
        "OPENAI_API_KEY": "sk-test-instances-000000",
        "RELAY_API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "warning",
    }
    with relay_process(env) as first, relay_process(env) as second:
        caller = SimulatedCaller(CallerConfig(base_url=first, auth_token=AUTH_TOKEN, from_number="+15551230000"))
        await caller.connect()
        await caller.wait_for_audio(300, timeout=10)
        await caller.wait_idle(timeout=10)
        await talk(caller, 500)
        await caller.hangup()
        client = redis.Redis.from_url(redis_url)
        key = derive_caller_key_secret(b"shared-secret-between-instances-4d9e")
        memory_key = f"{store_prefix}caller:{hash_number('+15551230000', key)}"
        assert await wait_for(lambda: client.get(memory_key) is not None, timeout=10)
        memory = client.get(memory_key).decode()
        assert client.ttl(memory_key) > 7 * 24 * 3600
        client.close()

        again = SimulatedCaller(CallerConfig(base_url=second, auth_token=AUTH_TOKEN, from_number="+15551230000"))
        await again.connect()
        await again.wait_for_audio(100, timeout=10)
        await again.hangup()
        async with httpx.AsyncClient() as http:
            rec1 = (
                await http.get(f"{second}/calls/{caller.call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"})
            ).json()
            rec2 = (
                await http.get(f"{first}/calls/{again.call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"})
            ).json()
    assert rec1["meta"]["instance"] != rec2["meta"]["instance"]
    assert rec2["meta"]["caller_memory"] == "1"
    update = next(e for _, e in sim.sessions[1].received if e["type"] == "session.update")
    assert memory in update["session"]["instructions"]
    first_update = next(e for _, e in sim.sessions[0].received if e["type"] == "session.update")
    assert "previous calls" not in first_update["session"]["instructions"]


async def test_callers_who_withhold_their_number_share_no_memory(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 300
    relay = RelayProcess(
        sim.url, REDIS_URL=redis_url, RELAY_REDIS_PREFIX=store_prefix, RELAY_CALLER_MEMORY="1", LOG_LEVEL="info"
    )
    await relay.start()
    client = redis.Redis.from_url(redis_url)
    headers = {"Authorization": f"Bearer {OPS_API_TOKEN}"}
    try:
        callers = []
        async with httpx.AsyncClient() as http:

            async def ended(call_sid: str) -> bool:
                response = await http.get(f"{relay.base_url}/calls/{call_sid}", headers=headers)
                return response.status_code == 200 and "ended" in response.json()["meta"]

            for seed in (1, 2):
                caller = SimulatedCaller(
                    CallerConfig(base_url=relay.base_url, auth_token=AUTH_TOKEN, from_number="Anonymous")
                )
                await caller.connect()
                await caller.wait_for_audio(300, timeout=10)
                await caller.wait_idle(timeout=10)
                await talk(caller, 500, seed=seed)  # a turn: a remembered caller would get a final summary
                await caller.hangup()
                deadline = time.monotonic() + 10
                while not await ended(caller.call_sid):
                    assert time.monotonic() < deadline, "the call was never recorded as ended"
                    await asyncio.sleep(0.05)
                callers.append(caller)
            records = [
                (await http.get(f"{relay.base_url}/calls/{c.call_sid}", headers=headers)).json() for c in callers
            ]
        assert list(client.scan_iter(match=f"{store_prefix}caller:*")) == []  # nothing remembered
        assert [r["meta"]["caller_memory"] for r in records] == ["0", "0"]
        for session in sim.sessions[:2]:
            update = next(e for _, e in session.received if e["type"] == "session.update")
            assert "previous calls" not in update["session"]["instructions"]
        off = [line for line in relay.lines if line["msg"].startswith("caller memory off for this call")]
        assert [(line["msg"], line["call_sid"]) for line in off] == [
            ("caller memory off for this call: the caller number is not an E.164 number", c.call_sid) for c in callers
        ]
    finally:
        client.close()
        await relay.close()


class relay_process:
    """``python -m relay serve`` as a separate process on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            **env,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "PUBLIC_URL": f"http://127.0.0.1:{self.port}",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=0.5).status_code == 200:
                    return f"http://127.0.0.1:{self.port}"
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("relay process did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("fault", ["kill", "pause", "client_pause"])
async def test_redis_outage_mid_call_never_touches_audio(
    sim: RealtimeSimulator, private_redis: RedisProcess, fault: str
) -> None:
    sim.config.greeting_reply_ms = 400
    sim.config.reply_ms = 800
    settings = relay_settings(sim.url, redis_url=private_redis.url)
    async with LocalRelay(settings) as relay:
        caller = make_caller(relay)
        await caller.connect()
        await caller.wait_for_audio(400, timeout=5)
        await caller.wait_idle(timeout=5)
        if fault == "kill":
            private_redis.kill()
        elif fault == "pause":
            private_redis.pause()  # SIGSTOP: the server hangs with its sockets open
        else:
            admin = redis.Redis.from_url(private_redis.url)
            admin.execute_command("CLIENT", "PAUSE", "4000", "ALL")  # Redis itself stops answering clients
            admin.close()
        await talk(caller, 500, seed=1)
        await talk(caller, 500, seed=2)
        assert relay.runtime.store.queue_depth > 0
        if fault == "kill":
            private_redis.restart()
        elif fault == "pause":
            private_redis.resume()
        await talk(caller, 500, seed=3)
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
        assert await relay.runtime.store.flush(10)
        record = await relay.runtime.store.get_call(caller.call_sid)
    session = sim.sessions[0]
    assert session.appended == caller.sent_payloads
    deltas = [e["delta"] for e in session.sent if e["type"] == "response.output_audio.delta"]
    assert caller.received_payloads == deltas
    assert record is not None
    assert record.meta["end_reason"] == "caller_hung_up"
    if fault != "kill":  # nothing was lost: the writer held on to it
        assert [e["kind"] for e in record.entries].count("caller") == 3
    else:
        assert [e["kind"] for e in record.entries].count("caller") >= 1


async def test_dropped_realtime_socket_resumes_on_a_new_seeded_session(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 500
    settings = relay_settings(sim.url, summary_max_turns=3, summary_keep_turns=2)
    async with LocalRelay(settings) as relay:
        caller = await greeted(relay, heard_ms=300)
        await talk(caller, 400, seed=1)
        await talk(caller, 400, seed=2)
        bridge = relay.runtime.calls[caller.call_sid]
        assert await wait_for(lambda: bridge.call is not None and bridge.call.summary is not None, timeout=5)
        summary = bridge.call.summary if bridge.call else None
        frames_before_drop = len(caller.sent_payloads)
        await sim.drop_all()
        assert await wait_for(lambda: len(sim.sessions) == 2 and sim.sessions[1].session.get("instructions"), timeout=5)
        heard = caller.played_bytes
        await talk(caller, 400, seed=3)
        assert caller.played_bytes > heard
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
        record = await relay.runtime.store.get_call(caller.call_sid)
    assert caller.close_code is None or caller.close_code == 1000
    first, second = sim.sessions
    update = next(e for _, e in second.received if e["type"] == "session.update")
    instructions = update["session"]["instructions"]
    assert summary and summary in instructions
    assert "caller turn 2" in instructions  # the most recent turns, as transcribed
    assert "already in progress" in instructions
    # no second greeting on the new session
    assert not any(e["type"] == "response.create" for _, e in second.received)
    assert_relayed_across_sessions(first, second, caller.sent_payloads)
    assert len(first.appended) >= frames_before_drop - 5
    assert record is not None
    assert any(e.get("event") == "realtime_reconnected" for e in record.entries)


async def test_a_turn_the_lost_session_took_is_not_heard_again_by_the_new_one(sim: RealtimeSimulator) -> None:
    """The Realtime socket drops just after the caller's question became a turn (and while its audio
    is still among the recent frames kept for replay): the new session must not hear it again, or the
    model answers it twice and runs its tool twice."""
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    sim.config.function_calls_on_turn = {1: [("lookup_order", '{"order_id": "10042"}')]}
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = await greeted(relay, heard_ms=300)
        caller.say(ulaw.synth_speech(500, seed=4))
        assert await wait_for(lambda: sim.sessions[0].turns == 1, timeout=5)
        # the relay has read that turn's speech_stopped (a drop can lose an event still in flight,
        # and then nothing says that audio was taken: that is another test's case)
        call = relay.runtime.calls[caller.call_sid].call
        assert call is not None
        assert await wait_for(lambda: call.caller_audio_committed_ms > 0, timeout=5)
        await sim.drop_all()
        assert await wait_for(lambda: len(sim.sessions) == 2 and sim.sessions[1].session != {}, timeout=5)
        # long enough for the new session's VAD to take a replayed utterance as a turn of its own
        await asyncio.sleep(1.5)
        second = sim.sessions[1]
        assert second.speech_started_at == []
        assert second.turns == 0
        # the call goes on: the next question is heard and answered on the new session
        heard = caller.played_bytes
        await caller.say_and_wait(ulaw.synth_speech(400, seed=5))
        assert await caller.wait_for_audio(heard // 8 + 300, timeout=10)
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
    assert second.turns == 1
    assert len(second.speech_started_at) == 1
    # the question's turn reached the new session as text instead
    update = next(e for _, e in second.received if e["type"] == "session.update")
    assert "caller turn 1" in update["session"]["instructions"]


async def test_an_utterance_cut_by_a_dropped_session_is_heard_whole_by_the_new_one(sim: RealtimeSimulator) -> None:
    """The socket drops while the caller is still speaking: the new session gets the start of that
    utterance again (it was never made into a turn), so the question is answered once, not lost."""
    sim.config.greeting_reply_ms = 300
    sim.config.reply_ms = 400
    async with LocalRelay(relay_settings(sim.url)) as relay:
        caller = await greeted(relay, heard_ms=300)
        heard = caller.played_bytes
        caller.say(ulaw.synth_speech(1000, seed=6))
        assert await wait_for(lambda: bool(sim.sessions[0].speech_started_at), timeout=5)
        await sim.drop_all()
        assert await wait_for(lambda: len(sim.sessions) == 2 and sim.sessions[1].turns == 1, timeout=5)
        assert await caller.wait_for_audio(heard // 8 + 300, timeout=10)
        await caller.hangup()
        assert await wait_for(lambda: not relay.runtime.calls)
    first, second = sim.sessions
    assert first.turns == 0
    # the replacement heard the utterance from before the drop: its audio began inside the speech
    cut = len(first.appended)
    start = len(caller.sent_payloads) - len(second.appended)
    assert start < cut
    assert_relayed_across_sessions(first, second, caller.sent_payloads)


async def test_reconnect_gives_up_after_the_cap_and_ends_cleanly(sim: RealtimeSimulator) -> None:
    settings = relay_settings(sim.url, reconnect_attempts=2, reconnect_backoff_s=0.05)
    async with LocalRelay(settings) as relay:
        caller = make_caller(relay)
        await caller.connect()
        await caller.wait_for_audio(100, timeout=5)
        await sim.stop()  # the API is gone for good
        assert await caller.wait_closed(timeout=10) == 1000
        assert await wait_for(lambda: not relay.runtime.calls)
        record = await relay.runtime.store.get_call(caller.call_sid)
    assert record is not None and record.meta["end_reason"] == "realtime_unavailable"


async def test_session_rolls_over_before_the_maximum_duration(sim: RealtimeSimulator) -> None:
    sim.config.greeting_reply_ms = 200
    settings = relay_settings(sim.url, session_max_s=1.5, session_update_timeout_s=0.5)
    async with LocalRelay(settings) as relay:
        caller = make_caller(relay)
        await caller.connect()
        await caller.wait_for_audio(200, timeout=5)
        assert await wait_for(lambda: len(sim.sessions) >= 2, timeout=6)
        await talk(caller, 400)
        await caller.hangup()
    first, second = sim.sessions[:2]
    assert first.closed
    assert_relayed_across_sessions(first, second, caller.sent_payloads)
    # no second greeting on the new session
    assert not any(e["type"] == "response.create" for _, e in second.received)
