"""Which instance holds which call, in one place: the instance registry, its beat, and each call's hold.

A call has at most one live stream across instances. The instance serving it holds the call in
the store for LIVE_TTL_S and renews the hold every LIVE_HEARTBEAT_S, so a crashed instance lets
go within seconds and another may take the call. One beat per process renews every hold of this
instance and its heartbeat in one pipeline (a command per call per beat would cost each
call about 0.1 ms of CPU per second of its length); each hold then settles its own outcome. With
the holds go small live-call records and the instance heartbeats, so any instance can list the
live instances and the live calls of all of them, a call whose instance stopped heart-beating
marked orphaned.

A slow or dead store must never stop audio: every store call here is bounded by
LIVE_STORE_TIMEOUT_S, and its failure is a log line or a returned value, never an exception
raised into the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from relay.store import Store
from relay.store.base import (
    LIVE_HEARTBEAT_S,
    LIVE_STORE_TIMEOUT_S,
    LIVE_TTL_S,
    InstanceRecord,
    LiveCall,
    LiveCallRecord,
)

__all__ = ["CallHold", "Ownership"]

log = logging.getLogger("relay.ownership")

# An instance whose heartbeat is this old is gone even while its connections look open (a machine that
# vanished without closing them): two beats missed.
GONE_AFTER_S = LIVE_HEARTBEAT_S * 2.5

CallLog = logging.Logger | logging.LoggerAdapter[logging.Logger]
T = TypeVar("T")


class Ownership:
    """This process's side of ownership: its instance id and heartbeat, and the holds of its calls."""

    def __init__(self, store: Store, instance_id: str, *, draining: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.instance_id = instance_id
        self.started = datetime.now(UTC).isoformat()
        self._draining = draining
        self._holds: dict[str, CallHold] = {}  # call SID -> the hold of its stream here (one: the runtime's registry)
        self._task: asyncio.Task[None] | None = None
        self._presence: asyncio.Task[None] | None = None
        self._on_message: Callable[[bytes], None] | None = None
        self._heartbeat_failing = False

    # the process ---------------------------------------------------------------------------------

    def start(self, on_message: Callable[[bytes], None] | None = None) -> None:
        """Announce this instance at once, then beat every LIVE_HEARTBEAT_S until `stop()`; be present
        (see `Store.keep_presence`) until then too. What `send` addresses to a call of this instance,
        from any instance, goes to `on_message`."""
        self._on_message = on_message
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._beat_loop(), name="ownership-beat")
        if self._presence is None or self._presence.done():
            self._presence = asyncio.create_task(
                self.store.keep_presence(self.instance_id, on_message), name="ownership-presence"
            )

    async def send(self, call_sid: str, message: bytes) -> bool:
        """Deliver `message` to the instance whose stream of `call_sid` is live (this one included), at
        most once; False (logged by the caller) when no instance holds the call or none answered."""
        try:
            async with asyncio.timeout(LIVE_STORE_TIMEOUT_S):
                owner = await self.store.live_owner(call_sid)
                if owner is None:
                    return False
                if owner == self.instance_id:
                    if self._on_message is None:
                        return False
                    asyncio.get_running_loop().call_soon(self._on_message, message)
                    return True
                return await self.store.send_to_instance(owner, message)
        except Exception as exc:
            log.warning("could not reach the instance of call %s (%s)", call_sid, type(exc).__name__)
            return False

    async def stop(self) -> None:
        tasks = [task for task in (self._task, self._presence) if task is not None]
        self._task = self._presence = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def instance_record(self) -> InstanceRecord:
        state = "draining" if self._draining() else "ready"
        return InstanceRecord(self.instance_id, self.started, state, time.time())

    async def _beat_loop(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(LIVE_HEARTBEAT_S)

    async def beat(self) -> None:
        """Renew this instance's heartbeat and every hold it has, in one pipeline; never raises."""
        holds = list(self._holds.values())
        held: list[CallHold] = []
        records: list[LiveCallRecord] = []
        for hold in holds:
            if not hold.held:
                continue
            try:
                records.append(hold.record())
            except Exception:  # a bug in one call must not stop the renewals of all the others
                log.exception("live-call record failed", extra={"call_sid": hold.call_sid})
                continue
            held.append(hold)
        failure: Exception | None = None
        renewed: dict[str, bool] = {}
        try:
            async with asyncio.timeout(LIVE_STORE_TIMEOUT_S):
                results = await self.store.beat(self.instance_record(), records, LIVE_TTL_S)
            renewed = {hold.call_sid: ok for hold, ok in zip(held, results, strict=True)}
        except Exception as exc:  # each call logs it once; the audio never waits on this
            failure = exc
        self._heartbeat_outcome(failure)
        for hold in holds:
            if self._holds.get(hold.call_sid) is hold:  # not released meanwhile
                try:
                    hold.beat_came_back(renewed.get(hold.call_sid, False), failure)
                except Exception:  # a bug in one call must not stop the renewals of all the others
                    log.exception("live-stream hold renewal failed", extra={"call_sid": hold.call_sid})

    def _heartbeat_outcome(self, failure: Exception | None) -> None:
        if failure is None:
            if self._heartbeat_failing:
                self._heartbeat_failing = False
                log.info("instance heartbeat written again", extra={"instance": self.instance_id})
        elif not self._heartbeat_failing:
            self._heartbeat_failing = True
            log.warning(
                "could not write this instance's heartbeat (%s); other instances list its calls as orphaned "
                "until the store answers",
                type(failure).__name__,
                extra={"instance": self.instance_id},
            )

    # listing -------------------------------------------------------------------------------------

    async def live_instances(self) -> list[InstanceRecord] | None:
        """The instances heart-beating now, or None (logged) when the store did not answer."""
        return await _listed("live instances", self.store.live_instances)

    async def live_calls(self) -> list[LiveCall] | None:
        """The live calls of every instance, or None (logged) when the store did not answer."""
        return await _listed("live calls", self.store.live_calls)

    # the calls -----------------------------------------------------------------------------------

    def hold(
        self,
        call_sid: str,
        *,
        profile: str,
        direction: str,
        phase: Callable[[], str],
        on_superseded: Callable[[], Awaitable[None]],
        log: CallLog,
    ) -> CallHold:
        """A hold for a stream of `call_sid` about to be admitted; `take()` it, `release()` it at the end.

        `phase` is read with every beat; `on_superseded` ends the stream when another one took the call."""
        return CallHold(
            self, call_sid, profile=profile, direction=direction, phase=phase, on_superseded=on_superseded, log=log
        )

    async def hand_off(self, call_sid: str) -> bool:
        """Let go of a call held here on purpose, so another instance may take it at once; False if it
        was not held here (or the store did not answer: then the hold lapses within LIVE_TTL_S)."""
        hold = self._holds.get(call_sid)
        return False if hold is None else await hold.hand_off()

    def _add(self, hold: CallHold) -> None:
        self._holds[hold.call_sid] = hold

    def _discard(self, hold: CallHold) -> None:
        if self._holds.get(hold.call_sid) is hold:
            del self._holds[hold.call_sid]


class CallHold:
    """One stream's claim on its call across instances: taken on admission, renewed by the beat,
    taken back when the store lost it, given up when another stream of the call took it."""

    def __init__(
        self,
        ownership: Ownership,
        call_sid: str,
        *,
        profile: str,
        direction: str,
        phase: Callable[[], str],
        on_superseded: Callable[[], Awaitable[None]],
        log: CallLog,
    ) -> None:
        self._ownership = ownership
        self.call_sid = call_sid
        self.profile = profile
        self.direction = direction
        self.started = datetime.now(UTC).isoformat()
        self._phase = phase
        self._on_superseded = on_superseded
        self._log = log
        self.held = False  # the store holds this call for this instance
        self.handed_off = False
        self._renewal_failing = False
        self._reclaim: asyncio.Task[None] | None = None

    def record(self) -> LiveCallRecord:
        return LiveCallRecord(
            self.call_sid, self._ownership.instance_id, self.started, self.direction, self.profile, self._phase()
        )

    async def take(self, *, resumes: bool = False) -> str | None:
        """Admission: hold the call unless another instance does. None: the stream may go on (held,
        or the store could not be asked and this instance's registry alone admits it); otherwise who
        holds the call, and this hold is done.

        A resuming stream (Twilio ran the continuation, so it ended the call's previous stream) takes
        the call over from an instance that is gone, instead of waiting for that hold to lapse."""
        try:
            holder = await asyncio.wait_for(self._claim(resumes=resumes), timeout=LIVE_STORE_TIMEOUT_S)
        except Exception as exc:  # admission must not stop with the store; this instance's registry still holds
            self._log.warning(
                "could not check other instances for a live stream of this call (%s); "
                "admitted on this instance's registry alone",
                type(exc).__name__,
            )
        else:
            if holder != self._ownership.instance_id:
                return holder or "another instance"
            self.held = True
        self._ownership._add(self)  # renewed (or taken back) from the next beat on
        return None

    async def _claim(self, *, resumes: bool = False) -> str | None:
        """Hold the call in the store unless another instance does; returns who holds it now.

        This instance's id also comes back when it held the call already (a stream of it that ended
        here without reaching the store): the local registry has ruled out a second live stream here.
        """
        store = self._ownership.store
        owner = self._ownership.instance_id
        holder: str | None = None
        for _ in range(2):  # a hold that expires between the two commands is taken on the second round
            if await store.claim_live(self.call_sid, owner, LIVE_TTL_S, self.record()):
                return owner
            holder = await store.live_owner(self.call_sid)
            if holder is not None:
                break
        if holder == owner:
            await store.refresh_live(self.call_sid, owner, LIVE_TTL_S)
        elif (
            resumes
            and holder is not None
            and await store.instance_gone(holder, GONE_AFTER_S)
            and await store.take_over_live(self.call_sid, holder, owner, LIVE_TTL_S, self.record())
        ):
            self._log.info("took the call over from instance %s, which is gone", holder)
            return owner
        return holder

    def beat_came_back(self, renewed: bool, failure: Exception | None) -> None:
        """The beat's renewal came back. ``renewed``: the store extended this call's hold. Otherwise
        (not held, or the hold was lost) the call tries to take it again, and ends if another stream
        of it took the call meanwhile."""
        if self.handed_off:
            return
        if failure is not None:
            if not self._renewal_failing:
                self._renewal_failing = True
                self._log.warning(
                    "could not renew this call's live-stream hold (%s); another instance may admit "
                    "a second stream of it once the hold expires",
                    type(failure).__name__,
                )
            return
        if renewed:
            self._renewal_back()
            return
        if self._reclaim is None or self._reclaim.done():
            self._reclaim = asyncio.create_task(self._take_back(), name=f"live-reclaim-{self.call_sid}")
            self._reclaim.add_done_callback(self._reclaim_done)

    def _renewal_back(self) -> None:
        self.held = True
        if self._renewal_failing:
            self._renewal_failing = False
            self._log.info("live-stream hold renewed again")

    async def _take_back(self) -> None:
        """Hold the call again after the store lost (or never had) this instance's hold."""
        try:
            async with asyncio.timeout(LIVE_STORE_TIMEOUT_S):
                holder = await self._claim()
        except Exception as exc:
            self.beat_came_back(False, exc)
            return
        if holder == self._ownership.instance_id:
            self._renewal_back()
            return
        self.held = False
        if holder is None:  # taken and let go again between two commands: try again next beat
            return
        self._log.error("another stream of this call is live on %s; ending this one", holder)
        await self._on_superseded()

    def _reclaim_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("task %s of this call failed", task.get_name(), exc_info=exc)

    async def hand_off(self) -> bool:
        """Let go of the call on purpose: no more renewals, and the store's hold goes at once."""
        if not self.held:
            return False
        self.held = False
        self.handed_off = True  # before awaiting: a beat meanwhile neither renews nor takes it back
        store, owner = self._ownership.store, self._ownership.instance_id
        try:
            async with asyncio.timeout(LIVE_STORE_TIMEOUT_S):
                return await store.hand_off(self.call_sid, owner)
        except Exception as exc:
            self._log.warning(
                "could not hand this call off (%s); its hold expires within %.0f s", type(exc).__name__, LIVE_TTL_S
            )
            return False

    async def release(self) -> None:
        """The stream is over: stop renewing, then let go of the store's hold (and the call's record).
        Never raises; the transport leaves its own registry after this."""
        task = self._reclaim
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._ownership._discard(self)
        if self.held or self.handed_off:
            store, owner = self._ownership.store, self._ownership.instance_id
            try:
                await asyncio.wait_for(store.release_live(self.call_sid, owner), timeout=LIVE_STORE_TIMEOUT_S)
            except Exception as exc:
                self._log.warning(
                    "could not release this call's live-stream hold (%s); it expires within %.0f s",
                    type(exc).__name__,
                    LIVE_TTL_S,
                )
            self.held = False
            self.handed_off = False


async def _listed(what: str, fetch: Callable[[], Awaitable[list[T]]]) -> list[T] | None:
    """One listing from the store within LIVE_STORE_TIMEOUT_S, or None and a log line."""
    try:
        async with asyncio.timeout(LIVE_STORE_TIMEOUT_S):
            return await fetch()
    except Exception as exc:
        log.warning("could not list the %s (%s)", what, type(exc).__name__)
        return None
