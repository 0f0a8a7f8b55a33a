"""Outbound calls: ``POST /calls`` places a call whose answer is an ordinary stream of this relay.

The request is checked field by field (a 400 names the field), then the call takes a place under
the cluster-wide cap and rate (``RELAY_MAX_OUTBOUND_CALLS``, ``RELAY_OUTBOUND_PER_MINUTE``, counted
in the store) and is placed with twilio's ``calls.create``: inline TwiML ``<Connect><Stream>`` whose
token names a random reference (the call SID does not exist yet; the store links the two once
Twilio answered the request), status callbacks for ``initiated ringing answered completed`` and
asynchronous answering-machine detection, so the stream starts the moment the callee answers.

The callbacks (status, AMD, recording) are signed Twilio webhooks that may reach any instance; they
are stored on the call's record, and the AMD result is acted on by the instance holding the call's
stream (``Runtime.tell_call``): per the call's voicemail policy, ``hangup`` ends it, ``leave_message``
waits for the end of the greeting (``DetectMessageEnd``) and speaks the message, ``continue`` does
nothing. /work/shared/PROTOCOLS.md §5.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import orjson
from twilio.base.exceptions import TwilioRestException

from relay.agent_settings import AgentSettings
from relay.env import E164
from relay.security import mint_stream_token
from relay.twilio import twiml

if TYPE_CHECKING:
    from relay.runtime import Runtime

log = logging.getLogger("relay.outbound")

REQUEST_KEYS: Final = frozenset(
    {"to", "from", "profile", "context", "voicemail", "voicemail_message", "idempotency_key"}
)
VOICEMAIL_POLICIES: Final = ("hangup", "leave_message", "continue")
MAX_REQUEST_BYTES: Final = 16 * 1024
MAX_CONTEXT_BYTES: Final = 4096  # the context as JSON
MAX_CONTEXT_KEYS: Final = 32
MAX_CONTEXT_KEY_CHARS: Final = 64
MAX_CONTEXT_VALUE_CHARS: Final = 500
MAX_VOICEMAIL_MESSAGE_CHARS: Final = 1000
MAX_IDEMPOTENCY_KEY_CHARS: Final = 200
IDEMPOTENCY_TTL_S: Final = 24 * 3600
STATUS_EVENTS: Final = ("initiated", "ringing", "answered", "completed")
FINAL_STATUSES: Final = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
# What an outbound call that never reached a stream ended with, by its final status.
UNANSWERED_END: Final = {"busy": "busy", "no-answer": "no_answer", "failed": "failed", "canceled": "canceled"}
MACHINE_RESULTS: Final = frozenset({"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other"})
MESSAGE_END_RESULTS: Final = frozenset({"machine_end_beep", "machine_end_silence", "machine_end_other"})
CALL_STATUS_PATH: Final = "/call-status"
AMD_STATUS_PATH: Final = "/amd-status"
RECORDING_STATUS_PATH: Final = "/recording-status"


class BadRequest(ValueError):
    """A POST /calls body the relay refuses; the message names the field."""


@dataclass(frozen=True)
class OutboundRequest:
    """A checked POST /calls body."""

    to: str
    from_: str
    profile: AgentSettings
    context: dict[str, str] = field(default_factory=dict)
    voicemail: str = "hangup"
    voicemail_message: str = ""
    idempotency_key: str | None = None


def _number(value: Any, name: str) -> str:
    if not isinstance(value, str) or not E164.fullmatch(value):
        raise BadRequest(f"{name} must be an E.164 number like +15550001111")
    return value


def parse_request(runtime: Runtime, body: bytes) -> OutboundRequest:
    """The request, checked; BadRequest naming the first field that is wrong."""
    if len(body) > MAX_REQUEST_BYTES:
        raise BadRequest(f"the body is over {MAX_REQUEST_BYTES} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(data) - REQUEST_KEYS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(REQUEST_KEYS))})")
    if "to" not in data:
        raise BadRequest("to is required")
    to = _number(data["to"], "to")
    settings = runtime.settings
    if "from" in data:
        from_ = _number(data["from"], "from")
    elif settings.outbound_from:
        from_ = settings.outbound_from
    else:
        raise BadRequest("from is required (RELAY_OUTBOUND_FROM is not set)")
    profiles = runtime.profiles
    if "profile" in data:
        name = data["profile"]
        if not isinstance(name, str) or (name not in profiles.by_name and name != profiles.default.name):
            raise BadRequest(f"profile must name a configured profile, got {str(name)[:64]!r}")
        profile = profiles.by_name.get(name, profiles.default)
    else:
        profile = profiles.for_number(from_)
    context = _context(data.get("context", {}))
    voicemail = data.get("voicemail", "hangup")
    if voicemail not in VOICEMAIL_POLICIES:
        raise BadRequest(f"voicemail must be one of {', '.join(VOICEMAIL_POLICIES)}")
    message = data.get("voicemail_message", "")
    if not isinstance(message, str) or len(message) > MAX_VOICEMAIL_MESSAGE_CHARS:
        raise BadRequest(f"voicemail_message must be a string of at most {MAX_VOICEMAIL_MESSAGE_CHARS} characters")
    if voicemail == "leave_message" and not message.strip():
        raise BadRequest("voicemail_message is required with voicemail leave_message")
    key = data.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS):
        raise BadRequest(
            f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    return OutboundRequest(to, from_, profile, context, voicemail, message.strip(), key)


def _context(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise BadRequest("context must be an object of short string values")
    if len(raw) > MAX_CONTEXT_KEYS:
        raise BadRequest(f"context has more than {MAX_CONTEXT_KEYS} keys")
    for key, value in raw.items():
        if not key or len(key) > MAX_CONTEXT_KEY_CHARS:
            raise BadRequest(f"context keys must be 1 to {MAX_CONTEXT_KEY_CHARS} characters")
        if not isinstance(value, str) or len(value) > MAX_CONTEXT_VALUE_CHARS:
            name = key[:MAX_CONTEXT_KEY_CHARS]
            raise BadRequest(f"context.{name} must be a string of at most {MAX_CONTEXT_VALUE_CHARS} characters")
    if len(orjson.dumps(raw)) > MAX_CONTEXT_BYTES:
        raise BadRequest(f"context is over {MAX_CONTEXT_BYTES} bytes")
    return dict(raw)


@dataclass(frozen=True)
class Placed:
    """What POST /calls answers: HTTP status and JSON body."""

    status: int
    body: dict[str, str]


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def place(runtime: Runtime, request: OutboundRequest, public_base: str) -> Placed:
    """Place the call (or find the one its idempotency key already placed). Raises what the store
    raised when it could not be asked; nothing was dialled then, and the key is free again."""
    store = runtime.store
    if runtime.twilio_control is None:
        return Placed(503, {"error": "outbound calls need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"})
    key = request.idempotency_key
    if key is None:
        return await _place(runtime, request, public_base)
    existing = await store.claim_idempotency_key(key, IDEMPOTENCY_TTL_S)
    if existing == "":
        return Placed(409, {"error": "a call with this idempotency_key is being placed"})
    if existing is not None:
        record = await store.get_call(existing)
        status = record.meta.get("status", "queued") if record is not None else "queued"
        return Placed(200, {"call_sid": existing, "status": status})
    try:
        placed = await _place(runtime, request, public_base)
    except BaseException:
        with contextlib.suppress(Exception):
            await store.drop_idempotency_key(key)
        raise
    if placed.status == 201:
        await store.set_idempotency_key(key, placed.body["call_sid"], IDEMPOTENCY_TTL_S)
    else:
        await store.drop_idempotency_key(key)
    return placed


async def _place(runtime: Runtime, request: OutboundRequest, public_base: str) -> Placed:
    store, settings = runtime.store, runtime.settings
    control = runtime.twilio_control
    assert control is not None
    ref = secrets.token_urlsafe(16)
    refused = await store.outbound_admit(ref, settings.max_outbound_calls, settings.outbound_per_minute)
    if refused is not None:
        runtime.metrics.outbound_calls.labels(refused).inc()
        what = (
            f"{settings.max_outbound_calls} outbound calls are in progress (RELAY_MAX_OUTBOUND_CALLS)"
            if refused == "cap"
            else f"{settings.outbound_per_minute} outbound calls were placed this minute (RELAY_OUTBOUND_PER_MINUTE)"
        )
        log.warning("outbound call refused: %s", what)
        return Placed(429, {"error": what})
    ttl = settings.outbound_ring_timeout_s + 120  # the token must outlive the ringing and a slow answer
    token = mint_stream_token(settings.stream_secret, ref, ttl, caller=request.from_, called=request.to)
    document = twiml.connect_stream(
        twiml.stream_url(public_base),
        {"token": token, "from": request.from_, "to": request.to, "outbound": ref},
        then=twiml.continue_url(public_base),
    )
    base = public_base.rstrip("/")
    create: dict[str, Any] = {
        "to": request.to,
        "from_": request.from_,
        "twiml": document,
        "timeout": settings.outbound_ring_timeout_s,
        "status_callback": base + CALL_STATUS_PATH,
        "status_callback_event": list(STATUS_EVENTS),
        "status_callback_method": "POST",
        # Asynchronous detection: the stream starts on answer, the result comes later (PROTOCOLS §5).
        "machine_detection": "DetectMessageEnd" if request.voicemail == "leave_message" else "Enable",
        "async_amd": "true",
        "async_amd_status_callback": base + AMD_STATUS_PATH,
        "async_amd_status_callback_method": "POST",
    }
    try:
        call_sid, status = await control.place_call(**create)
    except Exception as exc:
        await store.outbound_done(ref)
        runtime.metrics.outbound_calls.labels("failed").inc()
        if isinstance(exc, TwilioRestException) and exc.status is not None and 400 <= exc.status < 500:
            log.warning("outbound call refused by Twilio (%s %s): %s", exc.status, exc.code, exc.msg)
            return Placed(400, {"error": f"Twilio refused the call: {exc.msg}", "twilio_code": str(exc.code)})
        log.error("outbound call could not be placed (%s)", type(exc).__name__)
        return Placed(502, {"error": "Twilio could not be reached to place the call"})
    await store.link_outbound(ref, call_sid, ttl + 3600)
    store.call_started(
        call_sid,
        {
            "direction": "outbound",
            "from": request.from_,
            "to": request.to,
            "profile": request.profile.name,
            "context": orjson.dumps(request.context).decode(),
            "voicemail": request.voicemail,
            "voicemail_message": request.voicemail_message,
            "outbound_ref": ref,
            "status": status,
            f"status_{status}": _now(),
        },
    )
    runtime.metrics.outbound_calls.labels("placed").inc()
    log.info("outbound call placed to a %d-digit number", len(request.to) - 1, extra={"call_sid": call_sid})
    return Placed(201, {"call_sid": call_sid, "status": "queued"})


async def call_status(runtime: Runtime, form: Mapping[str, str]) -> None:
    """A status callback: stored with its time; a final one frees the call's place under the cap, and
    ends the record of a call that never reached a stream (busy, no answer, failed)."""
    call_sid, status = form["CallSid"], form.get("CallStatus", "")[:32]
    if not status:
        return
    store = runtime.store
    update = {"status": status, f"status_{status}": _now()}
    if status == "completed" and form.get("CallDuration", "").isdigit():
        update["call_duration_s"] = form["CallDuration"]
    if form.get("AnsweredBy"):
        update["answered_by"] = form["AnsweredBy"][:32]
    record = await store.get_call(call_sid)
    meta = record.meta if record is not None else {}
    never_streamed = "started" not in meta
    if status in FINAL_STATUSES:
        ref = meta.get("outbound_ref")
        if ref:
            await store.outbound_done(ref)
        if never_streamed and not meta.get("ended"):
            update.update({"ended": _now(), "end_reason": UNANSWERED_END.get(status, "completed")})
    store.call_updated(call_sid, update)
    log.info("call status %s", status, extra={"call_sid": call_sid})
    if status in FINAL_STATUSES and never_streamed and meta.get("direction") == "outbound":
        runtime.webhooks.call_ended(call_sid)  # no stream ended it: this is the call's end


async def amd_status(runtime: Runtime, form: Mapping[str, str]) -> None:
    """The answering-machine detection result: stored, and acted on by the instance holding the call's
    stream, per the call's voicemail policy."""
    call_sid, answered_by = form["CallSid"], form.get("AnsweredBy", "")[:32]
    store = runtime.store
    store.call_updated(call_sid, {"answered_by": answered_by, "answered_by_at": _now()})
    record = await store.get_call(call_sid)
    meta = record.meta if record is not None else {}
    policy = meta.get("voicemail", "hangup")
    log.info("answering machine detection: %s (voicemail policy %s)", answered_by, policy, extra={"call_sid": call_sid})
    if policy == "continue" or not (answered_by in MACHINE_RESULTS or answered_by == "fax"):
        return
    if policy == "leave_message" and answered_by in MESSAGE_END_RESULTS:
        command: dict[str, str] = {"command": "leave_message", "message": meta.get("voicemail_message", "")}
    elif policy == "leave_message" and answered_by == "machine_start":
        return  # DetectMessageEnd reports the end of the greeting next
    else:
        command = {"command": "voicemail_hangup", "answered_by": answered_by}
    if await runtime.tell_call(call_sid, command):
        return
    # No instance holds a stream of the call (it never started, or its instance is gone): hang up here.
    log.warning("no live stream for the voicemail policy; hanging up through REST", extra={"call_sid": call_sid})
    control = runtime.twilio_control
    if control is not None:
        try:
            await control.hangup(call_sid)
        except Exception as exc:
            log.warning("REST hang-up failed (%s)", type(exc).__name__, extra={"call_sid": call_sid})
    store.call_updated(call_sid, {"end_reason": "voicemail", "ended": _now()})


async def recording_status(runtime: Runtime, form: Mapping[str, str]) -> None:
    """A recording's status callback: its SID, URL and duration on the call's record."""
    call_sid = form["CallSid"]
    update = {
        "recording_sid": form.get("RecordingSid", "")[:64],
        "recording_url": form.get("RecordingUrl", "")[:500],
        "recording_status": form.get("RecordingStatus", "")[:32],
    }
    if form.get("RecordingDuration", "").isdigit():
        update["recording_duration_s"] = form["RecordingDuration"]
    stored = {k: v for k, v in update.items() if v}
    runtime.store.call_updated(call_sid, stored)
    log.info("recording %s", update["recording_status"] or "status", extra={"call_sid": call_sid})
    record = await runtime.store.get_call(call_sid)
    if record is not None and record.meta.get("ended") and update["recording_status"] == "completed":
        # The call's call.completed may have gone out without it: the recording follows on its own.
        runtime.webhooks.recording_completed(call_sid, stored)
