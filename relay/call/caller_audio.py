"""What happens to the caller's side of a Media Stream, decided without sockets or a loop.

Twilio sends 20 ms of µ-law 50 times a second; the relay passes each frame upstream untouched.
The rules around that are here, fed by the transport and by an injected clock, so each one is
tested with exact numbers and a fake clock (tests/test_call_caller_audio.py):

- the flood budget: audio may not outrun real time by more than a burst, counted since the
  stream started (a backlog that piled up while the process stalled is covered by the time that
  passed meanwhile, so it never closes a genuine call);
- the replay window: frames written just before a dropped Realtime socket is noticed die in
  flight, so a replacement session (which has heard nothing yet) gets the most recent ones again,
  but none the old session had already committed into a user turn (that turn reaches the new
  session as text; hearing it again would make the model answer it twice);
- the backlog: caller audio kept while no session is open, the newest few seconds of it;
- the keypad limit: digits over a per-second cap are dropped, a flood of them closes the stream;
- junk frames: logged the first few times, then as a running count.

Every audio size is `relay.audio.audio_bytes` of the base64 payload: one way to count.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import NewType

from relay.audio import FRAME_MS, ULAW_BYTES_PER_MS, audio_bytes
from relay.logbound import Logger, RepeatLimiter, clip
from relay.realtime.client import APPEND_PREFIX, APPEND_SUFFIX

CALLER_AUDIO_BUFFER_FRAMES = 150  # 3 s of caller audio kept while a new Realtime session opens
REPLAY_FRAMES = 75  # 1.5 s of recent audio a replacement session hears again
# Twilio sends audio in real time; a client sending far faster is abusive (and costs money upstream).
MEDIA_RATE_BYTES_PER_S = 2 * 8000
MEDIA_BURST_BYTES = 10 * 8000
DTMF_FLOOD_FACTOR = 3
DTMF_WINDOW_S = 1.0

CallerFrame = NewType("CallerFrame", str)
"""One Twilio media frame as the ``input_audio_buffer.append`` message that carries it upstream.

Caller audio is told apart from the core's own messages by this type, never by its text."""

FLOODED = -1
"""`CallerAudio.arrived`: the frame would put the stream over its audio budget."""


def frame_bytes(frame: CallerFrame) -> int:
    """Exact audio size of the frame an append message carries."""
    return audio_bytes(frame[len(APPEND_PREFIX) : -len(APPEND_SUFFIX)])


class KeyPress(Enum):
    """What to do with one keypad digit."""

    PASS = "pass"
    DROP = "drop"  # over the per-second cap
    FLOOD = "flood"  # far over it: close the stream


