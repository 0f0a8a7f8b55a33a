"""The floor relay: the smallest correct Twilio <-> Realtime pass-through, as fast as Python goes here.

``python -m bench.floor --port P --upstream ws://.../v1/realtime`` answers the voice webhook with a
``<Connect><Stream>`` (no signature or token checks: those are per-call set-up, not per-frame work),
then per Media Stream: reads ``start``, opens one upstream socket, sends one ``session.update`` (µ-law
both ways, without which the audio would be noise), forwards each media payload as
``input_audio_buffer.append`` and each audio delta as Twilio ``media`` + ``mark``. Nothing else: no
barge-in, no state, no logs, no metrics. The yardstick, not a product.

Stack: uvloop, ``websockets``' sans-I/O protocol objects on ``asyncio.Protocol`` (bench.ws): no ASGI,
no task or await per frame, frames written to the other socket from the receive callback. SIGUSR1
writes the event loop's task count to ``$BENCH_TASKS_FILE`` (the bench's leak check).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from typing import cast
from urllib.parse import parse_qsl

import orjson
from websockets.http11 import Request

from bench import tasks
from bench.ws import WsClient, WsServer, connect

APPEND_PREFIX = '{"type":"input_audio_buffer.append","audio":"'
APPEND_SUFFIX = '"}'
DELTA_TYPES = frozenset({"response.output_audio.delta", "response.audio.delta"})
SESSION_UPDATE = orjson.dumps(
    {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}},
        },
    }
).decode()


class FloorCall:
    def __init__(self, twilio: WsServer, upstream_url: str) -> None:
        self.twilio = twilio
        self.upstream_url = upstream_url
        self.upstream: WsClient | None = None
        self.backlog: list[str] = []
        self.media_prefix = ""
        self.mark_prefix = ""
        self.marks = itertools.count()
        self.ended = False
        twilio.on_text = self.from_twilio
        twilio.on_close = self.twilio_closed

    def from_twilio(self, data: bytes) -> None:
        msg = orjson.loads(data)
        event = msg.get("event")
        if event == "media":
            text = APPEND_PREFIX + msg["media"]["payload"] + APPEND_SUFFIX
            if self.upstream is not None:
                self.upstream.send_text(text)
            else:
                self.backlog.append(text)
        elif event == "start":
            sid = msg["start"]["streamSid"]
            self.media_prefix = '{"event":"media","streamSid":"' + sid + '","media":{"payload":"'
            self.mark_prefix = '{"event":"mark","streamSid":"' + sid + '","mark":{"name":"m'
            asyncio.get_running_loop().create_task(self.open_upstream())
        elif event == "stop":
            self.end()

    async def open_upstream(self) -> None:
        try:
            upstream = await connect(self.upstream_url + "?model=gpt-realtime", {"Authorization": "Bearer floor"})
        except Exception:
            self.end()
            return
        if self.ended:
            upstream.close()
            return
        upstream.on_text = self.from_upstream
        upstream.on_close = self.upstream_closed
        self.upstream = upstream
        upstream.send_text(SESSION_UPDATE)
        for text in self.backlog:
            upstream.send_text(text)
        self.backlog.clear()

    def from_upstream(self, data: bytes) -> None:
        msg = orjson.loads(data)
        if msg.get("type") in DELTA_TYPES:
            send = self.twilio.send_text
            send(self.media_prefix + msg["delta"] + '"}}')
            send(self.mark_prefix + str(next(self.marks)) + '"}}')

    def twilio_closed(self, code: int | None) -> None:
        self.end()

    def upstream_closed(self, code: int | None) -> None:
        self.upstream = None
        self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.twilio.close()
        if self.upstream is not None:
            self.upstream.close()


class Webhook(asyncio.Protocol):
    """POST /incoming-call -> TwiML with the stream URL (HTTP/1.1, one request per connection)."""

    def __init__(self, stream_url: str) -> None:
        self.stream_url = stream_url
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or b"0")
        if len(body) < length:
            return
        form = dict(parse_qsl(body[:length].decode()))
        caller = form.get("From", "")
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
            f'<Stream url="{self.stream_url}"><Parameter name="from" value="{caller}" /></Stream>'
            "</Connect></Response>"
        ).encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(xml)).encode() + b"\r\n\r\n" + xml
        )
        self.transport.close()


async def serve(host: str, port: int, upstream_url: str) -> None:
    loop = asyncio.get_running_loop()
    stream_url = f"ws://{host}:{port + 1}/media-stream"

    def on_open(conn: WsServer, request: Request) -> None:
        FloorCall(conn, upstream_url)

    http = await loop.create_server(lambda: Webhook(stream_url), host, port, backlog=2048)
    ws = await loop.create_server(lambda: WsServer(on_open), host, port + 1, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks.install()
    print(f"READY http://{host}:{port}", flush=True)
    await stop.wait()
    http.close()
    ws.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="webhook port; the Media Stream listens on port+1")
    parser.add_argument("--upstream", required=True, help="Realtime URL, e.g. ws://127.0.0.1:8765/v1/realtime")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port, args.upstream))
    print("floor relay stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
