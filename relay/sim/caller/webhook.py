"""The call before the stream: Twilio's signed voice webhook and the TwiML that answers it.

The form is the one Twilio posts for a ringing inbound call, every field signed over the public
URL; only a ``<Connect><Stream>`` opens a bidirectional stream, ``<Start><Stream>`` is a fork
(/work/shared/PROTOCOLS.md §1, §2). The stream URL names the public host, which a proxy would map
to where the relay really listens.
"""

from __future__ import annotations

import functools
import ssl
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from twilio.request_validator import RequestValidator

from relay.sim.caller.config import CallerConfig

WEBHOOK_PATH = "/incoming-call"
# Twilio identifies itself with this; a relay that logs user agents sees the real thing.
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every request: building one loads the CA bundle, about 28 ms of CPU, which
    twenty calls failing over at once would otherwise pay twice each."""
    return httpx.create_ssl_context()


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10.0, verify=_tls())


class CallRejected(RuntimeError):
    """The voice webhook did not answer 200, so Twilio would never open a stream."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"webhook answered {status}: {body[:200]!r}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class TwimlStream:
    """The bidirectional stream a ``<Connect><Stream>`` asks Twilio to open."""

    url: str
    parameters: dict[str, str]


def webhook_form(config: CallerConfig, call_sid: str) -> dict[str, str]:
    """The form Twilio posts for a ringing inbound call (every field is signed)."""
    form = {
        "CallSid": call_sid,
        "AccountSid": config.account_sid,
        "From": config.from_number,
        "To": config.to_number,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
        "Caller": config.from_number,
        "Called": config.to_number,
    }
    form.update(config.extra_form)
    return form


async def post_webhook(config: CallerConfig, form: dict[str, str]) -> tuple[int, str]:
    """POST the signed voice webhook; the signature covers the public URL, not base_url."""
    signature = RequestValidator(config.auth_token).compute_signature(config.public_base + WEBHOOK_PATH, form)
    headers = {"X-Twilio-Signature": signature, "User-Agent": WEBHOOK_USER_AGENT}
    url = config.base_url.rstrip("/") + WEBHOOK_PATH
    async with _client() as client:
        response = await client.post(url, data=form, headers=headers)
    return response.status_code, response.text


def redirect_form(config: CallerConfig, call_sid: str) -> dict[str, str]:
    """The form Twilio posts for a <Redirect> of a call in progress (every field is signed)."""
    form = {**webhook_form(config, call_sid), "CallStatus": "in-progress"}
    form.update(config.extra_form)
    return form


async def post_redirect(config: CallerConfig, public_url: str, form: dict[str, str]) -> tuple[int, str]:
    """POST a <Redirect> the way Twilio does: signed over the URL in the TwiML (the public one), sent
    to where the relay really listens."""
    signature = RequestValidator(config.auth_token).compute_signature(public_url, form)
    headers = {"X-Twilio-Signature": signature, "User-Agent": WEBHOOK_USER_AGENT}
    parts = urlsplit(public_url)
    url = config.base_url.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
    async with _client() as client:
        response = await client.post(url, data=form, headers=headers)
    return response.status_code, response.text


def redirect_after_stream(body: str) -> str | None:
    """The URL of the <Redirect> Twilio follows once the <Connect><Stream> ends, if the TwiML has one."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    verbs = list(root) if root.tag == "Response" else []
    for index, verb in enumerate(verbs):
        if verb.tag == "Connect":
            for later in verbs[index + 1 :]:
                if later.tag == "Redirect" and (later.text or "").strip():
                    return (later.text or "").strip()
            return None
    return None


def parse_twiml(body: str) -> TwimlStream:
    """Find the bidirectional stream; ``<Start><Stream>`` is fork-only and does not count."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"TwiML is not XML: {exc}") from None
    stream = root.find("./Connect/Stream") if root.tag == "Response" else None
    url = stream.get("url") if stream is not None else None
    if stream is None or not url:
        raise ValueError("TwiML has no <Connect><Stream url=...>")
    parameters: dict[str, str] = {}
    for param in stream.findall("Parameter"):
        name = param.get("name")
        if name is not None:
            parameters[name] = param.get("value", "")
    return TwimlStream(url=url, parameters=parameters)


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    return (parts.hostname or "").lower(), parts.port or (443 if secure else 80)


def dial_url(config: CallerConfig, stream_url: str) -> str:
    """Where to really connect: the public host is mapped to base_url, as a proxy would."""
    target = _origin(stream_url)
    if target not in (_origin(config.public_base), _origin(config.base_url)):
        return stream_url
    base = urlsplit(config.base_url)
    scheme = "wss" if base.scheme in ("https", "wss") else "ws"
    parts = urlsplit(stream_url)
    return urlunsplit((scheme, base.netloc, parts.path, parts.query, ""))
