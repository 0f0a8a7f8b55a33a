"""The phone's speaker: plays the relay's audio in real time and accounts for marks as Twilio does.

Audio from the relay is queued and played at 8 bytes per ms, one frame per tick of the caller's
clock; a mark is echoed only once the audio sent before it has finished playing, and ``clear``
drops every unplayed byte at once and echoes every pending mark immediately
(/work/shared/PROTOCOLS.md §4). Positions are absolute offsets in the relay's audio stream, so an
utterance's answer is the first audio received after it ended.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.exceptions import ConnectionClosed

from relay.sim.caller.clock import Pacer
from relay.sim.caller.config import CallerConfig
from relay.sim.caller.record import CallLog, Utterance
from relay.sim.caller.stream import Stream
from relay.sim.ulaw import ULAW_BYTES_PER_MS

IDLE_QUIET_S = 0.3
"""wait_idle(): the relay counts as done talking after this long without new audio."""


class Speaker:
    """Owns the playback queue, the mark FIFO and everything the caller heard."""

    def __init__(self, config: CallerConfig, log: CallLog, silence_frame: bytes, notify: Callable[[], None]) -> None:
        self.config = config
        self.log = log
        self.frame_bytes = len(silence_frame)
        self._silence_frame = silence_frame
        self._notify = notify
        self.received_payloads: list[str] = []
        self.played_bytes = 0
        self.marks_echoed: list[str] = []
        self.heard = bytearray()
        self._awaiting_answer: list[Utterance] = []
        self._playback = bytearray()
        self._play_pos = 0  # absolute offset of the next byte to play in the relay's audio stream
        self._recv_pos = 0  # absolute offset just past the last byte received
        self._pending_marks: deque[tuple[int, str]] = deque()
        self._last_media_at = float("-inf")

    def expect_answer(self, utterance: Utterance) -> None:
        """An utterance has ended: only audio received from now on can answer it."""
        utterance.answer_from = self._recv_pos
        self._awaiting_answer.append(utterance)

    def idle(self, closed: bool) -> bool:
        """Nothing left to play, no mark pending and no fresh audio (or the call is over)."""
        if self._playback or self._pending_marks:  # a pending mark: its last frame is still playing
            return False
        return closed or time.monotonic() - self._last_media_at >= IDLE_QUIET_S

    async def _echo_mark(self, stream: Stream, name: str) -> None:
        if stream.hanging_up:
            return  # after `stop` Twilio sends nothing more
        await stream.send(stream.mark(name))
        self.marks_echoed.append(name)
        self.log.record("mark_echo", name=name)

    async def run(self, epoch: float, stream: Stream) -> None:
        """Play the relay's audio in real time; a mark is echoed once the frame before it has ended."""
        pacer = Pacer(epoch, self.config.frame_ms / 1000)
        keep_audio = self.config.keep_audio
        was_playing = False
        try:
            while True:
                forgiven = await pacer.next_tick()
                if forgiven:
                    # The wall clock moved on without us: the caller heard a gap, not compressed audio.
                    if keep_audio:
                        self.heard += self._silence_frame * forgiven
                    self.log.record("clock_slip", task="player", frames=forgiven)
                # Everything started on earlier ticks has finished playing by now.
                while self._pending_marks and self._pending_marks[0][0] <= self._play_pos:
                    await self._echo_mark(stream, self._pending_marks.popleft()[1])
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
                    self.log.record("playback_start")
                was_playing = count > 0
                if count:
                    self._note_answers(start_pos, now)
                self._notify()
        except ConnectionClosed:
            pass

    def _note_answers(self, frame_start: int, tick_time: float) -> None:
        """Stamp when each finished utterance first had audio sent after it reach the ear."""
        still_waiting: list[Utterance] = []
        for utterance in self._awaiting_answer:
            if utterance.answer_from < self._play_pos:
                offset_bytes = max(0, utterance.answer_from - frame_start)
                utterance.first_heard = tick_time + offset_bytes / ULAW_BYTES_PER_MS / 1000
            else:
                still_waiting.append(utterance)
        self._awaiting_answer = still_waiting

    def on_media(self, msg: dict[str, Any]) -> None:
        media = msg.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self.log.error("media without a string media.payload")
            return
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self.log.error(f"media payload is not base64: {payload[:40]!r}")
            return
        if self.config.keep_audio:
            self.received_payloads.append(payload)
        self._playback += audio
        self._recv_pos += len(audio)
        self._last_media_at = time.monotonic()
        self.log.record("media_in", bytes=len(audio))

    def on_mark(self, msg: dict[str, Any]) -> None:
        mark = msg.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            self.log.error("mark without a string mark.name")
            return
        self._pending_marks.append((self._recv_pos, name))
        self.log.record("mark_in", name=name)

    async def on_clear(self, stream: Stream) -> None:
        """Drop every unplayed byte at once and acknowledge all pending marks, as Twilio does."""
        discarded = len(self._playback)
        self._playback.clear()
        self._play_pos = self._recv_pos
        names = [name for _, name in self._pending_marks]
        self._pending_marks.clear()
        self.log.record("clear", discarded_bytes=discarded, marks=names)
        for name in names:
            await self._echo_mark(stream, name)
