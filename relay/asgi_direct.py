"""A direct path for the messages of an accepted WebSocket, offered by the relay's own server protocol.

The ASGI app finds it in ``scope["extensions"]``; under any other server it is absent and the app
uses plain ASGI ``receive``/``send``. This module is the contract the app relies on; the
implementation, which needs uvicorn's protocol internals, is in relay/uvicorn_internals/.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

DIRECT_EXTENSION = "relay.websocket.direct"
"""ASGI scope extension offered by `relay.uvicorn_internals.websocket_protocol.RelayWebSocketProtocol`."""


class DirectWebSocket(Protocol):
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

    on_text: Callable[[str], bool] | None
    receive: Callable[[], Awaitable[Any]]
    writable: Callable[[], Awaitable[Any]]

    def can_write(self) -> bool:
        """True when ``send_text`` would write now: open, and the buffer under its high-water mark."""
        ...

    def send_text(self, text: str) -> bool: ...
