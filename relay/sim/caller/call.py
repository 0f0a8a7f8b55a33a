"""One simulated inbound call: the webhook, then the Media Stream with a microphone and a speaker.

The call posts the signed voice webhook, follows the ``<Connect><Stream>`` TwiML and opens the
stream (/work/shared/PROTOCOLS.md §1–§4). It runs three tasks: the microphone and the speaker on
the caller's clock, and a receiver that hands the relay's ``media``, ``mark`` and ``clear`` to the
speaker and winds the call down when either side closes. Hanging up sends ``stop`` and a normal
close, as Twilio does when the caller puts the phone down.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import orjson
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay.sim.caller.config import CallerConfig
from relay.sim.caller.microphone import Microphone
from relay.sim.caller.record import CallLog, Event
from relay.sim.caller.speaker import Speaker
from relay.sim.caller.stream import DTMF_KEYS, STREAM_USER_AGENT, Stream
from relay.sim.caller.webhook import (
    CallRejected,
    TwimlStream,
    dial_url,
    parse_twiml,
    post_redirect,
    post_webhook,
    redirect_after_stream,
    redirect_form,
    webhook_form,
)
from relay.sim.ulaw import SILENCE_BYTE, ULAW_BYTES_PER_MS, write_wav

WS_CLOSE_TIMEOUT_S = 5.0


class CallClosed(ConnectionError):
    """The call ended before the requested audio or key press could be sent."""


class SimulatedCaller:
    """One inbound call toward the relay, with everything the caller sent and heard recorded."""

    def __init__(self, config: CallerConfig) -> None:
        self.config = config
        self.call_sid: str = config.call_sid or "CA" + secrets.token_hex(16)
        self.stream_sid: str = "MZ" + secrets.token_hex(16)
        self.frame_bytes = config.frame_ms * ULAW_BYTES_PER_MS
        silence_frame = bytes([SILENCE_BYTE]) * self.frame_bytes

        self.close_code: int | None = None
        self.continue_url: str | None = None  # the <Redirect> after </Connect> in the webhook's TwiML
        self.stream_started_at: float | None = None
        self._log = CallLog()
        self._speaker = Speaker(config, self._log, silence_frame, self._notify)
        self._microphone = Microphone(config, self._log, silence_frame, self._speaker)

        self._ws: ClientConnection | None = None
        self._stream: Stream | None = None
        self._sender: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._waiters = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Hang up on the way out so a failing test never leaves call tasks running."""
        await self.hangup()

    # ------------------------------------------------------------------ what the call recorded

    @property
    def events(self) -> list[Event]:
        """The call's timeline: (monotonic time, kind, details), in order."""
        return self._log.events

    @property
    def errors(self) -> list[str]:
        """Protocol mistakes the relay made on this call, as Twilio would have flagged them."""
        return self._log.errors

    @property
    def sent_payloads(self) -> list[str]:
        """Every media payload sent, silence included (empty unless ``keep_audio``)."""
        return self._microphone.sent_payloads

    @property
    def received_payloads(self) -> list[str]:
        """Every media payload the relay sent (empty unless ``keep_audio``)."""
        return self._speaker.received_payloads

    @property
    def first_frame_at(self) -> float | None:
        """When the stream's first media frame went out (monotonic), or None before it."""
        return self._microphone.first_sent

    @property
    def last_frame_at(self) -> float | None:
        """When the stream's latest media frame went out (monotonic), or None before the first."""
        return self._microphone.last_sent

    @property
    def played_bytes(self) -> int:
        """µ-law bytes of the relay's audio played so far (cleared audio never plays)."""
        return self._speaker.played_bytes

    @property
    def marks_echoed(self) -> list[str]:
        """Names of the marks acknowledged to the relay, in the order they went out."""
        return self._speaker.marks_echoed

    @property
    def heard(self) -> bytearray:
        """What the caller heard, silence included (empty unless ``keep_audio``)."""
        return self._speaker.heard

    # ------------------------------------------------------------------ webhook and TwiML

    def webhook_form(self) -> dict[str, str]:
        """The form Twilio posts for a ringing inbound call (every field is signed)."""
        return webhook_form(self.config, self.call_sid)

    async def webhook(self) -> tuple[int, str]:
        """POST the signed voice webhook; the signature covers the public URL, not base_url."""
        return await post_webhook(self.config, self.webhook_form())

    async def continuation(self) -> tuple[int, str]:
        """What Twilio does once the stream ended without the call ending: the signed POST of the
        <Redirect> that followed </Connect>. Raises ValueError when the TwiML had none."""
        if self.continue_url is None:
            raise ValueError("the webhook's TwiML has no <Redirect> after </Connect>")
        return await post_redirect(self.config, self.continue_url, redirect_form(self.config, self.call_sid))

    @staticmethod
    def parse_twiml(body: str) -> TwimlStream:
        """Find the bidirectional stream; ``<Start><Stream>`` is fork-only and does not count."""
        return parse_twiml(body)

    # ------------------------------------------------------------------ connection

    async def connect(
        self, stream: TwimlStream | None = None, *, parameters_override: dict[str, str] | None = None
    ) -> None:
        """Open the Media Stream and start the microphone, speaker and receiver tasks.

        Raises CallRejected if the webhook fails, ValueError for TwiML without a stream, and
        websockets' InvalidStatus if the relay refuses the upgrade.
        """
        if self._ws is not None:
            raise RuntimeError("this caller is already connected; use one SimulatedCaller per call")
        if stream is None:
            status, body = await self.webhook()
            if status != 200:
                raise CallRejected(status, body)
            stream = self.parse_twiml(body)
            self.continue_url = redirect_after_stream(body)
        headers: dict[str, str] = {}
        if self.config.sign_upgrade:
            validator = RequestValidator(self.config.auth_token)
            headers["X-Twilio-Signature"] = validator.compute_signature(stream.url, {})
        self._ws = await connect(
            dial_url(self.config, stream.url),
            additional_headers=headers,
            user_agent_header=STREAM_USER_AGENT,
            proxy=None,
            compression=None,
            ping_interval=None,
            close_timeout=WS_CLOSE_TIMEOUT_S,
        )
        media = self._stream = Stream(self._ws, self.stream_sid)
        parameters = stream.parameters if parameters_override is None else parameters_override
        start = media.start(self.config.account_sid, self.call_sid, parameters)
        try:
            await media.hello()
            await media.send(start)
        except ConnectionClosed:
            # The relay hung up during the handshake: nothing to run, but the code is an answer.
            await self._ws.close()
            self._mark_closed(self._ws.close_code)
            return
        epoch = time.monotonic()
        self.stream_started_at = epoch
        self._receiver = asyncio.create_task(self._receive(), name=f"sim-caller-receiver-{self.call_sid}")
        self._sender = asyncio.create_task(
            self._microphone.run(epoch, media), name=f"sim-caller-sender-{self.call_sid}"
        )
        self._player = asyncio.create_task(self._speaker.run(epoch, media), name=f"sim-caller-player-{self.call_sid}")

    def _notify(self) -> None:
        if self._waiters:  # 50 ticks a second per call: only pay for an Event when someone waits
            self._changed.set()
            self._changed = asyncio.Event()

    # ------------------------------------------------------------------ the caller's actions

    def say(self, ulaw_audio: bytes) -> None:
        """Queue caller speech; it goes out after anything already queued, frame by frame."""
        self._microphone.say(ulaw_audio)

    async def say_and_wait(self, ulaw_audio: bytes) -> None:
        """Say, then return once the last frame is on the wire (CallClosed if the call ends first)."""
        utterance = self._microphone.say(ulaw_audio)
        await utterance.done.wait()
        if utterance.audio and utterance.sent_end is None:
            raise CallClosed("the call ended before the utterance was sent")

    async def press(self, digit: str) -> None:
        """Send a key press the way Twilio reports it on a bidirectional stream."""
        if digit not in DTMF_KEYS:
            raise ValueError(f"not a DTMF key: {digit!r}")
        media = self._stream
        if self._ws is None or media is None or self._closed.is_set() or media.hanging_up:
            raise CallClosed("no open call to press a key on")
        try:
            await media.send(media.dtmf(digit))
        except ConnectionClosed:
            raise CallClosed("the call ended before the key press was sent") from None
        self._log.record("dtmf_out", digit=digit)

    async def enter(self, keys: str, gap_s: float = 0.15) -> None:
        """Type several keys, ``gap_s`` apart, like a person keying in a number."""
        for index, key in enumerate(keys):
            if index:
                await asyncio.sleep(gap_s)
            await self.press(key)

    # ------------------------------------------------------------------ receiver

    async def _receive(self) -> None:
        """Handle the relay's messages until either side closes, then stop the other tasks."""
        assert self._ws is not None
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    self._log.error("binary frame from the relay (Twilio expects JSON text)")
                    continue
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            await self._stop_tasks()
            self._mark_closed(self._ws.close_code)

    async def _handle(self, raw: str) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._log.error(f"invalid JSON from the relay: {raw[:100]!r}")
            return
        if not isinstance(msg, dict):
            self._log.error(f"message is not an object: {raw[:100]!r}")
            return
        event = msg.get("event")
        if event not in ("media", "mark", "clear"):
            self._log.record("unknown", message=msg)
            return
        if msg.get("streamSid") != self.stream_sid:
            self._log.error(f"{event} for stream {msg.get('streamSid')!r}, ours is {self.stream_sid}")
            return
        if event == "media":
            self._speaker.on_media(msg)
        elif event == "mark":
            self._speaker.on_mark(msg)
        else:
            assert self._stream is not None
            await self._speaker.on_clear(self._stream)
        self._notify()

    # ------------------------------------------------------------------ ending the call

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._sender, self._player) if t is not None]
        self._sender = self._player = None
        for task in tasks:
            task.cancel()
        for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
            if isinstance(result, Exception):
                self._log.error(f"{task.get_name()} failed: {result!r}")

    def _mark_closed(self, code: int | None) -> None:
        if self._closed.is_set():
            return
        self.close_code = code
        self._log.record("closed", code=code)
        self._closed.set()
        self._microphone.abandon()
        self._notify()

    async def hangup(self) -> None:
        """The caller hangs up: ``stop``, then a normal close. Safe to call any number of times."""
        if self._ws is None:
            return
        media = self._stream
        if media is not None and not self._closed.is_set() and not media.hanging_up:
            media.hanging_up = True
            await self._stop_tasks()
            with contextlib.suppress(ConnectionClosed):
                await media.send(media.stop(self.config.account_sid, self.call_sid))
            await self._ws.close(1000)
        if self._receiver is not None:
            await asyncio.gather(self._receiver, return_exceptions=True)
        self._mark_closed(self._ws.close_code)

    async def drop(self) -> None:
        """The connection is lost: no ``stop`` and no close frame, as when a network path or the
        relay's instance fails. Twilio would then run the TwiML after ``</Connect>``."""
        if self._ws is None or self._closed.is_set():
            return
        if self._stream is not None:
            self._stream.hanging_up = True
        await self._stop_tasks()
        self._ws.transport.abort()
        if self._receiver is not None:
            await asyncio.gather(self._receiver, return_exceptions=True)
        self._mark_closed(self._ws.close_code)

    async def wait_closed(self, timeout: float) -> int | None:
        """Wait for the relay (or a hangup) to end the call; the close code, or None on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
                if self._receiver is not None:
                    await asyncio.gather(self._receiver, return_exceptions=True)
        except TimeoutError:
            return None
        return self.close_code

    # ------------------------------------------------------------------ waiting on the speaker

    async def _wait_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        self._waiters += 1
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    if self._closed.is_set():
                        return condition()
                    await self._changed.wait()
        except TimeoutError:
            return condition()
        finally:
            self._waiters -= 1
        return True

    async def wait_for_audio(self, min_ms: int, timeout: float) -> bool:
        """Wait until at least min_ms of assistant audio has been played (not merely received)."""
        needed = min_ms * ULAW_BYTES_PER_MS
        return await self._wait_until(lambda: self.played_bytes >= needed, timeout)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until the assistant has gone quiet: nothing left to play and no fresh audio."""
        return await self._wait_until(lambda: self._speaker.idle(self._closed.is_set()), timeout)

    # ------------------------------------------------------------------ measurements

    def mouth_to_ear_ms(self) -> list[float]:
        """Per answered utterance, ms from its last frame sent to the first answer audio played.

        Only audio received after the utterance ended counts as its answer; utterances that
        were never answered are left out.
        """
        return [
            (u.first_heard - u.sent_end) * 1000
            for u in self._microphone.utterances
            if u.sent_end is not None and u.first_heard is not None
        ]

    def write_recording(self, path: str) -> None:
        """Save what the caller heard, silence included, so a human can listen to the call."""
        write_wav(path, bytes(self.heard))
