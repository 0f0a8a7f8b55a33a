"""This call's hold on being the one live stream of its call: here and, through the store, everywhere.

Kept apart so the transport's part in it is one piece: the runtime renews every hold of this
instance each LIVE_HEARTBEAT_S and reports back through `live_beat`.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from relay import logs
from relay.store.base import LIVE_STORE_TIMEOUT_S, LIVE_TTL_S
from relay.transport.twilio_socket import CLOSE_POLICY

if TYPE_CHECKING:
    from relay.runtime import Runtime


class LiveHold(ABC):
    """The live-stream hold of a call's transport (a `LiveStream` to the runtime); the class using it
    provides the rest."""

    runtime: Runtime
    call_sid: str
    log: logs.CallLogger
    live_held: bool  # the store holds this call for this instance (renewed by the runtime)
    _live_renewal_failing: bool
    _reclaim: asyncio.Task[None] | None

    @abstractmethod
    async def _refuse(self, code: int, reason: str) -> None: ...

    @abstractmethod
    async def _end(self, reason: str) -> None: ...

    @abstractmethod
    async def goodbye(self, text: str, timeout: float) -> None: ...

    @abstractmethod
    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...

    async def _take_call(self) -> bool:
        """Make this the call's one live stream, on this instance and (through the store) on all."""
        runtime = self.runtime
        if not runtime.register(self):
            await self._refuse(CLOSE_POLICY, "call already live: another stream of it is on this instance")
            return False
        owner = runtime.instance_id
        try:
            holder = await asyncio.wait_for(self._claim_live(), timeout=LIVE_STORE_TIMEOUT_S)
        except Exception as exc:  # admission must not stop with the store; this instance's registry still holds
            self.log.warning(
                "could not check other instances for a live stream of this call (%s); "
                "admitted on this instance's registry alone",
                type(exc).__name__,
            )
        else:
            if holder != owner:
                runtime.unregister(self)
                await self._refuse(
                    CLOSE_POLICY, f"call already live: another stream of it is on {holder or 'another instance'}"
                )
                return False
            self.live_held = True
        return True

    async def _claim_live(self) -> str | None:
        """Hold the call in the store unless another instance does; returns who holds it now.

        This instance's id also comes back when it held the call already (a stream of it that ended
        here without reaching the store): the local registry has ruled out a second live stream here.
        """
        store = self.runtime.store
        owner = self.runtime.instance_id
        holder: str | None = None
        for _ in range(2):  # a hold that expires between the two commands is taken on the second round
            if await store.claim_live(self.call_sid, owner, LIVE_TTL_S):
                return owner
            holder = await store.live_owner(self.call_sid)
            if holder is not None:
                break
        if holder == owner:
            await store.refresh_live(self.call_sid, owner, LIVE_TTL_S)
        return holder

    def live_beat(self, renewed: bool, failure: Exception | None) -> None:
        """The runtime's renewal of this instance's holds (every LIVE_HEARTBEAT_S) came back.

        ``renewed``: the store extended this call's hold. Otherwise (not held, or the hold was lost)
        the call tries to take it again, and ends if another stream of it took the call meanwhile.
        """
        if failure is not None:
            if not self._live_renewal_failing:
                self._live_renewal_failing = True
                self.log.warning(
                    "could not renew this call's live-stream hold (%s); another instance may admit "
                    "a second stream of it once the hold expires",
                    type(failure).__name__,
                )
            return
        if renewed:
            self._renewal_back()
            return
        if self._reclaim is None or self._reclaim.done():
            self._reclaim = self._spawn(self._take_back(), "live-reclaim")

    def _renewal_back(self) -> None:
        self.live_held = True
        if self._live_renewal_failing:
            self._live_renewal_failing = False
            self.log.info("live-stream hold renewed again")

    async def _take_back(self) -> None:
        """Hold the call again after the store lost (or never had) this instance's hold."""
        owner = self.runtime.instance_id
        try:
            async with asyncio.timeout(LIVE_STORE_TIMEOUT_S):
                holder = await self._claim_live()
        except Exception as exc:
            self.live_beat(False, exc)
            return
        if holder == owner:
            self._renewal_back()
            return
        self.live_held = False
        if holder is None:  # taken and let go again between two commands: try again next beat
            return
        self.log.error("another stream of this call is live on %s; ending this one", holder)
        await self._end("superseded")

    async def _release_call(self) -> None:
        """The stream is over: stop renewing, let go of the store's hold, then leave this instance's
        registry (in that order: a new stream of the call here must not find the old hold and lose
        its own to this release)."""
        task = self._reclaim
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self.live_held:
            try:
                await asyncio.wait_for(
                    self.runtime.store.release_live(self.call_sid, self.runtime.instance_id),
                    timeout=LIVE_STORE_TIMEOUT_S,
                )
            except Exception as exc:
                self.log.warning(
                    "could not release this call's live-stream hold (%s); it expires within %.0f s",
                    type(exc).__name__,
                    LIVE_TTL_S,
                )
            self.live_held = False
        self.runtime.unregister(self)
