"""Relay-side end-of-turn detection for sessions without server turn detection (``vad.type = "none"``).

With ``turn_detection: null`` the Realtime API neither notices speech nor answers: the client
commits the input buffer and asks for a response. This is the energy detector that decides when,
over the very µ-law the caller sends (nothing is transcoded; the bytes are only looked at).

Per 20 ms frame (160 µ-law bytes) the root mean square of the G.711-expanded samples is compared
with a threshold. Speech starts once ``SPEECH_ONSET_MS`` of consecutive frames are above it and ends
after ``silence_duration_ms`` of frames below it. The VAD ``threshold`` (0..1, server VAD's 0.5
default) maps linearly onto the RMS of the 16-bit linear signal: ``threshold * RMS_AT_THRESHOLD_ONE``,
so 0.5 is an RMS of 500, about -36 dBFS: well under telephone speech, well over line noise.

``prefix_padding_ms`` needs no work here: a manual commit makes the whole buffer since the previous
commit into the turn, so the committed audio holds everything before the onset (at least the padding,
except right at the start of a session); the relay never holds caller audio back to trim it. A turn
shorter than the API's 100 ms commit minimum is never ended.

A fixed threshold cannot tell a loud line (hum, traffic, a television) from speech, so a turn also
ends after ``MAX_TURN_MS`` however loud the line stays. The audio after such a forced end starts the
next turn at once, but unannounced: no ``SpeechStart`` (which would cancel the answer being asked
for) until the line has gone quiet once. If it stays loud, that turn too ends after ``MAX_TURN_MS``
(a ``SpeechStart`` dated at the forced end, then its ``SpeechEnd``): one turn every ``MAX_TURN_MS``.

Sans-I/O: fed bytes, it returns boundaries; no clock (time is the audio's own position).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.agent_settings import VadSettings
from relay.audio import FRAME_BYTES, FRAME_MS, ULAW_BYTES_PER_MS

SPEECH_ONSET_MS = 60
RMS_AT_THRESHOLD_ONE = 1000.0
INPUT_COMMIT_MIN_MS = 100  # the API refuses to commit less
# A phone caller rarely speaks this long without a pause; past it the line is taken to be noisy and
# the turn is ended anyway, so the model answers instead of the call hanging in "caller speaking".
MAX_TURN_MS = 15_000


def _expand(code: int) -> int:
    """G.711 µ-law to linear: complement, then sign, 3-bit segment and 4-bit step (bias 0x84)."""
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)) - 0x84
    return -magnitude if code & 0x80 else magnitude


ULAW_TO_LINEAR: tuple[int, ...] = tuple(_expand(code) for code in range(256))
_SQUARES: tuple[int, ...] = tuple(value * value for value in ULAW_TO_LINEAR)


def frame_square_sum(frame: bytes) -> int:
    """Sum of the squared linear samples of a µ-law frame (RMS² × length), by table lookup."""
    return sum(map(_SQUARES.__getitem__, frame))


@dataclass(frozen=True, slots=True)
class SpeechStart:
    onset_ms: int  # start of the first loud frame, in this session's input audio


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    audio_end_ms: int  # end of the last loud frame


Boundary = SpeechStart | SpeechEnd


class Endpointer:
    """Energy endpointing over one session's caller audio. Not thread-safe."""

    def __init__(self, vad: VadSettings) -> None:
        rms = vad.threshold * RMS_AT_THRESHOLD_ONE
        self._limit = rms * rms * FRAME_BYTES  # compared with the frame's square sum: no square root
        self._onset_frames = -(-SPEECH_ONSET_MS // FRAME_MS)
        self._silence_frames = max(1, -(-vad.silence_duration_ms // FRAME_MS))
        self._max_turn_frames = MAX_TURN_MS // FRAME_MS
        self.reset()

    def reset(self) -> None:
        self.in_speech = False
        self._carry = b""
        self._loud = 0  # consecutive loud frames
        self._quiet = 0  # consecutive quiet frames while in speech
        self._turn_frames = 0  # frames since the current turn began (announced or not)
        self._held = False  # a turn was forced to end and the line has not been quiet since
        self.new_session()

    def new_session(self) -> None:
        """A new Realtime session: positions restart at 0; a turn in progress goes on."""
        self._position = 0  # bytes of input audio seen in this session
        self._committed = 0  # where the uncommitted audio starts, bytes
        self._last_loud_end = 0

    @property
    def position_ms(self) -> int:
        return self._position // ULAW_BYTES_PER_MS

    def committed(self) -> None:
        """The caller's turn was committed: the buffer is empty from here on."""
        self._committed = self._position

    def feed(self, audio: bytes) -> list[Boundary]:
        """µ-law bytes in arrival order; the speech boundaries they complete (usually none)."""
        data = self._carry + audio if self._carry else audio
        whole = len(data) - len(data) % FRAME_BYTES
        boundaries: list[Boundary] = []
        for offset in range(0, whole, FRAME_BYTES):
            frame = data if whole == len(data) == FRAME_BYTES else data[offset : offset + FRAME_BYTES]
            self._position += FRAME_BYTES
            boundaries += self._step(frame_square_sum(frame) > self._limit)
        self._carry = data[whole:]
        return boundaries

    def _step(self, loud: bool) -> tuple[Boundary, ...]:
        if loud:
            self._loud += 1
            self._quiet = 0
            self._last_loud_end = self._position
        else:
            self._loud = 0
            if self._held:  # quiet once after a forced end: speech is detected afresh
                self._held = False
                self._turn_frames = 0
                return ()
        buffered_ms = (self._position - self._committed) // ULAW_BYTES_PER_MS
        if self._held:  # still loud since the forced end: the unannounced turn goes on
            self._turn_frames += 1
            if self._turn_frames < self._max_turn_frames or buffered_ms < INPUT_COMMIT_MIN_MS:
                return ()
            onset = max(0, self._position - self._turn_frames * FRAME_BYTES)
            self._turn_frames = 0
            return SpeechStart(onset // ULAW_BYTES_PER_MS), SpeechEnd(self._position // ULAW_BYTES_PER_MS)
        if not self.in_speech:
            if loud and self._loud >= self._onset_frames:
                self.in_speech = True
                self._turn_frames = self._loud
                return (SpeechStart((self._position - self._loud * FRAME_BYTES) // ULAW_BYTES_PER_MS),)
            return ()
        self._turn_frames += 1
        if not loud:
            self._quiet += 1
        if buffered_ms < INPUT_COMMIT_MIN_MS:
            return ()
        if self._turn_frames >= self._max_turn_frames:
            self.in_speech = False
            self._quiet = 0
            self._turn_frames = 0
            self._held = loud
            return (SpeechEnd(self._last_loud_end // ULAW_BYTES_PER_MS),)
        if not loud and self._quiet >= self._silence_frames:
            self.in_speech = False
            self._quiet = 0
            return (SpeechEnd(self._last_loud_end // ULAW_BYTES_PER_MS),)
        return ()
