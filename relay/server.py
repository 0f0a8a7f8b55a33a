"""Running the app under uvicorn with a graceful drain on SIGTERM, in one or several processes.

uvicorn's own shutdown closes WebSockets at once, which would cut live phone calls. Here
SIGTERM first turns readiness off and lets calls finish (up to DRAIN_SECONDS, then a
spoken goodbye); only then does uvicorn stop. A second SIGTERM or SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._subprocess import get_subprocess

from relay import logs
from relay.app import create_app
from relay.config import Settings
from relay.runtime import Runtime

log = logging.getLogger("relay.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._drain_requested and self._loop is not None:
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._begin_drain)
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        task = self.runtime.start_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def uvicorn_config(app: Any, settings: Settings, *, port: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=settings.max_twilio_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        timeout_graceful_shutdown=5,
    )


def _run_worker(settings_env: dict[str, str], sockets: list[socket.socket] | None = None) -> None:
    settings = Settings.from_env(settings_env)
    logs.configure(settings.log_level, _secrets(settings))
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    server = DrainingServer(uvicorn_config(app, settings), runtime)
    server.run(sockets=sockets)


def _secrets(settings: Settings) -> list[str | None]:
    return [
        settings.openai_api_key,
        settings.twilio_auth_token,
        settings.relay_api_token,
        settings.stream_secret.decode(errors="ignore") if settings.stream_secret else None,
    ]


def serve(settings: Settings, workers: int = 1) -> None:
    """``python -m relay serve``: one process, or ``workers`` processes sharing one socket."""
    env = dict(os.environ)
    if workers <= 1:
        _run_worker(env)
        return
    logs.configure(settings.log_level, _secrets(settings))
    config = uvicorn_config("relay.app:app", settings)
    sock = config.bind_socket()
    children: list[Any] = []
    stopping = False

    def spawn() -> Any:
        process = get_subprocess(config, target=functools.partial(_run_worker, env), sockets=[sock])
        process.start()
        return process

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid:
                os.kill(child.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    children.extend(spawn() for _ in range(workers))
    log.info("started %d worker processes on %s:%d", workers, settings.host, settings.port)
    while children:
        for i, child in enumerate(list(children)):
            child.join(timeout=0.5)
            if child.is_alive():
                continue
            if stopping:
                children.remove(child)
            else:
                log.error("worker %s exited with %s; starting a new one", child.pid, child.exitcode)
                children[i] = spawn()
        time.sleep(0.1)
    sock.close()
