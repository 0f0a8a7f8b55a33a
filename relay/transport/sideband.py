"""One SIP call, controlled over its sideband WebSocket: the call's audio is OpenAI's, not ours.

OpenAI's SIP connector answers the trunk; the project webhook (relay/app.py) hands the call here.
`SipCall` is a `MediaStreamCall` without a caller socket: the same admission into the live-call
registry (ownership hold, GET /calls), the same call core with no audio path (``stream_sid``
None: no playback accounting, ``output_audio_buffer.*`` say what the caller hears, keypad events
are keypad entries), the same effects, tools, transcripts, summaries, caller memory and call
record. What differs is here: the accept (its session built by the code that builds a Media
Stream's ``session.update``), the sideband connection by call id (reopened when it drops, as a
Realtime session is), and call control through OpenAI's REST API instead of Twilio's: hang-up
after the goodbye has played, transfer by SIP REFER to the profile's destination
(/work/shared/PROTOCOLS.md §14).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from websockets.exceptions import InvalidStatus

from relay import logs
from relay.agent_settings import AgentSettings
from relay.call import Call
from relay.realtime.endpoint import sideband_target
from relay.security import frame_caller_notes
from relay.sip.errors import CallGone
from relay.sip.headers import IncomingCall, choose_profile
from relay.store.base import caller_memory_refusal
from relay.transport.lifecycle import FINAL_SUMMARY_WAIT_S, MediaStreamCall
from relay.transport.output import Output
from relay.transport.realtime_session import RealtimeSession
from relay.transport.twilio_socket import TwilioSide, TwilioSocket

if TYPE_CHECKING:
    from relay.runtime import Runtime
    from relay.sip.calls import SipCalls

KEYPAD_POLL_S = 0.05  # a keypad entry's pause is noticed within this
# Ends after which nobody else would: the session cannot be controlled any more, or we are stopping
_HANGS_UP = ("shutdown", "realtime_unavailable", "realtime_error:", "sideband_failed")


log = logging.getLogger(logs.TRANSPORT_LOGGER)


async def answer(runtime: Runtime, incoming: IncomingCall) -> None:
    """A SIP call OpenAI offers: rejected with 486 when this instance is full or draining, else
    accepted with its profile's session and served to its end."""
    sip = runtime.sip
    assert sip is not None, "SIP calls arrive only with SIP mode on"
    extra = {"call_sid": incoming.call_id, "sip_call_id": incoming.sip_call_id}
    if runtime.full or runtime.draining:
        reason = "draining" if runtime.draining else "full"
        runtime.metrics.calls_refused.labels(reason).inc()
        log.warning("SIP call rejected with 486 (%s)", reason, extra=extra)
        try:
            await sip.reject(incoming.call_id, status_code=486)
        except CallGone:
            log.info("SIP call gone before it was rejected", extra=extra)
        except Exception as exc:
            log.warning("SIP reject failed (%s)", type(exc).__name__, extra=extra)
        return
    agent, chosen_by = choose_profile(runtime.profiles, incoming)
    log.info("SIP call offered; profile %s (by %s)", agent.name, chosen_by, extra=extra)
    await SipCall(runtime, sip, incoming, agent).run()


class NoCallerSocket(TwilioSocket):
    """The caller's side of a call whose audio does not pass through the relay: nothing is written
    to it, and it is "open" until the call ends."""

    __slots__ = ()

    def __init__(self) -> None:  # no websocket: the slots the writes would use are all there is
        self.direct = None
        self.state = TwilioSide.OPEN
        self._queued = deque()

    def write(self, text: str) -> bool:
        return False

    def can_write(self) -> bool:
        return False

    async def wait_sent(self) -> None:
        return None

    async def close(self, code: int, reason: str) -> None:
        self.state = TwilioSide.CLOSED


def refused_as_gone(exc: Exception) -> bool:
    """A sideband handshake refused with 404: there is no such call (any more)."""
    return isinstance(exc, InvalidStatus) and exc.response.status_code == 404


