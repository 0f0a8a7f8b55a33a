"""Configuration from the environment (12-factor), validated once at start-up.

Variable names are a contract shared with deployments: see the README's table. ``Settings`` is the
process's whole configuration; what the assistant is and how it listens (``AgentSettings``, which
profiles override per number) is in ``relay.agent_settings``, and the checked reading of single
variables and secrets in ``relay.env``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit

from relay.agent_settings import (
    DEFAULT_GREETING,
    DEFAULT_INSTRUCTIONS,
    AgentSettings,
    DtmfSettings,
    VadSettings,
    check_dtmf,
    check_resume_line,
    check_voice,
)
from relay.env import (
    E164,
    ConfigError,
    check_secrets,
    read_bool,
    read_choice,
    read_float,
    read_http_url,
    read_int,
    read_port,
    read_redis_url,
)
from relay.realtime import models
from relay.webhook_signing import SecretError, decode_secret

Dialect = Literal["ga", "beta"]
Provider = Literal["openai", "azure"]

INSECURE_STREAM_SECRET = b"insecure-development-secret"  # RELAY_INSECURE_DEV without any secret: public
AZURE_API_VERSION = "2025-04-01-preview"


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


def _api_base(env: Mapping[str, str]) -> str:
    """OPENAI_API_BASE: where the SIP calls' REST requests go (https://, or http:// on loopback)."""
    base = (env.get("OPENAI_API_BASE") or "https://api.openai.com/v1").rstrip("/")
    if not base.startswith(("https://", "http://")) or not urlsplit(base).hostname:
        raise ConfigError(f"OPENAI_API_BASE must be an https:// URL like https://api.openai.com/v1, got {base!r}")
    if base.startswith("http://") and not _is_loopback(base):
        raise ConfigError(f"OPENAI_API_BASE must use https:// (plain http only on loopback), got {base!r}")
    return base


def derive_caller_key_secret(stream_secret: bytes) -> bytes:
    """The caller-key secret when none is configured: the same on every instance sharing the stream secret."""
    return hmac.new(stream_secret, b"relay-caller-key", hashlib.sha256).digest()


def _webhook_settings(env: Mapping[str, str]) -> dict[str, object]:
    """RELAY_WEBHOOK_* (the post-call webhook, relay/webhooks.py): a URL needs a secret to sign with."""
    raw_url = (env.get("RELAY_WEBHOOK_URL") or "").strip()
    url = read_http_url(raw_url, "RELAY_WEBHOOK_URL") if raw_url else None
    raw_secret = env.get("RELAY_WEBHOOK_SECRET") or ""
    secret = b""
    if raw_secret:
        try:
            secret = decode_secret(raw_secret)
        except SecretError as exc:
            raise ConfigError(f"RELAY_WEBHOOK_SECRET {exc}") from None
    if url and not secret:
        raise ConfigError(
            "RELAY_WEBHOOK_URL needs RELAY_WEBHOOK_SECRET to sign the deliveries with "
            "(whsec_ followed by `openssl rand -base64 32`)"
        )
    backoff = read_float(env, "RELAY_WEBHOOK_BACKOFF", 10.0, 0.01)
    backoff_max = read_float(env, "RELAY_WEBHOOK_BACKOFF_MAX", 1800.0, 0.01)
    if backoff_max < backoff:
        raise ConfigError(f"RELAY_WEBHOOK_BACKOFF_MAX ({backoff_max:g}) must be >= RELAY_WEBHOOK_BACKOFF ({backoff:g})")
    return {
        "webhook_url": url,
        "webhook_secret": secret,
        "webhook_timeout_s": read_float(env, "RELAY_WEBHOOK_TIMEOUT", 5.0, 0.1),
        "webhook_backoff_s": backoff,
        "webhook_backoff_max_s": backoff_max,
    }


