"""The phone's microphone: one µ-law frame every 20 ms for the whole call, speech or silence.

Speech queued with ``say()`` goes out frame by frame after anything queued before it, padded with
silence to a whole frame; between utterances the line carries silence, as a phone line never
pauses. Each frame is a ``media`` message whose ``chunk`` and ``timestamp`` count on the media
clock (/work/shared/PROTOCOLS.md §3, §12).
"""

from __future__ import annotations

import base64
import time
from collections import deque

from websockets.exceptions import ConnectionClosed

from relay.sim.caller.clock import Pacer
from relay.sim.caller.config import CallerConfig
from relay.sim.caller.record import CallLog, Utterance
from relay.sim.caller.speaker import Speaker
from relay.sim.caller.stream import Stream


class Microphone:
    """Owns the caller's queued speech and the frames sent."""

    def __init__(self, config: CallerConfig, log: CallLog, silence_frame: bytes, speaker: Speaker) -> None:
        self.config = config
        self.log = log
        self.frame_bytes = len(silence_frame)
        self._silence_frame = silence_frame
        self._speaker = speaker
        self.sent_payloads: list[str] = []
        self.utterances: list[Utterance] = []
        self._speech: deque[Utterance] = deque()
        self._closed = False
        self.first_sent: float | None = None  # when the first and the latest frame went out
        self.last_sent: float | None = None

    def say(self, ulaw_audio: bytes) -> Utterance:
        """Queue caller speech; it goes out after anything already queued, frame by frame."""
        utterance = Utterance(audio=bytes(ulaw_audio), index=len(self.utterances))
        self.utterances.append(utterance)
        if utterance.audio and not self._closed:
            self._speech.append(utterance)
        else:
            utterance.done.set()
        return utterance

    def abandon(self) -> None:
        """The call is over: queued speech will never be sent, and no more is taken."""
        self._closed = True
        for utterance in self._speech:
            utterance.done.set()  # wakes say_and_wait(), which reports the unsent audio
        self._speech.clear()

    def _next_frame(self) -> tuple[bytes, Utterance | None, bool, bool]:
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

    async def run(self, epoch: float, stream: Stream) -> None:
        """Stream one frame per tick for the whole call, like a phone line that never pauses."""
        pacer = Pacer(epoch, self.config.frame_ms / 1000)
        chunk = 0
        try:
            while True:
                forgiven = await pacer.next_tick()
                if forgiven:
                    self.log.record("clock_slip", task="sender", frames=forgiven)
                frame, utterance, first, last = self._next_frame()
                payload = base64.b64encode(frame).decode("ascii")
                chunk += 1
                await stream.send(stream.media(chunk, (chunk - 1) * self.config.frame_ms, payload))
                self.last_sent = time.monotonic()
                if self.first_sent is None:
                    self.first_sent = self.last_sent
                if self.config.keep_audio:
                    self.sent_payloads.append(payload)
                if utterance is None:
                    continue
                now = self.last_sent
                if first:
                    utterance.sent_start = now
                    self.log.record("speech_start", index=utterance.index, bytes=len(utterance.audio))
                if last:
                    utterance.sent_end = now
                    self._speaker.expect_answer(utterance)
                    self.log.record("speech_end", index=utterance.index, bytes=len(utterance.audio))
                    utterance.done.set()
        except ConnectionClosed:
            pass  # the receiver sees the close and winds the call down
