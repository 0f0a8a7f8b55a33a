"""A TCP proxy on loopback that can go silent without closing: a half-open connection.

Networks fail by going quiet, not only by closing. ``blackhole()`` stops forwarding bytes
in both directions on every current connection while keeping the sockets open, which is
what a dead NAT entry or a frozen peer looks like; only keepalive pings can detect it.
New connections made after ``blackhole()`` are forwarded normally. ``connect_delay_s`` holds each
new connection that long before it is passed on: a slow upstream handshake.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, connect_delay_s: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.connect_delay_s = connect_delay_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for link in self._links:
            link.close()
        await asyncio.gather(*(link.done.wait() for link in self._links))
        self._links.clear()

    def blackhole(self) -> None:
        """Every open connection goes silent (bytes are swallowed), without a FIN or RST."""
        for link in self._links:
            link.silent = True

    @property
    def open_links(self) -> int:
        return sum(1 for link in self._links if not link.done.is_set())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.connect_delay_s:
                await asyncio.sleep(self.connect_delay_s)
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        await asyncio.gather(link.pump(reader, up_writer), link.pump(up_reader, writer))
        link.close()
        link.done.set()


class _Link:
    def __init__(self, a: asyncio.StreamWriter, b: asyncio.StreamWriter) -> None:
        self.writers = (a, b)
        self.silent = False
        self.done = asyncio.Event()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.silent:
                    continue
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    def close(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
