"""Every use of websockets' non-public API in the relay, in one module; the rest of relay/ uses only
its documented API (``websockets.asyncio.client``/``server``, ``websockets.exceptions``,
``websockets.http11``, ``Connection.state`` with ``websockets.protocol.State``).

Versions: written against websockets 17.4 and checked with 17.4 (the test suite); the code relied
upon below has the same shape in 13.0, 16.0 and 17.0 (read, not run). pyproject.toml allows ``>=13,<17.5``: 13.0 is
the first release with the ``websockets.asyncio`` implementation and ``connect(create_connection=)``.

What it relies on (websockets/asyncio/connection.py, websockets/protocol.py, websockets/frames.py):

- `RealtimeConnection`: ``Connection.data_received`` feeds the sans-I/O protocol and hands each
  event it returns to ``process_event(event)``, which for a data frame puts it in ``recv_messages``
  (the assembler ``recv()`` reads); overriding ``process_event`` and not calling it drops the frame
  before it is queued. Events are ``Frame`` objects with ``opcode`` (``Opcode.TEXT``), ``fin`` and
  a bytes-like ``data``.
- `write_text`: ``Connection.protocol`` is the sans-I/O protocol, whose ``send_text(bytes)`` frames a
  message; ``Connection.send_data()`` writes what the protocol has to send to the transport. That
  is what ``send()`` does inside ``send_context()``, minus the context's state check (the caller
  checks ``state``), its ``drain()`` (the caller awaits it when this returns True) and its turning a
  write error into ConnectionClosed. ``Connection.paused`` is True while the transport is over its
  high-water mark (``drain()`` waits for it to turn False).

On upgrade: diff those three files between the two releases (``pip download websockets==X
--no-deps``), read ``Connection.send``/``send_context``/``data_received``/``process_event`` again,
run tests/test_direct_paths.py tests/test_relay_e2e.py tests/test_realtime_conformance.py, then move
the bound in pyproject.toml and the versions here together (tests/test_static.py checks that they
agree).
"""

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


def write_text(upstream: ClientConnection, text: str) -> bool:
    """``upstream.send(text)`` minus its async context manager, for an OPEN socket: frame the message,
    hand it to the transport, and return True when websockets' flow control says to wait (drain()).

    This runs once per caller frame; what it saves is measured in bench/RESULTS.md.
    """
    upstream.protocol.send_text(text.encode())
    upstream.send_data()
    return upstream.paused


def write_paused(upstream: ClientConnection) -> bool:
    """True while websockets' flow control says to wait (``drain()``) before writing more: the
    transport's buffer is over its high-water mark. ``Connection.paused`` is not documented."""
    return upstream.paused
