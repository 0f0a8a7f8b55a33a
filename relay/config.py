"""Configuration from the environment (12-factor), validated once at start-up.

Variable names are a contract shared with deployments: see the README's table.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from relay.realtime import models

Dialect = Literal["ga", "beta"]
Provider = Literal["openai", "azure"]
VadType = Literal["server_vad", "semantic_vad", "none"]

DEFAULT_INSTRUCTIONS = (
    "You are a friendly, concise phone assistant. Speak naturally, keep answers short, and ask one question at a time."
)
DEFAULT_GREETING = "Greet the caller warmly in one short sentence and ask how you can help."
INSECURE_STREAM_SECRET = b"insecure-development-secret"  # RELAY_INSECURE_DEV without any secret: public
GA_VOICES = models.GA_VOICES
AZURE_API_VERSION = "2025-04-01-preview"


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


def check_voice(dialect: str, voice: str | None, speed: float, *, voice_key: str, speed_key: str) -> None:
    """Refuse a voice or speed a ``dialect`` session would refuse; the environment and profiles share it."""
    problem = models.voice_problem(dialect, voice or models.DEFAULT_VOICE[dialect], speed)
    if problem is not None:
        field_name, reason = problem
        raise ConfigError(f"{speed_key} {reason}" if field_name == "speed" else f"{voice_key}: {reason}")


def _is_loopback(url: str) -> bool:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host in ("127.0.0.1", "localhost", "::1")


def _provider_settings(env: Mapping[str, str], dialect: str) -> dict[str, object]:
    """Provider, upstream URL, credential and model (deployment) settings, checked together.

    ``openai``: ``OPENAI_REALTIME_URL`` (ws/wss) with ``OPENAI_API_KEY``. ``azure``:
    ``AZURE_OPENAI_ENDPOINT`` + ``AZURE_OPENAI_DEPLOYMENT``, authenticated with
    ``AZURE_OPENAI_API_KEY`` (preferred when both are set, as the ``openai`` package does) or a
    Microsoft Entra token in ``AZURE_OPENAI_AD_TOKEN``. The credential itself is checked by
    ``Settings.check_credentials`` when the service starts.
    """
    raw_provider = env.get("RELAY_PROVIDER") or env.get("OPENAI_PROVIDER") or "openai"
    provider = raw_provider.strip().lower()
    if provider not in ("openai", "azure"):
        name = "RELAY_PROVIDER" if env.get("RELAY_PROVIDER") else "OPENAI_PROVIDER"
        raise ConfigError(f"{name} must be openai or azure, got {raw_provider!r}")
    model = env.get("OPENAI_REALTIME_MODEL") or ""
    if provider == "openai":
        url = (env.get("OPENAI_REALTIME_URL") or "wss://api.openai.com/v1/realtime").rstrip("/")
        if not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"OPENAI_REALTIME_URL must be a ws:// or wss:// URL, got {url!r}")
        key = env.get("OPENAI_API_KEY") or None
        default_model = models.DEFAULT_MODEL_GA if dialect == "ga" else models.DEFAULT_MODEL_BETA
        return {"provider": "openai", "realtime_url": url, "openai_api_key": key, "model": model or default_model}
    if env.get("OPENAI_REALTIME_URL"):
        raise ConfigError(
            "OPENAI_REALTIME_URL is not used with RELAY_PROVIDER=azure: set AZURE_OPENAI_ENDPOINT "
            "(e.g. https://my-resource.openai.azure.com)"
        )
    endpoint = (env.get("AZURE_OPENAI_ENDPOINT") or "").rstrip("/")
    if not endpoint:
        raise ConfigError(
            "AZURE_OPENAI_ENDPOINT is required with RELAY_PROVIDER=azure (https://<resource>.openai.azure.com)"
        )
    if not endpoint.startswith(("https://", "wss://", "http://", "ws://")) or not urlsplit(endpoint).hostname:
        raise ConfigError(
            f"AZURE_OPENAI_ENDPOINT must be an https:// URL like https://<resource>.openai.azure.com, got {endpoint!r}"
        )
    if urlsplit(endpoint).path not in ("", "/") or urlsplit(endpoint).query:
        raise ConfigError(
            f"AZURE_OPENAI_ENDPOINT is the resource's base URL without a path, like "
            f"https://<resource>.openai.azure.com, got {endpoint!r}"
        )
    if endpoint.startswith(("http://", "ws://")) and not _is_loopback(endpoint):
        raise ConfigError(f"AZURE_OPENAI_ENDPOINT must use https:// (plain http only on loopback), got {endpoint!r}")
    deployment = env.get("AZURE_OPENAI_DEPLOYMENT") or model
    if not deployment:
        raise ConfigError(
            "AZURE_OPENAI_DEPLOYMENT is required with RELAY_PROVIDER=azure (the realtime model's deployment name)"
        )
    api_key = env.get("AZURE_OPENAI_API_KEY") or None
    ad_token = None if api_key else (env.get("AZURE_OPENAI_AD_TOKEN") or None)
    return {
        "provider": "azure",
        "azure_endpoint": endpoint,
        "azure_api_key": api_key,
        "azure_ad_token": ad_token,
        "azure_api_version": env.get("AZURE_OPENAI_API_VERSION") or AZURE_API_VERSION,
        "model": deployment,
    }


# Every secret the relay reads from the environment, with the fewest bytes it accepts (0: any length).
# A value shipped as a placeholder in this repository's examples is refused whatever its length.
SECRET_ENV: dict[str, int] = {
    "OPENAI_API_KEY": 0,
    "AZURE_OPENAI_API_KEY": 0,
    "AZURE_OPENAI_AD_TOKEN": 0,
    "TWILIO_AUTH_TOKEN": 0,
    "RELAY_STREAM_SECRET": 32,
    "RELAY_API_TOKEN": 32,
    "RELAY_CALLER_KEY_SECRET": 32,
}
_PLACEHOLDER_WORDS = ("replaceme", "changeme", "changeit", "yourkey", "yoursecret", "yourtoken", "placeholder")
_PLACEHOLDER_VALUES = frozenset({"", "secret", "password", "token", "todo", "tbd", "none", "null", "test", "example"})


def is_placeholder(value: str) -> bool:
    """True for example values such as ``replace-me``, ``REPLACE_ME``, ``changeme``, ``...`` or ``<your-key>``."""
    folded = re.sub(r"[^a-z0-9]", "", value.lower())
    return (
        folded in _PLACEHOLDER_VALUES
        or any(word in folded for word in _PLACEHOLDER_WORDS)
        or bool(re.fullmatch(r"(sk)?(x+|0+)", folded))
        or (value.startswith("<") and value.endswith(">"))
    )


def _secret(env: Mapping[str, str], name: str, min_bytes: int = 0) -> str | None:
    """A secret from the environment (unset or empty: None); a placeholder or a short value is refused."""
    raw = env.get(name)
    if not raw:
        return None
    if is_placeholder(raw.strip()):
        shown = f" ({raw.strip()!r})" if len(raw.strip()) <= 12 else ""  # a long one might be real after all
        raise ConfigError(f"{name} is a placeholder{shown}; set the real secret")
    size = len(raw.encode())
    if size < min_bytes:
        raise ConfigError(
            f"{name} is {size} bytes; it must be at least {min_bytes} random bytes (e.g. `openssl rand -hex 32`)"
        )
    return raw


def _check_secrets(env: Mapping[str, str]) -> None:
    for name, min_bytes in SECRET_ENV.items():
        _secret(env, name, min_bytes)


def _port(env: Mapping[str, str], name: str = "PORT", default: int = 8000) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{name} must be a TCP port between 1 and 65535, got {raw[:32]!r}")
    return int(raw)


def _redis_url(env: Mapping[str, str], name: str = "REDIS_URL") -> str | None:
    """The URL as redis-py will read it, checked now rather than by a crashing worker."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    from redis.connection import parse_url

    parts = urlsplit(raw)
    shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if _safe_port(parts) else "")
    try:
        kwargs = parse_url(raw)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"{name} is not a usable Redis URL ({exc}): {shown}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{name}: a unix:// URL needs a socket path, got {shown}")
    else:
        if not parts.hostname:
            raise ConfigError(f"{name} has no host, got {shown}")
        if parts.port == 0:
            raise ConfigError(f"{name}: port must be between 1 and 65535, got 0")
        if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", parts.path):
            raise ConfigError(f"{name}: the path must be a database number (/0 … /15), got {parts.path[:32]!r}")
    db = kwargs.get("db", 0)
    if not isinstance(db, int) or db < 0:
        raise ConfigError(f"{name}: the database number must be a non-negative integer, got {db!r}")
    password = parts.password
    if password and is_placeholder(password):
        raise ConfigError(f"{name} has a placeholder password; set the real one")
    return raw


