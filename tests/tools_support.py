"""Helpers for the tool, call-control and profile tests (kept out of conftest.py).

``TwilioApiRecorder`` is a real HTTP server on loopback standing in for api.twilio.com: the
official twilio client, rebased with ``TWILIO_API_BASE``, sends it exactly what production
sends, and every request is recorded (method, path, headers, form, arrival time).
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from relay.sim.realtime import RealtimeSimulator, SimSession

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
TWILIO_AUTH = "twilio-rest-auth-token-77"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode(), keep_blank_values=True)

    @property
    def basic_auth(self) -> tuple[str, str]:
        scheme, _, encoded = self.headers.get("authorization", "").partition(" ")
        assert scheme.lower() == "basic", self.headers
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        return user, password


@dataclass
class TwilioApiRecorder:
    """``with TwilioApiRecorder() as api:`` -> ``api.url``, ``api.requests``; ``api.status`` to fail."""

    requests: list[RecordedRequest] = field(default_factory=list)
    status: int = 200
    delay_s: float = 0.0
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> TwilioApiRecorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with recorder._lock:
                    recorder.requests.append(
                        RecordedRequest(
                            method=self.command,
                            path=self.path,
                            headers={k.lower(): v for k, v in self.headers.items()},
                            body=body,
                            at=time.monotonic(),
                        )
                    )
                if recorder.delay_s:
                    time.sleep(recorder.delay_s)
                call_sid = self.path.rsplit("/", 1)[-1].removesuffix(".json")
                status = recorder.status
                if status == 200:
                    payload: dict[str, Any] = {
                        "sid": call_sid,
                        "account_sid": ACCOUNT_SID,
                        "status": "completed" if b"Status=completed" in body else "in-progress",
                        "api_version": "2010-04-01",
                    }
                else:
                    payload = {"code": 20404, "message": "The requested resource was not found", "status": status}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="twilio-api-recorder", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def calls_path(self, call_sid: str, account_sid: str = ACCOUNT_SID) -> str:
        return f"/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"


def received(session: SimSession) -> list[dict[str, Any]]:
    """Client events the simulator received (appends excluded), in order."""
    return [event for _, event in session.received]


def received_timed(session: SimSession) -> list[tuple[float, dict[str, Any]]]:
    return list(session.received)


def function_calls_sent(session: SimSession) -> list[dict[str, Any]]:
    """``response.function_call_arguments.done`` events the simulator emitted."""
    return [e for e in session.sent if e["type"] == "response.function_call_arguments.done"]


def outputs(session: SimSession) -> list[dict[str, Any]]:
    """function_call_output items the relay created, in order."""
    return [
        e["item"]
        for e in received(session)
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]


def outputs_by_call(session: SimSession) -> dict[str, Any]:
    return {item["call_id"]: json.loads(item["output"]) for item in outputs(session)}


def errors_sent(session: SimSession) -> list[dict[str, Any]]:
    return [e["error"] for e in session.sent if e["type"] == "error"]


def after_last_output(session: SimSession) -> list[str]:
    """Types of client events after the last function_call_output."""
    events = received(session)
    last = max(
        i
        for i, e in enumerate(events)
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    )
    return [e["type"] for e in events[last + 1 :]]


def largest_gap(times: list[float], start: float, end: float) -> float:
    """Largest interval between consecutive arrivals that overlaps [start, end]."""
    inside = [t for t in times if start <= t <= end]
    before = [t for t in times if t < start]
    after = [t for t in times if t > end]
    points = ([before[-1]] if before else []) + inside + ([after[0]] if after else [])
    assert len(points) >= 2, "no frames around the interval"
    return max(b - a for a, b in itertools.pairwise(points))


def only_session(sim: RealtimeSimulator) -> SimSession:
    assert len(sim.sessions) == 1, [s.id for s in sim.sessions]
    return sim.sessions[0]
