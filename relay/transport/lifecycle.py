"""One phone call over a Media Stream, from admission to the last task's end.

`MediaStreamCall` is what the route runs and what the runtime knows as a live stream. It wires
the call core (relay.call) to the caller's socket (`media_stream`), the Realtime session
(`realtime_session`) and the one output path (`output`), runs the core's effects (store, metrics,
tools), and makes sure every task and socket of the call ends with it: hang-up, transfer, the
drain goodbye and the teardown are here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection

from relay import logs
from relay.asgi_direct import DirectWebSocket
from relay.call import Call, Effect, Entry, Metric, RunTool, SummaryReady, UpstreamFailed, UsageReport
from relay.logbound import RepeatLimiter
from relay.ownership import CallHold
from relay.security import frame_caller_notes
from relay.store.base import CallRecord, caller_memory_refusal
from relay.tools import ToolContext
from relay.transport.admission import Admission, Admitted, refuse
from relay.transport.ending import CallEnd
from relay.transport.live_hold import LiveHold
from relay.transport.media_stream import MediaStream
from relay.transport.output import Output
from relay.transport.realtime_session import RealtimeSession
from relay.transport.twilio_socket import CLOSE_NORMAL, TwilioSocket
from relay.twilio import twiml

if TYPE_CHECKING:
    from relay.runtime import Runtime

FINAL_SUMMARY_WAIT_S = 4.0
CALLER_MEMORY_TIMEOUT_S = 0.5
PLAYBACK_POLL_S = 0.02
GOODBYE_START_S = 0.2  # for the goodbye's first audio to be sent before playback is awaited
DISPOSITION_TIMEOUT_S = 1.0
RESUME_READ_TIMEOUT_S = 1.0
HANDOFF_FLUSH_TIMEOUT_S = 1.0
RESUME_ENTRIES = 40  # the latest stored entries a resumed call's conversation is seeded with


class MediaStreamCall(LiveHold):
    """A call's Media Stream; ``await MediaStreamCall(runtime, websocket).run()`` serves it."""

    def __init__(self, runtime: Runtime, websocket: WebSocket | None, *, twilio: TwilioSocket | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        # a SIP call (relay/transport/sideband.py) has no caller socket: it passes its stand-in
        self.twilio = twilio if twilio is not None else TwilioSocket(websocket)  # type: ignore[arg-type]
        self.log = logs.call_logger("", "")
        self.call: Call | None = None
        self.call_sid = ""
        self.caller = ""
        self.called = ""
        self.caller_memory: str | None = None  # notes from earlier calls: never passed on to a transfer whisper
        self.memory_on = False  # caller memory is read and written for this call (see _serve)
        self.end = CallEnd()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._twilio_task: asyncio.Task[None] | None = None
        self._upstream_task: asyncio.Task[None] | None = None
        self._final_summary = asyncio.Event()
        self._output: Output | None = None
        self._session: RealtimeSession | None = None
        self.cost_usd = 0.0
        self.started_at = time.monotonic()
        self.agent = self.settings.agent
        self.allowed_tools: tuple[str, ...] | None = None
        self._skipped_note = ""
        self._effect_failures = RepeatLimiter(self.log)  # per kind of effect, bounded log lines
        self._hold: CallHold | None = None  # the call's one live stream across instances (relay/ownership.py)

    def twilio_open(self) -> bool:
        return self.twilio.open

    @property
    def _direct(self) -> DirectWebSocket | None:
        """The relay server's direct path for this socket's messages (None under plain ASGI)."""
        return self.twilio.direct

    @property
    def upstream(self) -> ClientConnection | None:
        """The open Realtime socket, if any."""
        return self._output.upstream if self._output is not None else None

    async def run(self) -> None:
        """Serve one Media Stream from accept to the last task's end."""
        admitted = await Admission(self.runtime, self.twilio).run()
        if admitted is not None:
            await self._serve(admitted)

    async def _refuse(self, code: int, reason: str) -> None:
        await refuse(self.runtime, self.twilio, code, reason, self._skipped_note)

    async def _serve(self, admitted: Admitted) -> None:
        runtime = self.runtime
        start, grant = admitted.start, admitted.grant
        self.log = admitted.log
        self._effect_failures.logger = self.log  # the call's SIDs on its lines from here
        self._skipped_note = admitted.skipped_note
        self.call_sid = grant.call_sid
        self.caller = grant.caller  # the numbers the token was minted with, i.e. what Twilio signed
        self.called = grant.called
        if not await self._take_call(resumes=grant.resumes):
            return
        if self.settings.caller_memory:
            refusal = caller_memory_refusal(self.caller)
            self.memory_on = refusal is None
            if refusal is not None:
                self.log.info("caller memory off for this call: %s", refusal)
        try:
            self.agent = runtime.profile_for(self.called)
            self.allowed_tools = self.agent.tools
            memory = self.caller_memory = await self._caller_memory()
            earlier = await self._earlier_streams() if grant.resumes else None
            call = self.call = Call(
                call_sid=start.call_sid,
                stream_sid=start.stream_sid,
                dialect=runtime.dialect,
                agent=self.agent,
                model=self.settings.model_for(self.agent),
                tools=runtime.tools.specs(self.allowed_tools, self.agent),
                instructions_suffix=frame_caller_notes(memory) if memory else "",
                summary_max_turns=self.settings.summary_max_turns,
                summary_max_tokens=self.settings.summary_max_tokens,
                summary_keep_turns=self.settings.summary_keep_turns,
                max_dtmf_per_second=self.settings.max_dtmf_per_second,
                logger=logs.call_logger(start.call_sid, start.stream_sid),
                transport_logger=self.log,
            )
            if grant.resumes:
                call.resume(earlier.summary if earlier else None, earlier.entries[-RESUME_ENTRIES:] if earlier else [])
        except BaseException:
            await self._release_call()
            raise
        audio = call.audio
        output = self._output = Output(call, self.twilio, audio, runtime.metrics, self._apply)
        stream = MediaStream(
            call,
            self.twilio,
            output,
            audio,
            self.end,
            self.log,
            max_frame_bytes=self.settings.max_twilio_message_bytes,
            spawn=self._spawn,
            settle=self._ended_on_purpose,
        )
        session = self._session = RealtimeSession(
            call,
            output,
            self.end,
            self.log,
            settings=self.settings,
            dialect=runtime.dialect,
            metrics=runtime.metrics,
            finish=self._end,
            spawn=self._spawn,
        )
        runtime.metrics.calls_started.inc()
        started = {"started": datetime.now(UTC).isoformat()}
        if grant.resumes:  # the call's record goes on; "started" stays the call's first stream's
            started = {
                "ended": "",  # an earlier stream's end was not the call's
                "end_reason": "",
                "resumed": started["started"],
                "streams": str(int((earlier.meta if earlier else {}).get("streams", "1") or 1) + 1),
            }
        runtime.store.call_started(
            self.call_sid,
            {
                **started,
                "from": self.caller,
                "to": self.called,
                "stream_sid": start.stream_sid,
                "instance": runtime.instance_id,
                "dialect": runtime.dialect.name,
                "model": call.model,
                "profile": self.agent.name,
                "caller_memory": "1" if memory else "0",
            },
        )
        self.log.log(
            logging.WARNING if self._skipped_note else logging.INFO,
            "call started%s",
            self._skipped_note,
            extra={"caller_known": bool(memory), "profile": self.agent.name},
        )
        self._upstream_task = asyncio.create_task(session.supervise(), name=f"upstream-{self.call_sid}")
        # Its own task: each frame then resumes a 4-deep coroutine chain, not the ~20 frames of ASGI
        # middleware above this one (bench/RESULTS.md). Cancelling the ASGI task still cancels it.
        self._twilio_task = asyncio.create_task(stream.receive_loop(), name=f"twilio-{self.call_sid}")
        try:
            await self._twilio_task
        except asyncio.CancelledError:
            if not self.end.ending:
                raise
        finally:
            await self._teardown()

    async def _earlier_streams(self) -> CallRecord | None:
        """What the call's earlier streams stored (conversation, summary), for a resuming stream."""
        try:
            async with asyncio.timeout(RESUME_READ_TIMEOUT_S):
                record = await self.runtime.store.get_call(self.call_sid)
        except Exception as exc:
            self.log.warning(
                "the call's stored conversation is unavailable (%s); resuming without it", type(exc).__name__
            )
            return None
        if record is None:
            self.log.warning("nothing stored for this call; resuming without its conversation")
        else:
            self.log.info("resuming the call with %d stored entries", len(record.entries))
        return record

    async def _caller_memory(self) -> str | None:
        if not self.memory_on:
            return None
        try:
            return await asyncio.wait_for(
                self.runtime.store.get_caller_memory(self.caller), timeout=CALLER_MEMORY_TIMEOUT_S
            )
        except Exception as exc:
            self.log.warning("caller memory unavailable (%s); continuing without", type(exc).__name__)
            return None

    # ---- effects and tasks ---------------------------------------------------------------------

    def _apply(self, effect: Effect) -> None:
        """Perform one effect of the core. A failure costs that effect, never the call: it is logged
        (with its traceback the first time per kind, then as a running count) and the rest goes on."""
        try:
            self._perform(effect)
        except Exception:
            kind = type(effect).__name__
            self._effect_failures.log(kind, logging.ERROR, "effect %s failed; skipped", kind, exc_info=True)

    def _perform(self, effect: Effect) -> None:
        store = self.runtime.store
        metrics = self.runtime.metrics
        if isinstance(effect, Metric):
            metrics.observe(effect.name, effect.value, effect.label)
        elif isinstance(effect, Entry):
            store.add_entry(self.call_sid, {"kind": effect.kind, "t": time.time(), **effect.data})
        elif isinstance(effect, UsageReport):
            store.add_usage(self.call_sid, effect.usage)
            self.cost_usd += metrics.record_usage(effect.usage, self.settings.price_per_1k_tokens)
        elif isinstance(effect, RunTool):
            self._spawn(self._run_tool(effect), f"tool-{effect.name}")
        elif isinstance(effect, SummaryReady):
            store.set_summary(self.call_sid, effect.text)
            if effect.final:
                if self.memory_on:
                    store.set_caller_memory(self.caller, effect.text)
                self._final_summary.set()
        elif isinstance(effect, UpstreamFailed):
            assert self._session is not None, "effects come from a call that has a session"
            self._session.failed(effect)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{name}-{self.call_sid}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A side task of the call ended: an exception is a bug, logged with the call's SIDs at once."""
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("task %s of this call failed", task.get_name(), exc_info=exc)

    async def _flush(self) -> None:
        assert self._output is not None
        await self._output.flush()

    # ---- tools ---------------------------------------------------------------------------------

    def tool_context(self) -> ToolContext:
        return ToolContext(
            call_sid=self.call_sid,
            caller=self.caller,
            called=self.called,
            profile=self.agent,
            store=self.runtime.store,
            log=logs.call_logger(self.call_sid, (self.call.stream_sid or "") if self.call else "", "relay.tools"),
            end_call=self.end_call,
            transfer_call=self.transfer_call,
            summary=lambda: self.call.summary if self.call else None,
        )

    async def _run_tool(self, request: RunTool) -> None:
        assert self.call is not None
        result = await self.runtime.tools.run(
            request.name, request.arguments, self.tool_context(), allowed=self.allowed_tools
        )
        self.runtime.metrics.tool_call(request.name, result.outcome, result.duration_s)
        if self.end.ending or self.call.phase.value == "closed":
            return  # the call ended (end_call, transfer, hang-up): no new response for a dead line
        self.call.tool_result(request.call_id, result.output, ok=result.outcome == "ok")
        await self._flush()

    async def wait_playback_idle(self, timeout: float) -> bool:
        """Until Twilio has acknowledged every mark of the audio sent (or the timeout)."""
        assert self.call is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call.playback_idle or not self.twilio.open:
                return True
            await asyncio.sleep(PLAYBACK_POLL_S)
        return False

    async def end_call(self, reason: str = "assistant_ended") -> None:
        """Let the goodbye play out, then hang up through Twilio's REST API and close both sockets."""
        played = await self.wait_playback_idle(self.settings.end_call_mark_timeout_s)
        if not played:
            self.log.info("goodbye not acknowledged within %.1f s; hanging up", self.settings.end_call_mark_timeout_s)
        control = self.runtime.twilio_control
        if control is not None:
            try:
                await control.hangup(self.call_sid)
            except Exception as exc:
                self.log.warning("REST hang-up failed (%s); closing the stream instead", type(exc).__name__)
        await self._end(reason)

    async def transfer_call(self, number: str, whisper: str | None = None) -> None:
        """Hand the caller to a human: the live call's TwiML becomes <Dial>, which ends our stream."""
        control = self.runtime.twilio_control
        await self.wait_playback_idle(self.settings.end_call_mark_timeout_s)
        if control is None:
            raise RuntimeError("transfers need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        await control.redirect(
            self.call_sid, twiml.dial(number, whisper_url=self.runtime.whisper_url(whisper, memory=self.caller_memory))
        )
        await self._end("transferred")

    # ---- ending ------------------------------------------------------------------------------------

    async def _end(self, reason: str) -> None:
        """End the call from our side: stop the Twilio loop, which runs the teardown.

        Closing the stream makes Twilio fetch the continuation webhook (relay/app.py): a call ended on
        purpose is recorded as such first, so the continuation hangs up. A lost Realtime API or a
        superseded stream is not an ending on purpose: the continuation apologises (and dials the
        fallback number) instead of leaving the caller in silence; a superseded stream records nothing
        (the stream that superseded it carries the call)."""
        self.end.begin(reason)
        if reason == "realtime_unavailable" or reason.startswith("realtime_error"):
            await self._record_disposition("unavailable")  # a new stream would find it unreachable too
        elif reason != "superseded":  # another stream carries the call on
            await self._record_disposition("ended")
        await self.twilio.close(CLOSE_NORMAL, reason[:100])
        task = self._twilio_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    async def _ended_on_purpose(self) -> None:
        await self._record_disposition("ended")

    async def _record_disposition(self, disposition: str) -> None:
        """Record, before the stream closes, how the call goes on (``ended``: it is over;
        ``unavailable``: the Realtime API is not reachable), for the continuation webhook on whichever
        instance Twilio reaches; bounded, since the caller waits on it."""
        try:
            async with asyncio.timeout(DISPOSITION_TIMEOUT_S):
                await self.runtime.store.set_disposition(self.call_sid, disposition)
        except Exception as exc:
            self.log.warning(
                "could not record the call's disposition %r (%s); the continuation webhook cannot tell "
                "and treats the stream as lost",
                disposition,
                type(exc).__name__,
            )

    def _at_pause(self) -> bool:
        """A natural pause: nothing playing or being generated, no tool running, the caller silent."""
        call = self.call
        return (
            call is not None
            and call.session_ready
            and call.playback_idle
            and not call.caller_speaking
            and call.phase.value == "listening"
        )

    async def hand_off(self, max_wait_s: float) -> bool:
        """Drain by hand-off: at the next natural pause (at the latest after `max_wait_s`) flush the
        call's state to the store, let go of its hold and close the stream, so Twilio fetches the
        continuation from another instance, which resumes the call. False if the call was ending."""
        deadline = time.monotonic() + max_wait_s
        while not self._at_pause() and time.monotonic() < deadline and not self.end.ending:
            await asyncio.sleep(PLAYBACK_POLL_S)
        call = self.call
        if call is None or self.end.ending:
            return False
        at_pause = self._at_pause()
        self.end.begin("handed_off")
        try:
            call.note_event("handed_off", at_pause=at_pause)
            await self._flush()
            if not await self.runtime.store.flush(HANDOFF_FLUSH_TIMEOUT_S):
                self.log.warning("state not all written within %.1f s before the hand-off", HANDOFF_FLUSH_TIMEOUT_S)
        finally:  # whatever failed above, the stream closes and the call goes on elsewhere
            if self._hold is not None:
                await self._hold.hand_off()
            self.log.info("call handed off%s", "" if at_pause else " without a pause (the wait ran out)")
            await self.twilio.close(CLOSE_NORMAL, "handed off")
        task = self._twilio_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        return True

    async def goodbye(self, text: str, timeout: float) -> None:
        """Shutdown: a short spoken goodbye where the session allows, then close."""
        call = self.call
        if call is not None and call.session_ready and self.upstream is not None and not self.end.ending:
            call.note_event("drain_goodbye")
            call.say(f"Say exactly this and nothing else: {text}", interrupt=True)
            await self._flush()
            await asyncio.sleep(GOODBYE_START_S)
            await self.wait_playback_idle(timeout)
        await self._end("shutdown")

    async def _teardown(self) -> None:
        call = self.call
        if call is None:
            return
        reason = self.end.begin("stream_closed")
        if reason == "caller_hung_up":  # Twilio's stop: the call is over, nothing may resume it
            await self._record_disposition("ended")
        if (
            self.memory_on
            and not self._final_summary.is_set()  # a SIP call asks for it before hanging up
            and reason != "handed_off"  # the call goes on elsewhere: its last instance writes the memory
            and self.upstream is not None
            and call.session_ready
            and (call.turn_count > 0 or call.summary)
        ):
            if call.request_summary(final=True):
                await self._flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._final_summary.wait(), FINAL_SUMMARY_WAIT_S)
        call.close(reason)
        for effect in call.take_output()[2]:
            self._apply(effect)
        if self._upstream_task is not None and self._upstream_task is not asyncio.current_task():
            self._upstream_task.cancel()
            with contextlib.suppress(BaseException):
                await self._upstream_task
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.tasks:
            await asyncio.gather(*[t for t in self.tasks if t is not asyncio.current_task()], return_exceptions=True)
        upstream = self.upstream
        if upstream is not None:
            with contextlib.suppress(Exception):
                await upstream.close()
            assert self._output is not None
            self._output.upstream = None
        await self.twilio.close(CLOSE_NORMAL, "call ended")
        ended = self._record_end(call, reason)
        await self._release_call()
        self.log.info("call ended", extra=ended)

    def _record_end(self, call: Call, reason: str) -> dict[str, object]:
        """The call's record and metrics at its end; returns the fields of its last log line."""
        duration = time.monotonic() - self.started_at
        now = datetime.now(UTC).isoformat()
        if reason == "handed_off":  # the call goes on elsewhere: its record is not ended
            self.runtime.store.call_updated(self.call_sid, {"handed_off": now})
        else:
            self.runtime.store.call_updated(
                self.call_sid,
                {
                    "ended": now,
                    "end_reason": reason,
                    "duration_s": f"{duration:.1f}",
                    "frames_in": str(call.frames_in),
                    "frames_out": str(call.frames_out),
                    "cost_usd": f"{self.cost_usd:.4f}",
                },
            )
        self.runtime.metrics.call_ended(reason, duration)
        if self.settings.price_per_1k_tokens:
            self.runtime.metrics.call_cost.observe(self.cost_usd)
        audio = call.audio
        return {
            "reason": reason,
            "duration_s": round(duration, 1),
            "frames_in": call.frames_in,
            "frames_out": call.frames_out,
            "malformed_frames": audio.malformed_frames,
            "ignored_from_twilio": audio.repeats.counts | call.repeats.counts,
            "audio_dropped_frames": audio.dropped_frames,
        }
