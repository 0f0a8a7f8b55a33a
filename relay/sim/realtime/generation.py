"""The output of a response: assistant message items streamed as audio or text deltas.

Replies are synthetic speech, µ-law synthesised and converted to the response's output format,
sent in chunks of ``SimConfig.chunk_ms`` paced at ``realtime_factor`` times real time, with a
transcript whose deltas keep pace with the audio and carry ``obfuscation`` padding as live
sessions' do. A response cancelled mid-item still delivers the deltas already in flight, then the
``*.done`` tail of the cut item (/work/shared/PROTOCOLS.md §9, §10, §11).
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from relay.sim import ulaw
from relay.sim.realtime.conversation import Conversation
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.schema import codec_of
from relay.sim.realtime.wire import JSON, clone, new_id, split_words

_OBFUSCATION_CHARS = 16


@dataclass(eq=False)
class Response:
    """One response in flight: what has been emitted, so cancel can close it at any point."""

    id: str
    number: int
    out_of_band: bool
    modality: Literal["audio", "text", "calls"]
    modalities: list[str]
    audio_ms: int
    full_text: str
    metadata: Any
    calls: list[tuple[str, str]]
    voice: str
    output: list[JSON] = field(default_factory=list)
    open_item: JSON | None = None
    text_so_far: str = ""
    sent_audio_ms: int = 0
    audio: bytes = b""
    chunk_index: int = 0
    output_format: Any = None
    task: asyncio.Task[None] | None = None
    done: bool = False
    speech_before_calls_ms: int = 0


@lru_cache(maxsize=64)
def _reply_audio(ms: int, variant: int) -> bytes:
    """Synthesis is the costliest step; a handful of cached variants serve hundreds of calls."""
    return ulaw.synth_speech(ms, seed=variant, pitch_hz=130.0 + 15.0 * variant, level=0.3)


class ResponseOutput:
    """Streams the output items of responses into the conversation (or beside it, out of band)."""

    def __init__(self, out: Outbox, conversation: Conversation) -> None:
        self.out = out
        self.rec = out.rec
        self.conversation = conversation

    def _open_message(self, response: Response) -> JSON:
        item: JSON = {
            "id": new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self.open_item(response, item)
        part = {"type": "audio", "transcript": ""} if response.modality == "audio" else {"type": "text", "text": ""}
        self.out.emit({"type": "response.content_part.added", **self.where(response, item), "part": part})
        return item

    def open_item(self, response: Response, item: JSON) -> None:
        output_index = len(response.output)
        response.output.append(item)
        response.open_item = item
        self.out.emit(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": output_index,
                "item": clone(item),
            }
        )
        if not response.out_of_band:
            previous = self.conversation.last_item_id()
            self.rec._conversation.append(item)
            if response.modality == "audio":
                self.rec._sent_audio_ms[item["id"]] = 0
            self.conversation.item_added(item, previous)

    def where(self, response: Response, item: JSON) -> JSON:
        return {
            "response_id": response.id,
            "item_id": item["id"],
            "output_index": response.output.index(item),
            "content_index": 0,
        }

    def close_item(self, response: Response, status: str) -> None:
        """Emit the ``*.done`` tail of the open output item (complete or cut short by a cancel)."""
        item = response.open_item
        if item is None:
            return
        response.open_item = None
        names = self.out.names
        if item["type"] == "message":
            where = self.where(response, item)
            text = response.text_so_far
            if response.modality == "audio":
                self.out.emit({"type": names.audio_done, **where})
                self.out.emit({"type": names.transcript_done, **where, "transcript": text})
                part: JSON = {"type": "audio", "transcript": text}
                item["content"] = [{"type": names.audio_content, "transcript": text}]
            else:
                self.out.emit({"type": names.text_done, **where, "text": text})
                part = {"type": "text", "text": text}
                item["content"] = [{"type": names.text_content, "text": text}]
            self.out.emit({"type": "response.content_part.done", **where, "part": part})
        item["status"] = status
        output_index = response.output.index(item)
        self.out.emit(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": output_index,
                "item": clone(item),
            }
        )
        if not response.out_of_band:
            self.conversation.item_done(item)

    async def generate_audio(self, response: Response) -> None:
        item = self._open_message(response)
        where = self.where(response, item)
        response.audio = _reply_audio(response.audio_ms, response.number % 4)
        response.chunk_index = 0
        words = split_words(response.full_text)
        realtime_factor = self.out.cfg.realtime_factor
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = response.audio_ms
        spoken = 0
        while response.sent_audio_ms < total:
            self._send_audio_chunk(response, item, where)
            position = response.sent_audio_ms
            due = math.ceil(len(words) * position / total)
            while spoken < due:
                self._emit_transcript_delta(where, words[spoken])
                response.text_so_far += words[spoken]
                spoken += 1
            if realtime_factor > 0:
                await asyncio.sleep(max(0.0, started + position / 1000.0 / realtime_factor - loop.time()))
            else:
                await asyncio.sleep(0)
        while spoken < len(words):  # zero-length audio still gets its transcript
            self._emit_transcript_delta(where, words[spoken])
            response.text_so_far += words[spoken]
            spoken += 1
        self.close_item(response, "completed")

    def _send_audio_chunk(self, response: Response, item: JSON, where: JSON) -> None:
        """The next audio delta of the reply; chunk sizes cycle through ``SimConfig.chunk_ms``."""
        chunk_sizes = self.out.cfg.chunk_ms or (100,)
        position, total = response.sent_audio_ms, response.audio_ms
        ms = min(max(1, chunk_sizes[response.chunk_index % len(chunk_sizes)]), total - position)
        response.chunk_index += 1
        chunk = response.audio[position * ulaw.ULAW_BYTES_PER_MS : (position + ms) * ulaw.ULAW_BYTES_PER_MS]
        probe = self.out.cfg.latency_probe
        if probe is not None:
            chunk = probe.outgoing(self.rec, chunk)
        codec = codec_of(response.output_format)
        if codec != "pcmu":  # replies are synthesised as µ-law; other formats are converted from it
            chunk = ulaw.to_alaw(chunk) if codec == "pcma" else ulaw.to_pcm16_24k(chunk)
        self.out.emit({"type": self.out.names.audio_delta, **where, "delta": base64.b64encode(chunk).decode("ascii")})
        position += ms
        response.sent_audio_ms = position
        if not response.out_of_band:
            self.rec._sent_audio_ms[item["id"]] = position
        self.conversation.assistant_audio_emitted = True

    def send_late_audio(self, response: Response) -> None:
        """Deltas already in flight when a response is cancelled still arrive, before its ``*.done`` events."""
        item = response.open_item
        if item is None or item["type"] != "message" or response.modality != "audio" or not response.audio:
            return
        where = self.where(response, item)
        for _ in range(max(0, self.out.cfg.late_audio_deltas)):
            if response.sent_audio_ms >= response.audio_ms:
                return
            self._send_audio_chunk(response, item, where)

    def _emit_transcript_delta(self, where: JSON, word: str) -> None:
        """Live transcript deltas carry ``obfuscation``: random padding that hides the length of each delta."""
        padding = secrets.token_urlsafe(12)[: max(1, _OBFUSCATION_CHARS - len(word))]
        self.out.emit({"type": self.out.names.transcript_delta, **where, "delta": word, "obfuscation": padding})

    async def generate_text(self, response: Response) -> None:
        item = self._open_message(response)
        where = self.where(response, item)
        for word in split_words(response.full_text):
            self.out.emit({"type": self.out.names.text_delta, **where, "delta": word})
            response.text_so_far += word
            await asyncio.sleep(0)
        self.close_item(response, "completed")