def _drain_mode(env: Mapping[str, str]) -> str:
    """RELAY_DRAIN_MODE, "handoff" by default with Redis (only then can another instance resume a call)."""
    has_redis = bool(env.get("REDIS_URL"))
    mode = read_choice(env, "RELAY_DRAIN_MODE", "handoff" if has_redis else "goodbye", ("goodbye", "handoff"))
    if mode == "handoff" and not has_redis:
        raise ConfigError("RELAY_DRAIN_MODE=handoff needs REDIS_URL: other instances resume calls from Redis")
    return mode


def _optional_e164(env: Mapping[str, str], name: str) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if not E164.fullmatch(raw):
        raise ConfigError(f"{name} must be an E.164 number like +15550001111, got {raw[:32]!r}")
    return raw


def _ring_timeout(env: Mapping[str, str]) -> int:
    seconds = read_int(env, "RELAY_OUTBOUND_RING_TIMEOUT", 30, 5)
    if seconds > 600:
        raise ConfigError(f"RELAY_OUTBOUND_RING_TIMEOUT must be at most 600 (Twilio's limit), got {seconds}")
    return seconds


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
    # SIP mode (relay/sip): OpenAI's REST API for accept/reject/refer/hangup, and the secret its
    # project webhook (POST /openai/webhook) is signed with; without the secret SIP mode is off
    openai_api_base: str = "https://api.openai.com/v1"
    openai_webhook_secret: str | None = None
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
    apology_say: str = (
        "Sorry, we are having technical difficulties and cannot continue this call right now. Please call again later."
    )
    drain_mode: str = "goodbye"  # "handoff": on SIGTERM each call moves to another instance (needs Redis)
    handoff_max_wait_s: float = 3.0  # a hand-off waits this long at most for a natural pause
    max_continuations: int = 3  # per call per CONTINUATION_WINDOW_S: beyond it the apology (a loop guard)
    outbound_from: str | None = None  # the caller ID of POST /calls when the request names none
    max_outbound_calls: int = 10  # outbound calls in progress at once, across all instances
    outbound_per_minute: int = 30  # outbound calls placed per minute, across all instances
    outbound_ring_timeout_s: int = 30  # how long an outbound call rings before it is no-answer
    recording: str = "off"  # "dual": every call is recorded, one channel per party (a profile may differ)
    relay_api_token: str | None = None
    console_token: str | None = None  # RELAY_CONSOLE_TOKEN: the operations console's sign-in (off without it)
    console_session_s: int = 8 * 3600  # how long a console sign-in lasts
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
    webhook_url: str | None = None  # the post-call webhook (a profile's webhook_url overrides it)
    webhook_secret: bytes = b""  # its signing key (decoded from whsec_<base64>, or the raw secret's bytes)
    webhook_timeout_s: float = 5.0
    webhook_backoff_s: float = 10.0  # the first retry's delay; doubled per attempt, with jitter
    webhook_backoff_max_s: float = 1800.0  # no retry waits longer (Retry-After included)

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
        check_secrets(env)
        insecure = read_bool(env, "RELAY_INSECURE_DEV", False)
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
        dialect = read_choice(env, "OPENAI_REALTIME_DIALECT", "ga", ("ga", "beta"))
        upstream = _provider_settings(env, dialect)
        vad_type = read_choice(env, "RELAY_VAD", "server_vad", ("server_vad", "semantic_vad", "none"))
        idle = read_int(env, "RELAY_VAD_IDLE_TIMEOUT_MS", 0)
        vad = VadSettings(
            type=vad_type,  # type: ignore[arg-type]
            threshold=read_float(env, "RELAY_VAD_THRESHOLD", 0.5),
            prefix_padding_ms=read_int(env, "RELAY_VAD_PREFIX_PADDING_MS", 300),
            silence_duration_ms=read_int(env, "RELAY_VAD_SILENCE_MS", 500),
            eagerness=read_choice(env, "RELAY_VAD_EAGERNESS", "auto", ("low", "medium", "high", "auto")),
            idle_timeout_ms=idle or None,
        )
        if not 0.0 <= vad.threshold <= 1.0:
            raise ConfigError("RELAY_VAD_THRESHOLD must be between 0 and 1")
        dtmf = DtmfSettings(
            terminator=env.get("RELAY_DTMF_TERMINATOR", "#").strip(),
            timeout_ms=read_int(env, "RELAY_DTMF_TIMEOUT_MS", 2000, 100),
            max_digits=read_int(env, "RELAY_DTMF_MAX_DIGITS", 20, 1),
            interrupt=read_bool(env, "RELAY_DTMF_INTERRUPT", True),
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
        resume_line = env.get("RELAY_RESUME_LINE", "").strip()
        check_resume_line(resume_line, "RELAY_RESUME_LINE")
        # On Azure the name is a deployment, which no default can guess: off until one is named.
        default_transcription = "" if upstream["provider"] == "azure" else models.DEFAULT_TRANSCRIPTION_MODEL
        voice = env.get("RELAY_VOICE") or models.DEFAULT_VOICE[dialect]
        speed = read_float(env, "RELAY_VOICE_SPEED", 1.0, 0.25)
        check_voice(dialect, voice, speed, voice_key="RELAY_VOICE", speed_key="RELAY_VOICE_SPEED")
        agent = AgentSettings(
            instructions=env.get("RELAY_INSTRUCTIONS", DEFAULT_INSTRUCTIONS),
            greeting=greeting or None,
            resume_line=resume_line or None,
            voice=voice,
            speed=speed,
            vad=vad,
            dtmf=dtmf,
            transcription_model=env.get("RELAY_TRANSCRIPTION_MODEL", default_transcription) or None,
            noise_reduction=read_choice(env, "RELAY_NOISE_REDUCTION", "near_field", ("near_field", "far_field", "off")),
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
            price = read_float(env, f"RELAY_PRICE_{kind.upper()}_PER_1K", -1.0, -1.0)
            if price >= 0:
                prices[kind] = price
        return cls(
            dialect=dialect,  # type: ignore[arg-type]
            **upstream,  # type: ignore[arg-type]
            openai_api_base=_api_base(env),
            openai_webhook_secret=env.get("OPENAI_WEBHOOK_SECRET") or None,
            redis_url=read_redis_url(env),
            redis_prefix=env.get("RELAY_REDIS_PREFIX", "relay:"),
            twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
            twilio_auth_token=auth_token,
            twilio_api_base=env.get("TWILIO_API_BASE") or None,
            public_url=public_url,
            host=env.get("HOST", "0.0.0.0"),
            port=read_port(env),
            insecure_dev=insecure,
            stream_secret=stream_secret,
            caller_key_secret=caller_key_secret,
            stream_token_ttl_s=read_int(env, "RELAY_STREAM_TOKEN_TTL", 60, 5),
            start_timeout_s=read_float(env, "RELAY_START_TIMEOUT", 5.0, 0.1),
            max_pending_streams=read_int(env, "RELAY_MAX_PENDING_STREAMS", 64, 1),
            session_update_timeout_s=read_float(env, "RELAY_SESSION_UPDATE_TIMEOUT", 10.0, 0.1),
            log_level=read_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
            agent=agent,
            profiles_file=env.get("RELAY_PROFILES") or None,
            handler_modules=modules,
            tool_timeout_s=read_float(env, "RELAY_TOOL_TIMEOUT", 10.0, 0.01),
            end_call_mark_timeout_s=read_float(env, "RELAY_END_CALL_TIMEOUT", 8.0, 0.01),
            max_calls=read_int(env, "MAX_CALLS", 100, 1),
            drain_seconds=read_float(env, "DRAIN_SECONDS", 30.0),
            overflow_say=env.get("RELAY_OVERFLOW_SAY", cls.overflow_say),
            overflow_dial=env.get("RELAY_OVERFLOW_DIAL") or None,
            fallback_number=env.get("RELAY_FALLBACK_NUMBER") or None,
            apology_say=env.get("RELAY_APOLOGY_SAY") or cls.apology_say,
            max_continuations=read_int(env, "RELAY_MAX_CONTINUATIONS", 3, 0),
            outbound_from=_optional_e164(env, "RELAY_OUTBOUND_FROM"),
            max_outbound_calls=read_int(env, "RELAY_MAX_OUTBOUND_CALLS", 10, 1),
            outbound_per_minute=read_int(env, "RELAY_OUTBOUND_PER_MINUTE", 30, 1),
            outbound_ring_timeout_s=_ring_timeout(env),
            recording=read_choice(env, "RELAY_RECORDING", "off", ("off", "dual")),
            drain_mode=_drain_mode(env),
            handoff_max_wait_s=read_float(env, "RELAY_HANDOFF_MAX_WAIT", 3.0, 0.0),
            relay_api_token=env.get("RELAY_API_TOKEN") or None,
            console_token=env.get("RELAY_CONSOLE_TOKEN") or None,
            console_session_s=read_int(env, "RELAY_CONSOLE_SESSION_TTL", 8 * 3600, 60),
            state_ttl_s=read_int(env, "RELAY_STATE_TTL", 7 * 24 * 3600, 60),
            caller_memory=read_bool(env, "RELAY_CALLER_MEMORY", True),
            caller_memory_ttl_s=read_int(env, "RELAY_CALLER_MEMORY_TTL", 30 * 24 * 3600, 60),
            summary_max_turns=read_int(env, "RELAY_SUMMARY_MAX_TURNS", 24, 2),
            summary_max_tokens=read_int(env, "RELAY_SUMMARY_MAX_TOKENS", 6000, 100),
            summary_keep_turns=read_int(env, "RELAY_SUMMARY_KEEP_TURNS", 6, 0),
            session_max_s=read_float(env, "RELAY_SESSION_MAX_SECONDS", 55 * 60.0, 1.0),
            reconnect_attempts=read_int(env, "RELAY_RECONNECT_ATTEMPTS", 3, 0),
            reconnect_backoff_s=read_float(env, "RELAY_RECONNECT_BACKOFF", 0.25),
            store_queue_size=read_int(env, "RELAY_STORE_QUEUE", 10_000, 10),
            max_twilio_message_bytes=read_int(env, "RELAY_MAX_TWILIO_MESSAGE", 64 * 1024, 1024),
            max_upstream_message_bytes=read_int(env, "RELAY_MAX_UPSTREAM_MESSAGE", 8 * 1024 * 1024, 64 * 1024),
            max_webhook_body_bytes=read_int(env, "RELAY_MAX_WEBHOOK_BODY", 64 * 1024, 1024),
            max_http_header_bytes=read_int(env, "RELAY_MAX_HTTP_HEADER", 32 * 1024, 1024),
            max_url_bytes=read_int(env, "RELAY_MAX_URL", 8 * 1024, 256),
            http_idle_timeout_s=read_float(env, "RELAY_HTTP_IDLE_TIMEOUT", 10.0, 0.1),
            max_dtmf_per_second=read_float(env, "RELAY_MAX_DTMF_PER_SECOND", 10.0, 0.1),
            ws_ping_interval_s=read_float(env, "RELAY_WS_PING_INTERVAL", 20.0, 0.05),
            ws_ping_timeout_s=read_float(env, "RELAY_WS_PING_TIMEOUT", 20.0, 0.05),
            twilio_ping_interval_s=read_float(env, "RELAY_TWILIO_PING_INTERVAL", 20.0, 0.05),
            twilio_ping_timeout_s=read_float(env, "RELAY_TWILIO_PING_TIMEOUT", 20.0, 0.05),
            price_per_1k_tokens=prices,
            metrics_enabled=read_bool(env, "RELAY_METRICS", True),
            **_webhook_settings(env),  # type: ignore[arg-type]
        )
