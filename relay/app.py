"""The ASGI application: webhook, media stream, operations endpoints and the calls API.

``relay.app:app`` builds its runtime from the environment on start-up; tests and the
demo use ``create_app(settings)`` with their own settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from relay import console, logs, outbound
from relay.config import Settings
from relay.logbound import clip
from relay.metrics import CONTENT_TYPE
from relay.runtime import Runtime
from relay.security import InvalidSignature, check_signature, mint_stream_token, public_request_url
from relay.sip.errors import WebhookSignatureInvalid
from relay.sip.headers import CALL_ID, MalformedWebhook, parse_incoming
from relay.transport import sideband
from relay.transport.lifecycle import MediaStreamCall
from relay.twilio import twiml

log = logging.getLogger("relay.app")
_SID = re.compile(r"[A-Za-z0-9]{2,64}")
XML = "application/xml"
DRAIN_RETRY_AFTER_S = 1  # Retry-After of the 503 a draining instance answers the webhook with
CONTINUATION_WINDOW_S = 60  # the loop guard counts a call's continuations per this many seconds
WEBHOOK_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")  # Standard Webhooks (§15)
WEBHOOK_DEDUPE_TTL_S = 24 * 3600  # OpenAI retries a delivery for well under a day
WEBHOOK_DEDUPE_TIMEOUT_S = 1.0
CONTINUATION_STORE_TIMEOUT_S = 1.0  # Twilio waits for the continuation's TwiML; the caller hears nothing meanwhile


def _public_base(runtime: Runtime, request: Request) -> str:
    if runtime.settings.public_url:
        return runtime.settings.public_url
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host}"


async def _read_limited(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _webhook_body(request: Request, what: str) -> bytes | Response:
    """A webhook's raw body, read within the body limits and the idle timeout; else the refusal."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        # The head had RELAY_HTTP_IDLE_TIMEOUT to arrive (relay/uvicorn_internals/http_limits.py); so has the body.
        async with asyncio.timeout(settings.http_idle_timeout_s):
            body = await _read_limited(request, settings.max_webhook_body_bytes)
    except TimeoutError:
        runtime.request_refusals.log(
            "slow_body",
            logging.WARNING,
            "%s body not received within %g s; answered 408",
            what,
            settings.http_idle_timeout_s,
        )
        return PlainTextResponse("request body timeout", status_code=408, headers={"Connection": "close"})
    except ClientDisconnect:
        runtime.request_refusals.log(
            "disconnected", logging.INFO, "%s client disconnected before sending its whole body", what
        )
        return Response(status_code=400)  # nobody is left to read it
    if body is None:
        runtime.metrics.calls_refused.labels("webhook_too_large").inc()
        runtime.request_refusals.log(
            "too_large", logging.WARNING, "%s body over %d bytes refused", what, settings.max_webhook_body_bytes
        )
        return PlainTextResponse("request body too large", status_code=413)
    return body


