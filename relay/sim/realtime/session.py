"""Session configuration: the defaults ``session.created`` reports and the strict ``session.update``.

An update is checked against the dialect's declared fields (``schema``), its audio formats and
voices, and the voice lock once assistant audio exists; then it is deep-merged into the session,
turn detection filled with the service's defaults, and echoed in ``session.updated``
(/work/shared/PROTOCOLS.md §6, §7, §10). ``Settings`` is the part the other components act on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from relay.sim.realtime.conversation import Conversation
from relay.sim.realtime.errors import Problem, require
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.schema import (
    BETA_VOICES,
    GA_VOICES,
    SESSION_FIELDS,
    check_beta_format,
    check_fields,
    check_ga_format,
)
from relay.sim.realtime.wire import JSON, Dialect, clone

_BETA_MODELS = frozenset(
    {
        "gpt-realtime", "gpt-realtime-2025-08-28", "gpt-4o-realtime-preview",
        "gpt-4o-realtime-preview-2024-10-01", "gpt-4o-realtime-preview-2024-12-17",
        "gpt-4o-realtime-preview-2025-06-03", "gpt-4o-mini-realtime-preview",
        "gpt-4o-mini-realtime-preview-2024-12-17",
    }
)  # fmt: skip
_DEFAULT_INSTRUCTIONS = "You are a simulated realtime assistant (relay.sim). Replies are synthetic audio."
SERVER_VAD_DEFAULTS: JSON = {
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,  # a live session.created reports 200 (the docstring says 500)
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD_DEFAULTS: JSON = {"eagerness": "auto", "create_response": True, "interrupt_response": True}


def normalize_turn_detection(value: Any, dialect: Dialect) -> Any:
    """Fill the defaults the service reports back, so the session echo is complete."""
    if not isinstance(value, dict):
        return value
    kind = value.get("type") or "server_vad"
    defaults = _SEMANTIC_VAD_DEFAULTS if kind == "semantic_vad" else server_vad_defaults(dialect)
    return {"type": kind, **defaults, **{k: v for k, v in value.items() if k != "type"}}


def server_vad_defaults(dialect: Dialect) -> JSON:
    """``idle_timeout_ms`` exists only in the GA shape."""
    if dialect == "ga":
        return dict(SERVER_VAD_DEFAULTS)
    return {k: v for k, v in SERVER_VAD_DEFAULTS.items() if k != "idle_timeout_ms"}


def default_session(dialect: Dialect, session_id: str, model: str, expires_at: int) -> JSON:
    """The session as the service reports it in ``session.created``: PCM16 24 kHz until configured."""
    turn_detection = {"type": "server_vad", **server_vad_defaults(dialect)}
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
class Settings:
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
    def of(dialect: Dialect, session: JSON) -> Settings:
        if dialect == "ga":
            audio = session.get("audio") or {}
            inp = audio.get("input") or {}
            out = audio.get("output") or {}
            return Settings(
                turn_detection=inp.get("turn_detection"),
                transcription=inp.get("transcription") is not None,
                voice=str(out.get("voice") or "alloy"),
                modalities=list(session.get("output_modalities") or ["audio"]),
                input_ulaw=(inp.get("format") or {}).get("type") == "audio/pcmu",
                instructions=str(session.get("instructions") or ""),
                output_format=clone(out.get("format") or {"type": "audio/pcm", "rate": 24000}),
            )
        return Settings(
            turn_detection=session.get("turn_detection"),
            transcription=session.get("input_audio_transcription") is not None,
            voice=str(session.get("voice") or "alloy"),
            modalities=list(session.get("modalities") or ["text", "audio"]),
            input_ulaw=session.get("input_audio_format") == "g711_ulaw",
            instructions=str(session.get("instructions") or ""),
            output_format=session.get("output_audio_format") or "pcm16",
        )


class SessionConfig:
    """Owns the session configuration of one connection and answers ``session.update``."""

    def __init__(self, out: Outbox, conversation: Conversation, on_turn_detection_change: Callable[[], None]) -> None:
        self.out = out
        self.rec = out.rec
        self.conversation = conversation
        self._on_turn_detection_change = on_turn_detection_change
        self.settings = Settings.of(self.rec.dialect, self.rec.session)

    def on_session_update(self, event: JSON) -> None:
        update = require(event, "session", dict)
        if self.rec.dialect == "ga":
            self._check_ga_update(update)
        else:
            self._check_beta_update(update)
        self._merge(self.rec.session, update)
        previous = self.settings.turn_detection
        self.settings = Settings.of(self.rec.dialect, self.rec.session)
        if self.settings.turn_detection != previous:
            self._on_turn_detection_change()
        if self.out.cfg.answer_session_update:
            self.out.emit({"type": "session.updated", "session": clone(self.rec.session)})

    def _check_ga_update(self, update: JSON) -> None:
        kind = update.get("type")
        if kind is None:
            raise Problem(
                "beta_api_shape_disabled",
                "The beta Realtime API shape is not supported for this session: 'session.type' is required "
                "and must be 'realtime' (GA sessions nest audio settings under 'session.audio').",
                "session.type",
            )
        if kind != "realtime":
            raise Problem(
                "invalid_value", f"Invalid value: '{kind}'. Supported values are: 'realtime'.", "session.type"
            )
        check_fields(update, SESSION_FIELDS["ga"], "session")
        audio = update.get("audio")
        if audio is None:
            return
        if not isinstance(audio, dict):
            raise Problem("invalid_type", "Invalid type for 'session.audio'.", "session.audio")
        for side in ("input", "output"):
            section = audio.get(side)
            if section is None:
                continue
            if not isinstance(section, dict):
                raise Problem("invalid_type", f"Invalid type for 'session.audio.{side}'.", f"session.audio.{side}")
            if "format" in section:
                check_ga_format(section["format"], f"session.audio.{side}.format")
        output_section = audio.get("output")
        if isinstance(output_section, dict) and "voice" in output_section:
            self._check_voice(output_section["voice"], "session.audio.output.voice")

    def _check_beta_update(self, update: JSON) -> None:
        check_fields(update, SESSION_FIELDS["beta"], "session")
        for key in ("input_audio_format", "output_audio_format"):
            if key in update:
                check_beta_format(update[key], f"session.{key}")
        if "voice" in update:
            self._check_voice(update["voice"], "session.voice")

    def _check_voice(self, voice: Any, where: str) -> None:
        voices = GA_VOICES if self.rec.dialect == "ga" else BETA_VOICES
        custom = self.rec.dialect == "ga" and isinstance(voice, dict) and isinstance(voice.get("id"), str)
        if voice not in voices and not custom:
            shown = orjson.dumps(voice).decode() if not isinstance(voice, str) else f"'{voice}'"
            supported = ", ".join(f"'{name}'" for name in voices)
            raise Problem("invalid_value", f"Invalid value: {shown}. Supported values are: {supported}.", where)
        if voice != self.settings.voice and self.conversation.assistant_audio_emitted:
            raise Problem(
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
                target[key] = normalize_turn_detection(clone(value), self.rec.dialect)
            else:
                target[key] = clone(value)