def _safe_port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


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
    name: str = "default"
    model: str | None = None  # None: Settings.model (OPENAI_REALTIME_MODEL / AZURE_OPENAI_DEPLOYMENT)


def derive_caller_key_secret(stream_secret: bytes) -> bytes:
    """The caller-key secret when none is configured: the same on every instance sharing the stream secret."""
    return hmac.new(stream_secret, b"relay-caller-key", hashlib.sha256).digest()


@dataclass(frozen=True)
class Settings:
    openai_api_key: str | None = None
    realtime_url: str = "wss://api.openai.com/v1/realtime"
    model: str = models.DEFAULT_MODEL_GA
    dialect: Dialect = "ga"
    provider: Provider = "openai"
    azure_endpoint: str | None = None  # https://<resource>.openai.azure.com
    azure_api_key: str | None = None
    azure_ad_token: str | None = None
    azure_api_version: str = AZURE_API_VERSION  # preview (beta dialect) only
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
    max_pending_streams: int = 64  # Media Stream sockets waiting for `start`; see README
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
    max_http_header_bytes: int = 32 * 1024  # request line and headers of one HTTP request
    max_url_bytes: int = 8 * 1024
    http_idle_timeout_s: float = 10.0  # a connection's next request head must arrive within this
    max_dtmf_per_second: float = 10.0
    ws_ping_interval_s: float = 20.0  # Realtime socket keepalive
    ws_ping_timeout_s: float = 20.0
    twilio_ping_interval_s: float = 20.0  # Twilio socket keepalive
    twilio_ping_timeout_s: float = 20.0
    price_per_1k_tokens: Mapping[str, float] = field(default_factory=dict)
    metrics_enabled: bool = True

    def transcription_notice(self) -> str | None:
        """The start-up INFO line for Azure without a transcription deployment, else None."""
        if self.provider != "azure" or self.agent.transcription_model:
            return None
        return (
            "input transcription is off: with RELAY_PROVIDER=azure, RELAY_TRANSCRIPTION_MODEL names a "
            "deployment; set it to a transcription deployment to turn transcription on"
        )

    def check_credentials(self) -> None:
        """``serve`` refuses to start without the provider's credential, unless the upstream is a
        simulator on a loopback address (ws://127.0.0.1, ws://localhost, ws://[::1])."""
        if self.provider == "azure":
            if not (self.azure_api_key or self.azure_ad_token) and not _is_loopback(self.azure_endpoint or ""):
                raise ConfigError(
                    "RELAY_PROVIDER=azure needs AZURE_OPENAI_API_KEY or AZURE_OPENAI_AD_TOKEN (a Microsoft Entra token)"
                )
        elif not self.openai_api_key and not _is_loopback(self.realtime_url):
            raise ConfigError(
                "OPENAI_API_KEY is required (it may be left out only for a simulator on ws://127.0.0.1 or localhost)"
            )

    def model_for(self, agent: AgentSettings) -> str:
        """The Realtime model (on Azure: deployment) a call with this agent profile uses."""
        return agent.model or self.model

    @property
    def caller_key(self) -> bytes:
        """The key of caller-memory hashes: caller_key_secret, or the one derived from stream_secret."""
        return self.caller_key_secret or derive_caller_key_secret(self.stream_secret)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        _check_secrets(env)
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
            stream_secret = INSECURE_STREAM_SECRET
        caller_key_raw = env.get("RELAY_CALLER_KEY_SECRET") or ""
        caller_key_secret = caller_key_raw.encode() if caller_key_raw else derive_caller_key_secret(stream_secret)
        dialect = _choice(env, "OPENAI_REALTIME_DIALECT", "ga", ("ga", "beta"))
        upstream = _provider_settings(env, dialect)
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
        dtmf = DtmfSettings(
            terminator=env.get("RELAY_DTMF_TERMINATOR", "#").strip(),
            timeout_ms=_int(env, "RELAY_DTMF_TIMEOUT_MS", 2000, 100),
            max_digits=_int(env, "RELAY_DTMF_MAX_DIGITS", 20, 1),
            interrupt=_bool(env, "RELAY_DTMF_INTERRUPT", True),
        )
        check_dtmf(
            dtmf,
            {
                "terminator": "RELAY_DTMF_TERMINATOR",
                "timeout_ms": "RELAY_DTMF_TIMEOUT_MS",
                "max_digits": "RELAY_DTMF_MAX_DIGITS",
            },
        )
        greeting = env.get("RELAY_GREETING", DEFAULT_GREETING)
        # On Azure the name is a deployment, which no default can guess: off until one is named.
        default_transcription = "" if upstream["provider"] == "azure" else models.DEFAULT_TRANSCRIPTION_MODEL
        voice = env.get("RELAY_VOICE") or models.DEFAULT_VOICE[dialect]
        speed = _float(env, "RELAY_VOICE_SPEED", 1.0, 0.25)
        check_voice(dialect, voice, speed, voice_key="RELAY_VOICE", speed_key="RELAY_VOICE_SPEED")
        agent = AgentSettings(
            instructions=env.get("RELAY_INSTRUCTIONS", DEFAULT_INSTRUCTIONS),
            greeting=greeting or None,
            voice=voice,
            speed=speed,
            vad=vad,
            dtmf=dtmf,
            transcription_model=env.get("RELAY_TRANSCRIPTION_MODEL", default_transcription) or None,
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
            dialect=dialect,  # type: ignore[arg-type]
            **upstream,  # type: ignore[arg-type]
            redis_url=_redis_url(env),
            redis_prefix=env.get("RELAY_REDIS_PREFIX", "relay:"),
            twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
            twilio_auth_token=auth_token,
            twilio_api_base=env.get("TWILIO_API_BASE") or None,
            public_url=public_url,
            host=env.get("HOST", "0.0.0.0"),
            port=_port(env),
            insecure_dev=insecure,
            stream_secret=stream_secret,
            caller_key_secret=caller_key_secret,
            stream_token_ttl_s=_int(env, "RELAY_STREAM_TOKEN_TTL", 60, 5),
            start_timeout_s=_float(env, "RELAY_START_TIMEOUT", 5.0, 0.1),
            max_pending_streams=_int(env, "RELAY_MAX_PENDING_STREAMS", 64, 1),
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
            max_http_header_bytes=_int(env, "RELAY_MAX_HTTP_HEADER", 32 * 1024, 1024),
            max_url_bytes=_int(env, "RELAY_MAX_URL", 8 * 1024, 256),
            http_idle_timeout_s=_float(env, "RELAY_HTTP_IDLE_TIMEOUT", 10.0, 0.1),
            max_dtmf_per_second=_float(env, "RELAY_MAX_DTMF_PER_SECOND", 10.0, 0.1),
            ws_ping_interval_s=_float(env, "RELAY_WS_PING_INTERVAL", 20.0, 0.05),
            ws_ping_timeout_s=_float(env, "RELAY_WS_PING_TIMEOUT", 20.0, 0.05),
            twilio_ping_interval_s=_float(env, "RELAY_TWILIO_PING_INTERVAL", 20.0, 0.05),
            twilio_ping_timeout_s=_float(env, "RELAY_TWILIO_PING_TIMEOUT", 20.0, 0.05),
            price_per_1k_tokens=prices,
            metrics_enabled=_bool(env, "RELAY_METRICS", True),
        )
