"""The simulated Realtime server: where the relay connects, and the handle tests drive it by.

It listens on ``/v1/realtime`` and on Azure OpenAI's two paths, tells the dialect from the
``OpenAI-Beta: realtime=v1`` header or the Azure preview path, takes the model from the query
(/work/shared/PROTOCOLS.md §6, §10, §16) and records every session. Tests reach past the
protocol through it to inject server events and to drop every socket as a network failure would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from relay.sim.realtime.config import SimConfig
from relay.sim.realtime.peer import Peer
from relay.sim.realtime.record import SimSession
from relay.sim.realtime.session import default_session
from relay.sim.realtime.wire import JSON, Dialect

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
AZURE_GA_PATH = "/openai/v1/realtime"
AZURE_PREVIEW_PATH = "/openai/realtime"
"""Azure OpenAI's forms: ``?model=<deployment>`` (GA shapes), ``?api-version=…&deployment=…`` (beta shapes)."""
_PATHS = frozenset({REALTIME_PATH, AZURE_GA_PATH, AZURE_PREVIEW_PATH})
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class _Headers(dict[str, str]):
    """Request headers with case-insensitive lookup (keys stored lower-case, as HTTP/2 and ASGI do)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        for name, value in pairs:
            key = name.lower()
            super().__setitem__(key, f"{self[key]}, {value}" if key in self else value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)


class RealtimeSimulator:
    """A local Realtime server (``ws://host:port/v1/realtime``) that records every session."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.url = ""
        self.sessions: list[SimSession] = []
        self.connections = 0
        self._server: Server | None = None
        self._peers: dict[SimSession, Peer] = {}

    async def __aenter__(self) -> RealtimeSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen and return the base URL to put in ``OPENAI_REALTIME_URL``."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._check_path,
            compression=None,
            max_size=MAX_MESSAGE_BYTES,
            close_timeout=5,
        )
        bound_port = next(iter(self._server.sockets)).getsockname()[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.url = f"ws://{shown}:{bound_port}{REALTIME_PATH}"
        log.info("realtime simulator listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Close every connection (1001) and wait until all session tasks are gone."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        if self._peers:
            await asyncio.wait([asyncio.create_task(p.finished.wait()) for p in self._peers.values()], timeout=5)

    async def drop_all(self) -> None:
        """Abort every open socket without a close frame, as a network failure or crash would."""
        peers = list(self._peers.values())
        for peer in peers:
            peer.ws.transport.abort()
        if peers:
            await asyncio.wait([asyncio.create_task(p.finished.wait()) for p in peers], timeout=5)

    def inject(self, event: JSON, session: SimSession | None = None) -> int:
        """Send an arbitrary server event (e.g. an ``error``) on one or every open session; fault tests."""
        peers = [p for rec, p in self._peers.items() if session is None or rec is session]
        for peer in peers:
            peer.out.emit(dict(event))
        return len(peers)

    def active_sessions(self) -> list[SimSession]:
        return [rec for rec in self.sessions if not rec.closed]

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path.rstrip("/") not in _PATHS:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        request = ws.request
        assert request is not None  # set once the handshake completed
        target = urlsplit(request.path)
        headers = _Headers(list(request.headers.raw_items()))
        beta_flags = [flag.strip() for flag in (headers.get("openai-beta") or "").split(",")]
        preview = target.path.rstrip("/") == AZURE_PREVIEW_PATH
        dialect: Dialect = "beta" if "realtime=v1" in beta_flags or preview else "ga"
        query = dict(parse_qsl(target.query))
        model = query.get("deployment" if preview else "model") or (
            "gpt-realtime" if dialect == "ga" else "gpt-4o-realtime-preview"
        )
        rec = SimSession(dialect=dialect, headers=headers, path=target.path, query=query, model=model)
        lifetime = self.config.max_session_s if self.config.max_session_s is not None else 3600.0
        rec.session = default_session(dialect, rec.id, model, int(time.time() + lifetime))
        self.sessions.append(rec)
        peer = Peer(ws, rec, lambda: self.config)
        self._peers[rec] = peer
        log.debug("session %s opened (%s, %s)", rec.id, dialect, model)
        try:
            await peer.run()
        finally:
            self._peers.pop(rec, None)
            log.debug("session %s closed", rec.id)


async def serve_forever(host: str = "127.0.0.1", port: int = 8765, config: SimConfig | None = None) -> None:
    """Run a simulator until cancelled (``python -m relay.sim.realtime``, the demo)."""
    sim = RealtimeSimulator(config)
    await sim.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
