"""JSON logs, one object per line, with call and stream SIDs on every call-related line.

- ``configure()`` routes every logger (ours, uvicorn's, libraries') through one handler that
  writes one JSON object per line to stdout, at the configured level.
- Call correlation: ``call_logger()`` adds ``call_sid``/``stream_sid`` explicitly, and
  ``bind_call()`` puts them in a context variable, so any line logged while a call is being
  served — by the relay, a tool, or a library in a task or thread started from it — carries
  them too.
- Secrets and raw audio never reach the output: the finished line is scrubbed of the
  configured secret values (API key, auth token, API token, stream secret), secret-shaped
  strings (``sk-…`` keys, stream tokens, bearer credentials) and long base64 runs (audio).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson

REDACTED = "[redacted]"
# The Media Stream transport's log lines keep the logger name they have always had: operators'
# log filters and alerts know them by it.
TRANSPORT_LOGGER = "relay.bridge"
AUDIO_REDACTED = "[base64 redacted]"
_SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"v\d\.\d{6,}(?:\.[A-Za-z0-9_\-]{16,})+"),  # stream tokens: v2.<expiry>.<nonce>.<mac>
    re.compile(r"(?i)((?:bearer|basic)\s+)[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:[a-z]+\s+)?)[^'\",\s]{8,}"),
]
# Audio: the value of any payload/delta/audio field (a 20 ms µ-law frame is 216 base64 characters,
# also when JSON-escaped inside a message), and any long run of base64 characters without "/"
# (a "/" would also match URL paths, which stay readable).
_AUDIO_FIELD = re.compile(r"""(?i)((?:payload|delta|audio)\\?['"]?\s*[:=]\s*\\?['"])[A-Za-z0-9+/]{16,}={0,2}""")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+]{48,}={0,2}")
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_CALL_FIELDS = ("call_sid", "stream_sid")
# Libraries that log whole frames or request details at DEBUG/INFO: never below these levels.
_QUIET = {
    "websockets": logging.INFO,  # the upstream client: every frame at DEBUG
    "uvicorn.error": logging.INFO,  # uvicorn hands this logger to the WebSocket protocol: frames at DEBUG
    "twilio.http_client": logging.WARNING,  # every REST request's URL and headers at INFO
    "hpack": logging.INFO,
}

_current_call: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("relay_call", default=None)


def bind_call(call_sid: str, stream_sid: str = "") -> None:
    """Tag every log line of the current task (and the tasks and threads it starts later)."""
    _current_call.set((call_sid, stream_sid))


class Redactor(logging.Filter):
    """Scrubs known secret values, secret-shaped strings and base64 audio from text and records."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        values = {s for s in secrets if s and len(s) >= 6}
        # the line is scrubbed after JSON encoding, so a secret's escaped form is looked for too
        values |= {orjson.dumps(s).decode()[1:-1] for s in values}
        self.secrets = sorted(values, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
        text = _AUDIO_FIELD.sub(lambda m: m.group(1) + AUDIO_REDACTED, text)
        return _BASE64_RUN.sub(AUDIO_REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, self.scrub(value))
        return True


class CallContext(logging.Filter):
    """Adds the SIDs bound with ``bind_call()`` to records that do not carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _current_call.get()
        if bound is not None and not getattr(record, "call_sid", ""):
            record.call_sid, record.stream_sid = bound
        return True


# uvicorn (and the websockets protocol it hands its logger to) log every WebSocket handshake and
# every connection's open and close at INFO. The relay logs what matters about each call itself, and
# a client that keeps reconnecting must not buy log lines: these are debug lines here.
_PER_CONNECTION = frozenset(
    {
        '%s - "WebSocket %s" [accepted]',
        '%s - "WebSocket %s" 403',
        '%s - "WebSocket %s" %d',
        "connection open",
        "connection closed",
    }
)


class PerConnectionLines(logging.Filter):
    """Demotes uvicorn's per-connection INFO lines to DEBUG (dropped unless LOG_LEVEL=debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.msg not in _PER_CONNECTION:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; with a redactor, the finished line itself is scrubbed."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key != "color_message":
                entry[key] = value
        if "call_sid" in entry or "stream_sid" in entry:
            for key in _CALL_FIELDS:  # both or neither; unknown (before the stream starts) is null
                entry[key] = entry.get(key) or None
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        line = orjson.dumps(entry, default=str).decode()
        return self.redactor.scrub(line) if self.redactor is not None else line


class CallLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds call_sid / stream_sid to every line about a call."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def call_logger(call_sid: str, stream_sid: str = "", name: str = "relay.call") -> CallLogger:
    return CallLogger(logging.getLogger(name), {"call_sid": call_sid, "stream_sid": stream_sid})


def level_from(raw: str | None) -> str:
    """LOG_LEVEL as configure() takes it, before the settings are read (an unknown value: INFO)."""
    value = (raw or "info").strip().upper()
    return value if value in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO"


def configure(level: str = "INFO", secrets: Iterable[str | None] = (), stream: Any = None) -> None:
    """Route every logger (ours, uvicorn's, libraries') through one JSON handler with the redactor."""
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(redactor))
    handler.addFilter(CallContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.setLevel(logging.NOTSET)
        lg.propagate = True
    connections = logging.getLogger("uvicorn.error")
    for old_filter in [f for f in connections.filters if isinstance(f, PerConnectionLines)]:
        connections.removeFilter(old_filter)
    connections.addFilter(PerConnectionLines())
    for name, floor in _QUIET.items():
        logging.getLogger(name).setLevel(max(floor, numeric))
    logging.captureWarnings(True)
