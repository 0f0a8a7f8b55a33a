"""The input audio buffer: caller audio as the service receives it, and its energy turn detection.

Appends are base64 in the session's input format (the relay must configure µ-law; appends that
arrive before it did are counted). Positions count µ-law bytes since the session started, 8 per
ms (/work/shared/PROTOCOLS.md §12). With turn detection on, an energy VAD over whole 20 ms
windows emits ``speech_started`` (cancelling the running response when ``interrupt_response``)
and, after the configured silence, ``speech_stopped`` and the commit of a user item, then a
response when ``create_response``; without it the client commits (at least 100 ms) and clears
(/work/shared/PROTOCOLS.md §7, §8, §11).
"""

from __future__ import annotations

import binascii
import time

from relay.sim import ulaw
from relay.sim.realtime.conversation import Conversation
from relay.sim.realtime.errors import Problem
from relay.sim.realtime.function_calls import FunctionCalls
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.responses import Responses
from relay.sim.realtime.session import SERVER_VAD_DEFAULTS, SessionConfig
from relay.sim.realtime.wire import JSON, new_id, split_words

INPUT_COMMIT_MIN_MS = 100
"""The real service refuses to commit less than 100 ms of input audio."""
_SEMANTIC_VAD_SILENCE_MS = 500
_DEFAULT_PREFIX_PADDING_MS = 300