class SipCall(MediaStreamCall):
    """``await SipCall(runtime, sip, incoming, agent).run()`` accepts the call and serves it to its end."""

    def __init__(self, runtime: Runtime, sip: SipCalls, incoming: IncomingCall, agent: AgentSettings) -> None:
        super().__init__(runtime, None, twilio=NoCallerSocket())
        self.sip = sip
        self.incoming = incoming
        self.call_sid = incoming.call_id
        self.caller = incoming.caller
        self.called = incoming.called
        self.agent = agent
        self.allowed_tools = agent.tools
        self.log = logs.call_logger(incoming.call_id, "", logs.TRANSPORT_LOGGER)
        self._effect_failures.logger = self.log
        self._stopped = asyncio.Event()
        self._hung_up = False

    # ---- LiveHold ---------------------------------------------------------------------------

    def twilio_open(self) -> bool:
        return not self.end.ending

    async def _refuse(self, code: int, reason: str) -> None:
        # another stream of this call is live (a webhook delivered twice past the dedupe): it has the call
        self.log.warning("SIP call not taken: %s", reason)

    async def hand_off(self, max_wait_s: float) -> bool:
        """A SIP call's media stays with OpenAI: there is no stream to move, so it stays here."""
        return False

    # ---- the call -----------------------------------------------------------------------------

    async def run(self) -> None:
        runtime = self.runtime
        if not await self._take_call():
            return
        try:
            call = await self._accept()
        except BaseException:
            await self._release_call()
            raise
        if call is None:
            await self._release_call()
            return
        output = self._output = Output(call, self.twilio, call.audio, runtime.metrics, self._apply)
        settings = self.settings
        session = self._session = RealtimeSession(
            call,
            output,
            self.end,
            self.log,
            settings=settings,
            dialect=runtime.dialect,
            metrics=runtime.metrics,
            finish=self._end,
            spawn=self._spawn,
            target=lambda: sideband_target(settings, runtime.dialect, self.call_sid),
            call_gone=refused_as_gone,
        )
        runtime.metrics.calls_started.inc()
        runtime.store.call_started(
            self.call_sid,
            {
                "started": datetime.now(UTC).isoformat(),
                "direction": self.direction,
                "from": self.caller,
                "to": self.called,
                "stream_sid": "",
                "instance": runtime.instance_id,
                "dialect": runtime.dialect.name,
                "model": call.model,
                "profile": self.agent.name,
                "caller_memory": "1" if self.caller_memory else "0",
            },
        )
        self.log.info("SIP call started", extra={"caller_known": bool(self.caller_memory), "profile": self.agent.name})
        upstream = self._upstream_task = asyncio.create_task(session.supervise(), name=f"sideband-{self.call_sid}")
        keypad = self._spawn(self._keypad_timer(call, output), "keypad-timer")
        stopped = asyncio.create_task(self._stopped.wait(), name=f"stopped-{self.call_sid}")
        try:
            await asyncio.wait({upstream, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.done() and not upstream.cancelled() and (exc := upstream.exception()) is not None:
                self.log.error("the call's sideband task failed", exc_info=exc)
                await self._end("sideband_failed")
        finally:
            stopped.cancel()
            keypad.cancel()
            await self._teardown()

    async def _accept(self) -> Call | None:
        """Build the call and accept it with its session; None when it cannot be accepted."""
        runtime, settings = self.runtime, self.settings
        if settings.caller_memory:
            refusal = caller_memory_refusal(self.caller)
            self.memory_on = refusal is None
            if refusal is not None:
                self.log.info("caller memory off for this call: %s", refusal)
        memory = self.caller_memory = await self._caller_memory()
        call = self.call = Call(
            call_sid=self.call_sid,
            stream_sid=None,
            dialect=runtime.dialect,
            agent=self.agent,
            model=settings.model_for(self.agent),
            tools=runtime.tools.specs(self.allowed_tools, self.agent),
            instructions_suffix=frame_caller_notes(memory) if memory else "",
            summary_max_turns=settings.summary_max_turns,
            summary_max_tokens=settings.summary_max_tokens,
            summary_keep_turns=settings.summary_keep_turns,
            max_dtmf_per_second=settings.max_dtmf_per_second,
            logger=logs.call_logger(self.call_sid, ""),
            transport_logger=self.log,
        )
        session = runtime.dialect.session_config(
            self.agent, model=call.model, instructions=call.conversation.instructions(), tools=call.tools
        )
        try:
            await self.sip.accept(self.call_sid, session)
        except CallGone:
            self.log.info("SIP call gone before it was accepted (404); nothing to do")
            return None
        except Exception as exc:
            self.log.warning("SIP call accept failed (%s: %s)", type(exc).__name__, str(exc)[:200])
            runtime.metrics.calls_refused.labels("accept_failed").inc()
            return None
        return call

    async def _keypad_timer(self, call: Call, output: Output) -> None:
        """A keypad entry also ends with a pause after its last key (a Media Stream arms a timer per key)."""
        while not self.end.ending:
            await asyncio.sleep(KEYPAD_POLL_S)
            deadline = call.next_deadline()
            if deadline is not None and call.clock() >= deadline:
                call.tick()
                await output.flush()

    # ---- call control -------------------------------------------------------------------------

    async def _hangup(self) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        try:
            await self.sip.hangup(self.call_sid)
        except CallGone:
            self.log.info("SIP hang-up: the call was already over")
        except Exception as exc:
            self.log.warning("SIP hang-up failed (%s); closing the sideband", type(exc).__name__)

    async def _summary_before_end(self, deadline: float) -> None:
        """The final summary (caller memory) is asked for while the sideband is still open: after a
        hang-up or a REFER OpenAI closes it."""
        call = self.call
        if (
            call is None
            or not self.memory_on
            or self.upstream is None
            or not call.session_ready
            or not (call.turn_count > 0 or call.summary)
        ):
            return
        if call.request_summary(final=True):
            await self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._final_summary.wait(), max(0.0, deadline - time.monotonic()))

    async def _goodbye_played(self) -> None:
        """Until OpenAI has played everything: the response that called the tool is done (its audio
        came before the call) and its output buffer stopped; at most RELAY_END_CALL_TIMEOUT."""
        timeout = self.settings.end_call_mark_timeout_s
        if not await self.wait_playback_idle(timeout):
            self.log.info("no output_audio_buffer.stopped within %.1f s; hanging up", timeout)

    async def end_call(self, reason: str = "assistant_ended") -> None:
        """Let the goodbye play out (OpenAI's ``output_audio_buffer.stopped``, at most
        RELAY_END_CALL_TIMEOUT), then hang up through OpenAI's REST API."""
        await self._goodbye_played()
        await self._summary_before_end(time.monotonic() + FINAL_SUMMARY_WAIT_S)
        await self._hangup()
        await self._end(reason)

    async def transfer_call(self, number: str, whisper: str | None = None) -> None:
        """SIP REFER to one of the profile's destinations, ``tel:+…`` for a number or the profile's own
        ``sip:`` URI: the model names a destination, never the URI (one the profile does not list is
        refused here)."""
        if number not in self.agent.transfer_numbers.values():
            raise RuntimeError("SIP transfers go only to the profile's transfer_numbers")
        await self._goodbye_played()
        await self._summary_before_end(time.monotonic() + FINAL_SUMMARY_WAIT_S)
        if whisper:
            self.log.info("SIP transfers carry no whisper; the colleague is connected directly")
        await self.sip.refer(self.call_sid, number if number.startswith("sip:") else f"tel:{number}")
        await self._end("transferred")

    async def _end(self, reason: str) -> None:
        """End the call from our side: hang up where nobody else will, then stop the sideband."""
        reason = self.end.begin(reason)
        if reason.startswith(_HANGS_UP):
            await self._hangup()
        self._stopped.set()

    async def _teardown(self) -> None:
        call = self.call
        if call is not None and self.memory_on and not self._final_summary.is_set() and self.upstream is None:
            # the caller hung up and the sideband is gone: the latest summary is what there is to keep
            if call.summary:
                self.runtime.store.set_caller_memory(self.caller, call.summary)
                self._final_summary.set()
        self._over = True  # no continuation resumes a SIP call: its end is the call's (the webhook goes at once)
        await super()._teardown()
        self.log.log(logging.DEBUG, "SIP call torn down")
