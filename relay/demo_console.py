"""``python -m relay demo --console``: the operations console on a running relay, offline.

The relay runs with the Realtime simulator and keeps a few simulated calls going (each caller
listens, talks, cuts the assistant off, keys in an entry and hangs up after a while, then the
next one calls), so the console has live calls, events and a history to show. It prints the
console's URL and a sign-in token made for this run; Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time

from relay import logs
from relay.config import Settings
from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig

DEMO_CALLS = 3  # simulated calls live at once
CALL_SECONDS = 25.0  # how long a simulated caller stays on the line unless the console ends the call


async def _one_call(base_url: str, auth_token: str, n: int) -> None:
    caller = SimulatedCaller(
        CallerConfig(base_url=base_url, auth_token=auth_token, from_number=f"+1555010{n % 10000:04d}")
    )
    try:
        await caller.connect()
        ended_at = time.monotonic() + CALL_SECONDS
        await caller.wait_for_audio(600, timeout=10)
        caller.say(ulaw.synth_speech(900, seed=n))  # cuts into the greeting
        seed = n * 10
        while time.monotonic() < ended_at and caller.close_code is None:
            await caller.wait_idle(timeout=10)
            await asyncio.sleep(1.5)
            seed += 1
            if seed % 3 == 0:
                await caller.enter("42#")
            else:
                await caller.say_and_wait(ulaw.synth_speech(1200, seed=seed))
        if caller.close_code is None:
            await caller.hangup()
    except Exception as exc:  # a call the console hung up or transferred ends its own way
        print(f"simulated call {n} ended: {type(exc).__name__}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            await caller.hangup()


async def _calls(base_url: str, auth_token: str) -> None:
    n = 0
    running: set[asyncio.Task[None]] = set()
    while True:
        while len(running) < DEMO_CALLS:
            n += 1
            task = asyncio.create_task(_one_call(base_url, auth_token, n), name=f"demo-call-{n}")
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(1.0)
        await asyncio.sleep(0.5)


async def run_console_demo(*, seconds: float | None = None, verbose: bool = False) -> int:
    logs.configure("INFO" if verbose else "ERROR", stream=sys.stderr)
    auth_token = secrets.token_hex(16)
    console_token = secrets.token_urlsafe(32)  # made for this run: nobody else knows it
    sim = RealtimeSimulator(SimConfig(greeting_reply_ms=2400, reply_ms=2500, realtime_factor=4.0))
    await sim.start()
    settings = Settings(
        openai_api_key="offline-demo",
        realtime_url=sim.url,
        twilio_auth_token=auth_token,
        stream_secret=secrets.token_bytes(32),
        caller_memory=False,
        console_token=console_token,
        price_per_1k_tokens={"input_audio": 0.032, "output_audio": 0.064, "input_text": 0.004, "output_text": 0.016},
    )
    try:
        async with LocalRelay(settings) as relay:
            print(f"console: {relay.base_url}/console", flush=True)
            print(f"sign-in token (this run only): {console_token}", flush=True)
            print(f"{DEMO_CALLS} simulated calls at a time; Ctrl-C stops", flush=True)
            calls = asyncio.create_task(_calls(relay.base_url, auth_token), name="demo-calls")
            try:
                if seconds is None:
                    await asyncio.Event().wait()
                else:
                    await asyncio.sleep(seconds)
            finally:
                calls.cancel()
                with contextlib.suppress(BaseException):
                    await calls
    finally:
        await sim.stop()
    return 0
