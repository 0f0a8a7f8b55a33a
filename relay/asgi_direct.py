"""A direct path for the messages of an accepted WebSocket, offered by the relay's own server protocol.

The ASGI app finds it in ``scope["extensions"]``; under any other server it is absent and the app
uses plain ASGI ``receive``/``send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.exceptions import InvalidState

if TYPE_CHECKING:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

DIRECT_EXTENSION = "relay.websocket.direct"
"""ASGI scope extension offered by `RelayWebSocketProtocol`; see `DirectWebSocket`."""


class DirectWebSocket:
    """The per-message half of the ASGI WebSocket interface, without the layers above it.

    Offered to the app as ``scope["extensions"]["relay.websocket.direct"]``. A media stream
    exchanges ~60 messages a second per call; through Starlette each one passes its state checks
    and the exception middleware's `send` wrapper, and every send is a coroutine chain. Here:

    - ``receive()``: the protocol's own ASGI receive (same messages, same order).
    - ``send_text(text) -> bool``: frames and writes a text message at once; True when the
      transport's buffer is over its high-water mark and the caller should ``await writable()``
      (the flow control ASGI ``send`` applies by waiting before the next write). Raises
      ``ConnectionError`` once the socket is closed or closing, like ASGI ``send`` would.

    - ``on_text``: set by the app to a callable ``(text) -> bool`` to be handed each text message as
      it arrives, while no earlier message is waiting in the receive queue; returning True means
      the message was handled and will not be delivered by ``receive()``; False queues it as usual.
      It runs inside the protocol's data callback: it must not block, and an exception it raises
      is logged and the message dropped.

    Accepting, closing and anything else go through the ordinary ASGI path. Apps served by other
    servers never see the extension and use ASGI; measured in bench/RESULTS.md.
    """

    __slots__ = ("_protocol", "on_text", "receive", "writable")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol
        self.on_text: Callable[[str], bool] | None = None
        self.receive = protocol.receive
        self.writable = protocol.writable.wait

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
