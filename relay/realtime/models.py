"""Model names, voices and speeds the Realtime API accepts, and the shutdowns it has announced.

The one table of announced shutdowns. Source: the ``openai`` package 3.57, whose generated types
mark deprecated values with their dates: ``types/realtime/realtime_session_create_request.py``
(``model``, shutdown 2027-01-20) and ``types/realtime/audio_transcription.py`` (``model``,
shutdown 2027-02-26); recommended replacements: developers.openai.com/api/docs/deprecations.
Voices: ``types/realtime/realtime_audio_config_output.py`` (GA) and
``types/beta/realtime/session_update_event.py`` (beta); both give speed as 0.25-1.5.

This module imports nothing from the relay, so configuration code can use it freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime

DEFAULT_MODEL_GA = "gpt-realtime-2.1"
DEFAULT_MODEL_BETA = "gpt-4o-realtime-preview"

# Input transcription: the package's list has three values with no announced shutdown:
# gpt-transcribe, gpt-live-transcribe and gpt-realtime-whisper. gpt-realtime-whisper needs
# turn_detection null (no VAD), which a phone call relying on server VAD cannot use;
# gpt-transcribe is the package's first option for transcription everywhere (also the
# /audio/transcriptions endpoint), works with server and semantic VAD, and takes the
# keywords/languages hints. So it is the default, except on Azure, where the setting names a
# deployment and transcription stays off until one is named (relay/config.py).
DEFAULT_TRANSCRIPTION_MODEL = "gpt-transcribe"

GA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
BETA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")
DEFAULT_VOICE = {"ga": "marin", "beta": "alloy"}
SPEED_RANGE = {"ga": (0.25, 1.5), "beta": (0.25, 1.5)}
CUSTOM_VOICE_PREFIX = "voice_"
"""GA only: a custom voice id (``voice_…``), sent as ``{"id": …}``."""

_REALTIME_SHUTDOWN = date(2027, 1, 20)
_TRANSCRIPTION_SHUTDOWN = date(2027, 2, 26)

REALTIME_SHUTDOWNS: Mapping[str, date] = {
    name: _REALTIME_SHUTDOWN
    for name in (
        "gpt-realtime",
        "gpt-realtime-2025-08-28",
        "gpt-realtime-mini",
        "gpt-realtime-mini-2025-12-15",
        "gpt-audio-mini",
        "gpt-audio-mini-2025-12-15",
    )
}
TRANSCRIPTION_SHUTDOWNS: Mapping[str, date] = {
    name: _TRANSCRIPTION_SHUTDOWN
    for name in (
        "whisper-1",
        "gpt-4o-mini-transcribe",
        "gpt-4o-mini-transcribe-2025-12-15",
        "gpt-4o-transcribe",
        "gpt-4o-transcribe-diarize",
    )
}


def shutdown_notice(kind: str, name: str, where: str, today: date | None = None) -> str | None:
    """A warning for a configured model with an announced shutdown, else None.

    ``kind`` is ``"realtime"`` or ``"transcription"``; ``where`` names the setting (env variable
    or profile key) so the operator knows what to change.
    """
    table = REALTIME_SHUTDOWNS if kind == "realtime" else TRANSCRIPTION_SHUTDOWNS
    when = table.get(name)
    if when is None:
        return None
    today = today or datetime.now(UTC).date()
    replacement = DEFAULT_MODEL_GA if kind == "realtime" else DEFAULT_TRANSCRIPTION_MODEL
    if today > when:
        status = f"was shut down on {when.isoformat()}"
    else:
        status = f"has an announced shutdown on {when.isoformat()}"
    return (
        f"{where}={name}: the {kind} model {name} {status}; "
        f"move to a current model (the relay's default is {replacement})"
    )


def voice_problem(dialect: str, voice: str, speed: float) -> tuple[str, str] | None:
    """Why a ``dialect`` session would refuse ``voice``/``speed``: ("voice"|"speed", reason), or None."""
    low, high = SPEED_RANGE[dialect]
    if isinstance(speed, bool) or not low <= speed <= high:
        return "speed", f"must be between {low:g} and {high:g}, got {speed!r}"
    voices = GA_VOICES if dialect == "ga" else BETA_VOICES
    if voice in voices:
        return None
    if dialect == "ga" and voice.startswith(CUSTOM_VOICE_PREFIX) and len(voice) > len(CUSTOM_VOICE_PREFIX):
        return None
    custom = " or a custom voice id (voice_…)" if dialect == "ga" else ""
    return "voice", f"unknown voice {voice!r} for the {dialect} dialect (one of {', '.join(voices)}{custom})"
