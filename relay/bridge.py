"""The I/O half of a call: one Twilio WebSocket, one (replaceable) Realtime WebSocket.

Caller audio goes Twilio -> Realtime and answer audio Realtime -> Twilio in two straight
loops; everything else (store writes, tools, metrics) hangs off the side. Decisions are
the call object's (relay.call); this module moves messages, runs timers and tasks, and
makes sure every task and socket of the call ends with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import websockets
from starlette.websockets import WebSocket, WebSocketState
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from relay import logs
from relay.asgi_direct import DIRECT_EXTENSION, DirectWebSocket
from relay.audio import ULAW_BYTES_PER_MS, audio_bytes
from relay.call import Call, Entry, Metric, RunTool, SummaryReady, UpstreamFailed, UsageReport
from relay.logbound import RepeatLimiter, clip
from relay.metrics import HOP_SAMPLE_EVERY
from relay.ownership import CallHold
from relay.realtime import client
from relay.realtime import events as ev
from relay.realtime.connection import RealtimeConnection
from relay.realtime.endpoint import connect_target
from relay.security import (
    InvalidSignature,
    StreamGrant,
    StreamTokenError,
    check_signature,
    frame_caller_notes,
    verify_stream_token,
)
from relay.store.base import caller_memory_refusal
from relay.tools import ToolContext
from relay.twilio import messages as tw
from relay.twilio import twiml
from relay.websockets_internals import write_text as _write_text

if TYPE_CHECKING:
    from relay.runtime import Runtime

CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
CALLER_AUDIO_BUFFER_FRAMES = 150  # 3 s of caller audio kept while a new Realtime session opens
# Frames written just before a dropped socket is noticed die in flight; a replacement session
# (which has heard nothing yet) gets up to this much recent caller audio again, but none that the
# old session had already made into a user turn (that turn reaches the new one as text, and
# hearing it again would make the model answer it twice).
REPLAY_FRAMES = 75
# Twilio sends audio in real time; a client sending far faster is abusive (and costs money upstream).
# The budget is cumulative since the stream started, so a backlog that piles up while this process
# was stalled is covered by the time that passed meanwhile and never closes a genuine call.
MEDIA_RATE_BYTES_PER_S = 2 * 8000
MEDIA_BURST_BYTES = 10 * 8000
DTMF_FLOOD_FACTOR = 3
# Before `start` Twilio sends exactly `connected` then `start` (shared/PROTOCOLS.md §3); two frames of
# slack, and a socket that sends more without a valid start is closed. Whatever it sends, it costs at
# most one log line.
PRE_START_FRAMES = 4
FINAL_SUMMARY_WAIT_S = 4.0


class CallBridge:
    def __init__(self, runtime: Runtime, websocket: WebSocket) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.ws = websocket
        # Under the relay's own server protocol, per-message traffic skips Starlette's layers
        # (relay/asgi_direct.py); accept and close always go through them.
        self._direct: DirectWebSocket | None = websocket.scope.get("extensions", {}).get(DIRECT_EXTENSION)
        self._receive = self._direct.receive if self._direct is not None else websocket.receive
        self.log: logs.CallLogger = logs.call_logger("", "")
        self.call: Call | None = None
        self.call_sid = ""
        self.caller = ""
        self.called = ""
        self.caller_memory: str | None = None  # notes from earlier calls: never passed on to a transfer whisper
        self.memory_on = False  # caller memory is read and written for this call (see _serve)
        self.upstream: ClientConnection | None = None
        self.ending = False
        self.end_reason = ""
        self.fatal: UpstreamFailed | None = None
        self.twilio_closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._twilio_task: asyncio.Task[None] | None = None
        self._upstream_task: asyncio.Task[None] | None = None
        self._audio_backlog: deque[str] = deque(maxlen=CALLER_AUDIO_BUFFER_FRAMES)
        # (end of the frame in this session's input audio, in bytes; the append message)
        self._recent_audio: deque[tuple[int, str]] = deque(maxlen=REPLAY_FRAMES)
        self._session_audio_bytes = 0
        self._final_summary = asyncio.Event()
        self._rollover = False
        self._session_timeout = False
        self._dtmf_times: deque[float] = deque()
        self.malformed_frames = 0
        self.repeats = RepeatLimiter(self.log)  # per kind of frame the caller's side keeps sending wrong
        # caller-frame state shared by the Twilio loop and the frames taken as they arrive
        self._loop_waiting = False
        self._reader_waiting = False
        self._frames = 0
        self._media_bytes = 0
        self._media_since = time.monotonic()
        self._max_frame = self.settings.max_twilio_message_bytes
        self._hop_up = runtime.metrics.hop_latency.labels("caller_to_realtime")
        self._hop_down = runtime.metrics.hop_latency.labels("realtime_to_caller")
        self._deltas = 0
        self.audio_dropped_frames = 0
        self.cost_usd = 0.0
        self.started_at = time.monotonic()
        self.agent = self.settings.agent
        self.allowed_tools: tuple[str, ...] | None = None
        # how a caller frame is taken, chosen once per call (relay-side endpointing also looks at it)
        self._take = self._take_now
        self._call_timer: asyncio.Task[None] | None = None
        self._endpoint_flush: asyncio.Task[None] | None = None
        self._grant: StreamGrant | None = None
        self._hold: CallHold | None = None  # the call's one live stream across instances (relay/ownership.py)
        self._pending_task: asyncio.Task[Any] | None = None  # run(), while it waits for the start message
        self._evicted = False
        self._skipped_note = ""  # unreadable frames before the start, for the socket's one log line

    # ---- admission -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve one Media Stream from accept to the last task's end."""
        runtime = self.runtime
        pending = runtime.pending_streams
        await self.ws.accept()
        if len(pending) >= self.settings.max_pending_streams:
            # Make room by closing the socket that has waited longest. Refusing the new one instead would
            # let a few dozen idle sockets keep every real stream out; a real stream sends its start
            # within milliseconds of connecting, so only sockets that never do are ever closed here.
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.evict()
            runtime.metrics.calls_refused.labels("pending_streams").inc()
            self.runtime.stream_refusals.log(
                "pending_streams",
                logging.WARNING,
                "stream refused: %d sockets wait for their start message; closing the one waiting longest",
                len(pending) + 1,
            )
        pending[self] = None
        self._pending_task = asyncio.current_task()
        try:
            start = await self._await_start()
        except asyncio.CancelledError:
            if not self._evicted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._close_twilio(CLOSE_POLICY, "too many sockets waiting for start")
            return
        finally:
            pending.pop(self, None)
        if start is None:
            return
        if self.runtime.draining:  # checked once the start message names the call, for the log line
            self.runtime.metrics.calls_refused.labels("draining").inc()
            self.log.warning("stream refused: instance draining")
            await self._close_twilio(CLOSE_TRY_AGAIN, "instance draining")
            return
        await self._serve(start)

    async def _await_start(self) -> tw.Start | None:
        """Up to `PRE_START_FRAMES` frames until a valid start; at most one log line per socket."""
        settings = self.settings
        frames = 0
        skipped = 0
        first_problem = ""
        try:
            async with asyncio.timeout(settings.start_timeout_s):
                while True:
                    message = await self._receive()
                    if message["type"] == "websocket.disconnect":
                        return None
                    frames += 1
                    if frames > PRE_START_FRAMES:
                        self.runtime.metrics.calls_refused.labels("too many frames before start").inc()
                        self.runtime.stream_refusals.log(
                            "too_many_frames",
                            logging.WARNING,
                            "stream refused: too many frames before start: %d without a start, %d of them "
                            "unreadable (first: %s)",
                            frames - 1,
                            skipped,
                            first_problem or "-",
                        )
                        await self._close_twilio(CLOSE_POLICY, "too many frames before start")
                        return None
                    text = message.get("text")
                    if text is None:
                        problem = "binary frame"
                    elif len(text) > settings.max_twilio_message_bytes:
                        await self._refuse(CLOSE_TOO_BIG, "oversized frame before start")
                        return None
                    else:
                        try:
                            event = tw.parse(text)
                        except tw.MalformedMessage as exc:
                            problem = f"malformed ({clip(exc)})"
                        else:
                            if isinstance(event, tw.Start):
                                self.runtime.pending_streams.pop(self, None)  # no longer one to evict
                                if skipped:  # told on the socket's one line: its refusal or "call started"
                                    self._skipped_note = (
                                        f" ({skipped} frames before start skipped, first: {first_problem})"
                                    )
                                return await self._admit(event)
                            continue  # connected (or an event this relay does not know)
                    skipped += 1
                    first_problem = first_problem or problem
        except TimeoutError:
            await self._refuse(CLOSE_POLICY, "no valid start message in time")
            return None

    def evict(self) -> None:
        """Close this socket, still waiting for its start message, to make room for a new one."""
        self._evicted = True
        if self._pending_task is not None:
            self._pending_task.cancel()

    async def _refuse(self, code: int, reason: str) -> None:
        """Refuse a stream before admission. Anyone can open sockets, so these lines are bounded
        process-wide per kind of refusal (the reason up to its ':'), not per socket."""
        kind = reason.split(":")[0][:40]
        self.runtime.metrics.calls_refused.labels(kind).inc()
        self.runtime.stream_refusals.log(
            kind, logging.WARNING, "stream refused: %s%s", clip(reason, 200), self._skipped_note
        )
        await self._close_twilio(code, reason[:100])

    async def _admit(self, start: tw.Start) -> tw.Start | None:
        """The stream token (and the upgrade signature, when present) must match this call and the
        numbers Twilio signed for it; each token admits one stream."""
        self.log = logs.call_logger(start.call_sid, start.stream_sid, "relay.bridge")
        logs.bind_call(start.call_sid, start.stream_sid)  # library lines of this call carry the SIDs too
        params = start.custom_parameters
        try:
            grant = verify_stream_token(
                self.settings.stream_secret,
                start.call_sid,
                params.get("token", ""),
                caller=params.get("from", ""),
                called=params.get("to", ""),
            )
        except StreamTokenError as exc:
            await self._refuse(CLOSE_POLICY, f"stream token rejected: {exc}")
            return None
        signature = self.ws.headers.get("x-twilio-signature")
        if signature and self.settings.twilio_auth_token and self.settings.public_url:
            try:
                check_signature(
                    self.settings.twilio_auth_token,
                    twiml.stream_url(self.settings.public_url),
                    {},
                    signature,
                )
            except InvalidSignature as exc:
                await self._refuse(CLOSE_POLICY, f"upgrade signature rejected: {exc}")
                return None
        try:
            first_use = await asyncio.wait_for(
                self.runtime.store.claim_once(
                    f"stream-token:{grant.use_key}", max(60, int(grant.expiry - time.time()) + 60)
                ),
                timeout=1.0,
            )
        except Exception as exc:  # the store being down must not stop calls; the token still expires
            self.log.warning("could not check stream token reuse (%s); admitting", type(exc).__name__)
            first_use = True
        if not first_use:
            await self._refuse(CLOSE_POLICY, "stream token already used")
            return None
        self._grant = grant
        return start

    async def _take_call(self) -> bool:
        """Make this the call's one live stream, on this instance and (through the store) on all."""
        runtime = self.runtime
        if not runtime.register(self):
            await self._refuse(CLOSE_POLICY, "call already live: another stream of it is on this instance")
            return False
        self._hold = runtime.ownership.hold(
            self.call_sid,
            profile=runtime.profile_for(self.called).name,
            direction="inbound",
            phase=lambda: "ending" if self.ending else "live" if self.call is not None else "connecting",
            on_superseded=lambda: self._end("superseded"),
            log=self.log,
        )
        holder = await self._hold.take()
        if holder is not None:
            runtime.unregister(self)
            await self._refuse(CLOSE_POLICY, f"call already live: another stream of it is on {holder}")
            return False
        return True

    async def _release_call(self) -> None:
        """The stream is over: its hold stops renewing and lets go of the store's, then the stream
        leaves this instance's registry (in that order: a new stream of the call here must not find
        the old hold and lose its own to this release)."""
        if self._hold is not None:
            await self._hold.release()
        self.runtime.unregister(self)

    # ---- the call ------------------------------------------------------------------------

    async def _serve(self, start: tw.Start) -> None:
        runtime = self.runtime
        grant = self._grant
        assert grant is not None, "_admit() verified the token"
        self.call_sid = grant.call_sid
        self.caller = grant.caller  # the numbers the token was minted with, i.e. what Twilio signed
        self.called = grant.called
        if not await self._take_call():
            return
        if self.settings.caller_memory:
            refusal = caller_memory_refusal(self.caller)
            self.memory_on = refusal is None
            if refusal is not None:
                self.log.info("caller memory off for this call: %s", refusal)
        try:
            self.agent = runtime.profile_for(self.called)
            self.allowed_tools = self.agent.tools
            memory = self.caller_memory = await self._caller_memory()
            self.call = Call(
                call_sid=start.call_sid,
                stream_sid=start.stream_sid,
                dialect=runtime.dialect,
                agent=self.agent,
                model=self.settings.model_for(self.agent),
                tools=runtime.tools.specs(self.allowed_tools, self.agent),
                instructions_suffix=frame_caller_notes(memory) if memory else "",
                summary_max_turns=self.settings.summary_max_turns,
                summary_max_tokens=self.settings.summary_max_tokens,
                summary_keep_turns=self.settings.summary_keep_turns,
                logger=logs.call_logger(start.call_sid, start.stream_sid),
            )
        except BaseException:
            await self._release_call()
            raise
        runtime.metrics.calls_started.inc()
        runtime.store.call_started(
            self.call_sid,
            {
                "from": self.caller,
                "to": self.called,
                "stream_sid": start.stream_sid,
                "started": datetime.now(UTC).isoformat(),
                "instance": runtime.instance_id,
                "dialect": runtime.dialect.name,
                "model": self.call.model,
                "profile": self.agent.name,
                "caller_memory": "1" if memory else "0",
            },
        )
        self.log.log(
            logging.WARNING if self._skipped_note else logging.INFO,
            "call started%s",
            self._skipped_note,
            extra={"caller_known": bool(memory), "profile": self.agent.name},
        )
        self._upstream_task = asyncio.create_task(self._upstream_supervisor(), name=f"upstream-{self.call_sid}")
        # Its own task: each frame then resumes a 4-deep coroutine chain, not the ~20 frames of ASGI
        # middleware above this one (bench/RESULTS.md). Cancelling the ASGI task still cancels it.
        self._twilio_task = asyncio.create_task(self._twilio_loop(), name=f"twilio-{self.call_sid}")
        try:
            await self._twilio_task
        except asyncio.CancelledError:
            if not self.ending:
                raise
        finally:
            await self._teardown()

    async def _caller_memory(self) -> str | None:
        if not self.memory_on:
            return None
        try:
            return await asyncio.wait_for(self.runtime.store.get_caller_memory(self.caller), timeout=0.5)
        except Exception as exc:
            self.log.warning("caller memory unavailable (%s); continuing without", type(exc).__name__)
            return None

    async def _twilio_loop(self) -> None:
        assert self.call is not None
        call = self.call
        receive = self._receive
        max_bytes = self.settings.max_twilio_message_bytes
        parse = tw.parse
        # Relay-side endpointing (vad "none") looks at every caller frame; otherwise frames only pass.
        endpoint = call.caller_audio if call.endpointer is not None else None
        if endpoint is not None:
            self._take = self._take_now_endpointing
        take_now = self._take
        self._media_since = time.monotonic()  # the stream has just started: audio may not outrun the clock
        direct = self._direct
        if direct is not None:  # frames that need no waiting are handled as they arrive
            direct.on_text = self._on_text_now
        repeats = self.repeats
        repeats.logger = self.log  # the logger with the call's SIDs, set at admission
        try:
            while True:
                self._loop_waiting = True
                message = await receive()
                self._loop_waiting = False
                if message["type"] == "websocket.disconnect":
                    self.twilio_closed = True
                    self._mark_ending("caller_disconnected")
                    return
                text = message.get("text")
                if text is None:
                    repeats.log("binary_frame", logging.WARNING, "binary frame from Twilio ignored")
                    continue
                if len(text) > max_bytes:
                    self.log.warning("oversized Twilio frame (%d bytes); closing stream", len(text))
                    self._mark_ending("oversized_frame")
                    await self._close_twilio(CLOSE_TOO_BIG, "frame too large")
                    return
                self._frames += 1
                t0 = time.perf_counter() if self._frames % HOP_SAMPLE_EVERY == 1 else 0.0
                try:
                    event = parse(text)
                except tw.MalformedMessage as exc:
                    self._malformed_frame(str(exc))
                    continue
                if take_now(event, t0):
                    continue
                if type(event) is tw.Media:  # over the flood budget, or the upstream buffer is full
                    if self._media_flood(event.payload):
                        self.log.warning("caller audio arrives far faster than real time; closing stream")
                        self._mark_ending("media_flood")
                        await self._close_twilio(CLOSE_POLICY, "media flood")
                        return
                    call.frames_in += 1
                    self._media_bytes += len(event.payload) * 3 // 4
                    await self._send_upstream(client.APPEND_PREFIX + event.payload + client.APPEND_SUFFIX)
                    if endpoint is not None:
                        endpoint(event.payload)
                        await self._flush()
                elif isinstance(event, tw.Dtmf):
                    allowed = self._dtmf_allowed()
                    if allowed is None:
                        self._mark_ending("dtmf_flood")
                        await self._close_twilio(CLOSE_POLICY, "dtmf flood")
                        return
                    if allowed:
                        call.twilio_dtmf(event.digit)
                        await self._flush()
                        self._arm_call_timer()
                elif isinstance(event, tw.Stop):
                    self._mark_ending("caller_hung_up")
                    return
                elif isinstance(event, tw.Start):
                    repeats.log("second_start", logging.WARNING, "second start message on one stream ignored")
                elif isinstance(event, tw.Unknown):
                    repeats.log("unknown_event", logging.DEBUG, "unknown Twilio event %s ignored", clip(event.event))
        finally:
            self._loop_waiting = False
            if direct is not None:
                direct.on_text = None

    def _on_text_now(self, text: str) -> bool:
        """Called by the server protocol with a text frame as it arrives, while no earlier frame waits.

        Takes the frame only when the Twilio loop is idle in receive() (so order is kept) and the
        frame needs no waiting; otherwise returns False and the frame goes to the loop as usual.
        Media frames are 50 a second per call: this saves each a queue round trip and a task switch.
        """
        if not self._loop_waiting or len(text) > self._max_frame:
            return False
        try:
            event = tw.parse(text)
        except tw.MalformedMessage:
            return False  # the loop parses it again and logs it
        frame = self._frames + 1
        t0 = time.perf_counter() if frame % HOP_SAMPLE_EVERY == 1 else 0.0
        if self._take(event, t0):
            self._frames = frame
            return True
        return False

    def _take_now(self, event: tw.TwilioEvent, t0: float) -> bool:
        """Handle a media frame or a mark without waiting; False (and nothing changed) if it can't be."""
        call = self.call
        assert call is not None
        if type(event) is tw.Media:
            payload = event.payload
            upstream = self.upstream
            if self._media_flood(payload) or (upstream is not None and upstream.paused):
                return False
            call.frames_in += 1
            self._media_bytes += len(payload) * 3 // 4
            text = client.APPEND_PREFIX + payload + client.APPEND_SUFFIX
            if upstream is not None and upstream.state is State.OPEN:
                try:
                    _write_text(upstream, text)  # if that fills the buffer, the next frame goes to the loop
                    self._session_audio_bytes += audio_bytes(payload)
                    self._recent_audio.append((self._session_audio_bytes, text))
                except websockets.ConnectionClosed:
                    self._hold_audio(text)
            else:
                self._hold_audio(text)
            if t0:
                self._hop_up.observe(time.perf_counter() - t0)
            return True
        if type(event) is tw.Mark:
            call.twilio_mark(event.name)
            return True
        return False

    def _take_now_endpointing(self, event: tw.TwilioEvent, t0: float) -> bool:
        """``_take_now``, then the frame goes to the call's endpointer (only when it has one)."""
        if not self._take_now(event, t0):
            return False
        if type(event) is tw.Media:
            call = self.call
            assert call is not None
            call.caller_audio(event.payload)
            if (call.to_twilio or call.to_upstream or call.effects) and self._endpoint_flush is None:
                # a speech boundary (barge-in, end of turn): sent by a task, as this must not wait
                self._endpoint_flush = self._spawn(self._flush_endpointing(), "endpoint-flush")
        return True

    async def _flush_endpointing(self) -> None:
        try:
            await self._flush()
        finally:
            self._endpoint_flush = None

    def _arm_call_timer(self) -> None:
        """Wake up at the call's next deadline (a keypad entry's pause); one timer task per call."""
        call = self.call
        if call is None or call.next_deadline() is None or self.ending:
            return
        if self._call_timer is None or self._call_timer.done():
            self._call_timer = self._spawn(self._run_call_timer(), "call-timer")

    async def _run_call_timer(self) -> None:
        call = self.call
        assert call is not None
        while not self.ending:
            deadline = call.next_deadline()  # moves later with each key: sleep again until it holds
            if deadline is None:
                return
            delay = deadline - call.clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            call.tick()
            await self._flush()
            if call.next_deadline() == deadline:
                return  # nothing left that time can change (the call has closed)

    def _media_flood(self, payload: str) -> bool:
        """True if this frame would put the stream over its audio budget (real time plus a burst)."""
        total = self._media_bytes + len(payload) * 3 // 4
        return (
            total > MEDIA_BURST_BYTES
            and total > MEDIA_BURST_BYTES + (time.monotonic() - self._media_since) * MEDIA_RATE_BYTES_PER_S
        )

    def _malformed_frame(self, reason: str) -> None:
        """Logged the first few times, then as a running count: junk must not flood the logs."""
        self.malformed_frames += 1
        self.repeats.log("malformed_frame", logging.WARNING, "malformed Twilio frame skipped: %s", clip(reason))

    def _dtmf_allowed(self) -> bool | None:
        """True: pass the digit on; False: drop it (over the per-second cap); None: a flood, close."""
        now = time.monotonic()
        window = self._dtmf_times
        while window and now - window[0] > 1.0:
            window.popleft()
        window.append(now)
        limit = self.settings.max_dtmf_per_second
        if len(window) > DTMF_FLOOD_FACTOR * limit:
            self.log.warning("DTMF flood (%d digits in a second); closing stream", len(window))
            return None
        if len(window) > limit:
            if len(window) == int(limit) + 1:
                self.log.warning("DTMF over %g per second: digits dropped", limit)
            return False
        return True

    # ---- sending ---------------------------------------------------------------------------

    async def _send_upstream(self, text: str) -> None:
        upstream = self.upstream
        if self._send_upstream_now(text) and upstream is not None:
            try:
                await upstream.drain()
            except websockets.ConnectionClosed:
                pass  # the message is in the dead socket's buffer; a new session replays recent audio

    def _send_upstream_now(self, text: str) -> bool:
        """Write without waiting; True when the socket's buffer is over its limit (drain before more)."""
        upstream = self.upstream
        if upstream is None or upstream.state is not State.OPEN:
            # A closing socket makes send() wait for the close handshake; the caller must never wait.
            if text.startswith(client.APPEND_PREFIX):
                self._hold_audio(text)
            return False
        try:
            paused = _write_text(upstream, text)
        except websockets.ConnectionClosed:
            if text.startswith(client.APPEND_PREFIX):
                self._hold_audio(text)
            return False
        if text.startswith(client.APPEND_PREFIX):
            self._session_audio_bytes += audio_bytes(text[len(client.APPEND_PREFIX) : -len(client.APPEND_SUFFIX)])
            self._recent_audio.append((self._session_audio_bytes, text))
        return paused

    def _forget_committed_audio(self, committed_ms: int) -> None:
        """Drop the recent frames the lost session had already turned into a user turn."""
        committed = committed_ms * ULAW_BYTES_PER_MS
        recent = self._recent_audio
        while recent and recent[0][0] <= committed:
            recent.popleft()

    def _hold_audio(self, text: str) -> None:
        """Keep caller audio for the next Realtime session: the newest few seconds of it."""
        backlog = self._audio_backlog
        if len(backlog) == backlog.maxlen:
            self.audio_dropped_frames += 1
            self.runtime.metrics.caller_audio_dropped.inc()
            if self.audio_dropped_frames == 1:
                self.log.warning(
                    "no Realtime session for %.0f s: caller audio older than that is being dropped",
                    CALLER_AUDIO_BUFFER_FRAMES * 0.02,
                )
        backlog.append(text)

    async def _send_twilio(self, texts: list[str]) -> None:
        """Send in order; stops at the first failure (the caller's socket is gone, and the Twilio
        loop ends the call)."""
        direct = self._direct
        for text in texts:
            if self.twilio_closed:
                return
            try:
                if direct is None:
                    await self.ws.send_text(text)
                elif direct.send_text(text):
                    await direct.writable()
            except Exception:
                self.twilio_closed = True

    async def _flush(self, replay: list[str] | None = None) -> None:
        """Send what the call object produced and perform its effects.

        ``replay`` (caller audio for a new session) is written right after the call's own messages
        to the Realtime socket and before anything awaits, so no live frame can come in between.
        """
        assert self.call is not None
        to_twilio, to_upstream, effects = self.call.take_output()
        if replay:
            paused = False
            for text in to_upstream + replay:
                paused = self._send_upstream_now(text) or paused
            to_upstream = []
            upstream = self.upstream
            if paused and upstream is not None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await upstream.drain()
        if to_twilio:
            await self._send_twilio(to_twilio)
        for text in to_upstream:
            await self._send_upstream(text)
        for effect in effects:
            self._apply(effect)

    def _apply(self, effect: Any) -> None:
        store = self.runtime.store
        metrics = self.runtime.metrics
        if isinstance(effect, Metric):
            metrics.observe(effect.name, effect.value, effect.label)
        elif isinstance(effect, Entry):
            store.add_entry(self.call_sid, {"kind": effect.kind, "t": time.time(), **effect.data})
        elif isinstance(effect, UsageReport):
            store.add_usage(self.call_sid, effect.usage)
            self.cost_usd += metrics.record_usage(effect.usage, self.settings.price_per_1k_tokens)
        elif isinstance(effect, RunTool):
            self._spawn(self._run_tool(effect), f"tool-{effect.name}")
        elif isinstance(effect, SummaryReady):
            store.set_summary(self.call_sid, effect.text)
            if effect.final:
                if self.memory_on:
                    store.set_caller_memory(self.caller, effect.text)
                self._final_summary.set()
        elif isinstance(effect, UpstreamFailed):
            if effect.fatal:
                self.fatal = effect
                self.log.error("Realtime API refused the session (%s): %s", effect.code, effect.message)
            else:
                self._rollover = True
            if self.upstream is not None:
                self._spawn(self.upstream.close(), "upstream-close")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{name}-{self.call_sid}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A side task of the call ended: an exception is a bug, logged with the call's SIDs at once."""
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("task %s of this call failed", task.get_name(), exc_info=exc)

    # ---- upstream ----------------------------------------------------------------------------

    async def _connect_upstream(self) -> ClientConnection:
        settings = self.settings
        model = self.call.model if self.call is not None else settings.model_for(self.agent)
        url, headers = connect_target(settings, self.runtime.dialect, model)
        return await websockets.connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=settings.max_upstream_message_bytes,
            ping_interval=settings.ws_ping_interval_s,
            ping_timeout=settings.ws_ping_timeout_s,
            open_timeout=10,
            close_timeout=1,
            user_agent_header="phone-relay",
            create_connection=RealtimeConnection,
        )

    async def _upstream_supervisor(self) -> None:
        """Keep a configured Realtime session attached for as long as the call lasts."""
        assert self.call is not None
        call = self.call
        settings = self.settings
        failures = 0
        opened_once = False
        while not self.ending:
            try:
                upstream = await self._connect_upstream()
            except Exception as exc:
                failures += 1
                self.log.warning("Realtime connection failed (%s: %s)", type(exc).__name__, str(exc)[:200])
                if failures > settings.reconnect_attempts:
                    await self._end("realtime_unavailable")
                    return
                await asyncio.sleep(settings.reconnect_backoff_s * 2 ** (failures - 1))
                continue
            if opened_once:
                self.runtime.metrics.upstream_reconnects.labels("rollover" if self._rollover else "dropped").inc()
                call.note_event("realtime_reconnected", rollover=self._rollover)
            opened_once = True
            self._rollover = False
            self._session_timeout = False
            replay = [text for _, text in self._recent_audio] + list(self._audio_backlog)
            self._recent_audio.clear()
            self._audio_backlog.clear()
            self._session_audio_bytes = 0
            self.upstream = upstream
            call.upstream_opened()
            await self._flush(replay)  # the session's configuration, then the replayed audio
            watchdog = self._spawn(self._session_watchdog(upstream), "session-watchdog")
            try:
                await self._upstream_reader(upstream)
            finally:
                watchdog.cancel()
                self.upstream = None
                with contextlib.suppress(Exception):
                    await upstream.close()
            became_ready = call.session_ready
            self._forget_committed_audio(call.caller_audio_committed_ms)
            call.upstream_lost()
            await self._flush()
            if self.ending:
                return
            if self.fatal is not None:
                await self._end(f"realtime_error:{self.fatal.code}")
                return
            if self._rollover:
                self.log.info("Realtime session rolled over")
                continue
            if became_ready and not self._session_timeout:
                failures = 0
            failures += 1
            reason = "session.update timeout" if self._session_timeout else f"closed with {upstream.close_code}"
            self.log.warning("Realtime session lost (%s); reconnecting (attempt %d)", reason, failures)
            if failures > settings.reconnect_attempts:
                await self._end("realtime_unavailable")
                return
            await asyncio.sleep(settings.reconnect_backoff_s * 2 ** (failures - 1))

    async def _session_watchdog(self, upstream: ClientConnection) -> None:
        """Close a session that never confirms its configuration, and roll over long sessions."""
        assert self.call is not None
        await asyncio.sleep(self.settings.session_update_timeout_s)
        if not self.call.session_ready:
            self._session_timeout = True
            self.log.warning("no session.updated within %.1f s", self.settings.session_update_timeout_s)
            await upstream.close(1000, "session.update timeout")
            return
        remaining = self.settings.session_max_s - self.settings.session_update_timeout_s
        await asyncio.sleep(max(0.0, remaining))
        # Roll over between turns so nothing the caller is hearing is cut.
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not (self.call.playback_idle and not self.call.caller_speaking):
            await asyncio.sleep(0.05)
        self._rollover = True
        self.log.info("Realtime session reached its planned maximum; opening a new one")
        await upstream.close(1000, "rollover")

    async def _upstream_reader(self, upstream: ClientConnection) -> None:
        assert self.call is not None
        handle = self._upstream_message
        taker = upstream if isinstance(upstream, RealtimeConnection) and self._direct is not None else None
        if taker is not None:  # messages that need no waiting are handled as they arrive
            taker.on_text = self._on_upstream_now
        try:
            while True:
                self._reader_waiting = True
                try:
                    raw = await upstream.recv()
                finally:
                    self._reader_waiting = False
                await handle(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            if taker is not None:
                taker.on_text = None

    async def _upstream_message(self, raw: str | bytes) -> None:
        t0 = time.perf_counter()
        event = self._feed_upstream(raw)
        if event is None:
            return
        await self._flush()
        self._sample_hop_down(event, t0)

    def _feed_upstream(self, raw: str | bytes) -> ev.ServerEvent | None:
        """Parse one Realtime message and hand it to the call; None when it had to be skipped."""
        call = self.call
        assert call is not None
        try:
            event = self.runtime.dialect.parse(raw)
        except ev.MalformedEvent as exc:
            self.log.warning("malformed Realtime event skipped: %s", exc)
            return None
        try:
            call.upstream_event(event)
        except Exception:  # a bug must cost one event, not the call
            self.log.exception("error handling Realtime event %s; skipped", type(event).__name__)
            call.take_output()
            return None
        return event

    def _sample_hop_down(self, event: ev.ServerEvent, t0: float) -> None:
        if type(event) is ev.AudioDelta:
            self._deltas += 1
            if self._deltas % HOP_SAMPLE_EVERY == 1:  # audio deltas only, the first one included
                self._hop_down.observe(time.perf_counter() - t0)

    def _on_upstream_now(self, text: str) -> bool:
        """Called by the Realtime connection with a message as it arrives, while the reader waits.

        Handles it at once when nothing it causes has to wait: the caller's socket and the Realtime
        socket both take writes. Otherwise returns False, before touching anything, and the reader
        gets the message from recv() as usual.
        """
        direct = self._direct
        upstream = self.upstream
        if (
            not self._reader_waiting
            or direct is None
            or not direct.can_write()
            or (upstream is not None and upstream.paused)
        ):
            return False
        t0 = time.perf_counter()
        event = self._feed_upstream(text)
        if event is None:
            return True
        assert self.call is not None
        to_twilio, to_upstream, effects = self.call.take_output()
        for message in to_twilio:
            if self.twilio_closed:
                break
            try:
                direct.send_text(message)  # a full buffer is seen by the next message's can_write()
            except Exception:
                self.twilio_closed = True
        for message in to_upstream:
            self._send_upstream_now(message)
        for effect in effects:
            self._apply(effect)
        self._sample_hop_down(event, t0)
        return True

    # ---- tools ---------------------------------------------------------------------------------

    def tool_context(self) -> ToolContext:
        return ToolContext(
            call_sid=self.call_sid,
            caller=self.caller,
            called=self.called,
            profile=self.agent,
            store=self.runtime.store,
            log=logs.call_logger(self.call_sid, self.call.stream_sid if self.call else "", "relay.tools"),
            end_call=self.end_call,
            transfer_call=self.transfer_call,
            summary=lambda: self.call.summary if self.call else None,
        )

    async def _run_tool(self, request: RunTool) -> None:
        assert self.call is not None
        result = await self.runtime.tools.run(
            request.name, request.arguments, self.tool_context(), allowed=self.allowed_tools
        )
        self.runtime.metrics.tool_call(request.name, result.outcome, result.duration_s)
        if self.ending or self.call.phase.value == "closed":
            return  # the call ended (end_call, transfer, hang-up): no new response for a dead line
        self.call.tool_result(request.call_id, result.output, ok=result.outcome == "ok")
        await self._flush()

    async def wait_playback_idle(self, timeout: float) -> bool:
        """Until Twilio has acknowledged every mark of the audio sent (or the timeout)."""
        assert self.call is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call.playback_idle or self.twilio_closed:
                return True
            await asyncio.sleep(0.02)
        return False

    async def end_call(self, reason: str = "assistant_ended") -> None:
        """Let the goodbye play out, then hang up through Twilio's REST API and close both sockets."""
        played = await self.wait_playback_idle(self.settings.end_call_mark_timeout_s)
        if not played:
            self.log.info("goodbye not acknowledged within %.1f s; hanging up", self.settings.end_call_mark_timeout_s)
        control = self.runtime.twilio_control
        if control is not None:
            try:
                await control.hangup(self.call_sid)
            except Exception as exc:
                self.log.warning("REST hang-up failed (%s); closing the stream instead", type(exc).__name__)
        await self._end(reason)

    async def transfer_call(self, number: str, whisper: str | None = None) -> None:
        """Hand the caller to a human: the live call's TwiML becomes <Dial>, which ends our stream."""
        control = self.runtime.twilio_control
        await self.wait_playback_idle(self.settings.end_call_mark_timeout_s)
        if control is None:
            raise RuntimeError("transfers need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        await control.redirect(
            self.call_sid, twiml.dial(number, whisper_url=self.runtime.whisper_url(whisper, memory=self.caller_memory))
        )
        await self._end("transferred")

    # ---- ending ------------------------------------------------------------------------------------

    def _mark_ending(self, reason: str) -> None:
        if not self.ending:
            self.ending = True
            self.end_reason = reason

    async def _end(self, reason: str) -> None:
        """End the call from our side: stop the Twilio loop, which runs the teardown."""
        self._mark_ending(reason)
        if reason in ("realtime_unavailable",) or reason.startswith("realtime_error"):
            await self._redirect_to_fallback()
        await self._close_twilio(1000, reason[:100])
        task = self._twilio_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    async def _redirect_to_fallback(self) -> None:
        number = self.settings.fallback_number
        control = self.runtime.twilio_control
        if not number or control is None:
            return
        try:
            await control.redirect(self.call_sid, twiml.dial(number))
            self.log.info("call redirected to the fallback number")
        except Exception as exc:
            self.log.warning("fallback redirect failed (%s)", type(exc).__name__)

    async def goodbye(self, text: str, timeout: float) -> None:
        """Shutdown: a short spoken goodbye where the session allows, then close."""
        call = self.call
        if call is not None and call.session_ready and self.upstream is not None and not self.ending:
            call.note_event("drain_goodbye")
            call.say(f"Say exactly this and nothing else: {text}", interrupt=True)
            await self._flush()
            await asyncio.sleep(0.2)
            await self.wait_playback_idle(timeout)
        await self._end("shutdown")

    async def _close_twilio(self, code: int, reason: str) -> None:
        if self.twilio_closed:
            return
        self.twilio_closed = True
        with contextlib.suppress(Exception):
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                await self.ws.close(code=code, reason=reason)

    async def _teardown(self) -> None:
        call = self.call
        if call is None:
            return
        self._mark_ending("stream_closed")
        if (
            self.memory_on
            and self.upstream is not None
            and call.session_ready
            and (call.turn_count > 0 or call.summary)
        ):
            if call.request_summary(final=True):
                await self._flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._final_summary.wait(), FINAL_SUMMARY_WAIT_S)
        call.close(self.end_reason)
        for effect in call.take_output()[2]:
            self._apply(effect)
        if self._upstream_task is not None and self._upstream_task is not asyncio.current_task():
            self._upstream_task.cancel()
            with contextlib.suppress(BaseException):
                await self._upstream_task
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.tasks:
            await asyncio.gather(*[t for t in self.tasks if t is not asyncio.current_task()], return_exceptions=True)
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                await self.upstream.close()
            self.upstream = None
        await self._close_twilio(1000, "call ended")
        duration = time.monotonic() - self.started_at
        self.runtime.store.call_updated(
            self.call_sid,
            {
                "ended": datetime.now(UTC).isoformat(),
                "end_reason": self.end_reason,
                "duration_s": f"{duration:.1f}",
                "frames_in": str(call.frames_in),
                "frames_out": str(call.frames_out),
                "cost_usd": f"{self.cost_usd:.4f}",
            },
        )
        self.runtime.metrics.call_ended(self.end_reason, duration)
        if self.settings.price_per_1k_tokens:
            self.runtime.metrics.call_cost.observe(self.cost_usd)
        await self._release_call()
        self.log.info(
            "call ended",
            extra={
                "reason": self.end_reason,
                "duration_s": round(duration, 1),
                "frames_in": call.frames_in,
                "frames_out": call.frames_out,
                "malformed_frames": self.malformed_frames,
                "ignored_from_twilio": self.repeats.counts | call.repeats.counts,
                "audio_dropped_frames": self.audio_dropped_frames,
            },
        )
