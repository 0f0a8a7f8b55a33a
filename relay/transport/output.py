"""The one path by which anything reaches the caller's socket or the Realtime socket.

Two things are written: a caller frame as it comes in (`Output.caller_frame`, 50 a second), and
what the call core produced since the last time (`Output.write`: ``call.take_output()`` ->
messages for Twilio, messages for Realtime, effects). `write` never waits, so it serves both the
messages handled inside a socket's data callback and the awaiting path (`flush`, which then
waits until it is sent). Caller audio is a `CallerFrame` and never passes through the core's
messages; the policy for it (budget, replay, backlog) is `relay.call.caller_audio`'s. "Drain"
means only an instance shutting down; websockets' own ``drain()`` is called in one place here.

The way of one caller frame through these modules is told in relay/transport/media_stream.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from enum import Enum

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from relay.call import Call, Effect
from relay.call.caller_audio import FLOODED, CallerAudio, CallerFrame, frame_bytes
from relay.metrics import Metrics
from relay.realtime.client import APPEND_PREFIX, APPEND_SUFFIX
from relay.transport.twilio_socket import TwilioSocket
from relay.websockets_internals import write_paused, write_text


class FrameOutcome(Enum):
    """What became of one caller frame handed to `Output.caller_frame`."""

    TAKEN = "taken"  # written upstream, or kept for the next session
    WAIT = "wait"  # written; the Realtime socket's buffer is over its limit: wait before the next
    FLOOD = "flood"  # over the stream's audio budget: nothing done, the stream is to be closed


class Output:
    """Writes to both sockets of one call; `upstream` is the current Realtime socket, or None."""

    def __init__(
        self,
        call: Call,
        twilio: TwilioSocket,
        caller_audio: CallerAudio,
        metrics: Metrics,
        apply: Callable[[Effect], None],
    ) -> None:
        self.call = call
        self.twilio = twilio
        self.caller_audio = caller_audio
        self.upstream: ClientConnection | None = None
        self._apply = apply
        # bound once per call: these run for every caller frame
        self._arrived = caller_audio.arrived
        self._sent = caller_audio.sent
        self._hop_up = metrics.hop_latency.labels("caller_to_realtime")
        self._audio_dropped = metrics.caller_audio_dropped

    def caller_frame(self, payload: str, t0: float) -> FrameOutcome:
        """Send one caller frame upstream, or keep it for the next session when none is open.

        ``t0``: when the frame was received (``perf_counter``) if its hop latency is sampled, else 0.
        """
        size = self._arrived(payload)
        if size == FLOODED:
            return FrameOutcome.FLOOD
        self.call.frames_in += 1
        # a CallerFrame by construction; calling the NewType would cost a call per frame
        frame: CallerFrame = APPEND_PREFIX + payload + APPEND_SUFFIX  # type: ignore[assignment]
        outcome = FrameOutcome.WAIT if self._send_frame(frame, size) else FrameOutcome.TAKEN
        if t0:
            self._hop_up.observe(time.perf_counter() - t0)
        return outcome

    def _send_frame(self, frame: CallerFrame, size: int) -> bool:
        """Write one caller frame to the open session and record it for a replay, or keep it for the
        next session; True when the socket's buffer is over its limit (wait before the next)."""
        upstream = self.upstream
        if upstream is None or upstream.state is not State.OPEN:
            # A closing socket makes send() wait for the close handshake; the caller must never wait.
            self._hold(frame)
            return False
        try:
            full = write_text(upstream, frame)
        except websockets.ConnectionClosed:
            self._hold(frame)
            return False
        self._sent(size, frame)
        return full

    def _hold(self, frame: CallerFrame) -> None:
        if self.caller_audio.hold(frame):
            self._audio_dropped.inc()

    def write(self, replay: list[CallerFrame] | None = None) -> bool:
        """Write what the call produced and perform its effects, without waiting.

        ``replay`` (caller audio for a new session) goes right after the call's own messages to
        the Realtime socket, so no live frame can come in between. True when something must be
        awaited with `wait_sent` before writing more: a socket's buffer over its limit, or Twilio
        messages queued under plain ASGI. Inside a data callback, where nothing can wait, the next
        message's check sees the full buffer instead.
        """
        to_twilio, to_upstream, effects = self.call.take_output()
        twilio_full = False
        for text in to_twilio:
            twilio_full = self.twilio.write(text) or twilio_full
        upstream_full = False
        upstream = self.upstream
        for text in to_upstream:
            upstream_full = self._write_upstream(upstream, text) or upstream_full
        for frame in replay or ():  # caller audio again, for a new session, in order
            upstream_full = self._send_frame(frame, frame_bytes(frame)) or upstream_full
        for effect in effects:
            self._apply(effect)
        return twilio_full or upstream_full

    @staticmethod
    def _write_upstream(upstream: ClientConnection | None, text: str) -> bool:
        if upstream is None or upstream.state is not State.OPEN:
            return False  # the core's messages for a lost session: the next one is configured anew
        try:
            return write_text(upstream, text)
        except websockets.ConnectionClosed:
            return False

    async def wait_sent(self) -> None:
        """Until both sockets have taken what was written (a closed one counts as done)."""
        await self.twilio.wait_sent()
        await self.wait_upstream_sent()

    async def wait_upstream_sent(self) -> None:
        upstream = self.upstream
        if upstream is not None and write_paused(upstream):
            with contextlib.suppress(websockets.ConnectionClosed):
                await upstream.drain()  # on a close, the message dies in flight; a new session replays

    async def flush(self, replay: list[CallerFrame] | None = None) -> None:
        """`write`, then wait until it has gone out."""
        if self.write(replay):
            await self.wait_sent()
