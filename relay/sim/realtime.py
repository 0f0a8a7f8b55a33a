"""Offline OpenAI Realtime server: the relay's upstream peer for the demo, the tests and the load bench.

It speaks both wire dialects (GA and ``OpenAI-Beta: realtime=v1``) closely enough that the relay cannot
tell it from the real service for the paths it uses: session configuration, an energy VAD over the
µ-law it receives, synthetic spoken replies paced like real generation, barge-in (server-side cancel,
truncate bookkeeping and its errors), function calls, out-of-band responses and the fatal errors of a
bad key or an expired session. It is as strict as the service where a relay could go wrong: a
``session.update`` naming a field the dialect does not declare, at any depth, or an audio format it does
not name is refused; ``session.created`` reports the service's own defaults; a cancelled response still
delivers the audio deltas already in flight. Every event it emits validates against the ``openai``
package's server event types, and its session field tables equal that package's (both checked in the
tests; this module never imports ``openai``).

Design: per connection, one ``_Peer`` holds the protocol state. Client events are handled
synchronously and emitted events go through a FIFO drained by a single writer task, so the order on the
wire is the order of the state changes. Response generation runs in its own task so it can be paced and
cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from relay.sim import ulaw

__all__ = [
    "LatencyProbe",
    "RealtimeSimulator",
    "SimConfig",
    "SimSession",
    "serve_forever",
]

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Dialect = Literal["ga", "beta"]

REALTIME_PATH = "/v1/realtime"
AZURE_GA_PATH = "/openai/v1/realtime"
AZURE_PREVIEW_PATH = "/openai/realtime"
"""Azure OpenAI's forms: ``?model=<deployment>`` (GA shapes), ``?api-version=…&deployment=…`` (beta shapes)."""
_PATHS = frozenset({REALTIME_PATH, AZURE_GA_PATH, AZURE_PREVIEW_PATH})
# Voices each interface has (openai types/realtime/realtime_audio_config_output.py and
# types/beta/realtime/session_update_event.py), listed here apart from the relay's own table so
# the simulator checks the relay instead of mirroring it.
GA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
BETA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
INPUT_COMMIT_MIN_MS = 100
"""The real service refuses to commit less than 100 ms of input audio."""

_RUN_TAG = secrets.token_hex(3)
_ID_COUNTER = itertools.count(1)


def _new_id(prefix: str) -> str:
    """Unique within the process; shaped like the service's ids (``item_…``, ``event_…``) and < 32 chars."""
    return f"{prefix}_{_RUN_TAG}{next(_ID_COUNTER):010d}"


def _clone(value: Any) -> Any:
    """Deep copy of JSON data, so events already emitted never change when state does."""
    return orjson.loads(orjson.dumps(value))


@dataclass
class SimConfig:
    """Behaviour knobs; read at use time, so tests may change them between calls."""

    reply_ms: int = 1500
    greeting_reply_ms: int | None = None
    chunk_ms: tuple[int, ...] = (40, 100, 60, 120, 80)
    realtime_factor: float = 4.0
    response_delay_ms: int = 120
    vad_rms_threshold: float = 500.0
    vad_min_speech_ms: int = 60
    function_calls_on_turn: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    function_calls_on_text: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    answer_session_update: bool = True
    fatal_error_on_connect: str | None = None
    max_session_s: float | None = None
    expected_api_key: str | None = None
    record_audio: bool = True
    speech_before_calls_ms: int = 0
    """Off by default. A response carrying function calls first speaks this much audio (a goodbye before end_call)."""
    late_audio_deltas: int = 2
    """Audio deltas of a cancelled response that still arrive after the cancel (barge-in or client), as live
    sessions show: a relay must drop them. 0 turns it off."""
    latency_probe: LatencyProbe | None = None
    """Off by default. The load bench's hook: sees every decoded append, may stamp every audio chunk sent."""


class LatencyProbe(Protocol):
    """Measures transit outside the relay: markers the caller hid in its audio, markers added to replies."""

    def appended(self, session: SimSession, audio: bytes) -> None:
        """Called with the decoded bytes of every valid ``input_audio_buffer.append``, on arrival."""

    def outgoing(self, session: SimSession, chunk: bytes) -> bytes:
        """Called for every assistant audio chunk right before it is queued; returns the bytes to send."""


class _Headers(dict[str, str]):
    """Request headers with case-insensitive lookup (keys stored lower-case, as HTTP/2 and ASGI do)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        for name, value in pairs:
            key = name.lower()
            super().__setitem__(key, f"{self[key]}, {value}" if key in self else value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)


@dataclass(eq=False)
class SimSession:
    """What happened on one accepted WebSocket: the record tests and benches assert on."""

    dialect: Dialect
    headers: dict[str, str]
    path: str
    query: dict[str, str]
    id: str = field(default_factory=lambda: _new_id("sess"))
    model: str = ""
    connected_at: float = field(default_factory=time.monotonic)
    received: list[tuple[float, JSON]] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)
    append_count: int = 0
    append_times: list[float] = field(default_factory=list)
    appends_while_not_ulaw: int = 0
    """Appends that arrived while the session's input format was not µ-law (relay forgot to configure it)."""
    sent: list[JSON] = field(default_factory=list)
    session: JSON = field(default_factory=dict)
    truncates: list[JSON] = field(default_factory=list)
    speech_started_at: list[float] = field(default_factory=list)
    turns: int = 0
    """Caller audio turns committed so far (VAD or manual commit)."""
    responses: list[JSON] = field(default_factory=list)
    """Final response objects, as sent in ``response.done``."""
    closed: bool = False
    _conversation: list[JSON] = field(default_factory=list, repr=False)
    _sent_audio_ms: dict[str, int] = field(default_factory=dict, repr=False)
    _truncated_ms: dict[str, int] = field(default_factory=dict, repr=False)
    _user_audio_ms: dict[str, int] = field(default_factory=dict, repr=False)

    def items(self) -> list[JSON]:
        """Conversation items in order, summarised: id, type, role, status, text/transcript, audio ms."""
        summary: list[JSON] = []
        for item in self._conversation:
            entry: JSON = {"id": item["id"], "type": item["type"], "status": item.get("status")}
            if item["type"] == "message":
                entry["role"] = item.get("role")
                texts = []
                for part in item.get("content") or []:
                    if isinstance(part, dict):
                        text = part.get("text") if part.get("text") is not None else part.get("transcript")
                        if isinstance(text, str) and text:
                            texts.append(text)
                entry["text"] = " ".join(texts)
                entry["content"] = _clone(item.get("content") or [])
            for key in ("call_id", "name", "arguments", "output"):
                if key in item:
                    entry[key] = item[key]
            if item["id"] in self._sent_audio_ms:
                entry["audio_ms"] = self.audio_ms(item["id"])
            elif item["id"] in self._user_audio_ms:
                entry["audio_ms"] = self._user_audio_ms[item["id"]]
            summary.append(entry)
        return summary

    def audio_ms(self, item_id: str) -> int:
        """Assistant audio of an item as the server sees it: sent so far, or less once truncated."""
        sent = self._sent_audio_ms.get(item_id, 0)
        truncated = self._truncated_ms.get(item_id)
        return sent if truncated is None else min(sent, truncated)