class InputAudioBuffer:
    """Owns the input audio position and the VAD state of one session."""

    def __init__(
        self,
        out: Outbox,
        session: SessionConfig,
        conversation: Conversation,
        responses: Responses,
        calls: FunctionCalls,
    ) -> None:
        self.out = out
        self.rec = out.rec
        self.session = session
        self.conversation = conversation
        self.responses = responses
        self.calls = calls
        # Positions are bytes of µ-law since the session started (8 per ms).
        self.total_bytes = 0
        self.buffer_start_bytes = 0
        self.carry = b""
        self.in_speech = False
        self.loud_ms = 0
        self.quiet_ms = 0
        self.speech_item_id = ""
        self.speech_start_ms = 0

    def on_append(self, event: JSON) -> None:
        rec, cfg = self.rec, self.out.cfg
        audio = event.get("audio")
        rec.append_count += 1
        if cfg.record_audio:
            rec.appended.append(audio if isinstance(audio, str) else "")
            rec.append_times.append(time.monotonic())
        if not isinstance(audio, str):
            rec.received.append((time.monotonic(), event))
            self.out.emit_error(
                "missing_required_parameter",
                "Missing required parameter: 'audio'.",
                param="audio",
                client_event=event,
            )
            return
        try:
            data = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            self.out.emit_error(
                "invalid_value",
                "Invalid 'audio': expected base64-encoded audio bytes.",
                param="audio",
                client_event=event,
            )
            return
        if not self.session.settings.input_ulaw:
            rec.appends_while_not_ulaw += 1
        if cfg.latency_probe is not None:
            cfg.latency_probe.appended(rec, data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Advance the input position and run the energy VAD on every whole 20 ms window."""
        self.total_bytes += len(data)
        turn_detection = self.session.settings.turn_detection
        if turn_detection is None:
            return
        buf = self.carry + data if self.carry else data
        whole = len(buf) - len(buf) % ulaw.FRAME_BYTES
        if whole:
            base = self.total_bytes - len(buf)
            threshold = self.out.cfg.vad_rms_threshold * float(turn_detection.get("threshold") or 0.5) / 0.5
            min_square_sum = threshold * threshold * ulaw.FRAME_BYTES
            frame = ulaw.FRAME_BYTES
            for offset in range(0, whole, frame):
                window = buf if whole == len(buf) == frame else buf[offset : offset + frame]
                end_ms = (base + offset + frame) // ulaw.ULAW_BYTES_PER_MS
                self._vad_step(ulaw.square_sum(window) >= min_square_sum, end_ms, turn_detection)
        self.carry = buf[whole:]

    def _vad_step(self, loud: bool, end_ms: int, turn_detection: JSON) -> None:
        if not self.in_speech:
            if not loud:
                self.loud_ms = 0
                return
            self.loud_ms += ulaw.FRAME_MS
            if self.loud_ms >= self.out.cfg.vad_min_speech_ms:
                self._speech_started(end_ms - self.loud_ms, turn_detection)
            return
        if loud:
            self.quiet_ms = 0
            return
        self.quiet_ms += ulaw.FRAME_MS
        if turn_detection.get("type") == "semantic_vad":
            silence_ms = _SEMANTIC_VAD_SILENCE_MS
        else:
            silence_ms = int(turn_detection.get("silence_duration_ms") or SERVER_VAD_DEFAULTS["silence_duration_ms"])
        if self.quiet_ms >= silence_ms:
            self._speech_stopped(end_ms, turn_detection)

    def _speech_started(self, onset_ms: int, turn_detection: JSON) -> None:
        padding = turn_detection.get("prefix_padding_ms")
        padding_ms = _DEFAULT_PREFIX_PADDING_MS if padding is None else int(padding)
        self.in_speech = True
        self.loud_ms = self.quiet_ms = 0
        self.speech_item_id = new_id("item")
        self.speech_start_ms = max(self.buffer_start_bytes // ulaw.ULAW_BYTES_PER_MS, onset_ms - padding_ms, 0)
        self.rec.speech_started_at.append(time.monotonic())
        self.out.emit(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": self.speech_start_ms,
                "item_id": self.speech_item_id,
            }
        )
        active = self.responses.active
        if active is not None and not active.out_of_band and turn_detection.get("interrupt_response", True):
            self.responses.cancel(active, "turn_detected")

    def _speech_stopped(self, end_ms: int, turn_detection: JSON) -> None:
        self.in_speech = False
        self.loud_ms = self.quiet_ms = 0
        self.out.emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": end_ms,
                "item_id": self.speech_item_id,
            }
        )
        self._commit(self.speech_item_id, end_ms * ulaw.ULAW_BYTES_PER_MS, end_ms - self.speech_start_ms)
        if turn_detection.get("create_response", True) and self.responses.active is None:
            self.responses.start({})

    def reset_vad(self) -> None:
        self.carry = b""
        self.in_speech = False
        self.loud_ms = self.quiet_ms = 0

    def on_commit(self, event: JSON) -> None:
        pending_ms = (self.total_bytes - self.buffer_start_bytes) / ulaw.ULAW_BYTES_PER_MS
        if pending_ms < INPUT_COMMIT_MIN_MS:
            raise Problem(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{INPUT_COMMIT_MIN_MS}ms of audio, but buffer only has {pending_ms:.2f}ms of audio.",
            )
        item_id = self.speech_item_id if self.in_speech else new_id("item")
        self.reset_vad()
        self._commit(item_id, self.total_bytes, int(pending_ms))

    def on_clear(self, event: JSON) -> None:
        self.buffer_start_bytes = self.total_bytes
        self.reset_vad()
        self.out.emit({"type": "input_audio_buffer.cleared"})

    def _commit(self, item_id: str, end_bytes: int, duration_ms: int) -> None:
        """Turn the buffered caller audio into a user item, as after speech_stopped or a manual commit."""
        previous = self.conversation.last_item_id()
        self.buffer_start_bytes = end_bytes
        self.rec.turns += 1
        turn = self.rec.turns
        self.out.emit({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id})
        item: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self.rec._conversation.append(item)
        self.rec._user_audio_ms[item_id] = max(0, duration_ms)
        self.conversation.item_added(item, previous)
        self.conversation.item_done(item)
        if self.session.settings.transcription:
            transcript = f"caller turn {turn} ({max(0, duration_ms) / 1000:.1f} s)"
            item["content"][0]["transcript"] = transcript
            audio_tokens = max(1, duration_ms // 100)
            text_tokens = len(transcript) // 4 + 1
            for word in split_words(transcript):  # streamed first, as the transcribe models do
                self.out.emit(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": item_id,
                        "content_index": 0,
                        "delta": word,
                    }
                )
            self.out.emit(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": transcript,
                    "usage": {
                        "type": "tokens",
                        "input_tokens": audio_tokens,
                        "output_tokens": text_tokens,
                        "total_tokens": audio_tokens + text_tokens,
                        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                    },
                }
            )
        self.calls.arm_for_turn(turn)
