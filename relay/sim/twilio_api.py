"""A simulated Twilio REST API for outbound calls: what ``calls.create`` sets in motion, offline.

It serves the paths the official twilio client sends (``TWILIO_API_BASE`` points the relay's client
here): ``POST …/Calls.json`` checks the form as Twilio does (numbers, TwiML length, status-callback
events, AMD values) and answers 201 with the new call; then the callee plays its part. A ``human``
answers after `ring_s`, the inline TwiML's ``<Connect><Stream>`` opens (a `SimulatedCaller`), and
AMD reports ``human``. A ``machine`` answers the same way but plays a greeting, then a beep; AMD
reports ``machine_start`` (``MachineDetection=Enable``) or, with ``DetectMessageEnd``, the end of the
greeting (``machine_end_beep``). ``busy``, ``no-answer`` and ``failed`` never open a stream. Status
and AMD callbacks are signed with the auth token over the URL the request named and sent to where
the relay really listens. ``POST …/Calls/{sid}.json`` with ``Status=completed`` ends the call (the
stream gets ``stop``, then the ``completed`` callback with its duration); ``…/Recordings.json``
starts a recording whose ``completed`` callback follows the call's end. /work/shared/PROTOCOLS.md §5.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.env import E164
from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.caller.webhook import parse_twiml, post_redirect
from relay.uvicorn_internals.server import EmbeddedServer

__all__ = ["OutboundCall", "TwilioApiSimulator"]

STATUS_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
MACHINE_DETECTION = frozenset({"Enable", "DetectMessageEnd"})
MAX_TWIML_CHARS = 4000
BEEP_MS = 400


def _twilio_error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status},
        status_code=status,
    )


@dataclass
class OutboundCall:
    """One call placed through the simulator, with everything that happened to it."""

    sid: str
    form: dict[str, str]
    events: list[str] = field(default_factory=list)  # the status-callback events, in order
    status: str = "queued"
    answered_at: float | None = None
    callee: SimulatedCaller | None = None
    completed_by_rest: bool = False
    played_at_amd: int = 0  # µ-law bytes of the relay's audio the callee had played when AMD answered
    recordings: list[tuple[str, str]] = field(default_factory=list)  # (recording SID, its status callback URL)
    callbacks: list[tuple[str, dict[str, str], int]] = field(default_factory=list)  # url, form, relay's status


class TwilioApiSimulator:
    """``async with TwilioApiSimulator(account_sid, auth_token, relay_url, public_url) as api:``.

    `answer` says who picks up each call (``human``, ``machine``, ``busy``, ``no-answer``, ``failed``);
    `machine_greeting_ms` is how long a machine's greeting plays before its beep."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        relay_url: str,
        public_url: str,
        *,
        answer: str = "human",
        ring_s: float = 0.2,
        amd_s: float = 0.8,
        machine_greeting_ms: int = 1500,
        machine_delay_s: float = 0.0,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.relay_url = relay_url
        self.public_url = public_url
        self.answer = answer
        self.ring_s = ring_s
        self.amd_s = amd_s
        self.machine_greeting_ms = machine_greeting_ms
        self.machine_delay_s = machine_delay_s  # silence before a machine's greeting starts
        self.callbacks_to: str | None = None  # where callbacks go, when not `relay_url` (another instance)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, form
        self.calls: dict[str, OutboundCall] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        base = f"/2010-04-01/Accounts/{account_sid}"
        app = Starlette(
            routes=[
                Route(f"{base}/Calls.json", self._create, methods=["POST"]),
                Route(f"{base}/Calls/{{sid}}.json", self._update, methods=["POST"]),
                Route(f"{base}/Calls/{{sid}}/Recordings.json", self._record, methods=["POST"]),
            ]
        )
        self._server = EmbeddedServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._serving: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TwilioApiSimulator:
        self._serving = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="twilio-api-sim")
        await self._server.wait_started(self._serving)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for call in self.calls.values():
            if call.callee is not None:
                await call.callee.hangup()
        if self._serving is not None:
            await self._server.stop(self._serving, timeout_s=5)
        self._sock.close()

    # ------------------------------------------------------------------ the REST API

    async def _form(self, request: Request) -> dict[str, str] | Response:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return _twilio_error(401, 20003, "Authenticate")
        raw = parse_qs((await request.body()).decode(), keep_blank_values=True)
        form = {key: values[-1] for key, values in raw.items()}
        for key, values in raw.items():
            if len(values) > 1:
                form[key] = " ".join(values)  # StatusCallbackEvent repeats; kept space-separated
        self.requests.append((request.method, request.url.path, form))
        return form

    async def _create(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        for number in ("To", "From"):
            if not E164.fullmatch(form.get(number, "")):
                return _twilio_error(400, 21211 if number == "To" else 21212, f"Invalid '{number}' Phone Number")
        twiml = form.get("Twiml", "")
        if not twiml and not form.get("Url"):
            return _twilio_error(400, 21205, "Url parameter is required.")
        if len(twiml) > MAX_TWIML_CHARS:
            return _twilio_error(400, 21203, f"Twiml is longer than {MAX_TWIML_CHARS} characters")
        events = form.get("StatusCallbackEvent", "").split()
        if any(event not in STATUS_EVENTS for event in events):
            return _twilio_error(400, 21626, "Invalid StatusCallbackEvent")
        if form.get("MachineDetection") and form["MachineDetection"] not in MACHINE_DETECTION:
            return _twilio_error(400, 21627, "Invalid MachineDetection")
        if form.get("AsyncAmd") not in (None, "true", "false"):
            return _twilio_error(400, 21628, "Invalid AsyncAmd")
        sid = "CA" + secrets.token_hex(16)
        call = self.calls[sid] = OutboundCall(sid, form)
        self._spawn(self._play(call))
        return JSONResponse(self._resource(call), status_code=201)

    def _resource(self, call: OutboundCall) -> dict[str, Any]:
        return {
            "sid": call.sid,
            "account_sid": self.account_sid,
            "to": call.form["To"],
            "from": call.form["From"],
            "status": call.status,
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Calls/{call.sid}.json",
        }

    async def _update(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        call = self.calls.get(request.path_params["sid"])
        if call is None:
            return _twilio_error(404, 20404, "The requested resource was not found")
        if form.get("Status") == "completed" and call.status not in ("completed", "busy", "no-answer", "failed"):
            call.completed_by_rest = True
            self._spawn(self._complete(call))
        return JSONResponse(self._resource(call))

    async def _record(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        call = self.calls.get(request.path_params["sid"])
        if call is None or call.status != "in-progress":
            return _twilio_error(404 if call is None else 400, 21220, "Call is not in progress")
        channels = form.get("RecordingChannels", "mono")
        if channels not in ("mono", "dual"):
            return _twilio_error(400, 21220, "Invalid RecordingChannels")
        sid = "RE" + secrets.token_hex(16)
        call.recordings.append((sid, form.get("RecordingStatusCallback", "")))
        return JSONResponse(
            {"sid": sid, "call_sid": call.sid, "account_sid": self.account_sid, "status": "in-progress"},
            status_code=201,
        )

    # ------------------------------------------------------------------ the callee

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _callback(self, call: OutboundCall, url: str | None, form: dict[str, str]) -> None:
        if not url:
            return
        target = self.callbacks_to or self.relay_url
        config = CallerConfig(base_url=target, auth_token=self.auth_token, public_url=self.public_url)
        status, _ = await post_redirect(config, url, form)
        call.callbacks.append((url, form, status))

    async def _status(self, call: OutboundCall, status: str, event: str, **extra: str) -> None:
        call.status = status
        call.events.append(status)
        if event in call.form.get("StatusCallbackEvent", "completed").split():
            form = {
                "CallSid": call.sid,
                "AccountSid": self.account_sid,
                "From": call.form["From"],
                "To": call.form["To"],
                "Direction": "outbound-api",
                "ApiVersion": "2010-04-01",
                "CallStatus": status,
                "StatusCallbackEvent": event,
                **extra,
            }
            await self._callback(call, call.form.get("StatusCallback"), form)

    async def _play(self, call: OutboundCall) -> None:
        await self._status(call, "initiated", "initiated")
        await asyncio.sleep(self.ring_s / 2)
        await self._status(call, "ringing", "ringing")
        await asyncio.sleep(self.ring_s / 2)
        if self.answer in ("busy", "no-answer", "failed"):
            await self._status(call, self.answer, "completed", CallDuration="0")
            return
        call.answered_at = time.monotonic()
        await self._status(call, "in-progress", "answered")
        stream = parse_twiml(call.form["Twiml"])
        callee = call.callee = SimulatedCaller(
            CallerConfig(
                base_url=self.relay_url,
                auth_token=self.auth_token,
                public_url=self.public_url,
                call_sid=call.sid,
                from_number=call.form["From"],
                to_number=call.form["To"],
            )
        )
        await callee.connect(stream)
        if self.answer == "machine":
            if self.machine_delay_s:
                callee.say(ulaw.silence(int(self.machine_delay_s * 1000)))
            callee.say(ulaw.synth_speech(self.machine_greeting_ms, seed=7))  # "You have reached …"
            callee.say(ulaw.tone(BEEP_MS, 1000.0, 0.5))
        if call.form.get("AsyncAmd") == "true" and call.form.get("MachineDetection"):
            await self._detect(call)

    async def _detect(self, call: OutboundCall) -> None:
        if self.answer == "human":
            await asyncio.sleep(self.amd_s)
            result = "human"
        elif call.form["MachineDetection"] == "DetectMessageEnd":
            await asyncio.sleep(self.machine_delay_s + (self.machine_greeting_ms + BEEP_MS) / 1000 + 0.2)
            result = "machine_end_beep"
        else:
            await asyncio.sleep(self.amd_s)
            result = "machine_start"
        if call.status != "in-progress":
            return
        assert call.answered_at is not None
        call.played_at_amd = call.callee.played_bytes if call.callee is not None else 0
        form = {
            "CallSid": call.sid,
            "AccountSid": self.account_sid,
            "AnsweredBy": result,
            "MachineDetectionDuration": str(int((time.monotonic() - call.answered_at) * 1000)),
        }
        await self._callback(call, call.form.get("AsyncAmdStatusCallback"), form)

    async def _complete(self, call: OutboundCall) -> None:
        """The call is over: the stream gets stop, then the completed callback (and recordings')."""
        if call.callee is not None:
            await call.callee.hangup()
        duration = int(time.monotonic() - call.answered_at) if call.answered_at is not None else 0
        await self._status(call, "completed", "completed", CallDuration=str(duration))
        for recording, url in call.recordings:
            form = {
                "CallSid": call.sid,
                "AccountSid": self.account_sid,
                "RecordingSid": recording,
                "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/{self.account_sid}/Recordings/{recording}",
                "RecordingStatus": "completed",
                "RecordingDuration": str(duration),
                "RecordingChannels": "2",
            }
            await self._callback(call, url, form)

    async def hang_up(self, sid: str) -> None:
        """The callee puts the phone down."""
        await self._complete(self.calls[sid])