@dataclass(frozen=True)
class _Names:
    """Server event names and content types that differ between the dialects."""

    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str
    text_delta: str
    text_done: str
    audio_content: str
    text_content: str


_NAMES: dict[Dialect, _Names] = {
    "ga": _Names(
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done",
        "response.output_text.delta",
        "response.output_text.done",
        "output_audio",
        "output_text",
    ),
    "beta": _Names(
        "response.audio.delta",
        "response.audio.done",
        "response.audio_transcript.delta",
        "response.audio_transcript.done",
        "response.text.delta",
        "response.text.done",
        "audio",
        "text",
    ),
}


@dataclass(frozen=True)
class OneOf:
    """An object whose allowed fields depend on its ``type`` (a discriminated union in the API schema)."""

    type_required: bool
    by_type: dict[str, dict[str, Any]]


FieldShape = dict[str, Any] | OneOf | None
"""``None``: any value; a dict: an object with exactly these optional fields; ``OneOf``: chosen by ``type``.
A shape applies to an object value or to every object in a list value; other values are not inspected."""

SESSION_FIELDS: dict[Dialect, dict[str, FieldShape]] = {
    # The session fields each dialect accepts, as the ``openai`` package declares them: GA
    # ``RealtimeSessionCreateRequest``, beta ``session_update_event.Session`` (a test keeps them equal).
    "ga": {
        "audio": {
            "input": {
                "format": OneOf(
                    False,
                    {
                        "audio/pcm": {"rate": None, "type": None},
                        "audio/pcma": {"type": None},
                        "audio/pcmu": {"type": None},
                    },
                ),
                "noise_reduction": OneOf(
                    False,
                    {"far_field": {"strength": None, "type": None}, "near_field": {"strength": None, "type": None}},
                ),
                "transcription": {
                    "delay": None,
                    "keywords": None,
                    "language": None,
                    "languages": None,
                    "model": None,
                    "prompt": None,
                },
                "turn_detection": OneOf(
                    True,
                    {
                        "semantic_vad": {
                            "create_response": None,
                            "eagerness": None,
                            "interrupt_response": None,
                            "type": None,
                        },
                        "server_vad": {
                            "create_response": None,
                            "idle_timeout_ms": None,
                            "interrupt_response": None,
                            "prefix_padding_ms": None,
                            "silence_duration_ms": None,
                            "threshold": None,
                            "type": None,
                        },
                    },
                ),
            },
            "output": {
                "format": OneOf(
                    False,
                    {
                        "audio/pcm": {"rate": None, "type": None},
                        "audio/pcma": {"type": None},
                        "audio/pcmu": {"type": None},
                    },
                ),
                "speed": None,
                "voice": {"id": None},
            },
        },
        "include": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": None,
        "output_modalities": None,
        "parallel_tool_calls": None,
        "prompt": {"id": None, "variables": None, "version": None},
        "reasoning": {"effort": None},
        "tool_choice": OneOf(
            True, {"function": {"name": None, "type": None}, "mcp": {"name": None, "server_label": None, "type": None}}
        ),
        "tools": OneOf(
            False,
            {
                "function": {"description": None, "name": None, "parameters": None, "type": None},
                "mcp": {
                    "allowed_callers": None,
                    "allowed_tools": {"read_only": None, "tool_names": None},
                    "authorization": None,
                    "connector_id": None,
                    "defer_loading": None,
                    "headers": None,
                    "require_approval": {
                        "always": {"read_only": None, "tool_names": None},
                        "never": {"read_only": None, "tool_names": None},
                    },
                    "server_description": None,
                    "server_label": None,
                    "server_url": None,
                    "tunnel_id": None,
                    "type": None,
                },
            },
        ),
        "tracing": {"group_id": None, "metadata": None, "workflow_name": None},
        "truncation": OneOf(
            True,
            {"retention_ratio": {"retention_ratio": None, "token_limits": {"post_instructions": None}, "type": None}},
        ),
        "type": None,
    },
    "beta": {
        "client_secret": {"expires_after": {"anchor": None, "seconds": None}},
        "input_audio_format": None,
        "input_audio_noise_reduction": OneOf(False, {"far_field": {"type": None}, "near_field": {"type": None}}),
        "input_audio_transcription": {"language": None, "model": None, "prompt": None},
        "instructions": None,
        "max_response_output_tokens": None,
        "modalities": None,
        "model": None,
        "output_audio_format": None,
        "speed": None,
        "temperature": None,
        "tool_choice": None,
        "tools": OneOf(False, {"function": {"description": None, "name": None, "parameters": None, "type": None}}),
        "tracing": {"group_id": None, "metadata": None, "workflow_name": None},
        "turn_detection": OneOf(
            False,
            {
                "semantic_vad": {
                    "create_response": None,
                    "eagerness": None,
                    "interrupt_response": None,
                    "prefix_padding_ms": None,
                    "silence_duration_ms": None,
                    "threshold": None,
                    "type": None,
                },
                "server_vad": {
                    "create_response": None,
                    "eagerness": None,
                    "interrupt_response": None,
                    "prefix_padding_ms": None,
                    "silence_duration_ms": None,
                    "threshold": None,
                    "type": None,
                },
            },
        ),
        "voice": None,
    },
}
GA_AUDIO_FORMATS = frozenset({"audio/pcm", "audio/pcmu", "audio/pcma"})
GA_PCM_RATES = frozenset({24000})
BETA_AUDIO_FORMATS = frozenset({"pcm16", "g711_ulaw", "g711_alaw"})
_BETA_MODELS = frozenset(
    {
        "gpt-realtime", "gpt-realtime-2025-08-28", "gpt-4o-realtime-preview",
        "gpt-4o-realtime-preview-2024-10-01", "gpt-4o-realtime-preview-2024-12-17",
        "gpt-4o-realtime-preview-2025-06-03", "gpt-4o-mini-realtime-preview",
        "gpt-4o-mini-realtime-preview-2024-12-17",
    }
)  # fmt: skip
_DEFAULT_INSTRUCTIONS = "You are a simulated realtime assistant (relay.sim). Replies are synthetic audio."
_SERVER_VAD_DEFAULTS: JSON = {
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,  # a live session.created reports 200 (the docstring says 500)
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD_DEFAULTS: JSON = {"eagerness": "auto", "create_response": True, "interrupt_response": True}
_SEMANTIC_VAD_SILENCE_MS = 500
_DEFAULT_PREFIX_PADDING_MS = 300
_TOKEN_LIMIT = 40000
_OBFUSCATION_CHARS = 16


def _normalize_turn_detection(value: Any, dialect: Dialect) -> Any:
    """Fill the defaults the service reports back, so the session echo is complete."""
    if not isinstance(value, dict):
        return value
    kind = value.get("type") or "server_vad"
    defaults = _SEMANTIC_VAD_DEFAULTS if kind == "semantic_vad" else _server_vad_defaults(dialect)
    return {"type": kind, **defaults, **{k: v for k, v in value.items() if k != "type"}}


def _server_vad_defaults(dialect: Dialect) -> JSON:
    """``idle_timeout_ms`` exists only in the GA shape."""
    if dialect == "ga":
        return dict(_SERVER_VAD_DEFAULTS)
    return {k: v for k, v in _SERVER_VAD_DEFAULTS.items() if k != "idle_timeout_ms"}


def _default_session(dialect: Dialect, session_id: str, model: str, expires_at: int) -> JSON:
    """The session as the service reports it in ``session.created``: PCM16 24 kHz until configured."""
    turn_detection = {"type": "server_vad", **_server_vad_defaults(dialect)}
    if dialect == "ga":
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": ["audio"],
            "instructions": _DEFAULT_INSTRUCTIONS,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": expires_at,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": turn_detection,
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
            },
        }
    session: JSON = {
        "id": session_id,
        "object": "realtime.session",
        "expires_at": expires_at,
        "modalities": ["text", "audio"],
        "instructions": _DEFAULT_INSTRUCTIONS,
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": None,
        "input_audio_noise_reduction": None,
        "turn_detection": turn_detection,
        "tools": [],
        "tool_choice": "auto",
        "temperature": 0.8,
        "max_response_output_tokens": "inf",
        "speed": 1.0,
        "tracing": None,
    }
    if model in _BETA_MODELS:
        session["model"] = model
    return session


