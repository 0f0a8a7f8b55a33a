"""Configuration from the environment (12-factor), validated once at start-up.

Variable names are a contract shared with deployments: see the README's table.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Dialect = Literal["ga", "beta"]
VadType = Literal["server_vad", "semantic_vad", "none"]

DEFAULT_INSTRUCTIONS = (
    "You are a friendly, concise phone assistant. Speak naturally, keep answers short, and ask one question at a time."
)
DEFAULT_GREETING = "Greet the caller warmly in one short sentence and ask how you can help."
GA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")


class ConfigError(ValueError):
    """A setting is missing or has a value the relay cannot run with."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


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


@dataclass(frozen=True)
class AgentSettings:
    """What the assistant is: per called number when profiles are configured."""

    instructions: str = DEFAULT_INSTRUCTIONS
    greeting: str | None = DEFAULT_GREETING
    voice: str = "marin"
    speed: float = 1.0
    vad: VadSettings = field(default_factory=VadSettings)
    transcription_model: str | None = "gpt-4o-transcribe"
    noise_reduction: str | None = "near_field"
    tools: tuple[str, ...] | None = None  # None: every loaded tool
    mcp_servers: tuple[Mapping[str, object], ...] = ()
    transfer_numbers: Mapping[str, str] = field(default_factory=dict)
    allow_any_transfer_number: bool = False
    whisper_summary: bool = False
    name: str = "default"


def derive_caller_key_secret(stream_secret: bytes) -> bytes:
    """The caller-key secret when none is configured: the same on every instance sharing the stream secret."""
    return hmac.new(stream_secret, b"relay-caller-key", hashlib.sha256).digest()


