"""The caller's WebSocket, as the rest of the transport writes to it and closes it.

Under the relay's own server protocol, per-message traffic skips Starlette's layers
(relay/asgi_direct.py): a write is framed and handed to the transport at once. Under any other
server, writes wait their turn in a queue that `wait_sent` sends through ASGI. Either way `write`
never waits and `wait_sent` does, so one output path serves both (relay/transport/output.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from enum import Enum

from starlette.websockets import WebSocket, WebSocketState

from relay.asgi_direct import DIRECT_EXTENSION, DirectWebSocket

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013


class TwilioSide(Enum):
    """Whether the caller's socket still takes messages, and if not, who ended it."""

    OPEN = "open"
    GONE = "gone"  # Twilio disconnected, or a write to it failed
    CLOSED = "closed"  # this relay closed it


class TwilioSocket:
    """Writes and the close of one Media Stream socket; its receive side is `receive`."""

    __slots__ = ("_queued", "direct", "receive", "state", "ws")

    def __init__(self, websocket: WebSocket) -> None:
        self.ws = websocket
        self.direct: DirectWebSocket | None = websocket.scope.get("extensions", {}).get(DIRECT_EXTENSION)
        self.receive = self.direct.receive if self.direct is not None else websocket.receive
        self.state = TwilioSide.OPEN
        self._queued: deque[str] = deque()  # plain ASGI only: written, not yet sent

    @property
    def open(self) -> bool:
        return self.state is TwilioSide.OPEN

    def write(self, text: str) -> bool:
        """Write without waiting; True when `wait_sent` must be awaited before the next writes."""
        if self.state is not TwilioSide.OPEN:
            return False  # the caller's socket is gone; the receive side ends the call
        direct = self.direct
        if direct is None:
            self._queued.append(text)
            return True
        try:
            return direct.send_text(text)
        except Exception:
            self.state = TwilioSide.GONE
            return False

    def can_write(self) -> bool:
        """True when a write now goes out at once (the relay's server protocol, buffer not full)."""
        return self.direct is not None and self.direct.can_write()

    async def wait_sent(self) -> None:
        """Until what was written has gone out (ASGI) or the transport's buffer has room again."""
        direct = self.direct
        if direct is not None:
            if self.state is TwilioSide.OPEN:
                await direct.writable()
            return
        queued = self._queued
        while queued:
            text = queued.popleft()
            if self.state is not TwilioSide.OPEN:
                queued.clear()
                return
            try:
                await self.ws.send_text(text)
            except Exception:
                self.state = TwilioSide.GONE

    def disconnected(self) -> None:
        """Twilio closed the socket."""
        self.state = TwilioSide.GONE

    async def close(self, code: int, reason: str) -> None:
        """Close the socket once, whoever asks first; nothing is written to it after this."""
        if self.state is not TwilioSide.OPEN:
            return
        self.state = TwilioSide.CLOSED
        with contextlib.suppress(Exception):
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                await self.ws.close(code=code, reason=reason)