@dataclass(frozen=True)
class _Settings:
    """The parts of the session config the simulator acts on, read from the dialect's locations."""

    turn_detection: JSON | None
    transcription: bool
    voice: str
    modalities: list[str]
    input_ulaw: bool
    instructions: str
    output_format: Any = None
    """As configured: a GA format object or a beta format string."""

    @staticmethod
    def of(dialect: Dialect, session: JSON) -> _Settings:
        if dialect == "ga":
            audio = session.get("audio") or {}
            inp = audio.get("input") or {}
            out = audio.get("output") or {}
            return _Settings(
                turn_detection=inp.get("turn_detection"),
                transcription=inp.get("transcription") is not None,
                voice=str(out.get("voice") or "alloy"),
                modalities=list(session.get("output_modalities") or ["audio"]),
                input_ulaw=(inp.get("format") or {}).get("type") == "audio/pcmu",
                instructions=str(session.get("instructions") or ""),
                output_format=_clone(out.get("format") or {"type": "audio/pcm", "rate": 24000}),
            )
        return _Settings(
            turn_detection=session.get("turn_detection"),
            transcription=session.get("input_audio_transcription") is not None,
            voice=str(session.get("voice") or "alloy"),
            modalities=list(session.get("modalities") or ["text", "audio"]),
            input_ulaw=session.get("input_audio_format") == "g711_ulaw",
            instructions=str(session.get("instructions") or ""),
            output_format=session.get("output_audio_format") or "pcm16",
        )


@dataclass(eq=False)
class _Response:
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


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class _Problem(Exception):
    """A client mistake answered with an ``error`` event (the session stays open)."""

    def __init__(self, code: str | None, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@lru_cache(maxsize=64)
def _reply_audio(ms: int, variant: int) -> bytes:
    """Synthesis is the costliest step; a handful of cached variants serve hundreds of calls."""
    return ulaw.synth_speech(ms, seed=variant, pitch_hz=130.0 + 15.0 * variant, level=0.3)


def _words(text: str) -> list[str]:
    """Split for deltas, keeping the separating spaces so the deltas concatenate to the text."""
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]] if text else []