async def _signed_form(request: Request, what: str) -> dict[str, str] | Response:
    """The form of a webhook from Twilio, read within the body limits and its signature checked;
    else the response that refuses it."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    body = await _webhook_body(request, what)
    if isinstance(body, Response):
        return body
    try:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        return PlainTextResponse("malformed form body", status_code=400)
    url = public_request_url(_public_base(runtime, request), str(request.url))  # where Twilio sent it
    if settings.twilio_auth_token:
        try:
            check_signature(
                settings.twilio_auth_token,
                url,
                form,
                request.headers.get("x-twilio-signature"),
                settings_header=request.headers.get("x-twilio-webhooks-signature-settings"),
            )
        except InvalidSignature as exc:
            runtime.metrics.calls_refused.labels("bad_signature").inc()
            claimed = {"call_sid": clip(form.get("CallSid", ""), 64), "url": clip(url, 200)}
            runtime.request_refusals.log("bad_signature", logging.WARNING, "%s refused: %s", what, exc, extra=claimed)
            return PlainTextResponse("invalid signature", status_code=403)
    return form


async def _callback_form(request: Request, what: str) -> dict[str, str] | Response:
    """A signed Twilio callback about one call. Unlike the voice webhooks it is taken while draining:
    it only records what happened to a call."""
    form = await _signed_form(request, what)
    if isinstance(form, Response):
        return form
    call_sid = form.get("CallSid", "")
    if not _SID.fullmatch(call_sid):
        return PlainTextResponse("missing or invalid CallSid", status_code=400)
    logs.bind_call(call_sid)
    return form


async def _call_form(request: Request, what: str) -> dict[str, str] | Response:
    """A signed webhook about one call (its CallSid checked and bound to the log lines), or the refusal.

    A draining instance answers 503, not "all lines busy": another instance can take the call. The
    proxy retries the next upstream on it (infra/nginx.conf) and, if every one refuses, Twilio
    fetches the number's fallback URL."""
    runtime: Runtime = request.app.state.runtime
    form = await _callback_form(request, what)
    if isinstance(form, Response):
        return form
    call_sid = form["CallSid"]
    if runtime.draining:
        runtime.metrics.calls_refused.labels("draining").inc()
        log.warning("%s refused with 503: instance draining", what, extra={"call_sid": call_sid})
        return PlainTextResponse(
            "instance draining", status_code=503, headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)}
        )
    return form


