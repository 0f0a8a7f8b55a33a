"""``python -m bench.sip_timing``: what SIP mode's control path costs on loopback, against the
simulated SIP connector (relay/sim/sip) with Redis from REDIS_URL (default 127.0.0.1:6379/15).

Per call, in sequence: the webhook's answer time, the webhook sent -> accept received, the accept ->
sideband open, and for the call's end_call the goodbye's ``output_audio_buffer.stopped`` -> hang-up.
These are the relay's own share (loopback, no network); the audio path is OpenAI's and not measured.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import statistics
import sys
import time

from relay import logs
from relay.config import Settings
from relay.sim.local import LocalRelay
from relay.sim.realtime import SimConfig
from relay.sim.sip import SipSimulator

CALLS = 20


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p50 = statistics.median(ordered) * 1000
    return f"p50 {p50:.1f} ms, max {ordered[-1] * 1000:.1f} ms"


async def main() -> int:
    logs.configure("ERROR", stream=sys.stderr)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    config = SimConfig(realtime_factor=8.0, greeting_reply_ms=400, reply_ms=500, speech_before_calls_ms=800)
    config.function_calls_on_turn = {1: [("end_call", '{"reason": "done"}')]}
    sim = SipSimulator(config, webhook_secret=secret)
    await sim.start()
    settings = Settings(
        openai_api_key="offline-bench",
        realtime_url=sim.url,
        openai_api_base=sim.api_base,
        openai_webhook_secret=secret,
        twilio_auth_token=secrets.token_hex(16),
        stream_secret=secrets.token_bytes(32),
        redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
        redis_prefix=f"bench-sip:{secrets.token_hex(4)}:",
        caller_memory=False,
    )
    answered: list[float] = []
    to_accept: list[float] = []
    to_sideband: list[float] = []
    to_hangup: list[float] = []
    try:
        async with LocalRelay(settings) as relay:
            url = f"{relay.base_url}/openai/webhook"
            for _ in range(CALLS):
                call = sim.new_call()
                sent = time.monotonic()
                status = await sim.deliver(url, call)
                answered.append(time.monotonic() - sent)
                assert status == 200
                while not call.sessions:
                    await asyncio.sleep(0.001)
                to_accept.append(call.request_times[0] - sent)
                to_sideband.append(call.sessions[0].connected_at - call.request_times[0])
                while not call.stopped_at:
                    await asyncio.sleep(0.005)
                await sim.caller_says(call, 600)
                while call.state == "accepted":
                    await asyncio.sleep(0.001)
                to_hangup.append(call.request_times[-1] - call.stopped_at[-1])
                while relay.runtime.calls or relay.runtime.sip_tasks:
                    await asyncio.sleep(0.005)
    finally:
        await sim.stop()
    print(f"{CALLS} SIP calls on loopback (Redis store), one at a time")
    print(f"  webhook answered:                        {_ms(answered)}")
    print(f"  webhook sent -> accept received:         {_ms(to_accept)}")
    print(f"  accept -> sideband open:                 {_ms(to_sideband)}")
    print(f"  goodbye played (.stopped) -> hang-up:    {_ms(to_hangup)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
