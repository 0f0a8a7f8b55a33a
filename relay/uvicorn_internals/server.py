"""uvicorn's Server with a drain on the first SIGTERM, and the pieces of uvicorn a multi-process parent uses.

See the package docstring for what of uvicorn this relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn._subprocess import get_subprocess

if TYPE_CHECKING:
    from relay.runtime import Runtime

log = logging.getLogger("relay.server")
# Signals this close together are one event delivered twice (a platform signalling the
# whole process group while the parent also forwards), not an operator insisting.
DUPLICATE_SIGNAL_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains the runtime's calls before uvicorn stops."""

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


class _Embedded(uvicorn.Server):
    """A uvicorn.Server inside another program: it leaves the host program's signal handlers alone
    and is started and stopped by that program."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def wait_started(self, serving: asyncio.Task[None]) -> None:
        """Return once the server listens; raise what `serving` (the task of ``serve()``) failed with."""
        while not self.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)

    async def stop(self, serving: asyncio.Task[None], timeout_s: float) -> None:
        """uvicorn's graceful shutdown, or after `timeout_s` its forced one."""
        self.should_exit = True
        try:
            await asyncio.wait_for(serving, timeout=timeout_s)
        except TimeoutError:
            self.force_exit = True
            await serving


class InProcessServer(_Embedded, DrainingServer):
    """A DrainingServer inside another program (the demo, pytest, the benchmark)."""


class EmbeddedServer(_Embedded):
    """A plain server inside another program, with no runtime to drain (the simulated SIP connector's
    REST API, relay/sim/sip)."""


def listening_socket(config: uvicorn.Config) -> socket.socket:
    """The socket `config` describes, bound and listening, to share with worker processes."""
    return config.bind_socket()


def worker_process(config: uvicorn.Config, target: Callable[..., None], sockets: list[socket.socket]) -> SpawnProcess:
    """A spawned (not yet started) process running ``target(sockets=sockets)`` the way uvicorn starts
    its own workers (stdin reattached, logging configured from `config`)."""
    return get_subprocess(config, target=target, sockets=sockets)