async def incoming_call(request: Request) -> Response:
    """Twilio's voice webhook: verify the signature, answer with <Connect><Stream>."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    form = await _call_form(request, "webhook")
    if isinstance(form, Response):
        return form
    call_sid = form["CallSid"]
    if runtime.full:
        reason = "full"
        runtime.metrics.calls_refused.labels(reason).inc()
        log.warning("call turned away (%s)", reason, extra={"call_sid": call_sid})
        body_xml = (
            twiml.dial(settings.overflow_dial, say_first=None)
            if settings.overflow_dial
            else twiml.say_and_hangup(settings.overflow_say)
        )
        return Response(body_xml, media_type=XML)
    caller, called = form.get("From", "")[:32], form.get("To", "")[:32]  # signed above: the token binds them
    token = mint_stream_token(
        settings.stream_secret, call_sid, settings.stream_token_ttl_s, caller=caller, called=called
    )
    parameters = {"token": token, "from": caller, "to": called}
    base = _public_base(runtime, request)
    stream = twiml.stream_url(base)
    log.info("call answered with a stream", extra={"call_sid": call_sid})
    return Response(twiml.connect_stream(stream, parameters, then=twiml.continue_url(base)), media_type=XML)


async def continue_call(request: Request) -> Response:
    """Twilio's request for what comes after a stream that ended without the call ending (the
    <Redirect> after </Connect>), on whichever instance the load balancer picked.

    A call the relay ended on purpose (the assistant hung up, a transfer, the drain's goodbye, an
    abusive stream) or the caller ended is hung up. A stream that was lost (its instance died or
    handed the call off, the connection dropped) of a call that is stored and, as Twilio signed,
    in progress resumes on a new stream, at most RELAY_MAX_CONTINUATIONS lost streams a minute (a
    hand-off is not counted: it is a deploy moving the call, not a failing one). Otherwise (the
    Realtime API unavailable, nothing stored, the loop guard) the caller hears the apology and is
    dialled to RELAY_FALLBACK_NUMBER (or hung up): never silence followed by a click."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    form = await _call_form(request, "continuation webhook")
    if isinstance(form, Response):
        return form
    call_sid = form["CallSid"]
    disposition: str | None = None
    count = 0
    handed_off = False
    try:
        async with asyncio.timeout(CONTINUATION_STORE_TIMEOUT_S):
            disposition = await runtime.store.get_disposition(call_sid)
            if disposition == "handed_off":  # a deliberate move (a drain), no sign of a failing call
                handed_off = await runtime.store.take_disposition(call_sid, "handed_off")  # once per hand-off
                disposition = None
            if disposition is None:
                record = await runtime.store.get_call(call_sid)
                if record is None or "started" not in record.meta:
                    disposition = "unknown"  # nothing to resume: not a call of ours, or its state is gone
                elif not handed_off:  # the loop guard counts lost streams, not hand-offs
                    count = await runtime.store.count_continuation(call_sid, CONTINUATION_WINDOW_S)
    except Exception as exc:  # unknown: the apology is right for a lost stream and harmless after an ending
        disposition = "unknown"
        log.warning(
            "continuation: call state unavailable (%s); answering with the apology",
            type(exc).__name__,
            extra={"call_sid": call_sid},
        )
    if disposition == "ended":
        runtime.metrics.continuations.labels("hangup").inc()
        log.info("continuation: call was ended by the relay; hanging up", extra={"call_sid": call_sid})
        return Response(twiml.hangup(), media_type=XML)
    base = _public_base(runtime, request)
    in_progress = form.get("CallStatus") == "in-progress"  # signed: Twilio says the call goes on
    if disposition is None and in_progress and count <= settings.max_continuations and not runtime.full:
        # The stream was lost (its instance died, handed it off, or the connection dropped): the
        # call resumes on a new stream here, its conversation carried over from the store.
        caller, called = form.get("From", "")[:32], form.get("To", "")[:32]  # signed by Twilio
        token = mint_stream_token(
            settings.stream_secret, call_sid, settings.stream_token_ttl_s, caller=caller, called=called, resumes=True
        )
        parameters = {"token": token, "from": caller, "to": called, "resume": "1"}
        runtime.metrics.continuations.labels("resume").inc()
        if handed_off:
            log.info("continuation: the handed-off call resumes on a new stream", extra={"call_sid": call_sid})
        else:
            log.info(
                "continuation: the call resumes on a new stream (%d in this window)",
                count,
                extra={"call_sid": call_sid},
            )
        return Response(
            twiml.connect_stream(twiml.stream_url(base), parameters, then=twiml.continue_url(base)), media_type=XML
        )
    if disposition is None and count > settings.max_continuations:
        log.warning(
            "continuation: %d streams of this call within %d s (RELAY_MAX_CONTINUATIONS=%d); giving up",
            count,
            CONTINUATION_WINDOW_S,
            settings.max_continuations,
            extra={"call_sid": call_sid},
        )
    outcome = "dial_fallback" if settings.fallback_number else "apology"
    runtime.metrics.continuations.labels(outcome).inc()
    log.warning(
        "continuation: the call cannot go on here; the caller hears the apology%s",
        " and is dialled to the fallback number" if settings.fallback_number else " and is hung up",
        extra={"call_sid": call_sid},
    )
    return Response(twiml.apology(settings.apology_say, settings.fallback_number), media_type=XML)


