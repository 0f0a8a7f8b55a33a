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

import base64
import functools
import logging
import os
import signal
import socket
import time
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import Any

import uvicorn

from relay import logs
from relay.app import create_app
from relay.config import Settings
from relay.forwarded import ForwardedHeaders
from relay.metrics import mark_worker_dead, multiprocess_dir, reset_multiprocess_dir
from relay.runtime import Runtime
from relay.uvicorn_internals.http_limits import BoundedHttpProtocol, HttpLimits, set_limits
from relay.uvicorn_internals.server import DrainingServer, listening_socket, worker_process
from relay.uvicorn_internals.websocket_protocol import RelayWebSocketProtocol

log = logging.getLogger("relay.server")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_WORKER_S = 30.0


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
        settings.webhook_secret.decode(errors="ignore") if settings.webhook_secret else None,
        base64.b64encode(settings.webhook_secret).decode() if settings.webhook_secret else None,
        settings.webhook_secret.hex() if settings.webhook_secret else None,
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
        process = worker_process(self.config, functools.partial(_run_worker, self.env), [self.sock])
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
        self.sock = listening_socket(self.config)
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
