"""A simulated Twilio caller: one inbound phone call, exactly as Twilio presents it to the relay.

It posts the signed voice webhook, follows the ``<Connect><Stream>`` TwiML, and then plays
both ends of the Media Stream in real time: a microphone that streams one µ-law frame every
20 ms (speech queued with ``say()``, silence otherwise) and a phone speaker that plays the
relay's audio at 8 bytes per ms and acknowledges marks only once the audio before them has
played (or was discarded by ``clear``). Both clocks run on absolute deadlines, so the
timings the relay sees — and the barge-in and latency numbers measured here — hold under load.

Used by ``python -m relay demo``, the test-suite and the load benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay.sim.ulaw import FRAME_MS, SILENCE_BYTE, ULAW_BYTES_PER_MS, write_wav

DEFAULT_ACCOUNT_SID = "AC" + "5ca1ab1e" * 4
WEBHOOK_PATH = "/incoming-call"
DTMF_KEYS = frozenset("0123456789*#ABCD")
# After a stall, at most this many frames go out back-to-back; older debt is forgiven
# (the clock is re-anchored) instead of flooding the relay with a burst.
MAX_BURST_FRAMES = 3
# wait_idle(): the relay counts as done talking after this long without new audio.
IDLE_QUIET_S = 0.3
WS_CLOSE_TIMEOUT_S = 5.0
# Twilio identifies itself with these; a relay that logs user agents sees the real thing.
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
STREAM_USER_AGENT = "Twilio.TmeWs/1.0"

Event = tuple[float, str, dict[str, Any]]


class CallRejected(RuntimeError):
    """The voice webhook did not answer 200, so Twilio would never open a stream."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"webhook answered {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class CallClosed(ConnectionError):
    """The call ended before the requested audio or key press could be sent."""


@dataclass
class CallerConfig:
    """Who calls whom, and where the relay really listens versus where Twilio thinks it does."""

    base_url: str
    auth_token: str
    public_url: str | None = None
    account_sid: str = DEFAULT_ACCOUNT_SID
    from_number: str = "+15550001111"
    to_number: str = "+15550002222"
    call_sid: str | None = None
    sign_upgrade: bool = True
    frame_ms: int = FRAME_MS
    extra_form: dict[str, str] = field(default_factory=dict)
    # False for load runs: heard, sent_payloads and received_payloads grow by ~30 kB per
    # call-second, so they stay empty; counters, events and timings are kept either way.
    keep_audio: bool = True

    def __post_init__(self) -> None:
        if self.frame_ms <= 0:
            raise ValueError("frame_ms must be positive")


@dataclass(frozen=True)
class TwimlStream:
    """The bidirectional stream a ``<Connect><Stream>`` asks Twilio to open."""

    url: str
    parameters: dict[str, str]


@dataclass
class _Utterance:
    audio: bytes
    index: int
    offset: int = 0
    sent_start: float | None = None
    sent_end: float | None = None
    # Position in the relay's audio stream when the utterance ended: only audio past this
    # point can be the answer to it.
    answer_from: int = 0
    first_heard: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _Pacer:
    """Ticks due at ``epoch + n * period``: sleep overshoot is never added up into drift."""

    def __init__(self, epoch: float, period_s: float) -> None:
        self.epoch = epoch
        self.period_s = period_s
        self.ticks = 0

    async def next_tick(self) -> int:
        """Wait for the next tick; return how many ticks were forgiven after a long stall."""
        self.ticks += 1
        due = self.epoch + self.ticks * self.period_s
        now = time.monotonic()
        if now < due:
            await asyncio.sleep(due - now)
            return 0
        lag = now - due
        if lag < MAX_BURST_FRAMES * self.period_s:
            await asyncio.sleep(0)
            return 0
        # Keep just enough debt for a short burst; the grid moves, its spacing does not.
        shift = lag - (MAX_BURST_FRAMES - 1) * self.period_s
        self.epoch += shift
        return int(shift / self.period_s)


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    return (parts.hostname or "").lower(), parts.port or (443 if secure else 80)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class SimulatedCaller:
    """One inbound call toward the relay, with everything the caller sent and heard recorded."""

    def __init__(self, config: CallerConfig) -> None:
        self.config = config
        self.call_sid: str = config.call_sid or "CA" + secrets.token_hex(16)
        self.stream_sid: str = "MZ" + secrets.token_hex(16)
        self.frame_bytes = config.frame_ms * ULAW_BYTES_PER_MS
        self._silence_frame = bytes([SILENCE_BYTE]) * self.frame_bytes

        self.close_code: int | None = None
        self.sent_payloads: list[str] = []
        self.received_payloads: list[str] = []
        self.played_bytes = 0
        self.events: list[Event] = []
        self.marks_echoed: list[str] = []
        self.heard = bytearray()
        self.errors: list[str] = []
        self.stream_started_at: float | None = None

        self._ws: ClientConnection | None = None
        self._seq = 0
        self._send_lock = asyncio.Lock()
        self._speech: deque[_Utterance] = deque()
        self._utterances: list[_Utterance] = []
        self._awaiting_answer: list[_Utterance] = []
        self._playback = bytearray()
        self._play_pos = 0  # absolute offset of the next byte to play in the relay's audio stream
        self._recv_pos = 0  # absolute offset just past the last byte received
        self._pending_marks: deque[tuple[int, str]] = deque()
        self._last_media_at = float("-inf")
        self._sender: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._hanging_up = False
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

    # ------------------------------------------------------------------ webhook and TwiML

    @property
    def _public_base(self) -> str:
        return (self.config.public_url or self.config.base_url).rstrip("/")

    def webhook_form(self) -> dict[str, str]:
        """The form Twilio posts for a ringing inbound call (every field is signed)."""
        cfg = self.config
        form = {
            "CallSid": self.call_sid,
            "AccountSid": cfg.account_sid,
            "From": cfg.from_number,
            "To": cfg.to_number,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
            "Caller": cfg.from_number,
            "Called": cfg.to_number,
        }
        form.update(cfg.extra_form)
        return form

    async def webhook(self) -> tuple[int, str]:
        """POST the signed voice webhook; the signature covers the public URL, not base_url."""
        form = self.webhook_form()
        signature = RequestValidator(self.config.auth_token).compute_signature(self._public_base + WEBHOOK_PATH, form)
        headers = {"X-Twilio-Signature": signature, "User-Agent": WEBHOOK_USER_AGENT}
        url = self.config.base_url.rstrip("/") + WEBHOOK_PATH
        async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
            response = await client.post(url, data=form, headers=headers)
        return response.status_code, response.text

    @staticmethod
    def parse_twiml(body: str) -> TwimlStream:
        """Find the bidirectional stream; ``<Start><Stream>`` is fork-only and does not count."""
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            raise ValueError(f"TwiML is not XML: {exc}") from None
        stream = root.find("./Connect/Stream") if root.tag == "Response" else None
        url = stream.get("url") if stream is not None else None
        if stream is None or not url:
            raise ValueError("TwiML has no <Connect><Stream url=...>")
        parameters: dict[str, str] = {}
        for param in stream.findall("Parameter"):
            name = param.get("name")
            if name is not None:
                parameters[name] = param.get("value", "")
        return TwimlStream(url=url, parameters=parameters)

    def _dial_url(self, stream_url: str) -> str:
        """Where to really connect: the public host is mapped to base_url, as a proxy would."""
        target = _origin(stream_url)
        if target not in (_origin(self._public_base), _origin(self.config.base_url)):
            return stream_url
        base = urlsplit(self.config.base_url)
        scheme = "wss" if base.scheme in ("https", "wss") else "ws"
        parts = urlsplit(stream_url)
        return urlunsplit((scheme, base.netloc, parts.path, parts.query, ""))

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
        headers: dict[str, str] = {}
        if self.config.sign_upgrade:
            validator = RequestValidator(self.config.auth_token)
            headers["X-Twilio-Signature"] = validator.compute_signature(stream.url, {})
        self._ws = await connect(
            self._dial_url(stream.url),
            additional_headers=headers,
            user_agent_header=STREAM_USER_AGENT,
            proxy=None,
            compression=None,
            ping_interval=None,
            close_timeout=WS_CLOSE_TIMEOUT_S,
        )
        cfg = self.config
        start = {
            "event": "start",
            "sequenceNumber": "",
            "start": {
                "accountSid": cfg.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(stream.parameters if parameters_override is None else parameters_override),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": self.stream_sid,
        }
        try:
            connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
            await self._ws.send(orjson.dumps(connected), text=True)
            await self._send(start)
        except ConnectionClosed:
            # The relay hung up during the handshake: nothing to run, but the code is an answer.
            await self._ws.close()
            self._mark_closed(self._ws.close_code)
            return
        epoch = time.monotonic()
        self.stream_started_at = epoch
        self._receiver = asyncio.create_task(self._receive(), name=f"sim-caller-receiver-{self.call_sid}")
        self._sender = asyncio.create_task(self._microphone(epoch), name=f"sim-caller-sender-{self.call_sid}")
        self._player = asyncio.create_task(self._speaker(epoch), name=f"sim-caller-player-{self.call_sid}")

    async def _send(self, message: dict[str, Any]) -> None:
        """Number and send one message; the lock keeps sequence numbers in wire order."""
        assert self._ws is not None
        async with self._send_lock:
            self._seq += 1
            message["sequenceNumber"] = str(self._seq)
            await self._ws.send(orjson.dumps(message), text=True)

    def _record(self, kind: str, **details: Any) -> None:
        self.events.append((time.monotonic(), kind, details))

    def _error(self, text: str) -> None:
        self.errors.append(text)
        self._record("error", message=text)

    def _notify(self) -> None:
        if self._waiters:  # 50 ticks a second per call: only pay for an Event when someone waits
            self._changed.set()
            self._changed = asyncio.Event()

    # ------------------------------------------------------------------ microphone

    def say(self, ulaw_audio: bytes) -> None:
        """Queue caller speech; it goes out after anything already queued, frame by frame."""
        utterance = _Utterance(audio=bytes(ulaw_audio), index=len(self._utterances))
        self._utterances.append(utterance)
        if utterance.audio and not self._closed.is_set():
            self._speech.append(utterance)
        else:
            utterance.done.set()

    async def say_and_wait(self, ulaw_audio: bytes) -> None:
        """Say, then return once the last frame is on the wire (CallClosed if the call ends first)."""
        self.say(ulaw_audio)
        utterance = self._utterances[-1]
        await utterance.done.wait()
        if utterance.audio and utterance.sent_end is None:
            raise CallClosed("the call ended before the utterance was sent")

    def _next_frame(self) -> tuple[bytes, _Utterance | None, bool, bool]:
        if not self._speech:
            return self._silence_frame, None, False, False
        utterance = self._speech[0]
        first = utterance.offset == 0
        frame = utterance.audio[utterance.offset : utterance.offset + self.frame_bytes]
        utterance.offset += self.frame_bytes
        if len(frame) < self.frame_bytes:
            frame += self._silence_frame[len(frame) :]
        last = utterance.offset >= len(utterance.audio)
        if last:
            self._speech.popleft()
        return frame, utterance, first, last

    async def _microphone(self, epoch: float) -> None:
        """Stream one frame per tick for the whole call, like a phone line that never pauses."""
        pacer = _Pacer(epoch, self.config.frame_ms / 1000)
        chunk = 0
        try:
            while True:
                forgiven = await pacer.next_tick()
                if forgiven:
                    self._record("clock_slip", task="sender", frames=forgiven)
                frame, utterance, first, last = self._next_frame()
                payload = _b64(frame)
                chunk += 1
                await self._send(
                    {
                        "event": "media",
                        "sequenceNumber": "",
                        "media": {
                            "track": "inbound",
                            "chunk": str(chunk),
                            # Presentation time of the frame's first sample, on the media clock.
                            "timestamp": str((chunk - 1) * self.config.frame_ms),
                            "payload": payload,
                        },
                        "streamSid": self.stream_sid,
                    }
                )
                if self.config.keep_audio:
                    self.sent_payloads.append(payload)
                if utterance is None:
                    continue
                now = time.monotonic()
                if first:
                    utterance.sent_start = now
                    self._record("speech_start", index=utterance.index, bytes=len(utterance.audio))
                if last:
                    utterance.sent_end = now
                    utterance.answer_from = self._recv_pos
                    self._awaiting_answer.append(utterance)
                    self._record("speech_end", index=utterance.index, bytes=len(utterance.audio))
                    utterance.done.set()
        except ConnectionClosed:
            pass  # the receiver sees the close and winds the call down

    async def press(self, digit: str) -> None:
        """Send a key press the way Twilio reports it on a bidirectional stream."""
        if digit not in DTMF_KEYS:
            raise ValueError(f"not a DTMF key: {digit!r}")
        if self._ws is None or self._closed.is_set() or self._hanging_up:
            raise CallClosed("no open call to press a key on")
        message = {
            "event": "dtmf",
            "sequenceNumber": "",
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
        try:
            await self._send(message)
        except ConnectionClosed:
            raise CallClosed("the call ended before the key press was sent") from None
        self._record("dtmf_out", digit=digit)

    async def enter(self, keys: str, gap_s: float = 0.15) -> None:
        """Type several keys, ``gap_s`` apart, like a person keying in a number."""
        for index, key in enumerate(keys):
            if index:
                await asyncio.sleep(gap_s)
            await self.press(key)

    # ------------------------------------------------------------------ speaker

    async def _echo_mark(self, name: str) -> None:
        if self._hanging_up:
            return  # after `stop` Twilio sends nothing more
        await self._send({"event": "mark", "sequenceNumber": "", "streamSid": self.stream_sid, "mark": {"name": name}})
        self.marks_echoed.append(name)
        self._record("mark_echo", name=name)

    async def _speaker(self, epoch: float) -> None:
        """Play the relay's audio in real time; a mark is echoed once the frame before it has ended."""
        pacer = _Pacer(epoch, self.config.frame_ms / 1000)
        keep_audio = self.config.keep_audio
        was_playing = False
        try:
            while True:
                forgiven = await pacer.next_tick()
                if forgiven:
                    # The wall clock moved on without us: the caller heard a gap, not compressed audio.
                    if keep_audio:
                        self.heard += self._silence_frame * forgiven
                    self._record("clock_slip", task="player", frames=forgiven)
                # Everything started on earlier ticks has finished playing by now.
                while self._pending_marks and self._pending_marks[0][0] <= self._play_pos:
                    await self._echo_mark(self._pending_marks.popleft()[1])
                now = time.monotonic()
                count = min(self.frame_bytes, len(self._playback))
                frame = bytes(self._playback[:count])
                del self._playback[:count]
                start_pos = self._play_pos
                self._play_pos += count
                self.played_bytes += count
                if keep_audio:
                    self.heard += frame
                    self.heard += self._silence_frame[count:]
                if count and not was_playing:
                    self._record("playback_start")
                was_playing = count > 0
                if count:
                    self._note_answers(start_pos, now)
                self._notify()
        except ConnectionClosed:
            pass

    def _note_answers(self, frame_start: int, tick_time: float) -> None:
        """Stamp when each finished utterance first had audio sent after it reach the ear."""
        still_waiting: list[_Utterance] = []
        for utterance in self._awaiting_answer:
            if utterance.answer_from < self._play_pos:
                offset_bytes = max(0, utterance.answer_from - frame_start)
                utterance.first_heard = tick_time + offset_bytes / ULAW_BYTES_PER_MS / 1000
            else:
                still_waiting.append(utterance)
        self._awaiting_answer = still_waiting

    # ------------------------------------------------------------------ receiver

    async def _receive(self) -> None:
        """Handle the relay's messages until either side closes, then stop the other tasks."""
        assert self._ws is not None
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    self._error("binary frame from the relay (Twilio expects JSON text)")
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
            self._error(f"invalid JSON from the relay: {raw[:100]!r}")
            return
        if not isinstance(msg, dict):
            self._error(f"message is not an object: {raw[:100]!r}")
            return
        event = msg.get("event")
        if event not in ("media", "mark", "clear"):
            self._record("unknown", message=msg)
            return
        if msg.get("streamSid") != self.stream_sid:
            self._error(f"{event} for stream {msg.get('streamSid')!r}, ours is {self.stream_sid}")
            return
        if event == "media":
            self._on_media(msg)
        elif event == "mark":
            self._on_mark(msg)
        else:
            await self._on_clear()
        self._notify()

    def _on_media(self, msg: dict[str, Any]) -> None:
        media = msg.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self._error("media without a string media.payload")
            return
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self._error(f"media payload is not base64: {payload[:40]!r}")
            return
        if self.config.keep_audio:
            self.received_payloads.append(payload)
        self._playback += audio
        self._recv_pos += len(audio)
        self._last_media_at = time.monotonic()
        self._record("media_in", bytes=len(audio))

    def _on_mark(self, msg: dict[str, Any]) -> None:
        mark = msg.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            self._error("mark without a string mark.name")
            return
        self._pending_marks.append((self._recv_pos, name))
        self._record("mark_in", name=name)

    async def _on_clear(self) -> None:
        """Drop every unplayed byte at once and acknowledge all pending marks, as Twilio does."""
        discarded = len(self._playback)
        self._playback.clear()
        self._play_pos = self._recv_pos
        names = [name for _, name in self._pending_marks]
        self._pending_marks.clear()
        self._record("clear", discarded_bytes=discarded, marks=names)
        for name in names:
            await self._echo_mark(name)

    # ------------------------------------------------------------------ ending the call

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._sender, self._player) if t is not None]
        self._sender = self._player = None
        for task in tasks:
            task.cancel()
        for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
            if isinstance(result, Exception):
                self._error(f"{task.get_name()} failed: {result!r}")

    def _mark_closed(self, code: int | None) -> None:
        if self._closed.is_set():
            return
        self.close_code = code
        self._record("closed", code=code)
        self._closed.set()
        for utterance in self._speech:
            utterance.done.set()  # wakes say_and_wait(), which reports the unsent audio
        self._speech.clear()
        self._notify()

    async def hangup(self) -> None:
        """The caller hangs up: ``stop``, then a normal close. Safe to call any number of times."""
        if self._ws is None:
            return
        if not self._closed.is_set() and not self._hanging_up:
            self._hanging_up = True
            await self._stop_tasks()
            with contextlib.suppress(ConnectionClosed):
                await self._send(
                    {
                        "event": "stop",
                        "sequenceNumber": "",
                        "streamSid": self.stream_sid,
                        "stop": {"accountSid": self.config.account_sid, "callSid": self.call_sid},
                    }
                )
            await self._ws.close(1000)
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

        def idle() -> bool:
            if self._playback or self._pending_marks:  # a pending mark: its last frame is still playing
                return False
            return self._closed.is_set() or time.monotonic() - self._last_media_at >= IDLE_QUIET_S

        return await self._wait_until(idle, timeout)

    # ------------------------------------------------------------------ measurements

    def mouth_to_ear_ms(self) -> list[float]:
        """Per answered utterance, ms from its last frame sent to the first answer audio played.

        Only audio received after the utterance ended counts as its answer; utterances that
        were never answered are left out.
        """
        return [
            (u.first_heard - u.sent_end) * 1000
            for u in self._utterances
            if u.sent_end is not None and u.first_heard is not None
        ]

    def write_recording(self, path: str) -> None:
        """Save what the caller heard, silence included, so a human can listen to the call."""
        write_wav(path, bytes(self.heard))
