"""The one way out of a simulated session: every server event is queued here and written in order.

Client events are handled synchronously and each state change queues its events at once, so the
order on the wire is the order of the state changes; a single writer task drains the queue.
Once the session is closing nothing more is queued, as nothing more would reach the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from relay.sim.realtime.config import SimConfig
from relay.sim.realtime.errors import error_event
from relay.sim.realtime.record import SimSession
from relay.sim.realtime.wire import JSON, NAMES, EventNames, new_id


@dataclass(frozen=True)
class Close:
    """Queued last: close the socket with this code once everything before it is written."""

    code: int
    reason: str


class Outbox:
    """Server events of one session, recorded in ``SimSession.sent`` and queued for the writer task."""

    def __init__(self, rec: SimSession, config: Callable[[], SimConfig]) -> None:
        self.rec = rec
        self.names: EventNames = NAMES[rec.dialect]
        self._config = config
        self.queue: asyncio.Queue[str | Close] = asyncio.Queue()
        self.closing = False

    @property
    def cfg(self) -> SimConfig:
        """The simulator's configuration as it is now (tests may change it between calls)."""
        return self._config()

    def emit(self, event: JSON) -> None:
        if self.closing:
            return
        event = {"event_id": new_id("event"), **event}
        if "delta" in event and not self.cfg.record_audio and event["type"] == self.names.audio_delta:
            self.rec.sent.append({**event, "delta": ""})  # load runs: keep the event, drop the audio
        else:
            self.rec.sent.append(event)
        self.queue.put_nowait(orjson.dumps(event).decode())

    def emit_error(
        self, code: str | None, message: str, *, param: str | None = None, client_event: JSON | None = None
    ) -> None:
        self.emit(error_event(code, message, param, client_event))

    async def write_to(self, ws: ServerConnection) -> None:
        """Write queued events until a ``Close`` is reached or the connection is gone."""
        queue = self.queue
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await queue.get()
                if isinstance(message, Close):
                    await ws.close(message.code, message.reason)
                    return
                await ws.send(message)
