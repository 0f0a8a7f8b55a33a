"""The Media Stream as Twilio writes it: numbered JSON text frames, in the shapes Twilio sends.

``connected`` comes first and unnumbered, then ``start``, then ``media``, ``dtmf``, ``mark`` echoes
and finally ``stop``, every one with a string ``sequenceNumber`` in wire order
(/work/shared/PROTOCOLS.md §3). Once the caller began hanging up only ``stop`` goes out.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

# Twilio identifies itself with this; a relay that logs user agents sees the real thing.
STREAM_USER_AGENT = "Twilio.TmeWs/1.0"
DTMF_KEYS = frozenset("0123456789*#ABCD")

Message = dict[str, Any]


class Stream:
    """The caller's side of one open Media Stream: numbers and sends Twilio's messages."""

    def __init__(self, ws: ClientConnection, stream_sid: str) -> None:
        self.ws = ws
        self.stream_sid = stream_sid
        self.hanging_up = False
        """Set once ``stop`` is under way: after it Twilio sends nothing more."""
        self._seq = 0
        self._lock = asyncio.Lock()

    async def hello(self) -> None:
        """The unnumbered ``connected`` frame every stream opens with."""
        connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        await self.ws.send(orjson.dumps(connected), text=True)

    async def send(self, message: Message) -> None:
        """Number and send one message; the lock keeps sequence numbers in wire order."""
        async with self._lock:
            self._seq += 1
            message["sequenceNumber"] = str(self._seq)
            await self.ws.send(orjson.dumps(message), text=True)

    def start(self, account_sid: str, call_sid: str, parameters: dict[str, str]) -> Message:
        return {
            "event": "start",
            "sequenceNumber": "",
            "start": {
                "accountSid": account_sid,
                "streamSid": self.stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(parameters),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": self.stream_sid,
        }

    def media(self, chunk: int, timestamp_ms: int, payload: str) -> Message:
        return {
            "event": "media",
            "sequenceNumber": "",
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                # Presentation time of the frame's first sample, on the media clock.
                "timestamp": str(timestamp_ms),
                "payload": payload,
            },
            "streamSid": self.stream_sid,
        }

    def dtmf(self, digit: str) -> Message:
        return {
            "event": "dtmf",
            "sequenceNumber": "",
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def mark(self, name: str) -> Message:
        return {"event": "mark", "sequenceNumber": "", "streamSid": self.stream_sid, "mark": {"name": name}}

    def stop(self, account_sid: str, call_sid: str) -> Message:
        return {
            "event": "stop",
            "sequenceNumber": "",
            "streamSid": self.stream_sid,
            "stop": {"accountSid": account_sid, "callSid": call_sid},
        }
