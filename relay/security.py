"""Who may start a call: Twilio request signatures and our short-lived stream tokens.

A stream token binds one Media Stream to the call SID it was minted for in the TwiML:
``v1.<expiry>.<hmac>``, HMAC-SHA256 over ``<call_sid>.<expiry>`` with a server secret
that every instance shares. It costs an attacker nothing to open a WebSocket, so the
token is checked before any (billed) Realtime session exists.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator, get_signature_algorithm

TOKEN_VERSION = "v1"
MAX_TOKEN_LENGTH = 200


class InvalidSignature(Exception):
    """X-Twilio-Signature is missing or does not match the request."""


class StreamTokenError(Exception):
    """The stream token cannot admit this stream."""


class StreamTokenInvalid(StreamTokenError):
    pass


class StreamTokenExpired(StreamTokenError):
    pass


def _mac(secret: bytes, call_sid: str, expiry: int) -> str:
    digest = hmac.new(secret, f"{call_sid}.{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mint_stream_token(secret: bytes, call_sid: str, ttl_s: int, *, now: float | None = None) -> str:
    expiry = int((time.time() if now is None else now) + ttl_s)
    return f"{TOKEN_VERSION}.{expiry}.{_mac(secret, call_sid, expiry)}"


def verify_stream_token(secret: bytes, call_sid: str, token: str, *, now: float | None = None) -> int:
    """Returns the token's expiry (epoch seconds) or raises StreamTokenError."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise StreamTokenInvalid("missing or oversized token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION or not parts[1].isdigit():
        raise StreamTokenInvalid("malformed token")
    expiry = int(parts[1])
    expected = _mac(secret, call_sid, expiry)
    if not hmac.compare_digest(expected.encode(), parts[2].encode()):
        raise StreamTokenInvalid("token does not match this call")
    if (time.time() if now is None else now) > expiry:
        raise StreamTokenExpired("token expired")
    return expiry


def public_request_url(public_base: str | None, seen_url: str) -> str:
    """The URL Twilio signed: PUBLIC_URL's scheme and host with the path and query we received.

    Behind a proxy the app sees an internal address; Twilio signed the public one.
    """
    if not public_base:
        return seen_url
    base = urlsplit(public_base)
    seen = urlsplit(seen_url)
    path = base.path.rstrip("/") + seen.path
    return urlunsplit((base.scheme, base.netloc, path, seen.query, ""))


def check_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str],
    signature: str | None,
    *,
    settings_header: str | None = None,
    signing_key: str | None = None,
) -> None:
    """Raises InvalidSignature unless ``signature`` is Twilio's signature of url + params.

    SHA-1 with the auth token by default; when Twilio announces a SharedKey signature
    (X-Twilio-Webhooks-Signature-Settings) the configured signing key and algorithm are used.
    """
    if not signature:
        raise InvalidSignature("missing X-Twilio-Signature")
    algorithm = get_signature_algorithm(settings_header)
    secret = signing_key if (settings_header and signing_key) else auth_token
    validator = RequestValidator(secret)
    try:
        ok = validator.validate(url, dict(params), signature, algorithm=algorithm)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidSignature("X-Twilio-Signature does not match")
