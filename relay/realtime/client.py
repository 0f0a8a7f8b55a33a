"""Client events whose shape is the same in both dialects."""

from __future__ import annotations

from typing import Any

APPEND_PREFIX = '{"type":"input_audio_buffer.append","audio":"'
APPEND_SUFFIX = '"}'


def append_audio(payload: str) -> str:
    """The Twilio base64 payload as is, wrapped without decoding or re-encoding."""
    return APPEND_PREFIX + payload + APPEND_SUFFIX


def truncate(item_id: str, audio_end_ms: int) -> dict[str, Any]:
    return {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms}


def clear_output_audio() -> dict[str, Any]:
    """``output_audio_buffer.clear``: stop the audio OpenAI plays to the caller itself (SIP, WebRTC);
    sent after the response's ``response.cancel``."""
    return {"type": "output_audio_buffer.clear"}


def cancel(response_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "response.cancel"}
    if response_id:
        event["response_id"] = response_id
    return event


def user_text(text: str, *, role: str = "user") -> dict[str, Any]:
    content_type = "input_text"
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": role, "content": [{"type": content_type, "text": text}]},
    }


def function_output(call_id: str, output: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output},
    }


def delete_item(item_id: str) -> dict[str, Any]:
    return {"type": "conversation.item.delete", "item_id": item_id}


def commit() -> dict[str, Any]:
    """Make the input audio buffer a user item (only without server turn detection)."""
    return {"type": "input_audio_buffer.commit"}
