"""One simulated Realtime session: the server side of one WebSocket, wired from its parts.

The connection's faults live here: a missing or wrong API key and a configured fatal error end
the session with an ``error`` and close 1008 before ``session.created``; a maximum session length
ends it with ``session_expired`` and close 1000 (/work/shared/PROTOCOLS.md §6, §11). Client
events are dispatched by ``type`` to the part that owns the state they touch, and handled
synchronously; a refused one is answered with an ``error`` naming its ``event_id``. Everything a
part emits goes through the session's one ``Outbox``, so the wire order is the order of the state
changes; response generation runs in tasks so it can be paced and cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from relay.sim.realtime.config import SimConfig
from relay.sim.realtime.conversation import Conversation
from relay.sim.realtime.errors import Problem
from relay.sim.realtime.function_calls import FunctionCalls
from relay.sim.realtime.generation import ResponseOutput
from relay.sim.realtime.input_audio import InputAudioBuffer
from relay.sim.realtime.outbox import Close, Outbox
from relay.sim.realtime.record import SimSession
from relay.sim.realtime.responses import Responses
from relay.sim.realtime.session import SessionConfig
from relay.sim.realtime.wire import JSON, clone

log = logging.getLogger(__name__)


class Peer:
    """Protocol state of one connection (the server side of one Realtime session)."""

    outbox = Outbox  # a SIP call's sideband (relay/sim/sip) has one that knows OpenAI plays the audio

    def __init__(self, ws: ServerConnection, rec: SimSession, config: Callable[[], SimConfig]) -> None:
        self.ws = ws
        self.rec = rec
        self.out = self.outbox(rec, config)
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()
        self.conversation = Conversation(self.out)
        self.session = SessionConfig(self.out, self.conversation, self._turn_detection_changed)
        self.output = ResponseOutput(self.out, self.conversation)
        self.calls = FunctionCalls(self.out, self.conversation, self.output)
        self.responses = Responses(self.out, self.session, self.conversation, self.output, self.calls, self._spawn)
        self.input = InputAudioBuffer(self.out, self.session, self.conversation, self.responses, self.calls)
        self.handlers: dict[str, Callable[[JSON], None]] = {
            "session.update": self.session.on_session_update,
            "input_audio_buffer.commit": self.input.on_commit,
            "input_audio_buffer.clear": self.input.on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self.conversation.on_truncate,
            "conversation.item.delete": self.conversation.on_delete,
            "conversation.item.retrieve": self.conversation.on_retrieve,
            "response.create": self.responses.on_response_create,
            "response.cancel": self.responses.on_response_cancel,
            "output_audio_buffer.clear": self._on_webrtc_only,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        writer = asyncio.create_task(self.out.write_to(self.ws))
        try:
            if self._authorized():
                self.out.emit({"type": "session.created", "session": clone(self.rec.session)})
                if self.out.cfg.max_session_s is not None:
                    self._spawn(self._expire_after(self.out.cfg.max_session_s))
            await self._read_loop()
        finally:
            self.out.closing = True
            pending = [*self.tasks, writer]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.rec.closed = True
            self.finished.set()

    def _authorized(self) -> bool:
        auth = self.rec.headers.get("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token and self.rec.path.startswith("/openai/"):
            token = (self.rec.headers.get("api-key") or "").strip()  # Azure: api-key or an Entra bearer token
        cfg = self.out.cfg
        if not token:
            self._fatal(
                "missing_api_key",
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
            return False
        if cfg.expected_api_key is not None and token != cfg.expected_api_key:
            shown = f"{token[:3]}{'*' * max(0, len(token) - 7)}{token[-4:]}" if len(token) > 8 else "***"
            self._fatal(
                "invalid_api_key",
                f"Incorrect API key provided: {shown}. "
                "You can find your API key at https://platform.openai.com/account/api-keys.",
            )
            return False
        if cfg.fatal_error_on_connect:
            self._fatal(cfg.fatal_error_on_connect, f"Simulated fatal error: {cfg.fatal_error_on_connect}.")
            return False
        return True

    def _fatal(self, code: str, message: str) -> None:
        self.out.emit_error(code, message)
        self._close(1008, code)

    async def _expire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.out.emit_error("session_expired", f"Your session hit the maximum duration of {seconds / 60:g} minutes.")
        self._close(1000, "session_expired")

    def _close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close; nothing emitted after this point reaches the wire."""
        if self.out.closing:
            return
        self.out.closing = True
        self.rec.closed = True  # over from the server's side: nothing more will be emitted
        active = self.responses.active
        if active is not None and active.task is not None:
            active.task.cancel()
        self.out.queue.put_nowait(Close(code, reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task failed in session %s", self.rec.id, exc_info=task.exception())

    async def _read_loop(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if self.out.closing:
                    continue
                if isinstance(message, bytes):
                    self.out.emit_error("invalid_value", "Binary frames are not supported; send JSON text frames.")
                    continue
                self._on_text(message)

    # ------------------------------------------------------------------ dispatch

    def _on_text(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.out.emit_error("invalid_json", "We could not parse the JSON body of your event; send a JSON object.")
            return
        if not isinstance(event, dict):
            self.out.emit_error("invalid_json", "Each client event must be a JSON object.")
            return
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self.input.on_append(event)
            return
        self.rec.received.append((time.monotonic(), event))
        if not isinstance(kind, str):
            self.out.emit_error(
                "missing_required_parameter",
                "Missing required parameter: 'type'.",
                param="type",
                client_event=event,
            )
            return
        handler = self.handlers.get(kind)
        if handler is None:
            supported = ", ".join(f"'{name}'" for name in ["input_audio_buffer.append", *self.handlers])
            self.out.emit_error(
                "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: {supported}.",
                param="type",
                client_event=event,
            )
            return
        try:
            handler(event)
        except Problem as problem:
            self.out.emit_error(problem.code, problem.message, param=problem.param, client_event=event)

    def _turn_detection_changed(self) -> None:
        self.input.reset_vad()

    def _on_item_create(self, event: JSON) -> None:
        self.calls.arm_for_message(self.conversation.on_item_create(event))

    def _on_webrtc_only(self, event: JSON) -> None:
        raise Problem("invalid_value", f"'{event['type']}' is only supported on WebRTC and SIP connections.", "type")
