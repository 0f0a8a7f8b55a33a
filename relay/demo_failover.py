"""``python -m relay demo --failover``: a call survives the instance carrying it, offline, with no keys.

Two real relay processes (``python -m relay serve``) share a Redis; the simulated Twilio places a call
through a round-robin balancer. Mid-sentence, the instance carrying its stream is killed with
SIGKILL. Twilio (simulated, following the TwiML after ``</Connect>``) fetches the continuation from the
other instance, which takes the call over and resumes the conversation on a new Realtime session: no
second greeting, the caller's next words answered. The demo prints the call as a timeline.

Redis comes from REDIS_URL, or a private ``redis-server`` the demo starts (and stops) itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx

from relay.sim import ulaw
from relay.sim.caller import TWILIO_RECONNECT_S, Balancer, CallerConfig, TwilioCall
from relay.sim.realtime import RealtimeSimulator, SimConfig

PUBLIC_URL = "https://relay.demo.invalid"  # where Twilio believes the relay is; the balancer maps it
START_TIMEOUT_S = 20.0


class DemoUnavailable(RuntimeError):
    """Something the demo needs is missing on this machine."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _redis() -> Iterator[str]:
    """REDIS_URL when set, else a private redis-server without persistence for the demo's length."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.path.exists(p)), None
    )
    if binary is None:
        raise DemoUnavailable("the failover demo needs Redis: set REDIS_URL, or install redis-server")
    port = _free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DemoUnavailable(f"redis-server did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Instance:
    """One ``python -m relay serve`` process of the demo."""

    name: str
    env: dict[str, str]
    verbose: bool
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        sink = None if self.verbose else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=env, stdout=sink, stderr=sink, start_new_session=True
        )

    async def start(self) -> None:
        self.proc = self._launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as http:
            while True:
                if self.proc.poll() is not None:
                    raise DemoUnavailable(f"{self.name} exited with {self.proc.returncode} (try --verbose)")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(self.url + "/readyz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise DemoUnavailable(f"{self.name} did not become ready within {START_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def _two_instances(redis_url: str, sim_url: str, verbose: bool) -> AsyncIterator[tuple[Instance, Instance]]:
    env = {
        "OPENAI_API_KEY": "offline-demo",
        "OPENAI_REALTIME_URL": sim_url,
        "TWILIO_AUTH_TOKEN": secrets.token_hex(16),
        "RELAY_STREAM_SECRET": secrets.token_hex(32),
        "RELAY_API_TOKEN": secrets.token_hex(24),
        "REDIS_URL": redis_url,
        "RELAY_REDIS_PREFIX": f"demo-{secrets.token_hex(4)}:",
        "PUBLIC_URL": PUBLIC_URL,
        "RELAY_CALLER_MEMORY": "0",
        "LOG_LEVEL": "INFO" if verbose else "ERROR",
    }
    instances = (Instance("instance A", env, verbose), Instance("instance B", env, verbose))
    try:
        await asyncio.gather(*(instance.start() for instance in instances))
        yield instances
    finally:
        for instance in instances:
            instance.stop()


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def print(self, text: str, at: float | None = None) -> None:
        print(f"{(at if at is not None else time.monotonic()) - self.t0:7.2f}s  {text}", flush=True)


async def run_failover_demo(*, verbose: bool = False) -> int:
    try:
        with _redis() as redis_url:
            return await _run(redis_url, verbose)
    except DemoUnavailable as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


async def _run(redis_url: str, verbose: bool) -> int:
    sim = RealtimeSimulator(SimConfig(greeting_reply_ms=2000, reply_ms=4000, realtime_factor=4.0))
    await sim.start()
    try:
        async with _two_instances(redis_url, sim.url, verbose) as (a, b):
            names = {a.url: a.name, b.url: b.name}
            print(f"{a.name} on {a.url}, {b.name} on {b.url}, sharing Redis; Realtime simulator at {sim.url}")
            print(f"Twilio (simulated) reaches them through a round-robin balancer as {PUBLIC_URL}\n", flush=True)
            return await _call(a, b, names, sim)
    finally:
        await sim.stop()


async def _call(a: Instance, b: Instance, names: dict[str, str], sim: RealtimeSimulator) -> int:
    auth = a.env["TWILIO_AUTH_TOKEN"]
    line = Timeline()
    config = CallerConfig(base_url=a.url, auth_token=auth, public_url=PUBLIC_URL)
    call = TwilioCall(config, Balancer([a.url, b.url]), reconnect_delay_s=TWILIO_RECONNECT_S)
    shown = 0

    def twilio_events() -> None:
        """Print what Twilio did since the last call, from its own record."""
        nonlocal shown
        for at, kind, details in call.events[shown:]:
            where = names.get(details.get("instance", ""), "")
            text = {
                "webhook": f"Twilio POSTs /incoming-call -> {where}: {details.get('status')}",
                "stream_open": f"Twilio opens media stream {details.get('leg')} on {where}",
                "stream_closed": f"media stream on {where} is gone (code {details.get('code')}); "
                f"Twilio goes on with the TwiML after </Connect>",
                "redirect": f"Twilio POSTs the <Redirect> /continue-call -> {where}: {details.get('status')}, "
                "a new <Connect><Stream>",
                "say": f"Twilio says {details.get('text')!r}",
                "dial": f"Twilio dials {details.get('number')}",
                "ended": f"call ended: {details.get('outcome')}",
            }.get(kind, f"Twilio: {kind} {details}")
            line.print(text, at)
        shown = len(call.events)

    async with call:
        await call.start()
        twilio_events()
        leg = call.leg
        await leg.wait_for_audio(300, timeout=10)
        line.print("caller hears the greeting")
        await leg.wait_idle(timeout=10)
        line.print("caller asks something (1.2 s)")
        await leg.say_and_wait(ulaw.synth_speech(1200, seed=1))
        heard = leg.played_bytes
        await leg.wait_for_audio(heard // 8 + 1500, timeout=10)
        carrier, other = (a, b) if call.leg_instances[-1] == a.url else (b, a)
        pid = carrier.proc.pid if carrier.proc else "?"
        line.print(f"assistant is 1.5 s into its answer: SIGKILL {carrier.name} (pid {pid}), which carries the stream")
        sessions_before = len(sim.sessions)
        carrier.kill()
        if not await call.wait_legs(2, timeout=15):
            twilio_events()
            line.print("the call did not continue")
            return 1
        twilio_events()
        resumed = call.leg
        deadline = time.monotonic() + 10
        while len(sim.sessions) <= sessions_before and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        line.print(f"{other.name} took the call over: a new Realtime session, seeded with the conversation")
        await asyncio.sleep(0.5)
        greeted_again = resumed.played_bytes > 0
        line.print("caller asks again (1.0 s)")
        await resumed.say_and_wait(ulaw.synth_speech(1000, seed=2))
        answered = await resumed.wait_for_audio(1000, timeout=10)
        line.print(f"assistant answers on {other.name}" if answered else "no answer on the new stream")
        await resumed.wait_idle(timeout=10)
        await call.hangup()
        line.print("caller hangs up")
    return _summary(call, sim, sessions_before, greeted_again, answered)


def _summary(call: TwilioCall, sim: RealtimeSimulator, sessions_before: int, greeted: bool, answered: bool) -> int:
    print("\nwhat happened")
    (gap,) = call.audio_gaps() or [float("nan")]
    print(f"  streams: {len(call.legs)}; caller audio no session received across the switch: {gap * 1000:.0f} ms")
    print(f"  (Twilio's own reconnect delay, {TWILIO_RECONNECT_S * 1000:.0f} ms, is part of it)")
    new = sim.sessions[sessions_before] if len(sim.sessions) > sessions_before else None
    instructions = ""
    if new is not None:
        update = next((e for _, e in new.received if e["type"] == "session.update"), None)
        instructions = update["session"].get("instructions", "") if update else ""
        greetings = sum(e["type"] == "response.create" for _, e in new.received)
        print(f"  greetings on the new session: {greetings}; the caller heard a second greeting: {greeted}")
    carried = [text for text in instructions.splitlines() if text.startswith(("Caller:", "Assistant:"))]
    print("  the new session's instructions carry the conversation so far:")
    for text in carried:
        print(f"    {text[:100]}")
    ok = len(call.legs) == 2 and bool(carried) and not greeted and answered
    return 0 if ok else 1
