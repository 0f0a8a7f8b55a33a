"""GA and beta Realtime dialects: the only place that knows how they differ.

Outbound: URL, headers, ``session.update`` and ``response.create`` shapes.
Inbound: raw server frames become the normalized events of ``relay.realtime.events``.
Client event types that are the same in both dialects are built in ``relay.realtime.client``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import orjson

from relay.agent_settings import DTMF_KEYS, AgentSettings, VadSettings
from relay.realtime import events as ev
from relay.realtime.models import CUSTOM_VOICE_PREFIX, DEFAULT_VOICE

DialectName = Literal["ga", "beta"]

# Beta event names -> GA names; everything after parsing speaks GA.
_BETA_RENAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "conversation.item.created": "conversation.item.added",
}

_IGNORED = frozenset(
    {
        "response.output_audio_transcript.delta",
        "response.output_text.delta",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.delta",
        "conversation.item.done",
        "conversation.item.retrieved",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.segment",
        "input_audio_buffer.cleared",
        "input_audio_buffer.timeout_triggered",
        "rate_limits.updated",
        "conversation.created",
        "transcription_session.updated",
        "mcp_list_tools.in_progress",
        "mcp_list_tools.completed",
        "mcp_list_tools.failed",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.mcp_call.failed",
    }
)


def _s(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ev.MalformedEvent(f"{key!r} must be a string")
    return value


def _opt_s(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _i(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ev.MalformedEvent(f"{key!r} must be an integer")
    return value


def _d(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ev.MalformedEvent(f"{key!r} must be an object")
    return value


def flatten_usage(usage: Any) -> dict[str, int]:
    """Token counts by kind from a response.done ``usage`` object (both dialects)."""
    if not isinstance(usage, dict):
        return {}
    out: dict[str, int] = {}
    for key in ("total_tokens", "input_tokens", "output_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key.removesuffix("_tokens")] = value
    for side in ("input", "output"):
        details = usage.get(f"{side}_token_details")
        if isinstance(details, dict):
            for key, value in details.items():
                if isinstance(value, int) and not isinstance(value, bool) and key.endswith("_tokens"):
                    out[f"{side}_{key.removesuffix('_tokens')}"] = value
    return out


def _parse_response_done(msg: dict[str, Any]) -> ev.ResponseDone:
    response = _d(msg, "response")
    calls: list[ev.FunctionCall] = []
    texts: list[str] = []
    output = response.get("output")
    if isinstance(output, list):
        for item in output:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "function_call":
                calls.append(
                    ev.FunctionCall(
                        call_id=_s(item, "call_id"),
                        name=_s(item, "name"),
                        arguments=_opt_s(item, "arguments") or "",
                        item_id=_opt_s(item, "id") or "",
                    )
                )
            elif item.get("type") == "message":
                content = item.get("content")
                if isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict):
                            text = part.get("text") or part.get("transcript")
                            if isinstance(text, str):
                                texts.append(text)
    details = response.get("status_details")
    reason: str | None = None
    error_code: str | None = None
    if isinstance(details, dict):
        reason = _opt_s(details, "reason") or _opt_s(details, "type")
        error = details.get("error")
        if isinstance(error, dict):
            error_code = _opt_s(error, "code")
    metadata = response.get("metadata")
    return ev.ResponseDone(
        response_id=_s(response, "id"),
        status=_opt_s(response, "status") or "completed",
        status_reason=reason,
        function_calls=tuple(calls),
        usage=flatten_usage(response.get("usage")),
        metadata=metadata if isinstance(metadata, dict) else None,
        output_text="".join(texts),
        error_code=error_code,
    )


def _parse_error(msg: dict[str, Any]) -> ev.ServerError:
    error = _d(msg, "error")
    return ev.ServerError(
        type=_opt_s(error, "type") or "error",
        code=_opt_s(error, "code"),
        message=(_opt_s(error, "message") or "")[:500],
        param=_opt_s(error, "param"),
        event_id=_opt_s(error, "event_id"),
    )


def _response_created(m: dict[str, Any]) -> ev.ResponseCreated:
    response = _d(m, "response")
    metadata = response.get("metadata")
    conversation = response.get("conversation_id")
    return ev.ResponseCreated(
        _s(response, "id"),
        metadata if isinstance(metadata, dict) else None,
        conversation if isinstance(conversation, str) else None,
    )


def _output_item_added(m: dict[str, Any]) -> ev.OutputItemAdded:
    item = _d(m, "item")
    return ev.OutputItemAdded(_s(m, "response_id"), _opt_s(item, "id") or "", _opt_s(item, "type") or "", item)


def _item_added(m: dict[str, Any]) -> ev.ItemAdded:
    item = _d(m, "item")
    return ev.ItemAdded(_opt_s(item, "id") or "", _opt_s(m, "previous_item_id"), item)


def _transcription_failed(m: dict[str, Any]) -> ev.InputTranscriptFailed:
    error = m.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return ev.InputTranscriptFailed(_s(m, "item_id"), message if isinstance(message, str) else "")


def _keypad_digit(m: dict[str, Any]) -> ev.KeypadDigit:
    digit = _s(m, "event")
    if len(digit) != 1 or digit not in DTMF_KEYS:
        raise ev.MalformedEvent(f"dtmf event is not one key: {digit[:20]!r}")
    return ev.KeypadDigit(digit)


_PARSERS: dict[str, Callable[[dict[str, Any]], ev.ServerEvent]] = {
    "response.output_audio.delta": lambda m: ev.AudioDelta(_s(m, "response_id"), _s(m, "item_id"), _s(m, "delta")),
    "response.output_audio.done": lambda m: ev.AudioDone(_s(m, "response_id"), _s(m, "item_id")),
    "input_audio_buffer.speech_started": lambda m: ev.SpeechStarted(_i(m, "audio_start_ms"), _s(m, "item_id")),
    "input_audio_buffer.speech_stopped": lambda m: ev.SpeechStopped(_i(m, "audio_end_ms"), _s(m, "item_id")),
    "input_audio_buffer.committed": lambda m: ev.InputCommitted(_s(m, "item_id")),
    "input_audio_buffer.dtmf_event_received": _keypad_digit,
    # the response is named for the record only: nothing here depends on it, so its absence is no fault
    "output_audio_buffer.started": lambda m: ev.OutputAudioStarted(_opt_s(m, "response_id") or ""),
    "output_audio_buffer.stopped": lambda m: ev.OutputAudioStopped(_opt_s(m, "response_id") or "", cleared=False),
    "output_audio_buffer.cleared": lambda m: ev.OutputAudioStopped(_opt_s(m, "response_id") or "", cleared=True),
    "response.created": _response_created,
    "response.done": _parse_response_done,
    "response.output_item.added": _output_item_added,
    "response.output_audio_transcript.done": lambda m: ev.AssistantTranscriptDone(
        _s(m, "response_id"), _s(m, "item_id"), _s(m, "transcript")
    ),
    "response.output_text.done": lambda m: ev.TextDone(_s(m, "response_id"), _s(m, "item_id"), _s(m, "text")),
    "conversation.item.input_audio_transcription.completed": lambda m: ev.InputTranscriptCompleted(
        _s(m, "item_id"), _s(m, "transcript")
    ),
    "conversation.item.input_audio_transcription.failed": _transcription_failed,
    "response.function_call_arguments.done": lambda m: ev.FunctionCallArgumentsDone(
        _s(m, "response_id"), _s(m, "item_id"), _s(m, "call_id"), _opt_s(m, "name") or "", _s(m, "arguments")
    ),
    "conversation.item.added": _item_added,
    "conversation.item.truncated": lambda m: ev.ItemTruncated(_s(m, "item_id"), _i(m, "audio_end_ms")),
    "conversation.item.deleted": lambda m: ev.ItemDeleted(_s(m, "item_id")),
    "session.created": lambda m: ev.SessionCreated(_d(m, "session")),
    "session.updated": lambda m: ev.SessionUpdated(_d(m, "session")),
    "error": _parse_error,
}


def _turn_detection(vad: VadSettings) -> dict[str, Any] | None:
    if vad.type == "none":
        return None
    if vad.type == "semantic_vad":
        return {
            "type": "semantic_vad",
            "eagerness": vad.eagerness,
            "create_response": vad.create_response,
            "interrupt_response": vad.interrupt_response,
        }
    detection: dict[str, Any] = {
        "type": "server_vad",
        "threshold": vad.threshold,
        "prefix_padding_ms": vad.prefix_padding_ms,
        "silence_duration_ms": vad.silence_duration_ms,
        "create_response": vad.create_response,
        "interrupt_response": vad.interrupt_response,
    }
    if vad.idle_timeout_ms:
        detection["idle_timeout_ms"] = vad.idle_timeout_ms
    return detection


def _ga_voice(voice: str) -> str | dict[str, str]:
    """A built-in voice by name; a custom voice (``voice_…``) as ``{"id": …}``."""
    return {"id": voice} if voice.startswith(CUSTOM_VOICE_PREFIX) else voice


class Dialect:
    """Shapes of one Realtime API dialect. Instances are immutable and shared by all calls."""

    name: DialectName

    def __init__(self, name: DialectName) -> None:
        self.name = name
        self._renames: Mapping[str, str] = _BETA_RENAMES if name == "beta" else {}

    def headers(self, auth: Mapping[str, str]) -> dict[str, str]:
        """Handshake headers: the provider's auth header (``relay.realtime.endpoint``) plus the dialect's."""
        headers = dict(auth)
        if self.name == "beta":
            headers["OpenAI-Beta"] = "realtime=v1"
        return headers

    def session_update(
        self,
        agent: AgentSettings,
        *,
        model: str,
        instructions: str,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """The ``session.update`` client event configuring µ-law both ways, voice, VAD and tools."""
        return {
            "type": "session.update",
            "session": self.session_config(agent, model=model, instructions=instructions, tools=tools),
        }

    def session_config(
        self,
        agent: AgentSettings,
        *,
        model: str,
        instructions: str,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """A call's session: µ-law both ways, voice, VAD, transcription, noise reduction and tools. The
        ``session`` of a Media Stream's ``session.update`` and (GA) the body of a SIP call's accept."""
        detection = _turn_detection(agent.vad)
        voice = agent.voice or DEFAULT_VOICE[self.name]
        tool_list = [dict(t) for t in tools]
        session: dict[str, Any]
        if self.name == "ga":
            audio_in: dict[str, Any] = {"format": {"type": "audio/pcmu"}, "turn_detection": detection}
            if agent.transcription_model:
                audio_in["transcription"] = {"model": agent.transcription_model}
            if agent.noise_reduction:
                audio_in["noise_reduction"] = {"type": agent.noise_reduction}
            session = {
                "type": "realtime",
                "model": model,
                "output_modalities": ["audio"],
                "instructions": instructions,
                "audio": {
                    "input": audio_in,
                    "output": {"format": {"type": "audio/pcmu"}, "voice": _ga_voice(voice), "speed": agent.speed},
                },
            }
            mcp = [dict(server) for server in agent.mcp_servers]
            if tool_list or mcp:
                session["tools"] = tool_list + mcp
                session["tool_choice"] = "auto"
        else:
            if detection is not None:
                detection.pop("idle_timeout_ms", None)  # GA only: a beta session.update naming it is refused
            session = {
                "modalities": ["audio", "text"],
                "instructions": instructions,
                "voice": voice,
                "speed": agent.speed,
                "input_audio_format": "g711_ulaw",
                "output_audio_format": "g711_ulaw",
                "turn_detection": detection,
            }
            if agent.transcription_model:
                session["input_audio_transcription"] = {"model": agent.transcription_model}
            if agent.noise_reduction:
                session["input_audio_noise_reduction"] = {"type": agent.noise_reduction}
            if tool_list:
                session["tools"] = tool_list
                session["tool_choice"] = "auto"
        return session

    def response_create(
        self,
        *,
        instructions: str | None = None,
        out_of_band: bool = False,
        metadata: Mapping[str, str] | None = None,
        text_only: bool = False,
    ) -> dict[str, Any]:
        response: dict[str, Any] = {}
        if instructions:
            response["instructions"] = instructions
        if out_of_band:
            response["conversation"] = "none"
        if metadata:
            response["metadata"] = dict(metadata)
        if text_only:
            response["output_modalities" if self.name == "ga" else "modalities"] = ["text"]
        event: dict[str, Any] = {"type": "response.create"}
        if response:
            event["response"] = response
        return event

    def parse(self, raw: str | bytes) -> ev.ServerEvent:
        """One server frame -> one normalized event. Raises MalformedEvent."""
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ev.MalformedEvent(f"invalid JSON: {exc.msg}") from None
        if not isinstance(msg, dict):
            raise ev.MalformedEvent("event is not a JSON object")
        kind = msg.get("type")
        if not isinstance(kind, str):
            raise ev.MalformedEvent("missing 'type'")
        kind = self._renames.get(kind, kind)
        parser = _PARSERS.get(kind)
        if parser is not None:
            return parser(msg)
        if kind in _IGNORED:
            return ev.Ignored(kind)
        return ev.Unknown(kind[:100], msg)


_DIALECTS = {"ga": Dialect("ga"), "beta": Dialect("beta")}


def get_dialect(name: str) -> Dialect:
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown Realtime dialect {name!r} (expected 'ga' or 'beta')") from None
