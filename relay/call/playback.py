"""What the caller has heard: marks, playback accounting and the truncation point at a barge-in.

Each chunk of assistant audio sent to Twilio is followed by a mark named
``<generation>.<seq>``. Twilio docs (Media Streams, "mark"): a mark is echoed "when the media
before it has completed playing"; on ``clear`` every pending mark is echoed at once. So an echo
confirms a whole chunk, and a ``clear`` bumps the generation: marks echoed for discarded
audio carry the old generation and count as stale.

Between echoes the head chunk is interpolated: it has been playing since the later of its send
time and the previous echo, at 8 bytes of µ-law per ms in 20 ms frames, a begun frame heard
whole. At a barge-in each item is truncated at what was heard of it (never more than was
received), which is what ``conversation.item.truncate``'s ``audio_end_ms`` asks for.

Sending a chunk and taking an echo run 50 times a second per call: they touch only this
object's attributes and one deque entry per chunk.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from relay.audio import FRAME_MS, ULAW_BYTES_PER_MS
from relay.call.effects import Entry, Metric, Outbox
from relay.logbound import RepeatLimiter, clip
from relay.realtime import client
from relay.twilio.messages import Outbound

PendingMark = tuple[str, str, int, float]
"""(mark name, item id, bytes, sent at) of a chunk Twilio has not confirmed as played."""


class Playback:
    """Playback accounting for the audio this call sent to Twilio."""

    __slots__ = (
        "_clock",
        "_last_ack_at",
        "_mark_seq",
        "_outbox",
        "_pending",
        "_repeats",
        "_twilio",
        "_watched_mark",
        "_watched_since",
        "frames_out",
        "generation",
        "item_response",
        "played_bytes",
        "received_bytes",
        "session_items",
        "stale_marks",
        "unplayed_bytes",
    )

    def __init__(
        self, outbox: Outbox, stream_sid: str | None, clock: Callable[[], float], repeats: RepeatLimiter
    ) -> None:
        self._outbox = outbox
        # None: the call's audio does not pass through the relay (SIP sideband); nothing is played here
        self._twilio = Outbound(stream_sid) if stream_sid is not None else None
        self._clock = clock
        self._repeats = repeats
        self.generation = 0
        self._mark_seq = 0
        self._pending: deque[PendingMark] = deque()
        self._last_ack_at = 0.0
        self.unplayed_bytes = 0
        self.played_bytes: dict[str, int] = {}
        self.received_bytes: dict[str, int] = {}
        self.item_response: dict[str, str] = {}  # item id -> the response that produced it
        # items the current Realtime session knows: only those can be truncated
        self.session_items: set[str] = set()
        self.stale_marks = 0
        self.frames_out = 0
        # the first mark of a response whose latency from the end of the caller's turn is measured
        self._watched_mark: str | None = None
        self._watched_since = 0.0

    @property
    def pending_marks(self) -> tuple[PendingMark, ...]:
        """The chunks sent and not yet confirmed played, oldest first."""
        return tuple(self._pending)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def send(self, payload: str, nbytes: int, item_id: str, response_id: str) -> str:
        """Queue one chunk and its mark for Twilio; returns the mark's name."""
        twilio = self._twilio
        if twilio is None:
            raise RuntimeError("this call has no audio path: nothing is played through the relay")
        received = self.received_bytes
        received[item_id] = received.get(item_id, 0) + nbytes
        self.item_response.setdefault(item_id, response_id)
        self.session_items.add(item_id)
        name = f"{self.generation}.{self._mark_seq}"
        self._mark_seq += 1
        self._pending.append((name, item_id, nbytes, self._clock()))
        self.unplayed_bytes += nbytes
        to_twilio = self._outbox.to_twilio
        to_twilio.append(twilio.media(payload))
        to_twilio.append(twilio.mark(name))
        self.frames_out += 1
        return name

    def watch(self, mark: str, since: float) -> None:
        """Report ``mouth_to_ear_played_seconds`` (from `since`) when `mark` is confirmed played."""
        self._watched_mark = mark
        self._watched_since = since

    def ack(self, name: str) -> bool:
        """Twilio echoed mark `name`: it and every chunk before it were played. False if stale."""
        gen, _, _ = name.partition(".")
        if gen != str(self.generation):
            self.stale_marks += 1
            return False
        pending = self._pending
        if not any(entry[0] == name for entry in pending):
            self.stale_marks += 1
            self._repeats.log("unknown_mark", logging.DEBUG, "mark %s is not pending; ignored", clip(name))
            return False
        now = self._last_ack_at = self._clock()
        played = self.played_bytes
        watched = self._watched_mark
        while pending:
            mark_name, item_id, nbytes, _ = pending.popleft()
            self.unplayed_bytes -= nbytes
            played[item_id] = played.get(item_id, 0) + nbytes
            if mark_name == watched:
                self._outbox.effects.append(Metric("mouth_to_ear_played_seconds", now - self._watched_since))
                self._watched_mark = watched = None
            if mark_name == name:
                break
        return True

    def playing_now(self) -> tuple[str | None, int]:
        """The item being played right now and how much of its head chunk the caller has heard."""
        if not self._pending:
            return None, 0
        _, item_id, nbytes, sent_at = self._pending[0]
        started = max(sent_at, self._last_ack_at)
        elapsed_ms = max(0.0, self._clock() - started) * 1000.0
        # Audio is played in 20 ms frames and a frame that has begun is heard whole.
        frames_begun = int(elapsed_ms // FRAME_MS) + 1 if elapsed_ms > 0 else 0
        return item_id, min(nbytes, frames_begun * FRAME_MS * ULAW_BYTES_PER_MS)

    def cut(self) -> list[str]:
        """Barge-in: ``clear`` Twilio and truncate each unplayed item at what was heard.

        Returns the responses whose audio was cut, in order; their late deltas must be dropped.
        Nothing happens (and nothing is returned) when nothing is waiting to be played.
        """
        pending = self._pending
        twilio = self._twilio
        if not pending or twilio is None:
            return []
        outbox = self._outbox
        outbox.to_twilio.append(twilio.clear())
        items: list[str] = []
        for _, item_id, _, _ in pending:
            if item_id not in items:
                items.append(item_id)
        playing_item, playing_bytes = self.playing_now()
        cut_responses: list[str] = []
        for item_id in items:
            played = self.played_bytes.get(item_id, 0) + (playing_bytes if item_id == playing_item else 0)
            self.played_bytes[item_id] = played
            received = self.received_bytes.get(item_id, 0)
            audio_end_ms = min(played, received) // ULAW_BYTES_PER_MS
            response_id = self.item_response.get(item_id)
            if response_id:
                cut_responses.append(response_id)
            if item_id in self.session_items:
                outbox.send_upstream(client.truncate(item_id, audio_end_ms))
                outbox.effects.append(Metric("truncations", 1.0))
            outbox.effects.append(
                Entry(
                    "interruption",
                    {"item_id": item_id, "audio_end_ms": audio_end_ms, "received_ms": received // ULAW_BYTES_PER_MS},
                )
            )
        pending.clear()
        self.unplayed_bytes = 0
        self.generation += 1
        self._mark_seq = 0
        self._watched_mark = None
        return cut_responses
