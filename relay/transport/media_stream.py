"""The receive side of the caller's socket: each Twilio message to the call core or upstream.

A caller frame from the Twilio socket to the Realtime socket, in the relay's own code: three
files (this one, relay/transport/output.py, relay/call/caller_audio.py) and six functions.

1. `MediaStream.on_text_arrived` (here: inside the server protocol's data callback, while the
   receive loop is idle, so no queue and no task switch) or `MediaStream.receive_loop` (here:
   anything that has to wait) parses it (`relay.twilio.messages.parse`) and calls, with the
   frame's receive time when its hop latency is sampled,
2. `Output.caller_frame`, which asks
3. `CallerAudio.arrived` for the stream's audio budget and the frame's exact size, then has
4. `Output._send_frame` (the one way any caller frame reaches a session, replays included) write
   it to the Realtime socket (`relay.websockets_internals.write_text`) and record it for a replay
   with
5. `CallerAudio.sent` (or keep it with `CallerAudio.hold` while no session is open).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from relay import logs
from relay.call import Call
from relay.call.caller_audio import CallerAudio, KeyPress
from relay.metrics import HOP_SAMPLE_EVERY
from relay.transport.ending import CallEnd
from relay.transport.output import FrameOutcome, Output
from relay.transport.twilio_socket import CLOSE_POLICY, CLOSE_TOO_BIG, TwilioSocket
from relay.twilio import messages as tw
from relay.websockets_internals import write_paused

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]
Settle = Callable[[], Awaitable[None]]


class MediaStream:
    """Twilio's messages of one admitted stream, until it stops, disconnects or is closed."""

    def __init__(
        self,
        call: Call,
        twilio: TwilioSocket,
        output: Output,
        caller_audio: CallerAudio,
        end: CallEnd,
        log: logs.CallLogger,
        *,
        max_frame_bytes: int,
        spawn: Spawn,
        settle: Settle,
    ) -> None:
        self.call = call
        self.twilio = twilio
        self.output = output
        self.caller_audio = caller_audio
        self.end = end
        self.log = log
        self._max_frame = max_frame_bytes
        self._spawn = spawn
        self._settle = settle  # records that the call ends on purpose, before the socket closes
        self._loop_waiting = False
        self._frames = 0  # text frames taken, for hop-latency sampling
        self._call_timer: asyncio.Task[None] | None = None
        self._endpoint_flush: asyncio.Task[None] | None = None
        # how a caller frame is sent, chosen once per call: relay-side endpointing also looks at it
        self._frame = self._frame_endpointing if call.endpointer is not None else output.caller_frame

    async def receive_loop(self) -> None:
        """Take messages until the stream ends; the call's end reason is set when this returns."""
        call = self.call
        receive = self.twilio.receive
        max_bytes = self._max_frame
        parse = tw.parse
        send_frame = self._frame
        output = self.output
        audio = self.caller_audio
        audio.stream_started()  # audio may not outrun the clock from here
        direct = self.twilio.direct
        if direct is not None:  # frames that need no waiting are handled as they arrive
            direct.on_text = self.on_text_arrived
        try:
            while True:
                self._loop_waiting = True
                message = await receive()
                self._loop_waiting = False
                if message["type"] == "websocket.disconnect":
                    self.twilio.disconnected()
                    self.end.begin("caller_disconnected")
                    return
                text = message.get("text")
                if text is None:
                    audio.binary_frame()
                    continue
                if len(text) > max_bytes:
                    self.log.warning("oversized Twilio frame (%d bytes); closing stream", len(text))
                    await self._close("oversized_frame", CLOSE_TOO_BIG, "frame too large")
                    return
                self._frames += 1
                t0 = time.perf_counter() if self._frames % HOP_SAMPLE_EVERY == 1 else 0.0
                try:
                    event = parse(text)
                except tw.MalformedMessage as exc:
                    audio.malformed(str(exc))
                    continue
                if type(event) is tw.Media:
                    outcome = send_frame(event.payload, t0)
                    if outcome is FrameOutcome.WAIT:
                        await output.wait_upstream_sent()
                    elif outcome is FrameOutcome.FLOOD:
                        self.log.warning("caller audio arrives far faster than real time; closing stream")
                        await self._close("media_flood", CLOSE_POLICY, "media flood")
                        return
                elif type(event) is tw.Mark:
                    call.twilio_mark(event.name)
                elif isinstance(event, tw.Dtmf):
                    press = audio.keypress()
                    if press is KeyPress.FLOOD:
                        await self._close("dtmf_flood", CLOSE_POLICY, "dtmf flood")
                        return
                    if press is KeyPress.PASS:
                        call.key_pressed(event.digit)
                        await output.flush()
                        self._arm_call_timer()
                elif isinstance(event, tw.Stop):
                    self.end.begin("caller_hung_up")
                    return
                elif isinstance(event, tw.Start):
                    audio.second_start()
                elif isinstance(event, tw.Unknown):
                    audio.unknown_event(event.event)
        finally:
            self._loop_waiting = False
            if direct is not None:
                direct.on_text = None

    def on_text_arrived(self, text: str) -> bool:
        """Handle a text frame inside the server protocol's data callback, without a task switch.

        Takes the frame only when the receive loop is idle in receive() (so order is kept) and the
        frame needs no waiting: a media frame the Realtime socket's buffer has room for, or a mark.
        Otherwise returns False, having changed nothing, and the frame goes to the loop as usual.
        Media frames are 50 a second per call: this saves each a queue round trip and a task switch.
        """
        if not self._loop_waiting or len(text) > self._max_frame:
            return False
        frame = self._frames + 1
        t0 = time.perf_counter() if frame % HOP_SAMPLE_EVERY == 1 else 0.0
        try:
            event = tw.parse(text)
        except tw.MalformedMessage:
            return False  # the loop parses it again and logs it
        if type(event) is tw.Media:
            upstream = self.output.upstream
            if upstream is not None and write_paused(upstream):
                return False
            if self._frame(event.payload, t0) is FrameOutcome.FLOOD:
                return False
        elif type(event) is tw.Mark:
            self.call.twilio_mark(event.name)
        else:
            return False
        self._frames = frame
        return True

    def _frame_endpointing(self, payload: str, t0: float) -> FrameOutcome:
        """`Output.caller_frame`, then the frame goes to the call's endpointer (only when it has one)."""
        outcome = self.output.caller_frame(payload, t0)
        if outcome is FrameOutcome.FLOOD:
            return outcome
        call = self.call
        call.find_turns(payload)
        if call.has_output and self._endpoint_flush is None:
            # a speech boundary (barge-in, end of turn): sent by a task, as this must not wait
            self._endpoint_flush = self._spawn(self._flush_endpointing(), "endpoint-flush")
        return outcome

    async def _flush_endpointing(self) -> None:
        try:
            await self.output.flush()
        finally:
            self._endpoint_flush = None

    async def _close(self, reason: str, code: int, close_reason: str) -> None:
        """An abusive stream ends the call: recorded as ended on purpose first, so the continuation
        webhook hangs up instead of giving the line to a new stream."""
        self.end.begin(reason)
        await self._settle()
        await self.twilio.close(code, close_reason)

    def _arm_call_timer(self) -> None:
        """Wake up at the call's next deadline (a keypad entry's pause); one timer task per call."""
        if self.call.next_deadline() is None or self.end.ending:
            return
        if self._call_timer is None or self._call_timer.done():
            self._call_timer = self._spawn(self._run_call_timer(), "call-timer")

    async def _run_call_timer(self) -> None:
        call = self.call
        while not self.end.ending:
            deadline = call.next_deadline()  # moves later with each key: sleep again until it holds
            if deadline is None:
                return
            delay = deadline - call.clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            call.tick()
            await self.output.flush()
            if call.next_deadline() == deadline:
                return  # nothing left that time can change (the call has closed)
