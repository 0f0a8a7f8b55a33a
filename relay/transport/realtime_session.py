"""The Realtime side of a call: a configured session kept attached for as long as the call lasts.

A session ends for one of a few named reasons (`SessionClose`), or for none (the socket dropped);
what follows is the reconnect policy's call (relay/call/reconnect.py). Caller audio that a dropped
session may have lost in flight is replayed to the next one (relay/call/caller_audio.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from enum import Enum

import websockets
from websockets.asyncio.client import ClientConnection

from relay import logs
from relay.call import Call, UpstreamFailed
from relay.call.reconnect import ReconnectPolicy
from relay.config import Settings
from relay.metrics import HOP_SAMPLE_EVERY, Metrics
from relay.realtime import events as ev
from relay.realtime.dialect import Dialect
from relay.realtime.endpoint import connect_target
from relay.transport.ending import CallEnd
from relay.transport.media_stream import Spawn
from relay.transport.output import Output
from relay.websockets_internals import RealtimeConnection, write_paused

ROLLOVER_WAIT_S = 60.0  # how long a planned rollover waits for a pause between turns
ROLLOVER_POLL_S = 0.05


class SessionClose(Enum):
    """Why this relay is closing the current Realtime session (None: it was not this relay)."""

    ROLLOVER = "rollover"  # the session reached its planned maximum
    EXPIRED = "expired"  # the service reported the session over (not fatal): a new one at once
    CONFIGURATION_TIMEOUT = "configuration timeout"  # no session.updated in time
    FATAL_ERROR = "fatal error"  # the service refused the session: the call cannot go on

    @property
    def renews(self) -> bool:
        """A new session follows at once, without counting as a failure."""
        return self in (SessionClose.ROLLOVER, SessionClose.EXPIRED)

    @staticmethod
    def outcome(current: SessionClose | None, reason: SessionClose) -> SessionClose:
        """Why the session closes once `reason` comes on top of `current`. A refusal outranks
        everything (the call cannot go on); a renewal outranks a configuration timeout that fires
        while that session closes."""
        if current is SessionClose.FATAL_ERROR:
            return current
        if current is not None and current.renews and reason is not SessionClose.FATAL_ERROR:
            return current
        return reason


class RealtimeSession:
    """Connects, reads and replaces the Realtime sessions of one call; `output.upstream` is the open one."""

    def __init__(
        self,
        call: Call,
        output: Output,
        end: CallEnd,
        log: logs.CallLogger,
        *,
        settings: Settings,
        dialect: Dialect,
        metrics: Metrics,
        finish: Callable[[str], Awaitable[None]],
        spawn: Spawn,
        target: Callable[[], tuple[str, dict[str, str]]] | None = None,
        call_gone: Callable[[Exception], bool] | None = None,
    ) -> None:
        self.call = call
        self.output = output
        self.end = end
        self.log = log
        self.settings = settings
        self.dialect = dialect
        self.metrics = metrics
        self._finish = finish  # end the call for a reason
        self._spawn = spawn
        # A SIP call's sideband (relay/transport/sideband.py) connects by call id, and a refused
        # connection there can mean the call itself is over rather than a failure
        self._target = target
        self._call_gone = call_gone
        self.closing: SessionClose | None = None
        self.fatal: UpstreamFailed | None = None
        self._reader_waiting = False
        self._deltas = 0
        self._hop_down = metrics.hop_latency.labels("realtime_to_caller")

    async def connect(self) -> ClientConnection:
        settings = self.settings
        if self._target is not None:
            url, headers = self._target()
        else:
            url, headers = connect_target(settings, self.dialect, self.call.model)
        return await websockets.connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=settings.max_upstream_message_bytes,
            ping_interval=settings.ws_ping_interval_s,
            ping_timeout=settings.ws_ping_timeout_s,
            open_timeout=10,
            close_timeout=1,
            user_agent_header="phone-relay",
            create_connection=RealtimeConnection,
        )

    def failed(self, failure: UpstreamFailed) -> None:
        """The service reported an error the session cannot continue past: close it."""
        if failure.fatal:
            self.fatal = failure
            self._close_for(SessionClose.FATAL_ERROR)
            self.log.error("Realtime API refused the session (%s): %s", failure.code, failure.message)
        else:
            self._close_for(SessionClose.EXPIRED)
        upstream = self.output.upstream
        if upstream is not None:
            self._spawn(upstream.close(), "upstream-close")

    def _close_for(self, reason: SessionClose) -> None:
        self.closing = SessionClose.outcome(self.closing, reason)

    async def supervise(self) -> None:
        """Keep a configured Realtime session attached for as long as the call lasts."""
        call = self.call
        output = self.output
        policy = ReconnectPolicy(self.settings.reconnect_attempts, self.settings.reconnect_backoff_s)
        opened_once = False
        while not self.end.ending:
            try:
                upstream = await self.connect()
            except Exception as exc:
                if self._call_gone is not None and self._call_gone(exc):
                    self.log.info("the call is over: its Realtime connection was refused (%s)", str(exc)[:200])
                    await self._finish("caller_hung_up")
                    return
                self.log.warning("Realtime connection failed (%s: %s)", type(exc).__name__, str(exc)[:200])
                delay = policy.connect_failed()
                if delay is None:
                    await self._finish("realtime_unavailable")
                    return
                await asyncio.sleep(delay)
                continue
            if opened_once:
                renewed = self.closing is not None and self.closing.renews
                self.metrics.upstream_reconnects.labels("rollover" if renewed else "dropped").inc()
                call.note_event("realtime_reconnected", rollover=renewed)
            opened_once = True
            self.closing = None
            output.upstream = upstream
            replay = call.upstream_opened()
            await output.flush(replay)  # the session's configuration, then the replayed audio
            watchdog = self._spawn(self._watchdog(upstream), "session-watchdog")
            try:
                await self._read(upstream)
            finally:
                watchdog.cancel()
                output.upstream = None
                with contextlib.suppress(Exception):
                    await upstream.close()
            became_ready = call.session_ready
            call.upstream_lost()
            await output.flush()
            if self.end.ending:
                return
            closing = self.closing
            if closing is SessionClose.FATAL_ERROR:
                assert self.fatal is not None, "failed() records the refusal"
                await self._finish(f"realtime_error:{self.fatal.code}")
                return
            if closing is not None and closing.renews:
                self.log.info("Realtime session rolled over")
                continue
            timed_out = closing is SessionClose.CONFIGURATION_TIMEOUT
            delay = policy.session_lost(became_ready=became_ready, timed_out=timed_out)
            reason = "session.update timeout" if timed_out else f"closed with {upstream.close_code}"
            if self._call_gone is not None and upstream.close_code == 1000 and closing is None:
                # a sideband the service closed normally: most often the call ended, which the
                # reconnect's refusal tells (call_gone); else the call goes on with a new socket
                self.log.info("Realtime sideband closed by the service; reconnecting to see whether the call goes on")
            else:
                self.log.warning("Realtime session lost (%s); reconnecting (attempt %d)", reason, policy.failures)
            if delay is None:
                await self._finish("realtime_unavailable")
                return
            await asyncio.sleep(delay)

    async def _watchdog(self, upstream: ClientConnection) -> None:
        """Close a session that never confirms its configuration, and roll over long sessions."""
        call = self.call
        settings = self.settings
        await asyncio.sleep(settings.session_update_timeout_s)
        if not call.session_ready:
            self._close_for(SessionClose.CONFIGURATION_TIMEOUT)
            self.log.warning("no session.updated within %.1f s", settings.session_update_timeout_s)
            await upstream.close(1000, "session.update timeout")
            return
        await asyncio.sleep(max(0.0, settings.session_max_s - settings.session_update_timeout_s))
        # Roll over between turns so nothing the caller is hearing is cut.
        deadline = time.monotonic() + ROLLOVER_WAIT_S
        while time.monotonic() < deadline and not (call.playback_idle and not call.caller_speaking):
            await asyncio.sleep(ROLLOVER_POLL_S)
        self._close_for(SessionClose.ROLLOVER)
        self.log.info("Realtime session reached its planned maximum; opening a new one")
        await upstream.close(1000, "rollover")

    async def _read(self, upstream: ClientConnection) -> None:
        handle = self._message
        direct = self.output.twilio.direct is not None
        taker = upstream if isinstance(upstream, RealtimeConnection) and direct else None
        if taker is not None:  # messages that need no waiting are handled as they arrive
            taker.on_text = self.on_text_arrived
        try:
            while True:
                self._reader_waiting = True
                try:
                    raw = await upstream.recv()
                finally:
                    self._reader_waiting = False
                await handle(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            if taker is not None:
                taker.on_text = None

    async def _message(self, raw: str | bytes) -> None:
        t0 = time.perf_counter()
        event = self._feed(raw)
        if event is None:
            return
        await self.output.flush()
        self._sample_hop_down(event, t0)

    def on_text_arrived(self, text: str) -> bool:
        """Handle a Realtime message inside the connection's data callback, without a task switch.

        Only while the reader waits in recv() and nothing the message causes has to wait (both
        sockets take writes); otherwise returns False, before touching anything, and the reader gets
        the message from recv() as usual.
        """
        output = self.output
        upstream = output.upstream
        if (
            not self._reader_waiting
            or not output.twilio.can_write()
            or (upstream is not None and write_paused(upstream))
        ):
            return False
        t0 = time.perf_counter()
        event = self._feed(text)
        if event is None:
            return True
        output.write()  # a full buffer is seen by the next message's check
        self._sample_hop_down(event, t0)
        return True

    def _feed(self, raw: str | bytes) -> ev.ServerEvent | None:
        """Parse one Realtime message and hand it to the call; None when it had to be skipped."""
        call = self.call
        try:
            event = self.dialect.parse(raw)
        except ev.MalformedEvent as exc:
            self.log.warning("malformed Realtime event skipped: %s", exc)
            return None
        try:
            call.upstream_event(event)
        except Exception:  # a bug must cost one event, not the call
            self.log.exception("error handling Realtime event %s; skipped", type(event).__name__)
            call.take_output()
            return None
        return event

    def _sample_hop_down(self, event: ev.ServerEvent, t0: float) -> None:
        if type(event) is ev.AudioDelta:
            self._deltas += 1
            if self._deltas % HOP_SAMPLE_EVERY == 1:  # audio deltas only, the first one included
                self._hop_down.observe(time.perf_counter() - t0)
