"""``python -m relay demo --sip``: one SIP-mode call, offline, printed as a timeline.

The real relay runs under uvicorn on loopback; the simulated SIP connector (relay/sim/sip) plays
OpenAI: it rings the relay with a signed ``realtime.call.incoming`` webhook, takes the accept over
its REST API and serves the call's sideband, where the caller's speech, keys and the assistant's
playback show up as events. The caller is greeted, asks about an order (the model looks it up),
keys in ``7 #``, and the assistant says goodbye and hangs up.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import sys
import time

from relay import logs
from relay.config import Settings
from relay.sim.local import LocalRelay
from relay.sim.realtime import SimConfig
from relay.sim.sip import SipSimulator


def _print(t0: float, text: str) -> None:
    print(f"{time.monotonic() - t0:7.2f}s  {text}", flush=True)


async def run_sip_demo(*, verbose: bool = False) -> int:
    logs.configure("INFO" if verbose else "ERROR", stream=sys.stderr)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    config = SimConfig(greeting_reply_ms=2000, reply_ms=2400, realtime_factor=4.0, speech_before_calls_ms=1200)
    config.function_calls_on_turn = {
        1: [("lookup_order", '{"order_id": "10042"}')],
        2: [("end_call", '{"reason": "the caller has what they needed"}')],
    }
    sim = SipSimulator(config, webhook_secret=secret)
    await sim.start()
    settings = Settings(
        openai_api_key="offline-demo",
        realtime_url=sim.url,
        openai_api_base=sim.api_base,
        openai_webhook_secret=secret,
        twilio_auth_token=secrets.token_hex(16),
        stream_secret=secrets.token_bytes(32),
        caller_memory=False,
    )
    t0 = time.monotonic()
    try:
        async with LocalRelay(settings) as relay:
            print(
                f"relay listening on {relay.base_url}; simulated SIP connector: REST {sim.api_base}, "
                f"sideband {sim.url}\n",
                flush=True,
            )
            call = await sim.offer(f"{relay.base_url}/openai/webhook")
            _print(t0, f"webhook realtime.call.incoming (signed, {call.webhook_id}) -> 200")
            while not call.sessions:
                await asyncio.sleep(0.01)
            _print(t0, f"accept {call.call_id}; sideband open (?call_id=…, no model)")
            while not call.stopped_at:
                await asyncio.sleep(0.01)
            _print(t0, "greeting played (output_audio_buffer.started … stopped)")
            _print(t0, "caller asks about an order (1.2 s of speech)")
            await sim.caller_says(call, 1200)
            while len(call.stopped_at) < 2:
                await asyncio.sleep(0.01)
            _print(t0, "the assistant says it will look it up; the model calls lookup_order")
            while len(call.stopped_at) < 3:
                await asyncio.sleep(0.01)
            _print(t0, "lookup_order's result went back (function_call_output + one response.create); answer played")
            sim.caller_keys(call, "7#")
            _print(t0, "caller keys in 7 # (input_audio_buffer.dtmf_event_received)")
            while len(call.stopped_at) < 4:
                await asyncio.sleep(0.01)
            _print(t0, "the keypad entry was answered")
            _print(t0, "caller says thanks (0.8 s)")
            await sim.caller_says(call, 800, seed=2)
            while call.state == "accepted":
                await asyncio.sleep(0.01)
            _print(t0, "goodbye played, then end_call hung up (POST …/hangup)")
            deadline = time.monotonic() + 10
            while (relay.runtime.calls or relay.runtime.sip_tasks) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            record = await relay.runtime.store.get_call(call.call_id)
    finally:
        await sim.stop()
    print("\nwhat happened", flush=True)
    print(f"  REST requests: {', '.join(action for action, _ in call.requests)}")
    sent = [event["type"] for session in call.sessions for _, event in session.received]
    print(
        f"  sent on the sideband: {sent.count('response.create')} response.create, "
        f"{sent.count('conversation.item.create')} conversation.item.create"
    )
    if record is not None:
        print("  conversation record:")
        for entry in record.entries:
            detail = (
                entry.get("text")
                or entry.get("digits")
                or entry.get("output")
                or entry.get("name")
                or entry.get("event")
            )
            print(f"    {entry['kind']:<13} {str(detail)[:90]}")
        print(f"  ended: {record.meta.get('end_reason')}")
    ok = record is not None and [a for a, _ in call.requests] == ["accept", "hangup"]
    return 0 if ok else 1
