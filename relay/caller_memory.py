"""Caller memory of a call whose stream dropped, written once no new stream resumed the call.

A stream that ends without Twilio's ``stop`` and without the relay ending the call (the connection
dropped) may be followed by the continuation webhook and a new stream of the same call, here or on
another instance. Writing the caller's memory then would write it mid-call: the resumed stream would
read its own call's notes back as an earlier call's, and the call's last stream, which writes the
memory of the whole call, could be overwritten by the dropped one's late write.

So the dropped stream's final summary waits here. Whether a stream resumed the call is in the
call's record (its ``streams`` count is raised by each resuming stream as it starts); a resumed
call's memory is its last stream's to write, and if none follows (the caller hung up as the
connection dropped, the continuation answered the apology), the summary is written as the memory
once a new stream can no longer start: its token has expired, its ``start`` and its wait for the
old stream's hold are over (`window_s`). On shutdown what still waits is settled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from relay.store.base import Store

STORE_READ_TIMEOUT_S = 1.0
POLL_S = 1.0  # how often a waiting summary looks whether its call was resumed (then it is dropped early)


@dataclass(frozen=True, slots=True)
class WaitingMemory:
    call_sid: str
    caller: str
    summary: str
    stream: int  # the dropped stream's number in its call (1 for the first)


class LaterMemory:
    """The summaries of dropped streams on this instance, until their calls are known to be over."""

    def __init__(self, store: Store, window_s: float, log: logging.Logger | logging.LoggerAdapter[logging.Logger]):
        self.store = store
        self.window_s = window_s
        self.log = log
        self._waiting: dict[str, tuple[WaitingMemory, asyncio.Task[None]]] = {}
        self._stopped = False

    def start(self) -> None:
        self._stopped = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def defer(self, memory: WaitingMemory) -> None:
        """Write `memory` as the caller's memory unless a stream resumes its call within the window."""
        if self._stopped:  # a stream torn down as the instance stops: nobody would be left to wait
            self._settle(memory, None)
            return
        earlier = self._waiting.pop(memory.call_sid, None)
        if earlier is not None:
            earlier[1].cancel()
        task = asyncio.create_task(self._settle_later(memory), name=f"caller-memory-{memory.call_sid}")
        self._waiting[memory.call_sid] = (memory, task)
        task.add_done_callback(lambda done: self._forget(memory.call_sid, done))

    def _forget(self, call_sid: str, task: asyncio.Task[None]) -> None:
        waiting = self._waiting.get(call_sid)
        if waiting is not None and waiting[1] is task:
            del self._waiting[call_sid]

    async def _settle_later(self, memory: WaitingMemory) -> None:
        deadline = time.monotonic() + self.window_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            if await self._resumed(memory) is True:
                self.log.debug(
                    "call resumed on a new stream; its last stream writes the caller's memory",
                    extra={"call_sid": memory.call_sid},
                )
                return
        self._settle(memory, await self._resumed(memory))

    def _settle(self, memory: WaitingMemory, resumed: bool | None) -> None:
        if resumed is True:
            return
        self.store.set_caller_memory(memory.caller, memory.summary)
        self.log.info(
            "caller memory written for a call whose dropped stream was not resumed",
            extra={"call_sid": memory.call_sid},
        )

    async def _resumed(self, memory: WaitingMemory) -> bool | None:
        """Whether a later stream of the call started (None: the store did not answer)."""
        try:
            async with asyncio.timeout(STORE_READ_TIMEOUT_S):
                record = await self.store.get_call(memory.call_sid)
        except Exception:
            return None
        if record is None:
            return False
        try:
            return int(record.meta.get("streams") or 1) > memory.stream
        except ValueError:
            return None

    async def stop(self) -> None:
        """Shutdown: settle every waiting summary now (a call resumed already is left to its stream)."""
        self._stopped = True
        waiting = list(self._waiting.values())
        self._waiting.clear()
        for memory, task in waiting:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            self._settle(memory, await self._resumed(memory))