def _require(event: JSON, name: str, kind: type | tuple[type, ...]) -> Any:
    value = event.get(name)
    if value is None:
        raise _Problem("missing_required_parameter", f"Missing required parameter: '{name}'.", name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Problem("invalid_type", f"Invalid type for '{name}'.", name)
    return value


def _supported(values: Iterable[Any]) -> str:
    """The API's enumeration style: 'a', 'b' and 'c'."""
    quoted = [f"'{value}'" for value in sorted(values, key=str)]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _check_fields(value: Any, shape: FieldShape, where: str) -> None:
    """Refuse, at any depth, a field the API does not declare (``unknown_parameter``) or an unknown ``type``."""
    if shape is None:
        return
    if isinstance(value, list):
        for index, element in enumerate(value):
            _check_fields(element, shape, f"{where}[{index}]")
        return
    if not isinstance(value, dict):
        return
    fields: dict[str, FieldShape]
    if isinstance(shape, OneOf):
        kind = value.get("type")
        if kind is None:
            if shape.type_required:
                raise _Problem(
                    "missing_required_parameter", f"Missing required parameter: '{where}.type'.", f"{where}.type"
                )
            fields = {key: sub for branch in shape.by_type.values() for key, sub in branch.items()}
        elif isinstance(kind, str) and kind in shape.by_type:
            fields = shape.by_type[kind]
        else:
            raise _Problem(
                "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: {_supported(shape.by_type)}.",
                f"{where}.type",
            )
    else:
        fields = shape
    for key, sub_value in value.items():
        if key not in fields:
            raise _Problem("unknown_parameter", f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}")
        _check_fields(sub_value, fields[key], f"{where}.{key}")


def _check_ga_format(fmt: Any, where: str) -> None:
    """GA formats are objects: ``audio/pcmu``, ``audio/pcma``, ``audio/pcm`` at 24 kHz (types: ``_check_fields``)."""
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise _Problem(
            "invalid_type", f"Invalid type for '{where}': expected an object, but got a {type(fmt).__name__}.", where
        )
    if (
        fmt.get("type", "audio/pcm") == "audio/pcm"
        and fmt.get("rate") is not None
        and fmt.get("rate") not in GA_PCM_RATES
    ):
        raise _Problem(
            "invalid_value",
            f"Invalid value: '{fmt.get('rate')}'. Supported values are: {_supported(GA_PCM_RATES)}.",
            f"{where}.rate",
        )


def _codec(fmt: Any) -> Literal["pcmu", "pcma", "pcm"]:
    """The encoding a GA format object or a beta format string stands for (PCM16 24 kHz unless G.711)."""
    name = fmt.get("type") if isinstance(fmt, dict) else fmt
    if name in ("audio/pcmu", "g711_ulaw"):
        return "pcmu"
    return "pcma" if name in ("audio/pcma", "g711_alaw") else "pcm"


def _check_beta_format(fmt: Any, where: str) -> None:
    """Beta formats are the strings ``pcm16``, ``g711_ulaw`` and ``g711_alaw``."""
    if fmt is not None and fmt not in BETA_AUDIO_FORMATS:
        raise _Problem(
            "invalid_value", f"Invalid value: '{fmt}'. Supported values are: {_supported(BETA_AUDIO_FORMATS)}.", where
        )


class _Peer:
    """Protocol state of one connection (the server side of one Realtime session)."""

    def __init__(self, sim: RealtimeSimulator, ws: ServerConnection, rec: SimSession) -> None:
        self.sim = sim
        self.ws = ws
        self.rec = rec
        self.names = _NAMES[rec.dialect]
        self.outbox: asyncio.Queue[str | _Close] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()
        self.closing = False
        self.conversation_id = _new_id("conv")
        self.active: _Response | None = None
        self.response_count = 0
        self.pending_calls: list[tuple[str, str]] | None = None
        self.known_call_ids: set[str] = set()
        self.assistant_audio_emitted = False
        self.last_input_tokens = 0
        # Input audio: positions are bytes of µ-law since the session started (8 per ms).
        self.total_bytes = 0
        self.buffer_start_bytes = 0
        self.carry = b""
        self.in_speech = False
        self.loud_ms = 0
        self.quiet_ms = 0
        self.speech_item_id = ""
        self.speech_start_ms = 0
        self.settings = _Settings.of(rec.dialect, rec.session)
        self.handlers: dict[str, Callable[[JSON], None]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self._on_truncate,
            "conversation.item.delete": self._on_delete,
            "conversation.item.retrieve": self._on_retrieve,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_webrtc_only,
        }

    @property
    def cfg(self) -> SimConfig:
        return self.sim.config

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_loop())
        try:
            if self._authorized():
                self._emit({"type": "session.created", "session": _clone(self.rec.session)})
                if self.cfg.max_session_s is not None:
                    self._spawn(self._expire_after(self.cfg.max_session_s))
            await self._read_loop()
        finally:
            self.closing = True
            pending = [*self.tasks, writer]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.rec.closed = True
            self.finished.set()

    def _authorized(self) -> bool:
        auth = self.rec.headers.get("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token and self.rec.path.startswith("/openai/"):
            token = (self.rec.headers.get("api-key") or "").strip()  # Azure: api-key or an Entra bearer token
        cfg = self.cfg
        if not token:
            self._fatal(
                "missing_api_key",
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
            return False
        if cfg.expected_api_key is not None and token != cfg.expected_api_key:
            shown = f"{token[:3]}{'*' * max(0, len(token) - 7)}{token[-4:]}" if len(token) > 8 else "***"
            self._fatal(
                "invalid_api_key",
                f"Incorrect API key provided: {shown}. "
                "You can find your API key at https://platform.openai.com/account/api-keys.",
            )
            return False
        if cfg.fatal_error_on_connect:
            self._fatal(cfg.fatal_error_on_connect, f"Simulated fatal error: {cfg.fatal_error_on_connect}.")
            return False
        return True

    def _fatal(self, code: str, message: str) -> None:
        self._emit_error(code, message)
        self._close(1008, code)

    async def _expire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._emit_error("session_expired", f"Your session hit the maximum duration of {seconds / 60:g} minutes.")
        self._close(1000, "session_expired")

    def _close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close; nothing emitted after this point reaches the wire."""
        if self.closing:
            return
        self.closing = True
        self.rec.closed = True  # over from the server's side: nothing more will be emitted
        if self.active is not None and self.active.task is not None:
            self.active.task.cancel()
        self.outbox.put_nowait(_Close(code, reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task failed in session %s", self.rec.id, exc_info=task.exception())

    async def _write_loop(self) -> None:
        ws, outbox = self.ws, self.outbox
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await outbox.get()
                if isinstance(message, _Close):
                    await ws.close(message.code, message.reason)
                    return
                await ws.send(message)

    async def _read_loop(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if self.closing:
                    continue
                if isinstance(message, bytes):
                    self._emit_error("invalid_value", "Binary frames are not supported; send JSON text frames.")
                    continue
                self._on_text(message)

    # ------------------------------------------------------------------ emitting

    def _emit(self, event: JSON) -> None:
        if self.closing:
            return
        event = {"event_id": _new_id("event"), **event}
        if "delta" in event and not self.cfg.record_audio and event["type"] == self.names.audio_delta:
            self.rec.sent.append({**event, "delta": ""})  # load runs: keep the event, drop the audio
        else:
            self.rec.sent.append(event)
        self.outbox.put_nowait(orjson.dumps(event).decode())

    def _emit_error(
        self, code: str | None, message: str, *, param: str | None = None, client_event: JSON | None = None
    ) -> None:
        client_event_id = client_event.get("event_id") if client_event else None
        error: JSON = {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id if isinstance(client_event_id, str) else None,
        }
        self._emit({"type": "error", "error": error})

    def _item_added(self, item: JSON, previous_item_id: str | None) -> None:
        kind = "conversation.item.added" if self.rec.dialect == "ga" else "conversation.item.created"
        self._emit({"type": kind, "previous_item_id": previous_item_id, "item": _clone(item)})

    def _item_done(self, item: JSON) -> None:
        if self.rec.dialect == "ga":
            self._emit(
                {
                    "type": "conversation.item.done",
                    "previous_item_id": self._prev_id(item),
                    "item": _clone(item),
                }
            )

    # ------------------------------------------------------------------ dispatch

    def _on_text(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._emit_error("invalid_json", "We could not parse the JSON body of your event; send a JSON object.")
            return
        if not isinstance(event, dict):
            self._emit_error("invalid_json", "Each client event must be a JSON object.")
            return
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self._on_append(event)
            return
        self.rec.received.append((time.monotonic(), event))
        if not isinstance(kind, str):
            self._emit_error(
                "missing_required_parameter",
                "Missing required parameter: 'type'.",
                param="type",
                client_event=event,
            )
            return
        handler = self.handlers.get(kind)
        if handler is None:
            supported = ", ".join(f"'{name}'" for name in ["input_audio_buffer.append", *self.handlers])
            self._emit_error(
                "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: {supported}.",
                param="type",
                client_event=event,
            )
            return
        try:
            handler(event)
        except _Problem as problem:
            self._emit_error(problem.code, problem.message, param=problem.param, client_event=event)

    # ------------------------------------------------------------------ session

    def _on_session_update(self, event: JSON) -> None:
        update = _require(event, "session", dict)
        if self.rec.dialect == "ga":
            self._check_ga_update(update)
        else:
            self._check_beta_update(update)
        self._merge(self.rec.session, update)
        previous = self.settings.turn_detection
        self.settings = _Settings.of(self.rec.dialect, self.rec.session)
        if self.settings.turn_detection != previous:
            self._reset_vad()
        if self.cfg.answer_session_update:
            self._emit({"type": "session.updated", "session": _clone(self.rec.session)})

    def _check_ga_update(self, update: JSON) -> None:
        kind = update.get("type")
        if kind is None:
            raise _Problem(
                "beta_api_shape_disabled",
                "The beta Realtime API shape is not supported for this session: 'session.type' is required "
                "and must be 'realtime' (GA sessions nest audio settings under 'session.audio').",
                "session.type",
            )
        if kind != "realtime":
            raise _Problem(
                "invalid_value", f"Invalid value: '{kind}'. Supported values are: 'realtime'.", "session.type"
            )
        _check_fields(update, SESSION_FIELDS["ga"], "session")
        audio = update.get("audio")
        if audio is None:
            return
        if not isinstance(audio, dict):
            raise _Problem("invalid_type", "Invalid type for 'session.audio'.", "session.audio")
        for side in ("input", "output"):
            section = audio.get(side)
            if section is None:
                continue
            if not isinstance(section, dict):
                raise _Problem("invalid_type", f"Invalid type for 'session.audio.{side}'.", f"session.audio.{side}")
            if "format" in section:
                _check_ga_format(section["format"], f"session.audio.{side}.format")
        output_section = audio.get("output")
        if isinstance(output_section, dict) and "voice" in output_section:
            self._check_voice(output_section["voice"], "session.audio.output.voice")

    def _check_beta_update(self, update: JSON) -> None:
        _check_fields(update, SESSION_FIELDS["beta"], "session")
        for key in ("input_audio_format", "output_audio_format"):
            if key in update:
                _check_beta_format(update[key], f"session.{key}")
        if "voice" in update:
            self._check_voice(update["voice"], "session.voice")

    def _check_voice(self, voice: Any, where: str) -> None:
        voices = GA_VOICES if self.rec.dialect == "ga" else BETA_VOICES
        custom = self.rec.dialect == "ga" and isinstance(voice, dict) and isinstance(voice.get("id"), str)
        if voice not in voices and not custom:
            shown = orjson.dumps(voice).decode() if not isinstance(voice, str) else f"'{voice}'"
            supported = ", ".join(f"'{name}'" for name in voices)
            raise _Problem("invalid_value", f"Invalid value: {shown}. Supported values are: {supported}.", where)
        if voice != self.settings.voice and self.assistant_audio_emitted:
            raise _Problem(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                where,
            )

    def _merge(self, target: JSON, update: JSON) -> None:
        """Deep-merge the containers (``audio``/``input``/``output``); every leaf value replaces the old."""
        for key, value in update.items():
            if key in ("audio", "input", "output") and isinstance(value, dict) and isinstance(target.get(key), dict):
                self._merge(target[key], value)
            elif key == "turn_detection":
                target[key] = _normalize_turn_detection(_clone(value), self.rec.dialect)
            else:
                target[key] = _clone(value)

    # ------------------------------------------------------------------ input audio and VAD

    def _on_append(self, event: JSON) -> None:
        rec, cfg = self.rec, self.cfg
        audio = event.get("audio")
        rec.append_count += 1
        if cfg.record_audio:
            rec.appended.append(audio if isinstance(audio, str) else "")
            rec.append_times.append(time.monotonic())
        if not isinstance(audio, str):
            rec.received.append((time.monotonic(), event))
            self._emit_error(
                "missing_required_parameter",
                "Missing required parameter: 'audio'.",
                param="audio",
                client_event=event,
            )
            return
        try:
            data = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            self._emit_error(
                "invalid_value",
                "Invalid 'audio': expected base64-encoded audio bytes.",
                param="audio",
                client_event=event,
            )
            return
        if not self.settings.input_ulaw:
            rec.appends_while_not_ulaw += 1
        if cfg.latency_probe is not None:
            cfg.latency_probe.appended(rec, data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Advance the input position and run the energy VAD on every whole 20 ms window."""
        self.total_bytes += len(data)
        turn_detection = self.settings.turn_detection
        if turn_detection is None:
            return
        buf = self.carry + data if self.carry else data
        whole = len(buf) - len(buf) % ulaw.FRAME_BYTES
        if whole:
            base = self.total_bytes - len(buf)
            threshold = self.cfg.vad_rms_threshold * float(turn_detection.get("threshold") or 0.5) / 0.5
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
            if self.loud_ms >= self.cfg.vad_min_speech_ms:
                self._speech_started(end_ms - self.loud_ms, turn_detection)
            return
        if loud:
            self.quiet_ms = 0
            return
        self.quiet_ms += ulaw.FRAME_MS
        if turn_detection.get("type") == "semantic_vad":
            silence_ms = _SEMANTIC_VAD_SILENCE_MS
        else:
            silence_ms = int(turn_detection.get("silence_duration_ms") or _SERVER_VAD_DEFAULTS["silence_duration_ms"])
        if self.quiet_ms >= silence_ms:
            self._speech_stopped(end_ms, turn_detection)

    def _speech_started(self, onset_ms: int, turn_detection: JSON) -> None:
        padding = turn_detection.get("prefix_padding_ms")
        padding_ms = _DEFAULT_PREFIX_PADDING_MS if padding is None else int(padding)
        self.in_speech = True
        self.loud_ms = self.quiet_ms = 0
        self.speech_item_id = _new_id("item")
        self.speech_start_ms = max(self.buffer_start_bytes // ulaw.ULAW_BYTES_PER_MS, onset_ms - padding_ms, 0)
        self.rec.speech_started_at.append(time.monotonic())
        self._emit(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": self.speech_start_ms,
                "item_id": self.speech_item_id,
            }
        )
        active = self.active
        if active is not None and not active.out_of_band and turn_detection.get("interrupt_response", True):
            self._cancel(active, "turn_detected")

    def _speech_stopped(self, end_ms: int, turn_detection: JSON) -> None:
        self.in_speech = False
        self.loud_ms = self.quiet_ms = 0
        self._emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": end_ms,
                "item_id": self.speech_item_id,
            }
        )
        self._commit(self.speech_item_id, end_ms * ulaw.ULAW_BYTES_PER_MS, end_ms - self.speech_start_ms)
        if turn_detection.get("create_response", True) and self.active is None:
            self._start_response({})

    def _reset_vad(self) -> None:
        self.carry = b""
        self.in_speech = False
        self.loud_ms = self.quiet_ms = 0

    def _on_commit(self, event: JSON) -> None:
        pending_ms = (self.total_bytes - self.buffer_start_bytes) / ulaw.ULAW_BYTES_PER_MS
        if pending_ms < INPUT_COMMIT_MIN_MS:
            raise _Problem(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{INPUT_COMMIT_MIN_MS}ms of audio, but buffer only has {pending_ms:.2f}ms of audio.",
            )
        item_id = self.speech_item_id if self.in_speech else _new_id("item")
        self._reset_vad()
        self._commit(item_id, self.total_bytes, int(pending_ms))

    def _on_clear(self, event: JSON) -> None:
        self.buffer_start_bytes = self.total_bytes
        self._reset_vad()
        self._emit({"type": "input_audio_buffer.cleared"})

    def _commit(self, item_id: str, end_bytes: int, duration_ms: int) -> None:
        """Turn the buffered caller audio into a user item, as after speech_stopped or a manual commit."""
        previous = self._last_item_id()
        self.buffer_start_bytes = end_bytes
        self.rec.turns += 1
        turn = self.rec.turns
        self._emit({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id})
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
        self._item_added(item, previous)
        self._item_done(item)
        if self.settings.transcription:
            transcript = f"caller turn {turn} ({max(0, duration_ms) / 1000:.1f} s)"
            item["content"][0]["transcript"] = transcript
            audio_tokens = max(1, duration_ms // 100)
            text_tokens = len(transcript) // 4 + 1
            for word in _words(transcript):  # streamed first, as the transcribe models do
                self._emit(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": item_id,
                        "content_index": 0,
                        "delta": word,
                    }
                )
            self._emit(
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
        calls = self.cfg.function_calls_on_turn.get(turn)
        if calls:
            self.pending_calls = list(calls)

    # ------------------------------------------------------------------ conversation items

    def _last_item_id(self) -> str | None:
        conversation = self.rec._conversation
        return str(conversation[-1]["id"]) if conversation else None

    def _find(self, item_id: Any) -> JSON | None:
        for item in self.rec._conversation:
            if item["id"] == item_id:
                return item
        return None

    def _prev_id(self, item: JSON) -> str | None:
        conversation = self.rec._conversation
        for index, candidate in enumerate(conversation):
            if candidate is item:
                return str(conversation[index - 1]["id"]) if index else None
        return None

    def _on_item_create(self, event: JSON) -> None:
        item = _require(event, "item", dict)
        kind = item.get("type")
        if kind not in ("message", "function_call", "function_call_output"):
            raise _Problem(
                "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: 'message', 'function_call' and "
                "'function_call_output'.",
                "item.type",
            )
        item_id = item.get("id")
        if item_id is not None and (not isinstance(item_id, str) or len(item_id) > 32):
            raise _Problem("invalid_value", "Invalid 'item.id': expected a string of at most 32 characters.", "item.id")
        if item_id is not None and self._find(item_id) is not None:
            raise _Problem("item_id_already_exists", f"Item with id '{item_id}' already exists.", "item.id")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system"):
                raise _Problem(
                    "invalid_value",
                    "Invalid 'item.role'. Supported values are: 'user', 'assistant' and 'system'.",
                    "item.role",
                )
            if not isinstance(item.get("content"), list):
                raise _Problem(
                    "missing_required_parameter",
                    "Missing required parameter: 'item.content'.",
                    "item.content",
                )
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in self.known_call_ids:
                raise _Problem("invalid_value", f"Tool call ID '{call_id}' not found in conversation.", "item.call_id")
            if not isinstance(item.get("output"), str):
                raise _Problem(
                    "missing_required_parameter", "Missing required parameter: 'item.output'.", "item.output"
                )
        else:
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _Problem(
                        "missing_required_parameter",
                        f"Missing required parameter: 'item.{key}'.",
                        f"item.{key}",
                    )
        conversation = self.rec._conversation
        after = event.get("previous_item_id")
        if after is None:
            position, previous = len(conversation), self._last_item_id()
        elif after == "root":
            position, previous = 0, None
        else:
            anchor = self._find(after)
            if anchor is None:
                raise _Problem(
                    "invalid_value",
                    f"Previous item with id '{after}' not found in conversation.",
                    "previous_item_id",
                )
            position, previous = conversation.index(anchor) + 1, str(after)
        fields = {key: value for key, value in _clone(item).items() if key not in ("id", "object", "status")}
        stored: JSON = {
            "id": item_id or _new_id("item"),
            "object": "realtime.item",
            "status": "completed",
            **fields,
        }
        if kind == "function_call":
            self.known_call_ids.add(stored["call_id"])
        conversation.insert(position, stored)
        self._item_added(stored, previous)
        self._item_done(stored)
        if kind == "message" and stored.get("role") == "user":
            texts = [
                part["text"]
                for part in stored["content"]
                if isinstance(part, dict) and part.get("type") == "input_text" and isinstance(part.get("text"), str)
            ]
            for needle, calls in self.cfg.function_calls_on_text.items():
                if any(needle in text for text in texts):
                    self.pending_calls = list(calls)
                    break

    def _on_truncate(self, event: JSON) -> None:
        item = self._find(event.get("item_id"))
        record: JSON = {
            "item_id": event.get("item_id"),
            "content_index": event.get("content_index"),
            "audio_end_ms": event.get("audio_end_ms"),
            "sent_ms": self.rec.audio_ms(item["id"]) if item is not None else 0,
            "at": time.monotonic(),
            "ok": False,
        }
        self.rec.truncates.append(record)  # malformed and refused ones too: they are what tests look for
        item_id = _require(event, "item_id", str)
        content_index = _require(event, "content_index", int)
        audio_end_ms = _require(event, "audio_end_ms", int)
        sent_ms = int(record["sent_ms"])
        if item is None:
            raise _Problem("item_not_found", f"Item with id '{item_id}' not found in conversation.", "item_id")
        if item.get("role") != "assistant" or item_id not in self.rec._sent_audio_ms:
            raise _Problem("invalid_value", "Only assistant messages with audio can be truncated.", "item_id")
        if content_index != 0:
            raise _Problem(
                "invalid_value",
                f"Invalid 'content_index': {content_index}; the audio is at 0.",
                "content_index",
            )
        if audio_end_ms < 0:
            raise _Problem("invalid_value", "Invalid 'audio_end_ms': must not be negative.", "audio_end_ms")
        if audio_end_ms > sent_ms:
            # As recorded from the service: no code, no param, the durations without a space before "ms".
            raise _Problem(None, f"Audio content of {sent_ms}ms is already shorter than {audio_end_ms}ms")
        self.rec._truncated_ms[item_id] = audio_end_ms
        for part in item.get("content") or []:
            if isinstance(part, dict) and "transcript" in part:
                part["transcript"] = ""  # the service drops the text of the unheard part; we drop it all
        record["ok"] = True
        self._emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": content_index,
                "audio_end_ms": audio_end_ms,
            }
        )

    def _on_delete(self, event: JSON) -> None:
        item_id = _require(event, "item_id", str)
        item = self._find(item_id)
        if item is None:
            raise _Problem(
                "item_not_found",
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                "item_id",
            )
        self.rec._conversation.remove(item)
        self._emit({"type": "conversation.item.deleted", "item_id": item_id})

    def _on_retrieve(self, event: JSON) -> None:
        item_id = _require(event, "item_id", str)
        item = self._find(item_id)
        if item is None:
            raise _Problem("item_not_found", f"Item with id '{item_id}' not found in conversation.", "item_id")
        self._emit({"type": "conversation.item.retrieved", "item": _clone(item)})

    def _on_webrtc_only(self, event: JSON) -> None:
        raise _Problem("invalid_value", f"'{event['type']}' is only supported on WebRTC and SIP connections.", "type")

    # ------------------------------------------------------------------ responses

    def _on_response_create(self, event: JSON) -> None:
        if self.active is not None:
            raise _Problem(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        request = event.get("response") or {}
        if not isinstance(request, dict):
            raise _Problem("invalid_type", "Invalid type for 'response'.", "response")
        self._start_response(request)

    def _on_response_cancel(self, event: JSON) -> None:
        wanted = event.get("response_id")
        active = self.active
        if active is None or (wanted is not None and wanted != active.id):
            raise _Problem("response_cancel_not_active", "Cancellation failed: no active response found")
        self._cancel(active, "client_cancelled")

    def _start_response(self, request: JSON) -> None:
        """Emit ``response.created`` now (the active-response rule starts here); generate in a task."""
        cfg, settings = self.cfg, self.settings
        out_of_band = request.get("conversation") == "none"
        key = "output_modalities" if self.rec.dialect == "ga" else "modalities"
        wanted = request.get(key) or settings.modalities
        calls: list[tuple[str, str]] = []
        if not out_of_band and self.pending_calls:
            calls, self.pending_calls = self.pending_calls, None
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
        response = _Response(
            id=_new_id("resp"),
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
        self._emit({"type": "response.created", "response": self._response_object(response, "in_progress")})
        response.task = self._spawn(self._generate(response))

    def _response_format(self, request: JSON) -> Any:
        """The output format of one response: the session's, unless ``response.create`` names another."""
        if self.rec.dialect == "ga":
            audio = request.get("audio")
            output = audio.get("output") if isinstance(audio, dict) else None
            wanted = output.get("format") if isinstance(output, dict) else None
            return _clone(wanted) if isinstance(wanted, dict) else _clone(self.settings.output_format)
        wanted = request.get("output_audio_format")
        return wanted if wanted in BETA_AUDIO_FORMATS else self.settings.output_format

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
        self, response: _Response, status: str, details: JSON | None = None, usage: JSON | None = None
    ) -> JSON:
        common: JSON = {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": _clone(response.output),
            "conversation_id": None if response.out_of_band else self.conversation_id,
            "max_output_tokens": "inf",
            "usage": usage,
            "metadata": response.metadata,
        }
        if self.rec.dialect == "ga":
            common["output_modalities"] = response.modalities
            common["audio"] = {"output": {"format": _clone(response.output_format), "voice": response.voice}}
        else:
            common["modalities"] = response.modalities
            common["voice"] = response.voice
            common["output_audio_format"] = response.output_format
            common["temperature"] = 0.8
        return common

    async def _generate(self, response: _Response) -> None:
        delay_s = self.cfg.response_delay_ms / 1000.0
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if response.modality == "calls":
            if response.speech_before_calls_ms:
                # A spoken message item first, then the calls: generated and cancelled like any audio reply.
                response.modality, response.audio_ms = "audio", response.speech_before_calls_ms
                await self._generate_audio(response)
                response.modality = "calls"
            await self._generate_calls(response)
        elif response.modality == "text":
            await self._generate_text(response)
        else:
            await self._generate_audio(response)
        self._finish(response, "completed", None)

    def _open_message(self, response: _Response) -> JSON:
        item: JSON = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._open_item(response, item)
        part = {"type": "audio", "transcript": ""} if response.modality == "audio" else {"type": "text", "text": ""}
        self._emit({"type": "response.content_part.added", **self._where(response, item), "part": part})
        return item

    def _open_item(self, response: _Response, item: JSON) -> None:
        output_index = len(response.output)
        response.output.append(item)
        response.open_item = item
        self._emit(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": output_index,
                "item": _clone(item),
            }
        )
        if not response.out_of_band:
            previous = self._last_item_id()
            self.rec._conversation.append(item)
            if response.modality == "audio":
                self.rec._sent_audio_ms[item["id"]] = 0
            self._item_added(item, previous)

    def _where(self, response: _Response, item: JSON) -> JSON:
        return {
            "response_id": response.id,
            "item_id": item["id"],
            "output_index": response.output.index(item),
            "content_index": 0,
        }

    def _close_item(self, response: _Response, status: str) -> None:
        """Emit the ``*.done`` tail of the open output item (complete or cut short by a cancel)."""
        item = response.open_item
        if item is None:
            return
        response.open_item = None
        names = self.names
        if item["type"] == "message":
            where = self._where(response, item)
            text = response.text_so_far
            if response.modality == "audio":
                self._emit({"type": names.audio_done, **where})
                self._emit({"type": names.transcript_done, **where, "transcript": text})
                part: JSON = {"type": "audio", "transcript": text}
                item["content"] = [{"type": names.audio_content, "transcript": text}]
            else:
                self._emit({"type": names.text_done, **where, "text": text})
                part = {"type": "text", "text": text}
                item["content"] = [{"type": names.text_content, "text": text}]
            self._emit({"type": "response.content_part.done", **where, "part": part})
        item["status"] = status
        output_index = response.output.index(item)
        self._emit(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": output_index,
                "item": _clone(item),
            }
        )
        if not response.out_of_band:
            self._item_done(item)

    async def _generate_audio(self, response: _Response) -> None:
        item = self._open_message(response)
        where = self._where(response, item)
        response.audio = _reply_audio(response.audio_ms, response.number % 4)
        response.chunk_index = 0
        words = _words(response.full_text)
        realtime_factor = self.cfg.realtime_factor
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
        self._close_item(response, "completed")

    def _send_audio_chunk(self, response: _Response, item: JSON, where: JSON) -> None:
        """The next audio delta of the reply; chunk sizes cycle through ``SimConfig.chunk_ms``."""
        chunk_sizes = self.cfg.chunk_ms or (100,)
        position, total = response.sent_audio_ms, response.audio_ms
        ms = min(max(1, chunk_sizes[response.chunk_index % len(chunk_sizes)]), total - position)
        response.chunk_index += 1
        chunk = response.audio[position * ulaw.ULAW_BYTES_PER_MS : (position + ms) * ulaw.ULAW_BYTES_PER_MS]
        probe = self.cfg.latency_probe
        if probe is not None:
            chunk = probe.outgoing(self.rec, chunk)
        codec = _codec(response.output_format)
        if codec != "pcmu":  # replies are synthesised as µ-law; other formats are converted from it
            chunk = ulaw.to_alaw(chunk) if codec == "pcma" else ulaw.to_pcm16_24k(chunk)
        self._emit({"type": self.names.audio_delta, **where, "delta": base64.b64encode(chunk).decode("ascii")})
        position += ms
        response.sent_audio_ms = position
        if not response.out_of_band:
            self.rec._sent_audio_ms[item["id"]] = position
        self.assistant_audio_emitted = True

    def _send_late_audio(self, response: _Response) -> None:
        """Deltas already in flight when a response is cancelled still arrive, before its ``*.done`` events."""
        item = response.open_item
        if item is None or item["type"] != "message" or response.modality != "audio" or not response.audio:
            return
        where = self._where(response, item)
        for _ in range(max(0, self.cfg.late_audio_deltas)):
            if response.sent_audio_ms >= response.audio_ms:
                return
            self._send_audio_chunk(response, item, where)

    def _emit_transcript_delta(self, where: JSON, word: str) -> None:
        """Live transcript deltas carry ``obfuscation``: random padding that hides the length of each delta."""
        padding = secrets.token_urlsafe(12)[: max(1, _OBFUSCATION_CHARS - len(word))]
        self._emit({"type": self.names.transcript_delta, **where, "delta": word, "obfuscation": padding})

    async def _generate_text(self, response: _Response) -> None:
        item = self._open_message(response)
        where = self._where(response, item)
        for word in _words(response.full_text):
            self._emit({"type": self.names.text_delta, **where, "delta": word})
            response.text_so_far += word
            await asyncio.sleep(0)
        self._close_item(response, "completed")

    async def _generate_calls(self, response: _Response) -> None:
        for name, arguments in response.calls:
            call_id = _new_id("call")
            self.known_call_ids.add(call_id)
            item: JSON = {
                "id": _new_id("item"),
                "object": "realtime.item",
                "type": "function_call",
                "status": "in_progress",
                "name": name,
                "call_id": call_id,
                "arguments": "",
            }
            self._open_item(response, item)
            where = {
                "response_id": response.id,
                "item_id": item["id"],
                "output_index": response.output.index(item),
            }
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                if piece:
                    self._emit(
                        {
                            "type": "response.function_call_arguments.delta",
                            **where,
                            "call_id": call_id,
                            "delta": piece,
                        }
                    )
                    item["arguments"] += piece
                    await asyncio.sleep(0)
            done: JSON = {
                "type": "response.function_call_arguments.done",
                **where,
                "call_id": call_id,
                "arguments": arguments,
            }
            if self.rec.dialect == "ga":
                done["name"] = name
            self._emit(done)
            self._close_item(response, "completed")

    def _cancel(self, response: _Response, reason: str) -> None:
        if response.task is not None and not response.task.done():
            response.task.cancel()
        if not response.done:
            self._send_late_audio(response)
        self._finish(response, "cancelled", reason)

    def _finish(self, response: _Response, status: str, reason: str | None) -> None:
        if response.done:
            return
        response.done = True
        if self.active is response:
            self.active = None
        self._close_item(response, "incomplete")
        details = None if reason is None else {"type": "cancelled", "reason": reason}
        usage = self._usage(response)
        final = self._response_object(response, status, details, usage)
        self.rec.responses.append(final)
        self._emit({"type": "response.done", "response": final})
        total = usage["total_tokens"]
        self._emit(
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

    def _usage(self, response: _Response) -> JSON:
        """Token counts roughly proportional to content: ~10 tokens/s of caller audio, ~20/s of replies."""
        input_text = len(self.settings.instructions) // 4
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


class RealtimeSimulator:
    """A local Realtime server (``ws://host:port/v1/realtime``) that records every session."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.url = ""
        self.sessions: list[SimSession] = []
        self.connections = 0
        self._server: Server | None = None
        self._peers: dict[SimSession, _Peer] = {}

    async def __aenter__(self) -> RealtimeSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen and return the base URL to put in ``OPENAI_REALTIME_URL``."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._check_path,
            compression=None,
            max_size=MAX_MESSAGE_BYTES,
            close_timeout=5,
        )
        bound_port = next(iter(self._server.sockets)).getsockname()[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.url = f"ws://{shown}:{bound_port}{REALTIME_PATH}"
        log.info("realtime simulator listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Close every connection (1001) and wait until all session tasks are gone."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        if self._peers:
            await asyncio.wait([asyncio.create_task(p.finished.wait()) for p in self._peers.values()], timeout=5)

    async def drop_all(self) -> None:
        """Abort every open socket without a close frame, as a network failure or crash would."""
        peers = list(self._peers.values())
        for peer in peers:
            peer.ws.transport.abort()
        if peers:
            await asyncio.wait([asyncio.create_task(p.finished.wait()) for p in peers], timeout=5)

    def inject(self, event: JSON, session: SimSession | None = None) -> int:
        """Send an arbitrary server event (e.g. an ``error``) on one or every open session; fault tests."""
        peers = [p for rec, p in self._peers.items() if session is None or rec is session]
        for peer in peers:
            peer._emit(dict(event))
        return len(peers)

    def active_sessions(self) -> list[SimSession]:
        return [rec for rec in self.sessions if not rec.closed]

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path.rstrip("/") not in _PATHS:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        request = ws.request
        assert request is not None  # set once the handshake completed
        target = urlsplit(request.path)
        headers = _Headers(list(request.headers.raw_items()))
        beta_flags = [flag.strip() for flag in (headers.get("openai-beta") or "").split(",")]
        preview = target.path.rstrip("/") == AZURE_PREVIEW_PATH
        dialect: Dialect = "beta" if "realtime=v1" in beta_flags or preview else "ga"
        query = dict(parse_qsl(target.query))
        model = query.get("deployment" if preview else "model") or (
            "gpt-realtime" if dialect == "ga" else "gpt-4o-realtime-preview"
        )
        rec = SimSession(dialect=dialect, headers=headers, path=target.path, query=query, model=model)
        lifetime = self.config.max_session_s if self.config.max_session_s is not None else 3600.0
        rec.session = _default_session(dialect, rec.id, model, int(time.time() + lifetime))
        self.sessions.append(rec)
        peer = _Peer(self, ws, rec)
        self._peers[rec] = peer
        log.debug("session %s opened (%s, %s)", rec.id, dialect, model)
        try:
            await peer.run()
        finally:
            self._peers.pop(rec, None)
            log.debug("session %s closed", rec.id)


async def serve_forever(host: str = "127.0.0.1", port: int = 8765, config: SimConfig | None = None) -> None:
    """Run a simulator until cancelled (``python -m relay.sim.realtime``, the demo)."""
    sim = RealtimeSimulator(config)
    await sim.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    """Command line entry: serve a simulator on a fixed port for manual runs."""
    parser = argparse.ArgumentParser(prog="python -m relay.sim.realtime", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--reply-ms", type=int, default=SimConfig.reply_ms)
    parser.add_argument("--realtime-factor", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SimConfig(reply_ms=args.reply_ms, realtime_factor=args.realtime_factor)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(args.host, args.port, config))


if __name__ == "__main__":
    main()
