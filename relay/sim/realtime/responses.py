"""Responses: their lifecycle from ``response.created`` to ``response.done``, and what they cost.

At most one response runs in the default conversation; another ``response.create`` meanwhile is
refused, and ``response.cancel`` with nothing active draws ``response_cancel_not_active``. An
out-of-band response (``conversation: "none"``) answers in text, outside the conversation, with a
``null`` ``conversation_id``. Every response ends with ``response.done`` (usage roughly
proportional to content, cached input from the previous turn) and ``rate_limits.updated``
(/work/shared/PROTOCOLS.md §8, §9, §11).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from relay.sim.realtime.conversation import Conversation
from relay.sim.realtime.errors import Problem
from relay.sim.realtime.function_calls import FunctionCalls
from relay.sim.realtime.generation import Response, ResponseOutput
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.schema import BETA_AUDIO_FORMATS
from relay.sim.realtime.session import SessionConfig
from relay.sim.realtime.wire import JSON, clone, new_id

_TOKEN_LIMIT = 40000

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Responses:
    """Owns the active response and the response counter of one session."""

    def __init__(
        self,
        out: Outbox,
        session: SessionConfig,
        conversation: Conversation,
        output: ResponseOutput,
        calls: FunctionCalls,
        spawn: Spawn,
    ) -> None:
        self.out = out
        self.rec = out.rec
        self.session = session
        self.conversation = conversation
        self.output = output
        self.calls = calls
        self._spawn = spawn
        self.conversation_id = new_id("conv")
        self.active: Response | None = None
        self.response_count = 0
        self.last_input_tokens = 0

    def on_response_create(self, event: JSON) -> None:
        if self.active is not None:
            raise Problem(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        request = event.get("response") or {}
        if not isinstance(request, dict):
            raise Problem("invalid_type", "Invalid type for 'response'.", "response")
        self.start(request)

    def on_response_cancel(self, event: JSON) -> None:
        wanted = event.get("response_id")
        active = self.active
        if active is None or (wanted is not None and wanted != active.id):
            raise Problem("response_cancel_not_active", "Cancellation failed: no active response found")
        self.cancel(active, "client_cancelled")

    def start(self, request: JSON) -> None:
        """Emit ``response.created`` now (the active-response rule starts here); generate in a task."""
        cfg, settings = self.out.cfg, self.session.settings
        out_of_band = request.get("conversation") == "none"
        key = "output_modalities" if self.rec.dialect == "ga" else "modalities"
        wanted = request.get(key) or settings.modalities
        calls = [] if out_of_band else self.calls.take()
        self.response_count += 1
        number = self.response_count
        modality: Literal["audio", "text", "calls"]
        if calls:
            modality = "calls"
        elif out_of_band or "audio" not in wanted:
            modality = "text"
        else:
            modality = "audio"
        speech_before_calls_ms = max(0, int(cfg.speech_before_calls_ms)) if calls else 0
        spoken = modality == "audio" or speech_before_calls_ms > 0
        if self.rec.dialect == "ga":
            modalities = ["audio"] if spoken else ["text"]
        else:
            modalities = ["audio", "text"] if spoken else ["text"]
        greeting = bool(request.get("instructions"))
        audio_ms = cfg.greeting_reply_ms if greeting and cfg.greeting_reply_ms is not None else cfg.reply_ms
        if out_of_band:
            text = self._summary_text(request)
        else:
            text = f"assistant reply {number}"
        voice = request.get("voice") if self.rec.dialect == "beta" else None
        audio_request = request.get("audio")
        if isinstance(audio_request, dict) and isinstance(audio_request.get("output"), dict):
            voice = audio_request["output"].get("voice")
        response = Response(
            id=new_id("resp"),
            number=number,
            out_of_band=out_of_band,
            modality=modality,
            modalities=modalities,
            audio_ms=max(0, int(audio_ms)),
            full_text=text,
            metadata=request.get("metadata"),
            calls=calls,
            voice=str(voice or settings.voice),
            speech_before_calls_ms=speech_before_calls_ms,
            output_format=self._response_format(request),
        )
        self.active = response
        self.out.emit({"type": "response.created", "response": self._response_object(response, "in_progress")})
        response.task = self._spawn(self._generate(response))

    def _response_format(self, request: JSON) -> Any:
        """The output format of one response: the session's, unless ``response.create`` names another."""
        if self.rec.dialect == "ga":
            audio = request.get("audio")
            output = audio.get("output") if isinstance(audio, dict) else None
            wanted = output.get("format") if isinstance(output, dict) else None
            return clone(wanted) if isinstance(wanted, dict) else clone(self.session.settings.output_format)
        wanted = request.get("output_audio_format")
        return wanted if wanted in BETA_AUDIO_FORMATS else self.session.settings.output_format

    def _summary_text(self, request: JSON) -> str:
        texts: list[str] = []
        sources = [*self.rec._conversation, *(request.get("input") or [])]
        for item in sources:
            if isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "user":
                for part in item.get("content") or []:
                    if (
                        isinstance(part, dict)
                        and part.get("type") == "input_text"
                        and isinstance(part.get("text"), str)
                    ):
                        texts.append(part["text"])
        typed = "; ".join(texts) if texts else "none"
        return f"Summary of {len(self.rec._conversation)} conversation items. Caller text input: {typed}."

    def _response_object(
        self, response: Response, status: str, details: JSON | None = None, usage: JSON | None = None
    ) -> JSON:
        common: JSON = {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": clone(response.output),
            "conversation_id": None if response.out_of_band else self.conversation_id,
            "max_output_tokens": "inf",
            "usage": usage,
            "metadata": response.metadata,
        }
        if self.rec.dialect == "ga":
            common["output_modalities"] = response.modalities
            common["audio"] = {"output": {"format": clone(response.output_format), "voice": response.voice}}
        else:
            common["modalities"] = response.modalities
            common["voice"] = response.voice
            common["output_audio_format"] = response.output_format
            common["temperature"] = 0.8
        return common

    async def _generate(self, response: Response) -> None:
        delay_s = self.out.cfg.response_delay_ms / 1000.0
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if response.modality == "calls":
            if response.speech_before_calls_ms:
                # A spoken message item first, then the calls: generated and cancelled like any audio reply.
                response.modality, response.audio_ms = "audio", response.speech_before_calls_ms
                await self.output.generate_audio(response)
                response.modality = "calls"
            await self.calls.generate(response)
        elif response.modality == "text":
            await self.output.generate_text(response)
        else:
            await self.output.generate_audio(response)
        self._finish(response, "completed", None)

    def cancel(self, response: Response, reason: str) -> None:
        if response.task is not None and not response.task.done():
            response.task.cancel()
        if not response.done:
            self.output.send_late_audio(response)
        self._finish(response, "cancelled", reason)

    def _finish(self, response: Response, status: str, reason: str | None) -> None:
        if response.done:
            return
        response.done = True
        if self.active is response:
            self.active = None
        self.output.close_item(response, "incomplete")
        details = None if reason is None else {"type": "cancelled", "reason": reason}
        usage = self._usage(response)
        final = self._response_object(response, status, details, usage)
        self.rec.responses.append(final)
        self.out.emit({"type": "response.done", "response": final})
        total = usage["total_tokens"]
        self.out.emit(
            {
                "type": "rate_limits.updated",
                "rate_limits": [  # live sessions report a single ``tokens`` entry
                    {
                        "name": "tokens",
                        "limit": _TOKEN_LIMIT,
                        "remaining": max(0, _TOKEN_LIMIT - total),
                        "reset_seconds": round(total * 60.0 / _TOKEN_LIMIT, 3),
                    },
                ],
            }
        )

    def _usage(self, response: Response) -> JSON:
        """Token counts roughly proportional to content: ~10 tokens/s of caller audio, ~20/s of replies."""
        input_text = len(self.session.settings.instructions) // 4
        input_audio = 0
        for item in self.rec._conversation:
            item_id = item["id"]
            if item_id in self.rec._user_audio_ms:
                input_audio += self.rec._user_audio_ms[item_id] // 100
            elif item_id in self.rec._sent_audio_ms:
                input_audio += self.rec.audio_ms(item_id) // 50
            for part in item.get("content") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    input_text += len(part["text"]) // 4 + 1
            for key in ("arguments", "output"):
                if isinstance(item.get(key), str):
                    input_text += len(item[key]) // 4 + 1
        output_audio = response.sent_audio_ms // 50
        output_text = len(response.text_so_far) // 4 + (1 if response.text_so_far else 0)
        output_text += sum(len(arguments) // 4 + 1 for _, arguments in response.calls)
        input_tokens = input_text + input_audio
        cached = min(self.last_input_tokens, input_tokens)
        self.last_input_tokens = input_tokens
        cached_text = min(cached, input_text)
        cached_audio = cached - cached_text
        output_tokens = output_text + output_audio
        input_details: JSON = {
            "text_tokens": input_text,
            "audio_tokens": input_audio,
            "cached_tokens": cached,
        }
        if self.rec.dialect == "ga":
            input_details["image_tokens"] = 0
            input_details["cached_tokens_details"] = {
                "text_tokens": cached_text,
                "audio_tokens": cached_audio,
                "image_tokens": 0,
            }
        return {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": input_details,
            "output_token_details": {"text_tokens": output_text, "audio_tokens": output_audio},
        }
