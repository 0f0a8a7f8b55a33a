"""WebSocket endpoints for the bench's own processes, callback-driven on one event loop.

``websockets``' sans-I/O protocol objects (the same RFC 6455 parser and serializer the library's
asyncio API uses) attached straight to ``asyncio.Protocol``: no task and no await per message, and
frames are written to the transport as soon as they are built. The load generator runs hundreds
of calls with this in one process; the floor relay uses it on both of its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

TextHandler = Callable[[bytes], None]
CloseHandler = Callable[[int | None], None]
MAX_MESSAGE = 8 * 1024 * 1024


class WsEndpoint(asyncio.Protocol):
    """One WebSocket connection. ``on_text(bytes)`` per text message; ``send_text(str)`` writes at once."""

    def __init__(self, proto: ClientProtocol | ServerProtocol) -> None:
        self.proto = proto
        self.transport: asyncio.Transport | None = None
        self.on_text: TextHandler = _ignore_text
        self.on_close: CloseHandler = _ignore_close
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.open.add_done_callback(_retrieve)
        self.closed = False
        self.close_code: int | None = None
        self._fragments: list[bytes] = []
        self._paused = False
        self._resume: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        events = proto.events_received()
        for event in events:
            if type(event) is Frame:
                self._frame(event)
            else:
                self._handshake(event)
        self._flush()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError(f"connection lost during the handshake: {exc}"))
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        if not self.closed:
            self.closed = True
            self.close_code = self.proto.close_code
            self.on_close(self.close_code)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    # ---- frames ----------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = cast(bytes, frame.data)  # bytes from the parser (orjson would take any buffer)
        if opcode is Opcode.TEXT:
            if frame.fin:
                self.on_text(data)
            else:
                self._fragments = [data]
        elif opcode is Opcode.CONT and self._fragments:
            self._fragments.append(data)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self.on_text(data)
        elif opcode is Opcode.CLOSE and self.proto.state is State.CLOSED:
            self.close_code = self.proto.close_code

    def _handshake(self, event: object) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.proto.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        if self.proto.state is State.CLOSED and not transport.is_closing():
            transport.close()

    # ---- API -------------------------------------------------------------------------------

    def send_text(self, text: str) -> bool:
        """Queue one text message on the transport; False once the connection is closing."""
        if self.proto.state is not State.OPEN or self.transport is None:
            return False
        self.proto.send_text(text.encode())
        for data in self.proto.data_to_send():
            self.transport.write(data)
        return True

    async def drain(self) -> None:
        """Wait while the kernel buffer is full (the peer is not reading)."""
        if self._paused and not self.closed:
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.proto.state is State.OPEN:
            self.proto.send_close(code, reason)
            self._flush()
        elif self.transport is not None and self.proto.state is State.CONNECTING:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a failed handshake nobody awaits is not an "unretrieved" error


def _ignore_text(data: bytes) -> None:
    return None


def _ignore_close(code: int | None) -> None:
    return None


class WsClient(WsEndpoint):
    def __init__(self, url: str, headers: dict[str, str], user_agent: str) -> None:
        super().__init__(ClientProtocol(parse_uri(url), max_size=MAX_MESSAGE))
        self._headers = headers
        self._user_agent = user_agent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(self.proto, ClientProtocol)
        request = self.proto.connect()
        request.headers["User-Agent"] = self._user_agent
        for name, value in self._headers.items():
            request.headers[name] = value
        self.proto.send_request(request)
        self._flush()

    def _handshake(self, event: object) -> None:
        if isinstance(event, Response) and not self.open.done():
            if self.proto.handshake_exc is not None:
                self.open.set_exception(self.proto.handshake_exc)
            else:
                self.open.set_result(None)


async def connect(url: str, headers: dict[str, str] | None = None, user_agent: str = "bench") -> WsClient:
    """Open a client connection and wait for the handshake (raises on refusal)."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: WsClient(url, headers or {}, user_agent), uri.host, uri.port)
    try:
        await asyncio.wait_for(asyncio.shield(client.open), 10)
    except BaseException:
        client.abort()
        raise
    return client


class WsServer(WsEndpoint):
    """Server side; ``on_open(conn, request)`` runs once the handshake is done."""

    def __init__(self, on_open: Callable[[WsServer, Request], None]) -> None:
        super().__init__(ServerProtocol(max_size=MAX_MESSAGE))
        self._on_open = on_open

    def _handshake(self, event: object) -> None:
        if not isinstance(event, Request):
            return
        assert isinstance(self.proto, ServerProtocol)
        response = self.proto.accept(event)
        self.proto.send_response(response)
        self._flush()
        if response.status_code == 101:
            self.open.set_result(None)
            self._on_open(self, event)
        else:
            with contextlib.suppress(Exception):
                self.open.set_exception(ConnectionError(f"handshake refused ({response.status_code})"))
            if self.transport is not None:
                self.transport.close()


def header_dict(headers: Headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.raw_items()}
