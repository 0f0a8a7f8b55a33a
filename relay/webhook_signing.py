"""Standard Webhooks signing of the relay's outgoing webhooks (github.com/standard-webhooks).

Each delivery carries ``webhook-id`` (one per event, the same on every retry: the receiver's
idempotency key), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,`` + base64 of HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``, keyed with the secret's bytes.
The secret is written ``whsec_<base64>`` (the key is the decoded part, as both the reference library
and OpenAI's verifier read it) or as raw text, whose UTF-8 bytes are the key (as OpenAI's verifier
reads a secret without the prefix; for the reference library write it ``whsec_`` + its base64).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 32  # the project's rule for every HMAC key; Standard Webhooks asks for at least 24


class SecretError(ValueError):
    """The secret cannot be used as a signing key (the message never repeats it)."""


def decode_secret(raw: str) -> bytes:
    """The signing key of a ``whsec_<base64>`` or raw secret; raises SecretError when too short or malformed."""
    value = raw.strip()
    if value.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(value[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise SecretError("is not valid base64 after whsec_") from None
        form = "decodes to"
    else:
        key = value.encode()
        form = "is"
    if len(key) < MIN_KEY_BYTES:
        raise SecretError(
            f"{form} {len(key)} bytes; the key must be at least {MIN_KEY_BYTES} random bytes "
            "(e.g. whsec_ followed by `openssl rand -base64 32`)"
        )
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one delivery attempt of a JSON body."""
    if "." in msg_id:
        raise ValueError("a webhook id must not contain '.'")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
        "content-type": "application/json",
    }
