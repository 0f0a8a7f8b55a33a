"""A webhook receiver for the tests: a real HTTP server on loopback that checks every delivery with the
official ``standardwebhooks`` library and answers with the statuses a test scripts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import standardwebhooks
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# whsec_ + base64 of 32 bytes, the form Standard Webhooks libraries expect
SECRET_KEY = bytes(range(101, 133))
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived
    verified: bool
    status: int = 0  # what the receiver answered

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def document(self) -> dict[str, Any]:
        value = orjson.loads(self.body)
        assert isinstance(value, dict)
        return value


@dataclass
class Script:
    """What the receiver answers: `statuses` in order (then `then`), each after holding the request
    `hold_s` (read while it holds, so a test may release held requests by setting it to 0)."""

    statuses: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    then: int = 200
    hold_s: float = 0.0


class Receiver:
    """``async with Receiver(script) as receiver:`` -> receiver.url, receiver.deliveries."""

    def __init__(self, script: Script | None = None, *, secret: str = SECRET, path: str = "/hooks/relay") -> None:
        self.script = script or Script()
        self.webhook = standardwebhooks.Webhook(secret)
        self.deliveries: list[Delivery] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()  # per webhook-id: attempts served at the same time
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        app = Starlette(routes=[Route(path, self._receive, methods=["POST"])])
        self._server = _QuietServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._task: asyncio.Task[None] | None = None

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            self.webhook.verify(body, headers)
            verified = True
        except standardwebhooks.WebhookVerificationError:
            verified = False
        delivery = Delivery(headers, body, time.monotonic(), verified)
        self.deliveries.append(delivery)
        msg_id = headers.get("webhook-id", "")
        self.in_flight[msg_id] += 1
        self.max_in_flight[msg_id] = max(self.max_in_flight[msg_id], self.in_flight[msg_id])
        try:
            held = time.monotonic()
            while time.monotonic() - held < self.script.hold_s:  # a test may end the hold early (hold_s = 0)
                await asyncio.sleep(0.02)
            answer = self.script.statuses.pop(0) if self.script.statuses else self.script.then
        finally:
            self.in_flight[msg_id] -= 1
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        delivery.status = status
        return Response(b"", status_code=status, headers=extra)

    async def wait(self, count: int, timeout: float = 10.0) -> bool:
        """Until `count` deliveries have been answered (or the timeout)."""
        deadline = time.monotonic() + timeout
        while sum(1 for d in self.deliveries if d.status) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def __aenter__(self) -> Receiver:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
        self._sock.close()


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield
