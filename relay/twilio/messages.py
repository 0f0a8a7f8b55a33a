"""Twilio Media Streams messages: parse what Twilio sends, build what we send back.

Outbound messages are assembled as strings around the untouched base64 payload: the
payload alphabet needs no JSON escaping, so the hot path never re-encodes audio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# A media frame in exactly the compact layout Twilio sends (shared/PROTOCOLS.md §3). A frame this
# matches is valid JSON with a non-empty base64-alphabet payload, so it needs no JSON parser: one
# pass of a regex instead of orjson, a dict walk and a second pass for the payload, 50 times a
# second per call. Any other layout (field order, spaces, escapes) takes the general path.
_MEDIA_FRAME = re.compile(
    r'\{"event":"media","sequenceNumber":"[0-9]{1,19}","media":\{"track":"(inbound|outbound)",'
    r'"chunk":"[0-9]{1,19}","timestamp":"[0-9]{1,19}","payload":"([A-Za-z0-9+/]+={0,2})"\},'
    r'"streamSid":"[A-Za-z0-9]{2,64}"\}'
)
_SID = re.compile(r"[A-Za-z0-9]{2,64}")
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class MalformedMessage(ValueError):
    """A frame from Twilio that cannot be understood; the call goes on without it."""


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    encoding: str
    sample_rate: int


@dataclass(slots=True)  # not frozen: built for every frame, and a frozen __init__ costs 4x as much
class Media:
    payload: str
    track: str


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Stop:
    call_sid: str


@dataclass(frozen=True, slots=True)
class Unknown:
    event: str


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop | Unknown


def is_base64(value: str) -> bool:
    return len(value) % 4 == 0 and _BASE64.fullmatch(value) is not None


def _obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise MalformedMessage(f"{key!r} must be an object")
    return value


def _str(obj: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    raise MalformedMessage(f"{key!r} must be a string")


def parse(raw: str | bytes) -> TwilioEvent:
    """Parse one Media Streams text frame into a typed event.

    Raises MalformedMessage for invalid JSON or a known event with wrong fields.
    """
    if type(raw) is str:
        match = _MEDIA_FRAME.fullmatch(raw)
        if match is not None and len(match[2]) % 4 == 0:
            return Media(match[2], match[1])
    return parse_json(raw)


def parse_json(raw: str | bytes) -> TwilioEvent:
    """`parse` without the fast path for Twilio's own media layout (the same results for every input)."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"invalid JSON: {exc.msg}") from None
    if not isinstance(msg, dict):
        raise MalformedMessage("message is not a JSON object")
    event = msg.get("event")
    if not isinstance(event, str):
        raise MalformedMessage("missing 'event'")
    if event == "media":
        media = _obj(msg, "media")
        payload = media.get("payload")
        if not isinstance(payload, str) or not payload or not is_base64(payload):
            raise MalformedMessage("media.payload must be non-empty base64")
        track = media.get("track")
        return Media(payload, track if isinstance(track, str) else "inbound")
    if event == "mark":
        name = _str(_obj(msg, "mark"), "name")
        return Mark(name)
    if event == "dtmf":
        digit = _str(_obj(msg, "dtmf"), "digit")
        if digit not in DTMF_DIGITS:
            raise MalformedMessage("dtmf.digit must be one of 0-9 * # A-D")
        return Dtmf(digit)
    if event == "start":
        start = _obj(msg, "start")
        stream_sid = _str(start, "streamSid", required=False) or _str(msg, "streamSid")
        call_sid = _str(start, "callSid")
        if not _SID.fullmatch(stream_sid) or not _SID.fullmatch(call_sid):
            raise MalformedMessage("start.streamSid / start.callSid are not SIDs")
        params_raw = start.get("customParameters") or {}
        if not isinstance(params_raw, dict):
            raise MalformedMessage("start.customParameters must be an object")
        params = {str(k): v for k, v in params_raw.items() if isinstance(v, str)}
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict):
            raise MalformedMessage("start.mediaFormat must be an object")
        encoding = fmt.get("encoding", "audio/x-mulaw")
        rate = fmt.get("sampleRate", 8000)
        return Start(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=_str(start, "accountSid", required=False),
            custom_parameters=params,
            encoding=encoding if isinstance(encoding, str) else "",
            sample_rate=rate if isinstance(rate, int) else 0,
        )
    if event == "stop":
        stop = msg.get("stop")
        call_sid = stop.get("callSid", "") if isinstance(stop, dict) else ""
        return Stop(call_sid if isinstance(call_sid, str) else "")
    if event == "connected":
        protocol = msg.get("protocol")
        return Connected(protocol if isinstance(protocol, str) else "")
    return Unknown(event[:64])


class Outbound:
    """Builds the messages we send on one stream; the streamSid is baked in once."""

    __slots__ = ("_clear", "_mark_prefix", "_media_prefix", "stream_sid")

    def __init__(self, stream_sid: str) -> None:
        if not _SID.fullmatch(stream_sid):
            raise ValueError("stream SID must be alphanumeric")
        self.stream_sid = stream_sid
        self._media_prefix = '{"event":"media","streamSid":"' + stream_sid + '","media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":"' + stream_sid + '","mark":{"name":"'
        self._clear = '{"event":"clear","streamSid":"' + stream_sid + '"}'

    def media(self, payload: str) -> str:
        """payload must already be base64 (checked where it enters the relay)."""
        return self._media_prefix + payload + '"}}'

    def mark(self, name: str) -> str:
        """name is one of the relay's own mark names (``<generation>.<seq>``), never text from a peer."""
        return self._mark_prefix + name + '"}}'

    def clear(self) -> str:
        return self._clear
