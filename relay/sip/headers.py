"""The ``realtime.call.incoming`` webhook's body, read strictly: its SIP headers are the caller's
provider's to set and trusted for nothing but choosing a profile and naming the caller.

Numbers are taken only from ``tel:+…`` or ``sip:+…@host`` URIs and only in E.164 form; every
length is bounded, and anything else reads as no number at all (/work/shared/PROTOCOLS.md §14).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from relay.agent_settings import AgentSettings
from relay.profiles import Profiles

MAX_HEADERS = 64
MAX_HEADER_NAME = 64
MAX_HEADER_VALUE = 512
PROFILE_HEADER = "x-relay-profile"
CALL_ID = re.compile(r"[A-Za-z0-9_-]{2,64}")  # OpenAI's rtc_… ids; also the call's SID in the store
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class MalformedWebhook(ValueError):
    """The body is not a realtime.call.incoming event this relay can act on."""


@dataclass(frozen=True)
class IncomingCall:
    call_id: str
    caller: str  # E.164 from the From header, or "" when it carries none
    called: str  # E.164 from the To header, or ""
    profile_header: str | None  # a well-formed X-Relay-Profile value, else None
    sip_call_id: str  # the Call-ID header (bounded), for log lines only


def number_of(value: str) -> str:
    """The E.164 number of a From/To header value (``"Name" <sip:+1…@host>;tag=…``, ``<tel:+1…>``,
    ``tel:+1…``), or "" when it holds anything else."""
    if len(value) > MAX_HEADER_VALUE:
        return ""
    if "<" in value:
        start = value.index("<") + 1
        end = value.find(">", start)
        if end < 0:
            return ""
        uri = value[start:end]
    else:
        uri = value.strip().split(";", 1)[0]
    uri = uri.split(";", 1)[0].strip()
    scheme, sep, rest = uri.partition(":")
    if not sep:
        return ""
    scheme = scheme.lower()
    if scheme == "tel":
        user = rest
    elif scheme in ("sip", "sips"):
        user, at, host = rest.partition("@")
        if not at or not _HOST.fullmatch(host.rsplit(":", 1)[0] if host.count(":") == 1 else host):
            return ""
    else:
        return ""
    return user if _E164.fullmatch(user) else ""


def parse_incoming(body: bytes) -> tuple[str, IncomingCall | None]:
    """(event type, the call) of a verified webhook body; the call is None for other event types.
    Raises MalformedWebhook for a body that is not a well-formed event."""
    try:
        event: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedWebhook("body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise MalformedWebhook("body is not an event")
    kind: str = event["type"][:100]
    if kind != "realtime.call.incoming":
        return kind, None
    data = event.get("data")
    if not isinstance(data, dict):
        raise MalformedWebhook("data is missing")
    call_id = data.get("call_id")
    if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
        raise MalformedWebhook("data.call_id is missing or malformed")
    raw_headers = data.get("sip_headers")
    if not isinstance(raw_headers, list):
        raise MalformedWebhook("data.sip_headers is missing")
    first: dict[str, str] = {}
    for header in raw_headers[:MAX_HEADERS]:
        if not isinstance(header, dict):
            continue
        name, value = header.get("name"), header.get("value")
        if not isinstance(name, str) or not isinstance(value, str) or len(name) > MAX_HEADER_NAME:
            continue
        first.setdefault(name.lower(), value[: MAX_HEADER_VALUE + 1])  # repeats: the first one counts
    profile = first.get(PROFILE_HEADER, "").strip()
    return kind, IncomingCall(
        call_id=call_id,
        caller=number_of(first.get("from", "")),
        called=number_of(first.get("to", "")),
        profile_header=profile if _PROFILE_NAME.fullmatch(profile) else None,
        sip_call_id=first.get("call-id", "")[:128],
    )


def choose_profile(profiles: Profiles, call: IncomingCall) -> tuple[AgentSettings, str]:
    """The call's profile and how it was chosen: an ``X-Relay-Profile`` header naming a profile that
    allows it, else the called number (``To``), else the default profile."""
    if call.profile_header is not None:
        named = profiles.by_name.get(call.profile_header)
        if named is not None and named.allow_sip_profile_header:
            return named, "header"
    if call.called:
        return profiles.for_number(call.called), "number"
    return profiles.default, "default"
