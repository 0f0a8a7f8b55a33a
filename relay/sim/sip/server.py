"""The simulated SIP connector: calls, their webhooks, the calls REST API and their sideband sockets."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from relay.sim import ulaw
from relay.sim.realtime.config import SimConfig
from relay.sim.realtime.errors import Problem
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.peer import Peer
from relay.sim.realtime.record import SimSession
from relay.sim.realtime.schema import SESSION_FIELDS, check_fields
from relay.sim.realtime.server import REALTIME_PATH, RealtimeSimulator, _Headers
from relay.sim.realtime.session import Settings, default_session
from relay.sim.realtime.wire import JSON, new_id
from relay.uvicorn_internals.server import EmbeddedServer

CALL_ACTIONS = ("accept", "reject", "refer", "hangup")


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` of one delivery: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body``,
    keyed with the base64 part of a ``whsec_`` secret (else the secret's bytes), as OpenAI signs."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass(eq=False)
class SimCall:
    """One call the simulated trunk sent to OpenAI, and everything the relay did with it."""

    call_id: str
    sip_headers: list[dict[str, str]]
    webhook_id: str
    state: str = "ringing"  # accepted, rejected, referred, ended
    accepted: JSON | None = None
    requests: list[tuple[str, JSON]] = field(default_factory=list)  # (action, body) in order
    request_times: list[float] = field(default_factory=list)  # monotonic arrival of each of them
    sessions: list[SimSession] = field(default_factory=list)  # its sideband connections
    playback_stops: bool = True  # False: OpenAI never reports output_audio_buffer.stopped
    playback_factor: float | None = None  # how much faster than real time it plays (None: realtime_factor)
    responses_done_at: list[float] = field(default_factory=list)  # monotonic times of response.done
    stopped_at: list[float] = field(default_factory=list)  # monotonic times of .stopped
    ended_at: float | None = None

    @property
    def live(self) -> bool:
        return self.state == "accepted"


class SipOutbox(Outbox):
    """The sideband's events: OpenAI plays a response's audio itself, so instead of its deltas the
    sideband sees when it starts, when it has played out, and when it was cut off."""

    call: SimCall | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_audio: dict[str, float] = {}
        self._audio_ms: defaultdict[str, float] = defaultdict(float)
        self._stops: dict[str, asyncio.TimerHandle] = {}

    def emit(self, event: JSON) -> None:
        if self.closing:
            return
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            response_id = event["response_id"]
            if response_id not in self._first_audio:
                self._first_audio[response_id] = time.monotonic()
                super().emit({"type": "output_audio_buffer.started", "response_id": response_id})
            try:
                self._audio_ms[response_id] += len(binascii.a2b_base64(event["delta"])) / ulaw.ULAW_BYTES_PER_MS
            except binascii.Error:
                pass
            return
        if kind == "input_audio_buffer.speech_started":  # barge-in on audio still playing out
            super().emit(event)
            for response_id, handle in list(self._stops.items()):
                handle.cancel()
                del self._stops[response_id]
                super().emit({"type": "output_audio_buffer.cleared", "response_id": response_id})
            return
        super().emit(event)
        if kind == "response.done":
            if self.call is not None:
                self.call.responses_done_at.append(time.monotonic())
            response = event["response"]
            response_id = response["id"]
            started = self._first_audio.get(response_id)
            if started is None:
                return
            if response.get("status") == "cancelled":
                super().emit({"type": "output_audio_buffer.cleared", "response_id": response_id})
                return
            if self.call is not None and not self.call.playback_stops:
                return
            factor = (self.call.playback_factor if self.call is not None else None) or self.cfg.realtime_factor or 1.0
            delay = max(0.0, started + self._audio_ms[response_id] / 1000.0 / factor - time.monotonic())
            loop = asyncio.get_running_loop()
            self._stops[response_id] = loop.call_later(delay, self._played_out, response_id)

    def _played_out(self, response_id: str) -> None:
        self._stops.pop(response_id, None)
        if self.call is not None:
            self.call.stopped_at.append(time.monotonic())
        self.emit({"type": "output_audio_buffer.stopped", "response_id": response_id})

    def clear_playback(self) -> None:
        for response_id, handle in list(self._stops.items()):
            handle.cancel()
            del self._stops[response_id]
            self.emit({"type": "output_audio_buffer.cleared", "response_id": response_id})


class SipPeer(Peer):
    outbox = SipOutbox

    def __init__(self, ws: ServerConnection, rec: SimSession, config: Any, call: SimCall) -> None:
        super().__init__(ws, rec, config)
        assert isinstance(self.out, SipOutbox)
        self.out.call = call
        self.call = call
        self.handlers["output_audio_buffer.clear"] = self._on_clear_output

    def _on_clear_output(self, event: JSON) -> None:
        assert isinstance(self.out, SipOutbox)
        self.out.clear_playback()


class SipSimulator(RealtimeSimulator):
    """``async with SipSimulator(webhook_secret=…) as sim``: ``sim.url`` for OPENAI_REALTIME_URL,
    ``sim.api_base`` for OPENAI_API_BASE; ``await sim.offer(webhook_url, …)`` rings the relay."""

    def __init__(self, config: SimConfig | None = None, *, webhook_secret: str) -> None:
        super().__init__(config)
        self.webhook_secret = webhook_secret
        self.calls: dict[str, SimCall] = {}
        self.rest: list[tuple[str, str, JSON]] = []  # (method, path, body) of every REST request
        self.api_base = ""
        self._sip_peers: dict[str, SipPeer] = {}
        self._rest_server: EmbeddedServer | None = None
        self._rest_task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=10.0)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        url = await super().start(host, port)
        app = Starlette(routes=[Route("/v1/realtime/calls/{call_id}/{action}", self._rest, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = self._rest_server = EmbeddedServer(
            uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        )
        self._rest_task = asyncio.create_task(server.serve(sockets=[sock]), name="sip-sim-rest")
        await server.wait_started(self._rest_task)
        self.api_base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return url

    async def stop(self) -> None:
        if self._rest_server is not None and self._rest_task is not None:
            await self._rest_server.stop(self._rest_task, timeout_s=5)
            self._rest_server = self._rest_task = None
        await self._http.aclose()
        await super().stop()

    # ---- the trunk's side: calls and their webhooks -------------------------------------------------

    def new_call(
        self,
        *,
        caller: str = "+15550001111",
        called: str = "+15550002222",
        extra_headers: dict[str, str] | None = None,
        to_uri: str | None = None,
        from_uri: str | None = None,
    ) -> SimCall:
        call_id = f"rtc_{secrets.token_hex(16)}"
        headers = [
            {
                "name": "From",
                "value": from_uri or f'"Caller" <sip:{caller}@pstn.twilio.com>;tag=as{secrets.token_hex(4)}',
            },
            {"name": "To", "value": to_uri or f"<sip:{called}@sip.api.openai.com;transport=tls>"},
            {"name": "Call-ID", "value": f"{secrets.token_hex(16)}@pstn.twilio.com"},
            {"name": "CSeq", "value": "1 INVITE"},
            {"name": "Contact", "value": "<sip:54.172.60.1:5061;transport=tls>"},
        ]
        headers += [{"name": name, "value": value} for name, value in (extra_headers or {}).items()]
        call = self.calls[call_id] = SimCall(call_id=call_id, sip_headers=headers, webhook_id=new_id("wh"))
        return call

    def webhook_body(self, call: SimCall) -> bytes:
        event = {
            "object": "event",
            "id": f"evt_{secrets.token_hex(12)}",
            "type": "realtime.call.incoming",
            "created_at": int(time.time()),
            "data": {"call_id": call.call_id, "sip_headers": call.sip_headers, "sip_media_security": "srtp"},
        }
        return orjson.dumps(event)

    async def deliver(
        self,
        webhook_url: str,
        call: SimCall,
        *,
        timestamp: int | None = None,
        secret: str | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """POST the call's webhook (again: the same ``webhook-id``, a fresh timestamp); the status."""
        payload = body if body is not None else self.webhook_body(call)
        stamp = int(time.time()) if timestamp is None else timestamp
        sent = {
            "content-type": "application/json",
            "webhook-id": call.webhook_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign_webhook(secret or self.webhook_secret, call.webhook_id, stamp, payload),
            "user-agent": "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)",
        }
        if headers is not None:
            sent = headers
        response = await self._http.post(webhook_url, content=payload, headers=sent)
        return response.status_code

    async def offer(self, webhook_url: str, **call_fields: Any) -> SimCall:
        call = self.new_call(**call_fields)
        status = await self.deliver(webhook_url, call)
        if status != 200:
            raise RuntimeError(f"the relay answered the webhook with {status}")
        return call

    # ---- the caller, over the call's media (which the relay never sees) ----------------------------

    def peer(self, call: SimCall) -> SipPeer | None:
        return self._sip_peers.get(call.call_id)

    async def caller_says(self, call: SimCall, ms: int, *, seed: int = 1, silence_ms: int = 700) -> None:
        """The caller speaks for ``ms`` then is silent, paced like RTP at ``realtime_factor``."""
        audio = ulaw.synth_speech(ms, seed=seed) + ulaw.silence(silence_ms)
        factor = self.config.realtime_factor or 1.0
        frame = ulaw.FRAME_BYTES
        for offset in range(0, len(audio), frame):
            peer = self.peer(call)
            if peer is not None and not peer.out.closing:
                peer.input._feed(audio[offset : offset + frame])
            await asyncio.sleep(ulaw.FRAME_MS / 1000.0 / factor)

    def caller_keys(self, call: SimCall, digits: str) -> None:
        peer = self.peer(call)
        if peer is None:
            raise RuntimeError("no sideband is open for this call")
        for digit in digits:
            peer.out.emit(
                {"type": "input_audio_buffer.dtmf_event_received", "event": digit, "received_at": int(time.time())}
            )

    async def caller_hangs_up(self, call: SimCall) -> None:
        await self._end(call, "ended")

    async def drop_sideband(self, call: SimCall) -> None:
        """Abort the call's sideband socket without a close frame (the call itself goes on)."""
        peer = self.peer(call)
        if peer is not None:
            peer.ws.transport.abort()
            await peer.finished.wait()

    async def _end(self, call: SimCall, state: str) -> None:
        if not call.live and call.state != "ringing":
            return
        call.state = state
        call.ended_at = time.monotonic()
        peer = self.peer(call)
        if peer is not None:
            peer._close(1000, "call ended")
            await peer.finished.wait()

    # ---- REST --------------------------------------------------------------------------------

    async def _rest(self, request: Request) -> Response:
        call_id, action = request.path_params["call_id"], request.path_params["action"]
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return JSONResponse({"error": {"message": "invalid JSON"}}, status_code=400)
        self.rest.append(("POST", request.url.path, body))
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            return JSONResponse({"error": {"message": "missing API key", "code": "missing_api_key"}}, status_code=401)
        call = self.calls.get(call_id)
        if action not in CALL_ACTIONS:
            return JSONResponse({"error": {"message": "Not found"}}, status_code=404)
        if (
            call is None
            or call.state in ("rejected", "referred", "ended")
            or (action in ("refer", "hangup") and call.state != "accepted")
        ):
            return JSONResponse(
                {"error": {"message": f"Call {call_id} not found", "code": "not_found"}}, status_code=404
            )
        call.requests.append((action, body))
        call.request_times.append(time.monotonic())
        if action == "accept":
            if call.state != "ringing":
                return JSONResponse({"error": {"message": "call already accepted"}}, status_code=409)
            if body.get("type") != "realtime":
                return JSONResponse({"error": {"message": "type must be 'realtime'", "param": "type"}}, status_code=400)
            try:
                check_fields(body, SESSION_FIELDS["ga"], "session")
            except Problem as problem:
                return JSONResponse({"error": {"message": problem.message, "param": problem.param}}, status_code=400)
            call.accepted = body
            call.state = "accepted"
        elif action == "reject":
            call.state = "rejected"
        elif action == "refer":
            if not isinstance(body.get("target_uri"), str):
                return JSONResponse({"error": {"message": "target_uri is required"}}, status_code=400)
            await self._end(call, "referred")
        else:
            await self._end(call, "ended")
        return Response(status_code=200)

    # ---- the sideband ------------------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: WsRequest) -> WsResponse | None:
        target = urlsplit(request.path)
        if target.path.rstrip("/") != REALTIME_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        call_id = dict(parse_qsl(target.query)).get("call_id")
        if call_id is None:
            return super()._check_path(connection, request)
        call = self.calls.get(call_id)
        if call is None or not call.live:
            return connection.respond(HTTPStatus.NOT_FOUND, "Call not found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        target = urlsplit(request.path)
        query = dict(parse_qsl(target.query))
        call = self.calls.get(query.get("call_id", ""))
        if call is None:
            await super()._handle(ws)
            return
        self.connections += 1
        accepted = call.accepted or {}
        model = str(accepted.get("model") or "gpt-realtime")
        headers = _Headers(list(request.headers.raw_items()))
        rec = SimSession(dialect="ga", headers=headers, path=target.path, query=query, model=model)
        session = default_session("ga", rec.id, model, int(time.time() + 3600))
        rec.session = session
        self.sessions.append(rec)
        call.sessions.append(rec)
        peer = SipPeer(ws, rec, lambda: self.config, call)
        if len(call.sessions) == 1:  # the accept configured the call's session; a reconnect finds it so
            peer.session._merge(rec.session, {k: v for k, v in accepted.items()})
        else:
            rec.session = call.sessions[0].session
        peer.session.settings = Settings.of("ga", rec.session)
        self._peers[rec] = peer
        self._sip_peers[call.call_id] = peer
        try:
            await peer.run()
        finally:
            self._peers.pop(rec, None)
            if self._sip_peers.get(call.call_id) is peer:
                del self._sip_peers[call.call_id]
