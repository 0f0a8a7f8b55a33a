"""Run the real relay (uvicorn, same settings as production) in-process on a loopback port.

Used by ``python -m relay demo``, the integration tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from types import TracebackType
from typing import Any

from relay.app import create_app
from relay.config import Settings
from relay.runtime import Runtime
from relay.server import uvicorn_config
from relay.uvicorn_internals.server import InProcessServer


def bind_loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class LocalRelay:
    """``async with LocalRelay(settings) as relay:`` -> relay.base_url, relay.runtime."""

    def __init__(self, settings: Settings, *, ws_protocol: Any = None, **runtime_kwargs: Any) -> None:
        self._sock = bind_loopback()
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        if settings.public_url is None:
            settings = dataclasses.replace(settings, public_url=self.base_url)
        self.settings = dataclasses.replace(settings, host="127.0.0.1", port=self.port)
        self.runtime = Runtime(self.settings, **runtime_kwargs)
        self.app = create_app(self.settings, self.runtime)
        self.server = InProcessServer(uvicorn_config(self.app, self.settings, ws=ws_protocol), self.runtime)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LocalRelay:
        self._task = asyncio.create_task(self.server.serve(sockets=[self._sock]), name="local-relay")
        await self.server.wait_started(self._task)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._task is not None:
            await self.server.stop(self._task, timeout_s=15)
        self._sock.close()
