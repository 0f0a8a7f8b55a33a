"""Running the app under uvicorn with a graceful drain on SIGTERM, in one or several processes.

uvicorn's own shutdown closes WebSockets at once, which would cut live phone calls. Here
SIGTERM first turns readiness off and lets calls finish (up to DRAIN_SECONDS, then a
spoken goodbye); only then does uvicorn stop and the process exits 0. A second SIGTERM
(or SIGINT) during the drain stops at once: sockets are closed with 1012 and the process
ends by that signal.

Several processes (``--workers N`` / ``WEB_CONCURRENCY``): the parent binds the port once
and starts N spawned workers that accept from the same socket. The parent forwards
SIGTERM/SIGINT to them, so each drains its own calls, restarts a worker that crashes,
and exits once they have all stopped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections import deque
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._subprocess import get_subprocess
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from relay import logs
from relay.app import create_app
from relay.asgi_direct import DIRECT_EXTENSION, DirectWebSocket
from relay.config import Settings
from relay.forwarded import ForwardedHeaders
from relay.http_limits import BoundedHttpProtocol, HttpLimits, set_limits
from relay.metrics import mark_worker_dead, multiprocess_dir, reset_multiprocess_dir
from relay.runtime import Runtime

log = logging.getLogger("relay.server")
# Signals this close together are one event delivered twice (a platform signalling the
# whole process group while the parent also forwards), not an operator insisting.
DUPLICATE_SIGNAL_S = 1.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_WORKER_S = 30.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._last_signal_at: float | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Runs in the main thread between bytecodes: only flags and loop callbacks here."""
        now = time.monotonic()
        if self._last_signal_at is not None and now - self._last_signal_at < DUPLICATE_SIGNAL_S:
            return
        self._last_signal_at = now
        loop = self._loop
        if sig == signal.SIGTERM and not self._drain_requested and not self.should_exit and loop is not None:
            self._drain_requested = True
            loop.call_soon_threadsafe(self._begin_drain)
            return
        if self._drain_requested or self.should_exit:
            self.force_exit = True
            if loop is not None:
                loop.call_soon_threadsafe(log.warning, "second signal (%s): stopping now", signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        log.info(
            "SIGTERM: draining",
            extra={"active_calls": len(self.runtime.calls), "drain_seconds": self.runtime.settings.drain_seconds},
        )
        task = self.runtime.start_drain()
        task.add_done_callback(self._drained)

    def _drained(self, task: Any) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("drain failed", exc_info=task.exception())
        self.should_exit = True


def uvicorn_config(app: Any, settings: Settings, *, port: int | None = None, ws: Any = None) -> uvicorn.Config:
    """The production configuration; `ws` swaps the WebSocket protocol (tests of the plain ASGI path)."""
    forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
    if not isinstance(app, str):  # an import string only binds the socket (the multi-worker parent)
        app = ForwardedHeaders(app, forwarded_allow_ips)
    limits = HttpLimits(
        max_header_bytes=settings.max_http_header_bytes,
        max_url_bytes=settings.max_url_bytes,
        idle_timeout_s=settings.http_idle_timeout_s,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        loop="uvloop",
        http=BoundedHttpProtocol,
        ws=RelayWebSocketProtocol if ws is None else ws,
        ws_max_size=settings.max_twilio_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=settings.twilio_ping_interval_s,
        ws_ping_timeout=settings.twilio_ping_timeout_s,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # applied by ForwardedHeaders, which also decides about X-Forwarded-Host
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_keep_alive=settings.http_idle_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=2,  # calls are over by then (drained); see runtime.DRAIN_*
    )
    set_limits(config, limits)
    return config


def secrets_of(settings: Settings) -> list[str | None]:
    """Values that must never appear in a log line."""
    return [
        settings.openai_api_key,
        settings.azure_api_key,
        settings.azure_ad_token,
        settings.twilio_auth_token,
        settings.relay_api_token,
        settings.stream_secret.decode(errors="ignore") if settings.stream_secret else None,
        settings.stream_secret.hex() if settings.stream_secret else None,
        settings.caller_key_secret.decode(errors="ignore") if settings.caller_key_secret else None,
        settings.caller_key_secret.hex() if settings.caller_key_secret else None,
    ]


def _run_worker(settings_env: dict[str, str], sockets: list[socket.socket] | None = None) -> None:
    settings = Settings.from_env(settings_env)
    logs.configure(settings.log_level, secrets_of(settings))
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    server = DrainingServer(uvicorn_config(app, settings), runtime)
    log.info(
        "relay worker starting",
        extra={
            "instance": runtime.instance_id,
            "store": runtime.store.kind,
            "max_calls": settings.max_calls,
            "drain_seconds": settings.drain_seconds,
            "log_level": settings.log_level.lower(),
            "metrics_multiprocess": runtime.metrics.multiprocess,
        },
    )
    notice = settings.transcription_notice()
    if notice:
        log.info(notice)
    server.run(sockets=sockets)


class _Supervisor:
    """The parent of several workers: forwards signals, replaces crashed workers, reaps them all."""

    def __init__(self, settings: Settings, workers: int, env: dict[str, str]) -> None:
        self.settings = settings
        self.workers = workers
        self.env = env
        self.config = uvicorn_config("relay.app:app", settings)
        self.sock: socket.socket | None = None
        self.children: list[SpawnProcess] = []
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.failures = 0
        self.exit_codes: list[int | None] = []

    def spawn(self) -> SpawnProcess:
        assert self.sock is not None
        process = get_subprocess(self.config, target=functools.partial(_run_worker, self.env), sockets=[self.sock])
        process.start()
        if process.pid is not None:
            self.started_at[process.pid] = time.monotonic()
        return process

    def forward(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True
        for child in self.children:
            if child.is_alive() and child.pid:
                os.kill(child.pid, sig)

    def run(self) -> int:
        self.sock = self.config.bind_socket()
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        self.children = [self.spawn() for _ in range(self.workers)]
        log.info(
            "started %d worker processes on %s:%d",
            self.workers,
            self.settings.host,
            self.settings.port,
            extra={"workers": [c.pid for c in self.children], "metrics_multiprocess": multiprocess_dir() is not None},
        )
        try:
            while self.children:
                self._reap()
                time.sleep(0.1)
        finally:
            self.sock.close()
        failed = [code for code in self.exit_codes if code != 0]
        log.info("all workers stopped", extra={"exit_codes": self.exit_codes})
        return 1 if failed else 0

    def _reap(self) -> None:
        for child in list(self.children):
            child.join(timeout=0)
            if child.is_alive() or child.pid is None:
                continue
            mark_worker_dead(child.pid)
            self.children.remove(child)
            lived = time.monotonic() - self.started_at.pop(child.pid, time.monotonic())
            if self.stopping:
                self.exit_codes.append(child.exitcode)
                continue
            self.failures = 0 if lived > STABLE_WORKER_S else self.failures + 1
            if self.failures > len(RESTART_BACKOFF_S):
                log.error("workers keep crashing at start; stopping the others")
                self.exit_codes.append(child.exitcode)
                self.forward(signal.SIGTERM, None)
                continue
            delay = RESTART_BACKOFF_S[self.failures - 1] if self.failures else 0.0
            log.error("worker %s exited with %s; starting a new one in %.1f s", child.pid, child.exitcode, delay)
            time.sleep(delay)
            if not self.stopping:
                self.children.append(self.spawn())


def serve(settings: Settings, workers: int = 1) -> None:
    """``python -m relay serve``: one process, or ``workers`` processes sharing one socket."""
    env = dict(os.environ)
    reset_multiprocess_dir()
    if workers <= 1:
        _run_worker(env)
        return
    logs.configure(settings.log_level, secrets_of(settings))
    code = _Supervisor(settings, workers, env).run()
    if code:
        raise SystemExit(code)


# ---- the Media Stream's WebSocket protocol ---------------------------------------------------------


class _MessageQueue:
    """The part of asyncio.Queue uvicorn's WebSocket protocol uses, for its single consumer (the app's
    receive()), without the task accounting and the Future per empty get of asyncio.Queue."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[Any] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Any:
        items = self._items
        while not items:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


READ_PAUSE_MESSAGES = 32
"""Messages waiting for the app before the socket stops being read (uvicorn pauses at 1)."""
MESSAGES_AFTER_CLOSE = 64
"""Messages a peer may still send after our close frame (in flight: ~1.3 s of audio); past that it
is ignoring the close, so the socket is no longer read (uvicorn would read and discard for 10 s)
and is dropped `IGNORED_CLOSE_GRACE_S` later, after the close frame has had time to arrive."""
IGNORED_CLOSE_GRACE_S = 1.0


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with flow control per 32 messages instead of per message.

    uvicorn pauses reading after every message and resumes once the app has taken it: 50 times a
    second per call, plus an asyncio.Queue round trip each time. Here the socket is paused only when
    32 messages (0.6 s of audio) wait, which still bounds memory. It also offers the app the direct
    path of relay/asgi_direct.py (receive, synchronous send, and text messages handed over as they
    arrive). Measured in bench/RESULTS.md.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _MessageQueue(self.loop)  # type: ignore[assignment]
        self.direct: DirectWebSocket | None = None
        self._after_close = 0

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            self.direct = DirectWebSocket(self)
            scope["extensions"][DIRECT_EXTENSION] = self.direct

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:  # past websocket.close: discard, as uvicorn does, but not for long
            self._after_close += 1
            if self._after_close == MESSAGES_AFTER_CLOSE and not self.transport.is_closing():
                self.read_paused = True
                self.transport.pause_reading()
                if self.close_timer is not None:
                    self.close_timer.cancel()
                self.close_timer = self.loop.call_later(IGNORED_CLOSE_GRACE_S, self.transport.close)
            return
        if self.curr_msg_data_type == "text":
            try:
                text = data.decode()
            except UnicodeDecodeError as exc:
                self.logger.warning("invalid UTF-8 in a text frame (at byte %d); closing with 1007", exc.start)
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
            on_text = self.direct.on_text if self.direct is not None else None
            if on_text is not None and self.queue.empty():
                try:
                    if on_text(text):
                        return
                except Exception:
                    self.logger.exception("error handling a WebSocket message as it arrived; message dropped")
                    return
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        if not self.read_paused and self.queue.qsize() >= READ_PAUSE_MESSAGES:
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if self.read_paused and self.queue.qsize() < READ_PAUSE_MESSAGES // 2:
            self.read_paused = False
            self.transport.resume_reading()
        return message