async def openai_webhook(request: Request) -> Response:
    """OpenAI's project webhook (SIP mode): a signed ``realtime.call.incoming`` is answered at once and
    its call accepted or rejected by a task of the runtime's; each delivery's ``webhook-id`` is acted
    on once across instances (OpenAI retries with the same id)."""
    runtime: Runtime = request.app.state.runtime
    sip = runtime.sip
    if sip is None:
        return PlainTextResponse("SIP mode is off (no OPENAI_WEBHOOK_SECRET)", status_code=404)
    body = await _webhook_body(request, "OpenAI webhook")
    if isinstance(body, Response):
        return body
    missing = [name for name in WEBHOOK_HEADERS if not request.headers.get(name)]
    if missing:
        runtime.metrics.calls_refused.labels("bad_signature").inc()
        runtime.request_refusals.log(
            "webhook_unsigned", logging.WARNING, "OpenAI webhook refused: no %s header", ", ".join(missing)
        )
        return PlainTextResponse("missing webhook signature headers", status_code=400)
    try:
        sip.verify(body, request.headers)
    except WebhookSignatureInvalid as exc:
        runtime.metrics.calls_refused.labels("bad_signature").inc()
        runtime.request_refusals.log("webhook_signature", logging.WARNING, "OpenAI webhook refused: %s", exc)
        return PlainTextResponse("invalid signature", status_code=401)
    except ValueError as exc:  # a header the verifier cannot read, a body that is not UTF-8
        runtime.request_refusals.log("webhook_malformed", logging.WARNING, "OpenAI webhook refused: %s", exc)
        return PlainTextResponse("malformed webhook", status_code=400)
    try:
        kind, incoming = parse_incoming(body)
    except MalformedWebhook as exc:
        runtime.request_refusals.log("webhook_body", logging.WARNING, "OpenAI webhook refused: %s", exc)
        return PlainTextResponse("malformed event", status_code=400)
    if incoming is None:
        log.info("OpenAI webhook %s ignored", clip(kind, 100))
        return Response(status_code=200)
    webhook_id = request.headers["webhook-id"][:200]
    try:
        first = await asyncio.wait_for(
            runtime.store.claim_once(f"openai-webhook:{webhook_id}", WEBHOOK_DEDUPE_TTL_S), WEBHOOK_DEDUPE_TIMEOUT_S
        )
    except Exception as exc:  # without the store each instance still acts on a delivery once
        log.warning("could not check the webhook for a repeat (%s); acting on it", type(exc).__name__)
        first = True
    if not first:
        log.info("OpenAI webhook delivered again; already acted on", extra={"call_sid": incoming.call_id})
        return Response(status_code=200)
    runtime.start_sip_call(sideband.answer(runtime, incoming), incoming.call_id)
    return Response(status_code=200)


async def media_stream(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    await MediaStreamCall(runtime, websocket).run()


async def transfer_whisper(request: Request) -> Response:
    """TwiML spoken to the human agent before a transferred caller is connected."""
    runtime: Runtime = request.app.state.runtime
    text = request.query_params.get("text", "")
    expires = request.query_params.get("expires", "")
    sig = request.query_params.get("sig", "")
    if not text or not runtime.whisper_valid(text, expires, sig):
        runtime.request_refusals.log(
            "whisper", logging.WARNING, "transfer whisper refused: expired or not signed by this relay"
        )
        return PlainTextResponse("forbidden", status_code=403)
    return Response(twiml.say_only(text), media_type=XML)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    checks = await runtime.readiness()
    return JSONResponse(checks, status_code=200 if checks["ready"] else 503)


async def metrics(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    if not runtime.settings.metrics_enabled:
        return PlainTextResponse("metrics are disabled (RELAY_METRICS=0)", status_code=404)
    runtime.metrics.sync_store(runtime.store.queue_depth, runtime.store.dropped_writes)  # no Redis round trip
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


def _unauthorized(runtime: Runtime, request: Request) -> Response | None:
    """401 unless the request carries ``Authorization: Bearer $RELAY_API_TOKEN`` (never without one)."""
    expected = runtime.settings.relay_api_token
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), expected.encode()):
        return JSONResponse(
            {"error": "a valid bearer token is required"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return None


async def list_calls(request: Request) -> Response:
    """The live calls of every instance, from the ownership registry; a call whose instance stopped
    heart-beating is listed with ``orphaned: true``."""
    runtime: Runtime = request.app.state.runtime
    refused = _unauthorized(runtime, request)
    if refused is not None:
        return refused
    live = await runtime.ownership.live_calls()
    if live is None:
        return JSONResponse({"error": "state store unavailable"}, status_code=503)
    calls = [{**call.record.fields(), "orphaned": call.orphaned} for call in live]
    return Response(orjson.dumps({"calls": calls}), media_type="application/json")


async def place_call(request: Request) -> Response:
    """POST /calls: place an outbound call (relay/outbound.py); 201 with its SID, 400 naming the field
    that is wrong, 429 at the cluster-wide cap or rate."""
    runtime: Runtime = request.app.state.runtime
    refused = _unauthorized(runtime, request)
    if refused is not None:
        return refused
    if runtime.draining:
        return JSONResponse(
            {"error": "instance draining"}, status_code=503, headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)}
        )
    try:
        async with asyncio.timeout(runtime.settings.http_idle_timeout_s):
            body = await _read_limited(request, outbound.MAX_REQUEST_BYTES)
    except (TimeoutError, ClientDisconnect):
        return JSONResponse({"error": "request body not received in time"}, status_code=408)
    if body is None:
        return JSONResponse({"error": f"the body is over {outbound.MAX_REQUEST_BYTES} bytes"}, status_code=413)
    try:
        call = outbound.parse_request(runtime, body)
    except outbound.BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    try:
        placed = await outbound.place(runtime, call, _public_base(runtime, request))
    except Exception as exc:  # the store: nothing was dialled
        log.warning("outbound call not placed: state store unavailable (%s)", type(exc).__name__)
        return JSONResponse({"error": "state store unavailable"}, status_code=503)
    return JSONResponse(placed.body, status_code=placed.status)


