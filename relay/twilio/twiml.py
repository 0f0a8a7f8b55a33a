"""TwiML answers to the voice webhook, built with twilio's own VoiceResponse."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

CONTINUE_PATH = "/continue-call"


def stream_url(public_base: str, path: str = "/media-stream") -> str:
    """wss:// for https:// bases (production); ws:// for plain http (local development)."""
    parts = urlsplit(public_base)
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def continue_url(public_base: str) -> str:
    """Where Twilio asks what to do once a stream ended without the call ending."""
    return public_base.rstrip("/") + CONTINUE_PATH


def connect_stream(url: str, parameters: Mapping[str, str], *, then: str | None = None) -> str:
    """<Connect><Stream> with <Parameter>s. Twilio runs the TwiML after </Connect> once the stream
    ends without the call ending (our side closed it, or the connection dropped): with ``then``,
    a <Redirect> (POST) there, so the caller is never left on a line with nobody behind it."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    if then:
        response.redirect(then, method="POST")
    return str(response.to_xml())


def hangup() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response.to_xml())


def apology(message: str, fallback_number: str | None) -> str:
    """Spoken ``message``, then the fallback number dialled when there is one, else a hang-up."""
    response = VoiceResponse()
    response.say(message)
    if fallback_number:
        dial_verb = Dial()
        dial_verb.number(fallback_number)
        response.append(dial_verb)
    else:
        response.hangup()
    return str(response.to_xml())


def say_and_hangup(message: str) -> str:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response.to_xml())


def dial(
    number: str, *, say_first: str | None = None, caller_id: str | None = None, whisper_url: str | None = None
) -> str:
    """<Dial> a number (``<Number>``) or a SIP URI (``<Sip>``); ``whisper_url`` serves TwiML played to
    the callee before they are connected."""
    response = VoiceResponse()
    if say_first:
        response.say(say_first)
    dial_verb = Dial(caller_id=caller_id) if caller_id else Dial()
    noun = dial_verb.sip if number.startswith("sip:") else dial_verb.number  # a SIP URI, or a phone number
    if whisper_url:
        noun(number, url=whisper_url, method="POST")
    else:
        noun(number)
    response.append(dial_verb)
    return str(response.to_xml())


def say_only(message: str) -> str:
    response = VoiceResponse()
    response.say(message)
    return str(response.to_xml())
