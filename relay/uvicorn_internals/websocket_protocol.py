"""The Media Stream's WebSocket protocol: uvicorn's sans-I/O one, with coarser flow control and the
direct message path of relay/asgi_direct.py.

See the package docstring for what of uvicorn this relies on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request

from relay.asgi_direct import DIRECT_EXTENSION


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
        self.direct: UvicornDirectWebSocket | None = None
        self._after_close = 0

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            self.direct = UvicornDirectWebSocket(self)
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


class UvicornDirectWebSocket:
    """`relay.asgi_direct.DirectWebSocket` on `RelayWebSocketProtocol`: receive is the protocol's own,
    a text message is framed by its websockets connection and written to its transport at once."""

    __slots__ = ("_protocol", "on_text", "receive", "writable")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol
        self.on_text: Callable[[str], bool] | None = None
        self.receive: Callable[[], Awaitable[Any]] = protocol.receive
        self.writable: Callable[[], Awaitable[Any]] = protocol.writable.wait

    def can_write(self) -> bool:
        """True when ``send_text`` would write now: open, and the buffer under its high-water mark."""
        protocol = self._protocol
        return (
            protocol.writable.is_set()
            and protocol.handshake_complete
            and not (protocol.disconnected or protocol.close_sent)
        )

    def send_text(self, text: str) -> bool:
        protocol = self._protocol
        if protocol.disconnected or protocol.close_sent or not protocol.handshake_complete:
            raise ConnectionError("websocket is closed")
        conn = protocol.conn
        try:
            conn.send_text(text.encode())
        except InvalidState as exc:
            raise ConnectionError("websocket is closed") from exc
        protocol.transport.write(b"".join(conn.data_to_send()))
        return not protocol.writable.is_set()
