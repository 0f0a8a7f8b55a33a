"""``python -m relay demo``: one complete phone call, offline, with no keys.

The real relay runs under uvicorn on loopback, exactly as in production; the Realtime
simulator plays the model and the simulated caller plays Twilio (signed webhook, TwiML,
Media Stream paced at 20 ms, marks acknowledged after real-time playback). The caller
listens to the greeting, asks something, interrupts the answer, keys in an entry, and hangs up.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time

from relay import logs
from relay.config import Settings
from relay.realtime.models import DEFAULT_MODEL_BETA, DEFAULT_MODEL_GA
from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig


def _print(t0: float, text: str) -> None:
    print(f"{time.monotonic() - t0:7.2f}s  {text}", flush=True)


async def run_demo(
    *, dialect: str = "ga", record: str | None = None, seconds: float = 12.0, verbose: bool = False
) -> int:
    logs.configure("INFO" if verbose else "ERROR", stream=sys.stderr)
    auth_token = secrets.token_hex(16)
    sim = RealtimeSimulator(SimConfig(greeting_reply_ms=2400, reply_ms=3000, realtime_factor=4.0))
    await sim.start()
    settings = Settings(
        openai_api_key="offline-demo",
        realtime_url=sim.url,
        dialect=dialect,  # type: ignore[arg-type]
        model=DEFAULT_MODEL_GA if dialect == "ga" else DEFAULT_MODEL_BETA,
        twilio_auth_token=auth_token,
        stream_secret=secrets.token_bytes(32),
        caller_memory=False,
    )
    t0 = time.monotonic()
    try:
        async with LocalRelay(settings) as relay:
            print(
                f"relay listening on {relay.base_url} (uvicorn, uvloop, httptools); "
                f"Realtime simulator at {sim.url} ({dialect} dialect)\n",
                flush=True,
            )
            caller = SimulatedCaller(CallerConfig(base_url=relay.base_url, auth_token=auth_token))
            status, body = await caller.webhook()
            _print(t0, f"webhook POST /incoming-call (signed) -> {status}, TwiML <Connect><Stream>")
            stream = caller.parse_twiml(body)
            await caller.connect(stream)
            _print(t0, f"media stream open: call {caller.call_sid}, stream {caller.stream_sid}")
            await caller.wait_for_audio(300, timeout=10)
            _print(t0, "caller hears the assistant's greeting")
            await caller.wait_idle(timeout=10)
            _print(t0, f"greeting finished ({caller.played_bytes // 8} ms of audio played)")
            _print(t0, "caller speaks for 1.2 s")
            await caller.say_and_wait(ulaw.synth_speech(1200, seed=1))
            before = caller.played_bytes
            await caller.wait_for_audio(before // 8 + 1200, timeout=10)
            _print(t0, "assistant answers; caller interrupts after 1.2 s of it")
            await caller.say_and_wait(ulaw.synth_speech(900, seed=2))
            await caller.wait_for_audio(caller.played_bytes // 8 + 500, timeout=10)
            await caller.wait_idle(timeout=10)
            _print(t0, "caller keys in 5 # on the keypad")
            await caller.enter("5#")
            await asyncio.sleep(0.3)
            await caller.wait_idle(timeout=10)
            remaining = seconds - (time.monotonic() - t0)
            if remaining > 0:
                await asyncio.sleep(min(remaining, 5.0))
            await caller.hangup()
            _print(t0, "caller hangs up")
            deadline = time.monotonic() + 10
            while relay.runtime.calls and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            record_data = await relay.runtime.store.get_call(caller.call_sid)
    finally:
        await sim.stop()

    session = sim.sessions[0]
    truncates = session.truncates
    print("\nwhat happened", flush=True)
    kinds = [kind for _, kind, _ in caller.events]
    print(
        f"  caller frames sent: {len(caller.sent_payloads)}, received by the model: {len(session.appended)}, "
        f"identical and in order: {session.appended == caller.sent_payloads}"
    )
    deltas = [e for e in session.sent if e["type"] in ("response.output_audio.delta", "response.audio.delta")]
    print(
        f"  assistant audio chunks: {len(deltas)} sent by the model, {len(caller.received_payloads)} played "
        f"or cleared at the caller, marks acknowledged: {kinds.count('mark_echo')}"
    )
    for t in truncates:
        print(
            f"  barge-in: Twilio clear + conversation.item.truncate at {t['audio_end_ms']} ms "
            f"of {t.get('sent_ms', '?')} ms generated"
        )
    latencies = caller.mouth_to_ear_ms()
    if latencies:
        shown = ", ".join(f"{v:.0f} ms" for v in latencies)
        print(f"  mouth-to-ear latency (end of caller speech -> first answer audio heard): {shown}")
    if record_data is not None:
        print("  conversation record:")
        for entry in record_data.entries:
            detail = entry.get("text") or entry.get("digits") or entry.get("reason") or entry.get("event") or ""
            if entry["kind"] == "interruption":
                detail = f"assistant cut at {entry['audio_end_ms']} ms"
            elif entry["kind"] == "latency":
                detail = f"{entry.get('mouth_to_ear_ms', '?')} ms mouth to ear"
            print(f"    {entry['kind']:<13} {detail}")
        print(f"  ended: {record_data.meta.get('end_reason')}")
    if record:
        caller.write_recording(record)
        print(f"  what the caller heard: {record} ({len(caller.heard) / 8000:.1f} s, 8 kHz)")
    ok = session.appended == caller.sent_payloads and bool(caller.received_payloads)
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig()
    raise SystemExit(asyncio.run(run_demo()))