async def _stored(
    request: Request, what: str, handle: Callable[[Runtime, dict[str, str]], Awaitable[None]]
) -> Response:
    form = await _callback_form(request, what)
    if isinstance(form, Response):
        return form
    runtime: Runtime = request.app.state.runtime
    try:
        await handle(runtime, form)
    except Exception as exc:  # Twilio retries a failed callback; the state store may be back by then
        log.warning("%s not stored (%s)", what, type(exc).__name__, extra={"call_sid": form["CallSid"]})
        return PlainTextResponse("state store unavailable", status_code=503)
    return Response(status_code=204)


async def call_status(request: Request) -> Response:
    return await _stored(request, "call status callback", outbound.call_status)


async def amd_status(request: Request) -> Response:
    return await _stored(request, "answering machine detection callback", outbound.amd_status)


async def recording_status(request: Request) -> Response:
    return await _stored(request, "recording status callback", outbound.recording_status)


async def get_call(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    refused = _unauthorized(runtime, request)
    if refused is not None:
        return refused
    call_sid = request.path_params["call_sid"]
    if not (_SID.fullmatch(call_sid) or CALL_ID.fullmatch(call_sid)):  # Twilio's CA…, OpenAI's rtc_…
        return JSONResponse({"error": "invalid call SID"}, status_code=400)
    try:
        record = await runtime.store.get_call(call_sid)
    except Exception as exc:
        log.warning("call lookup failed: %s", type(exc).__name__, extra={"call_sid": call_sid})
        return JSONResponse({"error": "state store unavailable"}, status_code=503)
    if record is None:
        return JSONResponse({"error": "no such call"}, status_code=404)
    return Response(orjson.dumps(record.to_json()), media_type="application/json")


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings or Settings.from_env())
        app.state.runtime = rt
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    routes = [
        Route("/incoming-call", incoming_call, methods=["POST"]),
        Route(twiml.CONTINUE_PATH, continue_call, methods=["POST"]),
        WebSocketRoute("/media-stream", media_stream),
        Route("/openai/webhook", openai_webhook, methods=["POST"]),
        Route("/transfer-whisper", transfer_whisper, methods=["POST", "GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/calls", list_calls, methods=["GET"]),
        Route("/calls", place_call, methods=["POST"]),
        Route(outbound.CALL_STATUS_PATH, call_status, methods=["POST"]),
        Route(outbound.AMD_STATUS_PATH, amd_status, methods=["POST"]),
        Route(outbound.RECORDING_STATUS_PATH, recording_status, methods=["POST"]),
        Route("/calls/{call_sid}", get_call, methods=["GET"]),
        *console.routes(),  # the operations console (404 unless RELAY_CONSOLE_TOKEN is set)
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    if runtime is not None:
        app.state.runtime = runtime
    return app


app = create_app()
