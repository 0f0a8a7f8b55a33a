"""Reading one environment variable as a checked value, and refusing weak or placeholder secrets.

Every reader raises ``ConfigError`` naming the variable, so a bad deployment stops at start-up with
one line instead of failing later in a worker. ``relay.config`` builds ``Settings`` from these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit


class ConfigError(ValueError):
    """A setting is missing or has a value the relay cannot run with."""


# A phone number as E.164 writes it: "+", a country code that does not start with 0, at most 15 digits.
E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def read_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def read_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
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


def read_float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
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


def read_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


# Every secret the relay reads from the environment, with the fewest bytes it accepts (0: any length).
# A value shipped as a placeholder in this repository's examples is refused whatever its length.
SECRET_ENV: dict[str, int] = {
    "OPENAI_API_KEY": 0,
    "AZURE_OPENAI_API_KEY": 0,
    "AZURE_OPENAI_AD_TOKEN": 0,
    "TWILIO_AUTH_TOKEN": 0,
    "RELAY_STREAM_SECRET": 32,
    "RELAY_API_TOKEN": 32,
    "RELAY_CONSOLE_TOKEN": 32,
    "RELAY_CALLER_KEY_SECRET": 32,
    "RELAY_WEBHOOK_SECRET": 32,
    "OPENAI_WEBHOOK_SECRET": 24,  # Standard Webhooks: at least 24 random bytes
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


def check_secrets(env: Mapping[str, str]) -> None:
    """Refuse every secret in ``SECRET_ENV`` that is set to a placeholder or is shorter than its minimum."""
    for name, min_bytes in SECRET_ENV.items():
        _secret(env, name, min_bytes)


def read_http_url(value: str, name: str) -> str:
    """An http:// or https:// URL with a host (a webhook's target), as given; ConfigError naming `name`."""
    url = value.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL, got {url[:64]!r}") from None
    if parts.username or parts.password:
        raise ConfigError(f"{name} must not carry credentials in the URL (the deliveries are signed instead)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, got {url[:64]!r}")
    return url


def read_port(env: Mapping[str, str], name: str = "PORT", default: int = 8000) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{name} must be a TCP port between 1 and 65535, got {raw[:32]!r}")
    return int(raw)


def read_redis_url(env: Mapping[str, str], name: str = "REDIS_URL") -> str | None:
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
