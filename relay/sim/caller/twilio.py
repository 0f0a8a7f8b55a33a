"""Twilio's side of one call across its streams: it runs the TwiML, verb by verb, as Twilio does.

A call starts with the signed voice webhook; its TwiML's ``<Connect><Stream>`` opens a stream (a
``SimulatedCaller``), and when that stream ends without the call ending (the relay closed it, or
its instance went away) Twilio goes on with the verbs after ``</Connect>``: ``<Redirect>`` is a
signed POST of the call's parameters whose answer replaces the rest of the document, ``<Say>``
is spoken, ``<Pause>`` waits, ``<Dial>`` bridges the caller elsewhere, ``<Hangup>`` or the end of
the document ends the call (/work/shared/PROTOCOLS.md §1, §2). Twilio takes about
TWILIO_RECONNECT_S from a stream's close to the next stream's socket; `reconnect_delay_s` plays
that part. Every request goes through a `Balancer`, as behind a load balancer: round robin over
the instances, passing over one that refuses the connection or answers 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
from websockets.exceptions import InvalidStatus

from relay.sim.caller.call import SimulatedCaller
from relay.sim.caller.config import CallerConfig
from relay.sim.caller.record import Event
from relay.sim.caller.webhook import (
    CallRejected,
    TwimlStream,
    post_redirect,
    post_webhook,
    redirect_form,
    webhook_form,
)

__all__ = ["TWILIO_RECONNECT_S", "Balancer", "NoInstance", "TwilioCall"]

# From a stream's close to the next stream's socket on a real call, Twilio took about this long.
TWILIO_RECONNECT_S = 0.73
# A document redirecting to itself forever is a bug in the application; Twilio would give up too.
MAX_DOCUMENTS = 50
PAUSE_DEFAULT_S = 1.0

T = TypeVar("T")


class NoInstance(ConnectionError):
    """Every instance refused the connection or answered 503."""


def _passes_over(exc: BaseException) -> bool:
    """What makes a balancer try the next instance: no connection, or a 503 (draining)."""
    if isinstance(exc, (httpx.ConnectError, ConnectionRefusedError)):
        return True
    return isinstance(exc, InvalidStatus) and exc.response.status_code == 503


class Balancer:
    """Round robin over instance base URLs, as a load balancer in front of the relay spreads requests.

    `instances` may change while calls run (an instance added, or one removed)."""

    def __init__(self, instances: Sequence[str]) -> None:
        if not instances:
            raise ValueError("a balancer needs at least one instance")
        self.instances = list(instances)
        self._next = 0
        self.passed_over: list[str] = []  # instances skipped, in order

    def rotation(self) -> list[str]:
        """The instances in the order to try them for one request; the next request starts one later."""
        count = len(self.instances)
        start = self._next % count
        self._next = start + 1
        return self.instances[start:] + self.instances[:start]

    async def send(self, attempt: Callable[[str], Awaitable[T]], answered: Callable[[T], bool]) -> tuple[str, T]:
        """Run `attempt` on each instance in turn until one answers (`answered`) or the rotation is
        exhausted: then NoInstance, unless an instance answered something else (returned as is)."""
        last: tuple[str, T] | None = None
        for instance in self.rotation():
            try:
                result = await attempt(instance)
            except Exception as exc:
                if not _passes_over(exc):
                    raise
                self.passed_over.append(instance)
                continue
            if answered(result):
                return instance, result
            self.passed_over.append(instance)
            last = (instance, result)
        if last is not None:
            return last
        raise NoInstance("no instance took the request")


class TwilioCall:
    """One call as Twilio carries it: its streams (``legs``), what it said, where it dialled, how it ended.

    The test speaks through the current leg (``call.leg.say(...)``); ``outcome`` is None while the
    call lasts, then one of "caller_hung_up", "hung_up" (a ``<Hangup/>``), "dialled", "completed"
    (the document ran out), "rejected" (the webhook did not answer 200) or "application_error".
    """

    def __init__(
        self,
        config: CallerConfig,
        balancer: Balancer | Sequence[str],
        *,
        reconnect_delay_s: float = TWILIO_RECONNECT_S,
    ) -> None:
        self.balancer = balancer if isinstance(balancer, Balancer) else Balancer(balancer)
        self.config = config
        self.call_sid = config.call_sid or "CA" + secrets.token_hex(16)
        self.reconnect_delay_s = reconnect_delay_s
        self.legs: list[SimulatedCaller] = []
        self.leg_instances: list[str] = []
        self.said: list[str] = []
        self.dialled: list[str] = []
        self.errors: list[str] = []
        self.events: list[Event] = []
        self.outcome: str | None = None
        self._runner: asyncio.Task[None] | None = None
        self._leg_opened = asyncio.Event()
        self._ended = asyncio.Event()
        self._hanging_up = False

    # ------------------------------------------------------------------ what the test sees

    @property
    def leg(self) -> SimulatedCaller:
        """The call's latest stream (the live one while a stream is up)."""
        if not self.legs:
            raise RuntimeError("the call has no stream yet")
        return self.legs[-1]

    def audio_gaps(self) -> list[float]:
        """Per switch of stream, seconds from the last caller frame on the old stream to the first on
        the new one: the caller audio no session received."""
        gaps: list[float] = []
        for old, new in zip(self.legs, self.legs[1:], strict=False):
            if old.last_frame_at is not None and new.first_frame_at is not None:
                gaps.append(new.first_frame_at - old.last_frame_at)
        return gaps

    def _record(self, kind: str, **details: Any) -> None:
        self.events.append((time.monotonic(), kind, details))

    # ------------------------------------------------------------------ the call

    async def start(self, timeout: float = 10.0) -> None:
        """Ring the relay and run its TwiML; returns once the first stream is open or the call ended.
        Raises CallRejected when the voice webhook does not answer 200."""
        form = webhook_form(self.config, self.call_sid)
        instance, (status, body) = await self.balancer.send(
            lambda url: post_webhook(self._at(url), form), lambda answer: answer[0] != 503
        )
        self._record("webhook", instance=instance, status=status)
        if status != 200:
            self._finish("rejected")
            raise CallRejected(status, body)
        self._runner = asyncio.create_task(self._run(body), name=f"sim-twilio-{self.call_sid}")
        opened = asyncio.create_task(self._leg_opened.wait())
        ended = asyncio.create_task(self._ended.wait())
        try:
            await asyncio.wait({opened, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            ended.cancel()

    async def wait_legs(self, count: int, timeout: float) -> bool:
        """Wait until the call has had `count` streams (the latest one open) or it ended."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.legs) < count or self.legs[-1].stream_started_at is None:
                    if self._ended.is_set():
                        return False
                    self._leg_opened.clear()
                    await self._leg_opened.wait()
        except TimeoutError:
            return False
        return True

    async def wait_ended(self, timeout: float) -> str | None:
        """The call's outcome once it ended, or None if it still lasts after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            return None
        return self.outcome

    async def hangup(self) -> None:
        """The caller puts the phone down: the live stream gets ``stop``, and no TwiML runs after it."""
        self._hanging_up = True
        if self.legs:
            await self.legs[-1].hangup()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            if not runner.done():
                runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._finish("caller_hung_up")

    async def __aenter__(self) -> TwilioCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hangup()

    # ------------------------------------------------------------------ running TwiML

    def _at(self, instance: str) -> CallerConfig:
        return dataclasses.replace(self.config, base_url=instance, call_sid=self.call_sid)

    def _finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._record("ended", outcome=outcome)
        self._ended.set()
        self._leg_opened.set()

    def _fail(self, message: str) -> None:
        self.errors.append(message)
        self._record("error", message=message)
        self._finish("application_error")

    async def _run(self, body: str) -> None:
        try:
            for _ in range(MAX_DOCUMENTS):
                follow = await self._document(body)
                if follow is None:
                    return
                body = follow
            self._fail(f"more than {MAX_DOCUMENTS} documents in a row")
        except Exception as exc:  # the simulator's own failure must show, not hang the call
            self._fail(f"running TwiML failed: {exc!r}")

    async def _document(self, body: str) -> str | None:
        """Run one TwiML document; the next document when it ends in a <Redirect>, else None (ended)."""
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            self._fail(f"TwiML is not XML: {exc}")
            return None
        if root.tag != "Response":
            self._fail(f"TwiML root is <{root.tag}>, not <Response>")
            return None
        for verb in root:
            text = (verb.text or "").strip()
            if verb.tag == "Connect":
                if not await self._connect(verb):
                    return None
            elif verb.tag == "Redirect":
                return await self._redirect(text, verb.get("method", "POST"))
            elif verb.tag == "Say":
                self.said.append(text)
                self._record("say", text=text)
            elif verb.tag == "Pause":
                seconds = float(verb.get("length", PAUSE_DEFAULT_S))
                self._record("pause", seconds=seconds)
                await asyncio.sleep(seconds)
            elif verb.tag == "Dial":
                number = text or " ".join((n.text or "").strip() for n in verb)
                self.dialled.append(number)
                self._record("dial", number=number)
                self._finish("dialled")
                return None
            elif verb.tag == "Hangup":
                self._record("hangup")
                self._finish("hung_up")
                return None
            else:
                self._fail(f"unsupported verb <{verb.tag}>")
                return None
        self._finish("completed")
        return None

    async def _connect(self, verb: ET.Element) -> bool:
        """Open the ``<Stream>`` and wait for it to end. True: the call goes on with the next verb."""
        stream = verb.find("Stream")
        url = stream.get("url") if stream is not None else None
        if stream is None or not url:
            self._fail("<Connect> without a <Stream url=...>")
            return False
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter") if p.get("name")}

        async def open_on(instance: str) -> SimulatedCaller:
            leg = SimulatedCaller(self._at(instance))
            await leg.connect(TwimlStream(url, parameters))
            return leg

        try:
            instance, opened = await self.balancer.send(open_on, lambda _: True)
        except (NoInstance, InvalidStatus, OSError) as exc:
            # Twilio ends the stream it could not open and goes on with the TwiML after </Connect>.
            self._record("stream_failed", error=repr(exc))
            await asyncio.sleep(self.reconnect_delay_s)
            return True
        self.legs.append(opened)
        self.leg_instances.append(instance)
        self._record("stream_open", instance=instance, leg=len(self.legs))
        self._leg_opened.set()
        code = await opened.wait_closed(timeout=float("inf"))
        if self._hanging_up:
            return False
        self._record("stream_closed", instance=instance, code=code)
        await asyncio.sleep(self.reconnect_delay_s)
        return True

    async def _redirect(self, url: str, method: str) -> str | None:
        if method.upper() != "POST":
            self._fail(f"<Redirect method={method!r}>: the relay's continuation is POSTed")
            return None
        form = redirect_form(self.config, self.call_sid)
        instance, (status, body) = await self.balancer.send(
            lambda at: post_redirect(self._at(at), url, form), lambda answer: answer[0] != 503
        )
        self._record("redirect", instance=instance, status=status)
        if status != 200:
            self._fail(f"<Redirect> to {url} answered {status}")
            return None
        return body
