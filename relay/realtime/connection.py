"""The Realtime WebSocket client connection, with complete text messages handed over as they arrive."""

from __future__ import annotations

import logging
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

log = logging.getLogger("relay.realtime")


class RealtimeConnection(ClientConnection):
    """websockets' ClientConnection, plus ``on_text``.

    When ``on_text`` is set, each unfragmented text message is first offered to it, in the
    protocol's data callback: True means handled (``recv()`` will not return it), False leaves it to
    ``recv()`` as usual. The owner sets it only while its reader waits in ``recv()`` with nothing
    queued, so messages keep their order. An exception it raises is logged and the message dropped.

    A Realtime session sends ~10 messages a second per call; taking them here saves each one the
    Assembler queue, a task switch and a coroutine chain (bench/RESULTS.md).
    """

    on_text: Callable[[str], bool] | None = None

    def process_event(self, event: Event) -> None:
        on_text = self.on_text
        if on_text is not None and type(event) is Frame and event.opcode is Opcode.TEXT and event.fin:
            try:
                text = str(event.data, "utf-8")
            except UnicodeDecodeError:
                pass  # recv() reports it the usual way
            else:
                try:
                    if on_text(text):
                        return
                except Exception:
                    log.exception("error handling a Realtime message as it arrived; message dropped")
                    return
        super().process_event(event)