class CallerAudio:
    """The caller-audio policy of one Media Stream.

    The transport tells it what happened to each frame and asks it what to do:

    - ``arrived(payload)`` before a frame is written upstream: its exact size, or `FLOODED`
      (nothing counted) when it would exceed the budget;
    - then ``sent(size, frame)`` once it is in the open session's socket, or ``hold(frame)``
      when there is no open session to take it;
    - ``session_lost(committed_ms)`` when the session is gone, with how much of its input audio
      it had committed; ``session_opened()`` when a new one is open: the frames to write to it
      first, in order (pass each to ``sent`` again, with ``frame_bytes``, once written).
    """

    __slots__ = (
        "_backlog",
        "_clock",
        "_keys",
        "_log",
        "_max_dtmf_per_second",
        "_recent",
        "_session_bytes",
        "_stream_bytes",
        "_stream_since",
        "dropped_frames",
        "malformed_frames",
        "repeats",
    )

    def __init__(self, clock: Callable[[], float], log: Logger, *, max_dtmf_per_second: float) -> None:
        self._clock = clock
        self._log = log
        self._max_dtmf_per_second = max_dtmf_per_second
        self._stream_bytes = 0
        self._stream_since = clock()
        # (end of the frame in this session's input audio, in bytes; the frame)
        self._recent: deque[tuple[int, CallerFrame]] = deque(maxlen=REPLAY_FRAMES)
        self._session_bytes = 0
        self._backlog: deque[CallerFrame] = deque(maxlen=CALLER_AUDIO_BUFFER_FRAMES)
        self._keys: deque[float] = deque()
        self.dropped_frames = 0
        self.malformed_frames = 0
        self.repeats = RepeatLimiter(log)  # per kind of frame the caller's side keeps sending wrong

    # ---- audio -----------------------------------------------------------------------------

    def stream_started(self) -> None:
        """The stream's audio starts now: the budget counts from here."""
        self._stream_since = self._clock()

    def arrived(self, payload: str) -> int:
        """Count a frame against the budget (real time plus a burst); its size, or `FLOODED`."""
        size = audio_bytes(payload)
        total = self._stream_bytes + size
        if total > MEDIA_BURST_BYTES and total > (
            MEDIA_BURST_BYTES + (self._clock() - self._stream_since) * MEDIA_RATE_BYTES_PER_S
        ):
            return FLOODED
        self._stream_bytes = total
        return size

    def sent(self, size: int, frame: CallerFrame) -> None:
        """The frame is in the open session's socket, ending at this much of its input audio."""
        self._session_bytes += size
        self._recent.append((self._session_bytes, frame))

    def hold(self, frame: CallerFrame) -> bool:
        """Keep a frame for the next session; True when that dropped the oldest one kept."""
        backlog = self._backlog
        dropped = len(backlog) == backlog.maxlen
        if dropped:
            self.dropped_frames += 1
            if self.dropped_frames == 1:
                self._log.warning(
                    "no Realtime session for %.0f s: caller audio older than that is being dropped",
                    CALLER_AUDIO_BUFFER_FRAMES * FRAME_MS / 1000,
                )
        backlog.append(frame)
        return dropped

    def session_lost(self, committed_ms: int) -> None:
        """Forget the recent frames the lost session had already committed into a user turn."""
        committed = committed_ms * ULAW_BYTES_PER_MS
        recent = self._recent
        while recent and recent[0][0] <= committed:
            recent.popleft()

    def session_opened(self) -> list[CallerFrame]:
        """A new session is open: what it must hear first (recent audio, then the backlog)."""
        replay = [frame for _, frame in self._recent]
        replay.extend(self._backlog)
        self._recent.clear()
        self._backlog.clear()
        self._session_bytes = 0
        return replay

    # ---- keypad ----------------------------------------------------------------------------

    def keypress(self, *, on_flood: str = "closing stream") -> KeyPress:
        """One digit arrived: pass it on, drop it (over the cap), or close (a flood); ``on_flood``
        says in the log what the transport does about a flood."""
        now = self._clock()
        window = self._keys
        while window and now - window[0] > DTMF_WINDOW_S:
            window.popleft()
        window.append(now)
        limit = self._max_dtmf_per_second
        if len(window) > DTMF_FLOOD_FACTOR * limit:
            self.repeats.log(
                "dtmf_flood", logging.WARNING, "DTMF flood (%d digits in a second); %s", len(window), on_flood
            )
            return KeyPress.FLOOD
        if len(window) > limit:
            if len(window) == int(limit) + 1:
                self._log.warning("DTMF over %g per second: digits dropped", limit)
            return KeyPress.DROP
        return KeyPress.PASS

    # ---- junk ------------------------------------------------------------------------------

    def malformed(self, reason: str) -> None:
        """A frame that does not parse: skipped, counted, logged a bounded number of times."""
        self.malformed_frames += 1
        self.repeats.log("malformed_frame", logging.WARNING, "malformed Twilio frame skipped: %s", clip(reason))

    def binary_frame(self) -> None:
        self.repeats.log("binary_frame", logging.WARNING, "binary frame from Twilio ignored")

    def second_start(self) -> None:
        self.repeats.log("second_start", logging.WARNING, "second start message on one stream ignored")

    def unknown_event(self, name: str) -> None:
        self.repeats.log("unknown_event", logging.DEBUG, "unknown Twilio event %s ignored", clip(name))
