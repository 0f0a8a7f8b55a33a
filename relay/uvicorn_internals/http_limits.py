"""uvicorn's httptools protocol with the bounds a directly exposed server needs.

httptools buffers a request's URL and headers for as long as a client keeps sending them, and
uvicorn's keep-alive timeout only starts after a response, so without these bounds a client can
hold memory (a 10 MB header per connection) or a file descriptor (a connection that never sends
a request) for as long as it likes. `BoundedHttpProtocol` adds three limits:

- the request line plus headers of one request: over ``max_header_bytes`` it answers 431 and closes;
- the URL: over ``max_url_bytes`` it answers 414 and closes;
- idle time: a connection must complete each request head within ``idle_timeout_s`` of connecting
  or of the previous response, or it is closed (a slow trickle of header bytes does not reset it).

See the package docstring for what of uvicorn this relies on.
"""

from __future__ import annotations

import asyncio
import http
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 32 * 1024
    max_url_bytes: int = 8 * 1024
    idle_timeout_s: float = 10.0


class _RequestTooLarge(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _refusal(status: int) -> bytes:
    phrase = http.HTTPStatus(status).phrase
    body = phrase.encode() + b"\n"
    head = f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


_LIMITS_ATTRIBUTE = "relay_http_limits"


def set_limits(config: uvicorn.Config, limits: HttpLimits) -> None:
    """Give the server built from `config` these limits (an attribute, so the config still pickles
    for worker processes)."""
    setattr(config, _LIMITS_ATTRIBUTE, limits)


class BoundedHttpProtocol(HttpToolsProtocol):
    """See the module docstring; ``uvicorn.Config(http=BoundedHttpProtocol)``, limits from `set_limits`."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits: HttpLimits = getattr(config, _LIMITS_ATTRIBUTE, None) or HttpLimits()
        self._head_bytes = 0
        self._reading_head = True  # waiting for, or reading, a request line and headers
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_idle_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's data_received, plus the head bounds."""
        if self._reading_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _RequestTooLarge):
                self._refuse(cause.status)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._reading_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431)

    def _refuse(self, status: int) -> None:
        self._cancel_idle_timer()
        if not self.transport.is_closing():
            self.transport.write(_refusal(status))
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.limits.max_url_bytes:
            raise _RequestTooLarge(414)
        super().on_url(url)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._cancel_idle_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True

    def on_response_complete(self) -> None:
        next_queued = bool(self.pipeline)
        super().on_response_complete()
        if not next_queued and not self.transport.is_closing():
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = self.loop.call_later(self.limits.idle_timeout_s, self._idle_timeout)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()
