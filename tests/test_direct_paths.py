"""The direct message paths of both sockets: relay/uvicorn_internals/websocket_protocol.py (the caller's)
and relay/websockets_internals.py (the Realtime session's)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from relay.asgi_direct import DIRECT_EXTENSION
from relay.sim.local import bind_loopback
from relay.uvicorn_internals.websocket_protocol import RelayWebSocketProtocol
from relay.websockets_internals import RealtimeConnection


async def test_realtime_connection_offers_each_text_message_before_recv(caplog: pytest.LogCaptureFixture) -> None:
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        for text in ("a", "b", "c", "boom", "d"):
            await ws.send(text)
        await ws.send(b"binary")  # only text is offered
        await ws.send(["frag", "mented"])  # fragmented messages go the usual way
        await go.wait()

    taken: list[str] = []

    def on_text(text: str) -> bool:
        if text == "boom":
            raise RuntimeError("handler bug")
        if text in ("a", "c"):
            taken.append(text)
            return True
        return False

    caplog.set_level(logging.ERROR, logger="relay.realtime")
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", create_connection=RealtimeConnection) as conn:
            assert isinstance(conn, RealtimeConnection)
            conn.on_text = on_text
            await conn.send("go")
            received = [await asyncio.wait_for(conn.recv(), 5) for _ in range(4)]
            conn.on_text = None
            go.set()
    assert taken == ["a", "c"]
    assert received == ["b", "d", b"binary", "fragmented"]  # "boom" was dropped, with a log line
    assert [r.getMessage() for r in caplog.records] == [
        "error handling a Realtime message as it arrived; message dropped"
    ]


async def test_relay_protocol_hands_text_messages_over_and_keeps_the_rest_for_receive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under RelayWebSocketProtocol an app can take messages as they arrive; what it declines
    arrives through receive() as usual, and a handler's exception costs that message only."""
    results: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        direct = scope["extensions"][DIRECT_EXTENSION]
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        taken: list[str] = []

        def on_text(text: str) -> bool:
            if text == "boom":
                raise RuntimeError("handler bug")
            if text.startswith("take"):
                taken.append(text)
                return True
            return False

        direct.on_text = on_text
        got: list[str] = []
        while True:
            message = await direct.receive()
            if message["type"] == "websocket.disconnect":
                break
            got.append(message["text"])
            if message["text"] == "end":
                break
        direct.on_text = None
        results.update(taken=taken, got=got, can_write=direct.can_write())
        assert direct.send_text(orjson.dumps(results).decode()) is False
        await send({"type": "websocket.close", "code": 1000})
        results["after_close"] = direct.can_write()
        with pytest.raises(ConnectionError):
            direct.send_text("too late")

    caplog.set_level(logging.ERROR)
    sock = bind_loopback()
    config = uvicorn.Config(app, ws=RelayWebSocketProtocol, lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            for text in ("take1", "x", "take2", "boom", "y", "end"):
                await ws.send(text)
                await asyncio.sleep(0.05)  # each arrives with nothing queued before it
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    finally:
        server.should_exit = True
        await task
        sock.close()
    assert reply == {"taken": ["take1", "take2"], "got": ["x", "y", "end"], "can_write": True}
    assert results["after_close"] is False
    assert any("message dropped" in r.getMessage() for r in caplog.records)
