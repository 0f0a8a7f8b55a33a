"""This call's hold on being the one live stream of its call: here and, through the store, everywhere.

The hold itself (claim, renewal with every beat of the instance, take-back, release) is
relay/ownership.py's; the transport's part is to take it on admission, refuse the stream when
another instance holds the call, and release it last.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

from relay import logs
from relay.ownership import CallHold
from relay.store.base import LIVE_HEARTBEAT_S, LIVE_TTL_S
from relay.transport.ending import CallEnd
from relay.transport.twilio_socket import CLOSE_POLICY

# A crashed instance's hold lapses within LIVE_TTL_S of its last renewal.
RESUME_HOLD_WAIT_S = LIVE_TTL_S + LIVE_HEARTBEAT_S
RESUME_HOLD_POLL_S = 0.1

if TYPE_CHECKING:
    from relay.agent_settings import AgentSettings
    from relay.call import Call
    from relay.runtime import Runtime


class LiveHold(ABC):
    """The live-stream hold of a call's transport; the class using it provides the rest."""

    runtime: Runtime
    call_sid: str
    called: str
    direction: str
    agent: AgentSettings
    call: Call | None
    end: CallEnd
    log: logs.CallLogger
    _hold: CallHold | None

    @abstractmethod
    def twilio_open(self) -> bool: ...

    @abstractmethod
    async def _refuse(self, code: int, reason: str) -> None: ...

    @abstractmethod
    async def _end(self, reason: str) -> None: ...

    @abstractmethod
    async def goodbye(self, text: str, timeout: float) -> None: ...

    @abstractmethod
    async def hand_off(self, max_wait_s: float) -> bool: ...

    @abstractmethod
    async def command(self, name: str, args: Mapping[str, str]) -> None: ...

    def _profile_name(self) -> str:
        """The profile the live-call listing shows."""
        return self.agent.name

    def _phase(self) -> str:
        """What the live-call listing shows for this call (read with every beat)."""
        if self.end.ending:
            return "ending"
        return self.call.phase.value if self.call is not None else "connecting"

    async def _take_call(self, *, resumes: bool = False) -> bool:
        """Make this the call's one live stream, on this instance and (through the store) on all.

        A resuming stream (Twilio ran the continuation, so the call's previous stream is over) waits
        up to RESUME_HOLD_WAIT_S for the previous stream's hold to go: at once after a hand-off or when
        its instance is gone (it crashed), else when that hold expires (an instance that lives on but
        has not noticed yet that its stream was lost)."""
        runtime = self.runtime
        deadline = time.monotonic() + (RESUME_HOLD_WAIT_S if resumes else 0.0)
        # On this instance the previous stream stays registered until its teardown is over, and only
        # then lets go of the hold it shares with any stream of the call here: wait for both.
        while not runtime.register(self):
            if time.monotonic() >= deadline or not self.twilio_open():
                await self._refuse(CLOSE_POLICY, "call already live: another stream of it is on this instance")
                return False
            await asyncio.sleep(RESUME_HOLD_POLL_S)
        while True:
            self._hold = runtime.ownership.hold(
                self.call_sid,
                profile=self._profile_name(),
                direction=self.direction,
                phase=self._phase,
                on_superseded=lambda: self._end("superseded"),
                log=self.log,
            )
            holder = await self._hold.take(resumes=resumes)
            if holder is None:
                return True
            if time.monotonic() >= deadline or not self.twilio_open():
                break
            await asyncio.sleep(RESUME_HOLD_POLL_S)
        runtime.unregister(self)
        await self._refuse(CLOSE_POLICY, f"call already live: another stream of it is on {holder}")
        return False

    async def _release_call(self) -> None:
        """The stream is over: stop renewing and let go of the store's hold, then leave this instance's
        registry (in that order: a new stream of the call here must not find the old hold and lose
        its own to this release)."""
        if self._hold is not None:
            await self._hold.release()
        self.runtime.unregister(self)