@dataclass(frozen=True)
class Settings:
    openai_api_key: str | None = None
    realtime_url: str = "wss://api.openai.com/v1/realtime"
    model: str = "gpt-realtime"
    dialect: Dialect = "ga"
    redis_url: str | None = None
    redis_prefix: str = "relay:"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_api_base: str | None = None
    public_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    insecure_dev: bool = False
    stream_secret: bytes = b""
    stream_token_ttl_s: int = 60
    # keys the hashes that name caller memory; empty: derived from stream_secret (Settings.caller_key)
    caller_key_secret: bytes = b""
    start_timeout_s: float = 5.0
    session_update_timeout_s: float = 10.0
    log_level: str = "INFO"
    agent: AgentSettings = field(default_factory=AgentSettings)
    profiles_file: str | None = None
    handler_modules: tuple[str, ...] = ("handlers.call_control", "handlers.orders")
    tool_timeout_s: float = 10.0
    end_call_mark_timeout_s: float = 8.0
    max_calls: int = 100
    drain_seconds: float = 30.0
    overflow_say: str = "Sorry, all our lines are busy. Please call again shortly."
    overflow_dial: str | None = None
    fallback_number: str | None = None
    relay_api_token: str | None = None
    state_ttl_s: int = 7 * 24 * 3600
    caller_memory: bool = True
    caller_memory_ttl_s: int = 30 * 24 * 3600
    summary_max_turns: int = 24
    summary_max_tokens: int = 6000
    summary_keep_turns: int = 6
    session_max_s: float = 55 * 60.0
    reconnect_attempts: int = 3
    reconnect_backoff_s: float = 0.25
    store_queue_size: int = 10_000
    max_twilio_message_bytes: int = 64 * 1024
    max_upstream_message_bytes: int = 8 * 1024 * 1024
    max_webhook_body_bytes: int = 64 * 1024
    max_dtmf_per_second: float = 10.0
    ws_ping_interval_s: float = 20.0  # Realtime socket keepalive
    ws_ping_timeout_s: float = 20.0
    twilio_ping_interval_s: float = 20.0  # Twilio socket keepalive
    twilio_ping_timeout_s: float = 20.0
    price_per_1k_tokens: Mapping[str, float] = field(default_factory=dict)
    metrics_enabled: bool = True

    @property
    def realtime_ws_url(self) -> str:
        sep = "&" if "?" in self.realtime_url else "?"
        return f"{self.realtime_url}{sep}model={self.model}"

    @property
    def caller_key(self) -> bytes:
        """The key of caller-memory hashes: caller_key_secret, or the one derived from stream_secret."""
        return self.caller_key_secret or derive_caller_key_secret(self.stream_secret)

    def with_agent(self, agent: AgentSettings) -> Settings:
        return replace(self, agent=agent)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        insecure = _bool(env, "RELAY_INSECURE_DEV", False)
        auth_token = env.get("TWILIO_AUTH_TOKEN") or None
        if not auth_token and not insecure:
            raise ConfigError(
                "TWILIO_AUTH_TOKEN is required to verify Twilio's signatures "
                "(set RELAY_INSECURE_DEV=1 only for local development)"
            )
        secret_raw = env.get("RELAY_STREAM_SECRET") or ""
        if secret_raw:
            stream_secret = secret_raw.encode()
        elif auth_token:
            # Every instance derives the same secret, so a token minted by one verifies on another.
            stream_secret = hmac.new(auth_token.encode(), b"relay-stream-token", hashlib.sha256).digest()
        else:
            stream_secret = b"insecure-development-secret"
        caller_key_raw = env.get("RELAY_CALLER_KEY_SECRET") or ""
        caller_key_secret = caller_key_raw.encode() if caller_key_raw else derive_caller_key_secret(stream_secret)
        dialect = _choice(env, "OPENAI_REALTIME_DIALECT", "ga", ("ga", "beta"))
        model_default = "gpt-realtime" if dialect == "ga" else "gpt-4o-realtime-preview"
        vad_type = _choice(env, "RELAY_VAD", "server_vad", ("server_vad", "semantic_vad", "none"))
        idle = _int(env, "RELAY_VAD_IDLE_TIMEOUT_MS", 0)
        vad = VadSettings(
            type=vad_type,  # type: ignore[arg-type]
            threshold=_float(env, "RELAY_VAD_THRESHOLD", 0.5),
            prefix_padding_ms=_int(env, "RELAY_VAD_PREFIX_PADDING_MS", 300),
            silence_duration_ms=_int(env, "RELAY_VAD_SILENCE_MS", 500),
            eagerness=_choice(env, "RELAY_VAD_EAGERNESS", "auto", ("low", "medium", "high", "auto")),
            idle_timeout_ms=idle or None,
        )
        if not 0.0 <= vad.threshold <= 1.0:
            raise ConfigError("RELAY_VAD_THRESHOLD must be between 0 and 1")
        greeting = env.get("RELAY_GREETING", DEFAULT_GREETING)
        voice = env.get("RELAY_VOICE", "marin")
        agent = AgentSettings(
            instructions=env.get("RELAY_INSTRUCTIONS", DEFAULT_INSTRUCTIONS),
            greeting=greeting or None,
            voice=voice,
            speed=_float(env, "RELAY_VOICE_SPEED", 1.0, 0.25),
            vad=vad,
            transcription_model=env.get("RELAY_TRANSCRIPTION_MODEL", "gpt-4o-transcribe") or None,
            noise_reduction=(_choice(env, "RELAY_NOISE_REDUCTION", "near_field", ("near_field", "far_field", "off"))),
        )
        if agent.noise_reduction == "off":
            agent = replace(agent, noise_reduction=None)
        public_url = (env.get("PUBLIC_URL") or "").rstrip("/") or None
        if public_url and not public_url.startswith(("https://", "http://")):
            raise ConfigError(f"PUBLIC_URL must start with https:// (or http:// in development), got {public_url!r}")
        modules_raw = env.get("RELAY_HANDLERS")
        modules = (
            tuple(m.strip() for m in modules_raw.split(",") if m.strip())
            if modules_raw is not None
            else cls.handler_modules
        )
        prices: dict[str, float] = {}
        for kind in ("input_text", "input_audio", "cached", "output_text", "output_audio"):
            price = _float(env, f"RELAY_PRICE_{kind.upper()}_PER_1K", -1.0, -1.0)
            if price >= 0:
                prices[kind] = price
        return cls(
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            realtime_url=(env.get("OPENAI_REALTIME_URL") or "wss://api.openai.com/v1/realtime").rstrip("/"),
            model=env.get("OPENAI_REALTIME_MODEL") or model_default,
            dialect=dialect,  # type: ignore[arg-type]
            redis_url=env.get("REDIS_URL") or None,
            redis_prefix=env.get("RELAY_REDIS_PREFIX", "relay:"),
            twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
            twilio_auth_token=auth_token,
            twilio_api_base=env.get("TWILIO_API_BASE") or None,
            public_url=public_url,
            host=env.get("HOST", "0.0.0.0"),
            port=_int(env, "PORT", 8000, 0),
            insecure_dev=insecure,
            stream_secret=stream_secret,
            caller_key_secret=caller_key_secret,
            stream_token_ttl_s=_int(env, "RELAY_STREAM_TOKEN_TTL", 60, 5),
            start_timeout_s=_float(env, "RELAY_START_TIMEOUT", 5.0, 0.1),
            session_update_timeout_s=_float(env, "RELAY_SESSION_UPDATE_TIMEOUT", 10.0, 0.1),
            log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
            agent=agent,
            profiles_file=env.get("RELAY_PROFILES") or None,
            handler_modules=modules,
            tool_timeout_s=_float(env, "RELAY_TOOL_TIMEOUT", 10.0, 0.01),
            end_call_mark_timeout_s=_float(env, "RELAY_END_CALL_TIMEOUT", 8.0, 0.01),
            max_calls=_int(env, "MAX_CALLS", 100, 1),
            drain_seconds=_float(env, "DRAIN_SECONDS", 30.0),
            overflow_say=env.get("RELAY_OVERFLOW_SAY", cls.overflow_say),
            overflow_dial=env.get("RELAY_OVERFLOW_DIAL") or None,
            fallback_number=env.get("RELAY_FALLBACK_NUMBER") or None,
            relay_api_token=env.get("RELAY_API_TOKEN") or None,
            state_ttl_s=_int(env, "RELAY_STATE_TTL", 7 * 24 * 3600, 60),
            caller_memory=_bool(env, "RELAY_CALLER_MEMORY", True),
            caller_memory_ttl_s=_int(env, "RELAY_CALLER_MEMORY_TTL", 30 * 24 * 3600, 60),
            summary_max_turns=_int(env, "RELAY_SUMMARY_MAX_TURNS", 24, 2),
            summary_max_tokens=_int(env, "RELAY_SUMMARY_MAX_TOKENS", 6000, 100),
            summary_keep_turns=_int(env, "RELAY_SUMMARY_KEEP_TURNS", 6, 0),
            session_max_s=_float(env, "RELAY_SESSION_MAX_SECONDS", 55 * 60.0, 1.0),
            reconnect_attempts=_int(env, "RELAY_RECONNECT_ATTEMPTS", 3, 0),
            reconnect_backoff_s=_float(env, "RELAY_RECONNECT_BACKOFF", 0.25),
            store_queue_size=_int(env, "RELAY_STORE_QUEUE", 10_000, 10),
            max_twilio_message_bytes=_int(env, "RELAY_MAX_TWILIO_MESSAGE", 64 * 1024, 1024),
            max_upstream_message_bytes=_int(env, "RELAY_MAX_UPSTREAM_MESSAGE", 8 * 1024 * 1024, 64 * 1024),
            max_webhook_body_bytes=_int(env, "RELAY_MAX_WEBHOOK_BODY", 64 * 1024, 1024),
            max_dtmf_per_second=_float(env, "RELAY_MAX_DTMF_PER_SECOND", 10.0, 0.1),
            ws_ping_interval_s=_float(env, "RELAY_WS_PING_INTERVAL", 20.0, 0.05),
            ws_ping_timeout_s=_float(env, "RELAY_WS_PING_TIMEOUT", 20.0, 0.05),
            twilio_ping_interval_s=_float(env, "RELAY_TWILIO_PING_INTERVAL", 20.0, 0.05),
            twilio_ping_timeout_s=_float(env, "RELAY_TWILIO_PING_TIMEOUT", 20.0, 0.05),
            price_per_1k_tokens=prices,
            metrics_enabled=_bool(env, "RELAY_METRICS", True),
        )
