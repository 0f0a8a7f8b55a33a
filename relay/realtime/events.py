"""The normalized vocabulary of Realtime server events the rest of the relay sees.

Names follow the GA API; the beta dialect is translated into these in dialect.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class MalformedEvent(ValueError):
    """A server event we cannot understand; logged and skipped."""


@dataclass(frozen=True, slots=True)
class SessionCreated:
    session: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    session: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    audio_start_ms: int
    item_id: str


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    audio_end_ms: int
    item_id: str


@dataclass(frozen=True, slots=True)
class InputCommitted:
    """The input audio buffer became a user item (server VAD end of turn, or our own commit)."""

    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str
    metadata: dict[str, Any] | None
    conversation: str | None


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    response_id: str
    item_id: str
    item_type: str
    item: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AudioDelta:
    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class AudioDone:
    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class OutputAudioStarted:
    """``output_audio_buffer.started``: OpenAI began playing a response's audio to the caller itself
    (SIP and WebRTC calls, whose audio never passes through the relay)."""

    response_id: str


@dataclass(frozen=True, slots=True)
class OutputAudioStopped:
    """``output_audio_buffer.stopped`` (played out) or ``.cleared`` (cut off): nothing is playing."""

    response_id: str
    cleared: bool


@dataclass(frozen=True, slots=True)
class KeypadDigit:
    """``input_audio_buffer.dtmf_event_received``: the caller pressed a key (SIP calls)."""

    digit: str


@dataclass(frozen=True, slots=True)
class AssistantTranscriptDone:
    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class TextDone:
    response_id: str
    item_id: str
    text: str


@dataclass(frozen=True, slots=True)
class InputTranscriptCompleted:
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class InputTranscriptFailed:
    item_id: str
    message: str


@dataclass(frozen=True, slots=True)
class FunctionCallArgumentsDone:
    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str
    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str
    status_reason: str | None
    function_calls: tuple[FunctionCall, ...]
    usage: dict[str, int]
    metadata: dict[str, Any] | None
    output_text: str
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class ItemAdded:
    item_id: str
    previous_item_id: str | None
    item: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ItemTruncated:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class ItemDeleted:
    item_id: str


@dataclass(frozen=True, slots=True)
class ServerError:
    type: str
    code: str | None
    message: str
    param: str | None
    event_id: str | None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed event the relay has no use for (deltas of transcripts, rate limits, …)."""

    type: str


@dataclass(frozen=True, slots=True)
class Unknown:
    type: str
    raw: dict[str, Any] = field(repr=False)


ServerEvent = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | InputCommitted
    | ResponseCreated
    | OutputItemAdded
    | AudioDelta
    | AudioDone
    | OutputAudioStarted
    | OutputAudioStopped
    | KeypadDigit
    | AssistantTranscriptDone
    | TextDone
    | InputTranscriptCompleted
    | InputTranscriptFailed
    | FunctionCallArgumentsDone
    | ResponseDone
    | ItemAdded
    | ItemTruncated
    | ItemDeleted
    | ServerError
    | Ignored
    | Unknown
)

# Error codes after which a new session cannot help (bad key, no quota, bad model).
FATAL_ERROR_CODES = frozenset(
    {
        "invalid_api_key",
        "missing_api_key",
        "insufficient_quota",
        "account_deactivated",
        "model_not_found",
        "unsupported_model",
        "beta_api_shape_disabled",
        "billing_hard_limit_reached",
        "organization_verification_required",
    }
)
