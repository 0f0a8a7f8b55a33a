"""What the assistant is and how it listens: the agent behaviour a profile can set per called number.

The defaults come from the environment (``Settings.from_env``) and a profiles file overrides them
per number (``relay.profiles``); both check values with the functions here, so a voice or keypad
setting is refused the same way wherever it was written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from relay.env import ConfigError
from relay.realtime import models

VadType = Literal["server_vad", "semantic_vad", "none"]

DEFAULT_INSTRUCTIONS = (
    "You are a friendly, concise phone assistant. Speak naturally, keep answers short, and ask one question at a time."
)
DEFAULT_GREETING = "Greet the caller warmly in one short sentence and ask how you can help."
RESUME_LINE_MAX_CHARS = 300  # spoken word for word while the caller waits: one or two sentences


def check_voice(dialect: str, voice: str | None, speed: float, *, voice_key: str, speed_key: str) -> None:
    """Refuse a voice or speed a ``dialect`` session would refuse; the environment and profiles share it."""
    problem = models.voice_problem(dialect, voice or models.DEFAULT_VOICE[dialect], speed)
    if problem is not None:
        field_name, reason = problem
        raise ConfigError(f"{speed_key} {reason}" if field_name == "speed" else f"{voice_key}: {reason}")


@dataclass(frozen=True)
class VadSettings:
    type: VadType = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    eagerness: str = "auto"
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None


DTMF_KEYS = "0123456789*#ABCD"


@dataclass(frozen=True)
class DtmfSettings:
    """How key presses become one keypad entry (an account number, a menu choice)."""

    terminator: str = "#"  # "" = no terminator: an entry ends by pause or length only
    timeout_ms: int = 2000  # pause after the last key that ends an entry
    max_digits: int = 20  # keys (the terminator not counted) that end an entry by themselves
    interrupt: bool = True  # a key press cuts off the assistant like speech does


def check_resume_line(line: str, key: str) -> None:
    """A resumption line is spoken as written, so it must be short enough to say in one breath."""
    if len(line) > RESUME_LINE_MAX_CHARS:
        limit = RESUME_LINE_MAX_CHARS
        raise ConfigError(f"{key} must be at most {limit} characters (it is said as is), got {len(line)}")


def check_dtmf(dtmf: DtmfSettings, names: Mapping[str, str]) -> None:
    """``names`` maps each field to what the operator wrote (an env variable, a profile key)."""
    if dtmf.terminator and (len(dtmf.terminator) != 1 or dtmf.terminator not in DTMF_KEYS):
        raise ConfigError(
            f"{names['terminator']} must be one key of 0-9 * # A-D, or empty for none, got {dtmf.terminator!r}"
        )
    if dtmf.timeout_ms < 100:
        raise ConfigError(f"{names['timeout_ms']} must be at least 100 (ms), got {dtmf.timeout_ms}")
    if dtmf.max_digits < 1:
        raise ConfigError(f"{names['max_digits']} must be at least 1, got {dtmf.max_digits}")


@dataclass(frozen=True)
class AgentSettings:
    """What the assistant is: per called number when profiles are configured."""

    instructions: str = DEFAULT_INSTRUCTIONS
    greeting: str | None = DEFAULT_GREETING
    resume_line: str | None = None  # said word for word when a call resumes on a new stream; None: nothing
    voice: str | None = None  # None: the dialect's default (GA marin, beta alloy)
    speed: float = 1.0
    vad: VadSettings = field(default_factory=VadSettings)
    dtmf: DtmfSettings = field(default_factory=DtmfSettings)
    transcription_model: str | None = models.DEFAULT_TRANSCRIPTION_MODEL
    noise_reduction: str | None = "near_field"
    tools: tuple[str, ...] | None = None  # None: every loaded tool
    mcp_servers: tuple[Mapping[str, object], ...] = ()
    transfer_numbers: Mapping[str, str] = field(default_factory=dict)
    allow_any_transfer_number: bool = False
    whisper_summary: bool = False
    # SIP mode: a call may pick this profile with an ``X-Relay-Profile`` SIP header (headers are the
    # SIP provider's to set, so only profiles that allow it)
    allow_sip_profile_header: bool = False
    name: str = "default"
    model: str | None = None  # None: Settings.model (OPENAI_REALTIME_MODEL / AZURE_OPENAI_DEPLOYMENT)
    # outbound calls (POST /calls): what the assistant says first when the callee answers (None: the
    # greeting); recording "off" or "dual" (None: RELAY_RECORDING); a line said first while recording
    outbound_greeting: str | None = None
    recording: str | None = None
    recording_disclosure: str | None = None
    webhook_url: str | None = None  # post-call webhook; None: RELAY_WEBHOOK_URL, "": none for this profile
