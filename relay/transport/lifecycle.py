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
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection

from relay import logs
from relay.agent_settings import AgentSettings
from relay.asgi_direct import DirectWebSocket
from relay.call import Call, Effect, Entry, Metric, RunTool, SummaryReady, UpstreamFailed, UsageReport
from relay.caller_memory import WaitingMemory
from relay.logbound import RepeatLimiter
from relay.outbound import RECORDING_STATUS_PATH
from relay.ownership import CallHold
from relay.security import StreamGrant, frame_call_context, frame_caller_notes
from relay.store.base import CallRecord, caller_memory_refusal
from relay.tools import ToolContext
from relay.transport.admission import Admission, Admitted, refuse
from relay.transport.ending import CallEnd
from relay.transport.live_hold import LiveHold
from relay.transport.media_stream import MediaStream
from relay.transport.output import Output
from relay.transport.realtime_session import RealtimeSession
from relay.transport.twilio_socket import CLOSE_NORMAL, CLOSE_POLICY, TwilioSocket
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
VOICEMAIL_MESSAGE_MAX_S = 60.0  # a voicemail message longer than this is cut by the hang-up
CONSOLE_COMMANDS = frozenset({"console_hangup", "console_transfer", "console_instruct"})
CONSOLE_INSTRUCTION_MAX = 1000  # characters of an operator's instruction
CONSOLE_INSTRUCTION_PREFIX = "An operator supervising this call tells you, and you act on it now in what you say next: "


def _stored_context(raw: str) -> dict[str, str]:
    """An outbound call's context as POST /calls stored it (checked there); {} if unreadable."""
    try:
        value = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _opening(agent: AgentSettings, *, outbound: bool, disclosed: bool) -> AgentSettings:
    """The agent as this call opens: an outbound call opens with the profile's outbound greeting, and a
    recorded call with its recording disclosure."""
    greeting = agent.greeting
    if outbound and agent.outbound_greeting is not None:
        greeting = agent.outbound_greeting or None
    disclosure = agent.recording_disclosure if disclosed else None
    if disclosure:
        greeting = f'First say exactly: "{disclosure}" ' + (f"Then: {greeting}" if greeting else "Then stop.")
    return agent if greeting == agent.greeting else replace(agent, greeting=greeting)


# Stream ends after which the continuation webhook may resume the call on a new stream (no stop from
# Twilio, nothing recorded as an ending): the caller's memory waits until it is known that none did.
MAY_RESUME = frozenset({"caller_disconnected", "stream_closed"})
# Stream ends where another stream of the call goes on (and writes the caller's memory at its end).
GOES_ON = frozenset({"handed_off", "superseded"})


def _first_start(earlier: CallRecord | None, fallback: datetime) -> datetime:
    """When the call's first stream started, from what the earlier streams stored (else `fallback`)."""
    try:
        began = datetime.fromisoformat((earlier.meta if earlier else {})["started"])
    except (KeyError, ValueError):
        return fallback
    return began if began.tzinfo is not None else fallback


# A stream lost without a disposition (the connection dropped) may be resumed by the continuation
# webhook: its call.completed webhook waits this long, and is not sent if another stream took the call.
LOST_STREAM_SETTLE_S = 30.0


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
        self.direction = "inbound"  # "outbound" for a call placed with POST /calls
        self.recording = False  # the call is recorded (dual channel, through the REST API)
        self.caller_memory: str | None = None  # notes from earlier calls: never passed on to a transfer whisper
        self.memory_on = False  # caller memory is read and written for this call (see _serve)
        self.memory_later = False  # the final summary waits to become the caller's memory (see _teardown)
        self.stream_number = 1  # this stream's place among the call's streams (a resumed call has several)
        self.end = CallEnd()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._twilio_task: asyncio.Task[None] | None = None
        self._upstream_task: asyncio.Task[None] | None = None
        self._final_summary = asyncio.Event()
        self._output: Output | None = None
        self._session: RealtimeSession | None = None
        self.cost_usd = 0.0
        self.started_at = time.monotonic()
        self.call_began = datetime.now(UTC)  # the call's first stream's start (see _serve)
        self.agent = self.settings.agent
        self.allowed_tools: tuple[str, ...] | None = None
        self._skipped_note = ""
        self._effect_failures = RepeatLimiter(self.log)  # per kind of effect, bounded log lines
        self._hold: CallHold | None = None  # the call's one live stream across instances (relay/ownership.py)
        self._tool_tasks: set[asyncio.Task[Any]] = set()
        self._results_for_next_stream = False  # a hand-off waits for the running tools (see hand_off)
        self._over = False  # an ending was recorded (not a hand-off): no other stream will carry the call on
        self._m2e: dict[str, list[float]] = {"sent": [], "played": []}  # mouth-to-ear seconds of this stream
        self._shown_phase = ""  # the phase the console was last told of (see _phase)
        self._feed = runtime.settings.console_token is not None  # the console's live feed (see _publish)

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
        # An outbound call's (POST /calls) and a resumed call's stream carry on a stored record.
        earlier = await self._stored_call(resuming=grant.resumes) if grant.outbound or grant.resumes else None
        meta = earlier.meta if earlier is not None else {}
        agent = runtime.profile_for(self.called)
        if meta.get("direction") == "outbound":
            # The other party is the callee: caller memory is theirs; the profile is the request's.
            self.direction = "outbound"
            self.caller, self.called = grant.called, grant.caller
            profiles = runtime.profiles
            agent = profiles.by_name.get(meta.get("profile", ""), profiles.default)
        elif grant.outbound:
            await self._refuse(CLOSE_POLICY, "outbound call without its stored record")
            return
        self.agent = agent
        if not await self._take_call(resumes=grant.resumes):
            return
        if self.settings.caller_memory:
            refusal = caller_memory_refusal(self.caller)
            self.memory_on = refusal is None
            if refusal is not None:
                self.log.info("caller memory off for this call: %s", refusal)
        try:
            self.allowed_tools = self.agent.tools
            memory = self.caller_memory = await self._caller_memory()
            recording = self.recording = self._records(grant)
            suffix = [frame_caller_notes(memory)] if memory else []
            if self.direction == "outbound":
                suffix.append(frame_call_context(_stored_context(meta.get("context", ""))))
            call = self.call = Call(
                call_sid=start.call_sid,
                stream_sid=start.stream_sid,
                dialect=runtime.dialect,
                agent=_opening(self.agent, outbound=self.direction == "outbound", disclosed=recording),
                model=self.settings.model_for(self.agent),
                tools=runtime.tools.specs(self.allowed_tools, self.agent),
                instructions_suffix="\n\n".join(suffix),
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
        self.call_began = datetime.now(UTC)
        started = {"started": self.call_began.isoformat()}
        if grant.resumes:  # the call's record goes on; "started" stays the call's first stream's
            self.call_began = _first_start(earlier, self.call_began)
            self.stream_number = int((earlier.meta if earlier else {}).get("streams", "1") or 1) + 1
            started = {
                "ended": "",  # an earlier stream's end was not the call's
                "end_reason": "",
                "resumed": started["started"],
                "streams": str(self.stream_number),
            }
        runtime.store.call_started(
            self.call_sid,
            {
                **started,
                "direction": self.direction,
                "from": grant.caller,  # as Twilio has them (for an outbound call: ours, then the callee's)
                "to": grant.called,
                "stream_sid": start.stream_sid,
                "instance": runtime.instance_id,
                "dialect": runtime.dialect.name,
                "model": call.model,
                "profile": self.agent.name,
                "caller_memory": "1" if memory else "0",
            },
        )
        self._publish("started", direction=self.direction, profile=self.agent.name, resumed=grant.resumes)
        self.log.log(
            logging.WARNING if self._skipped_note else logging.INFO,
            "call started%s",
            self._skipped_note,
            extra={"caller_known": bool(memory), "profile": self.agent.name},
        )
        if recording and not grant.resumes:  # a recording is the call's: it goes on across its streams
            self._spawn(self._start_recording(), "recording")
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

    async def _stored_call(self, *, resuming: bool) -> CallRecord | None:
        """What is stored for the call: an outbound call's request, and, for a resuming stream, what its
        earlier streams stored (conversation, summary)."""
        try:
            async with asyncio.timeout(RESUME_READ_TIMEOUT_S):
                record = await self.runtime.store.get_call(self.call_sid)
        except Exception as exc:
            self.log.warning("the call's stored record is unavailable (%s); going on without it", type(exc).__name__)
            return None
        if record is None:
            self.log.warning("nothing stored for this call; going on without its record")
        elif resuming:
            self.log.info("resuming the call with %d stored entries", len(record.entries))
        return record

    def _records(self, grant: StreamGrant) -> bool:
        """Whether this call is recorded (the profile's setting, else RELAY_RECORDING): only where the
        REST API and a public URL for the recording's callback are there."""
        mode = self.agent.recording or self.settings.recording
        if mode == "off":
            return False
        if self.runtime.twilio_control is None or not self.settings.public_url:
            if not grant.resumes:
                self.log.warning("recording is on but needs TWILIO_ACCOUNT_SID and PUBLIC_URL; not recording")
            return False
        return True

    async def _start_recording(self) -> None:
        control, public = self.runtime.twilio_control, self.settings.public_url
        assert control is not None and public is not None
        try:
            sid = await control.start_recording(
                self.call_sid, channels="dual", status_callback=public.rstrip("/") + RECORDING_STATUS_PATH
            )
        except Exception as exc:
            self.log.error("could not start the call's recording (%s)", type(exc).__name__)
            self.runtime.store.call_updated(self.call_sid, {"recording_status": "failed"})
            return
        self.log.info("recording the call (dual channel)")
        self.runtime.store.call_updated(self.call_sid, {"recording_sid": sid, "recording_status": "in-progress"})

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
            if effect.name in ("mouth_to_ear_sent_seconds", "mouth_to_ear_played_seconds"):
                self._m2e[effect.name.split("_")[3]].append(effect.value)
            if effect.name == "mouth_to_ear_played_seconds":  # once per answer: the turn's latency, recorded
                latency = {"kind": "latency", "t": time.time(), "mouth_to_ear_ms": round(effect.value * 1000)}
                store.add_entry(self.call_sid, latency)
                if self._feed:
                    store.publish_event({"call_sid": self.call_sid, **latency})
            elif effect.name == "realtime_errors":
                self._publish("error", code=effect.label)
        elif isinstance(effect, Entry):
            now = time.time()
            store.add_entry(self.call_sid, {"kind": effect.kind, "t": now, **effect.data})
            if self._feed:
                store.publish_event({"call_sid": self.call_sid, "kind": effect.kind, "t": now, **effect.data})
        elif isinstance(effect, UsageReport):
            store.add_usage(self.call_sid, effect.usage)
            cost = metrics.record_usage(effect.usage, self.settings.price_per_1k_tokens)
            if cost:  # as it is spent: an instance that dies mid-call has added its share already
                store.add_totals(self.call_sid, {"cost_usd": cost})
            self.cost_usd += cost
        elif isinstance(effect, RunTool):
            task = self._spawn(self._run_tool(effect), f"tool-{effect.name}")
            self._tool_tasks.add(task)
            task.add_done_callback(self._tool_tasks.discard)
        elif isinstance(effect, SummaryReady):
            store.set_summary(self.call_sid, effect.text)
            if effect.final:
                if self.memory_on and self.memory_later:
                    waiting = WaitingMemory(self.call_sid, self.caller, effect.text, self.stream_number)
                    self.runtime.later_memory.defer(waiting)
                elif self.memory_on:
                    store.set_caller_memory(self.caller, effect.text)
                self._final_summary.set()
        elif isinstance(effect, UpstreamFailed):
            assert self._session is not None, "effects come from a call that has a session"
            self._session.failed(effect)

    def _phase(self) -> str:
        """The phase the live-call listing shows (read with every heartbeat); a change is a console event."""
        phase = super()._phase()
        if phase != self._shown_phase:
            self._shown_phase = phase
            self._publish("phase", phase=phase)
        return phase

    def _publish(self, kind: str, **data: Any) -> None:
        """A call event for the operations console (relay/console/), on any instance: queued by the
        store, never awaited. Entries are published where they are recorded (`_perform`). Only with the
        console on: the feed cost each call about a fifth of its CPU (bench at 100 calls: 4.09 against
        3.35 ms per call-second without it), which a deployment without a console should not pay."""
        if self._feed:
            self.runtime.store.publish_event({"call_sid": self.call_sid, "kind": kind, "t": time.time(), **data})

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
        if self._results_for_next_stream:
            self.call.tool_result_for_next_stream(request.call_id, result.output, ok=result.outcome == "ok")
        else:
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
        # Before the REST call: Twilio's stop for the hang-up may come back before it returns, and the
        # call ended for `reason`, not because the caller hung up.
        self.end.begin(reason)
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
        ``unavailable``: the Realtime API is not reachable; ``handed_off``: resume it elsewhere), for
        the continuation webhook on whichever instance Twilio reaches; bounded, since the caller
        waits on it."""
        self._over = disposition != "handed_off"
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
        waited_tools = len(self._tool_tasks)
        if waited_tools and not self.end.ending:
            # A tool still runs: cutting it off would lose what it did (an order placed, a booking
            # made) and its answer. The hand-off waits for it (each tool has its own timeout, so it
            # always comes back); its result is recorded instead of answered here, and the stream
            # that resumes the call tells the caller.
            self._results_for_next_stream = True
            self.log.info("hand-off waits for %d running tool%s", waited_tools, "" if waited_tools == 1 else "s")
            await asyncio.wait(set(self._tool_tasks))
        call = self.call
        if call is None or self.end.ending:
            return False
        at_pause = self._at_pause()
        self.end.begin("handed_off")
        try:
            await self._record_disposition("handed_off")  # its continuation resumes it without counting a loss
            call.note_event(
                "handed_off", at_pause=at_pause, **({"waited_for_tools": waited_tools} if waited_tools else {})
            )
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

    async def command(self, name: str, args: Mapping[str, str]) -> None:
        """What another part of the service (any instance: Runtime.tell_call) asks of this stream:
        the voicemail policy of an outbound call once answering-machine detection has answered, and an
        operator's step from the console (hang up, transfer to one of the profile's destinations,
        an instruction the assistant acts on in its next words)."""
        call = self.call
        if call is None or self.end.ending:
            return
        if name in CONSOLE_COMMANDS:
            await self._console_command(call, name, args)
        elif name == "voicemail_hangup":
            self.log.info("answering machine (%s): hanging up", args.get("answered_by", "?"))
            call.note_event("voicemail", policy="hangup", answered_by=args.get("answered_by", ""))
            call.stop_speaking()
            await self._flush()
            await self.end_call("voicemail")
        elif name == "leave_message":
            self.log.info("answering machine greeting over: leaving the message")
            call.note_event("voicemail", policy="leave_message")
            call.stop_speaking()
            call.say(
                "You reached an answering machine and it is recording now. Leave this message, speaking to "
                f"the person you called, then stop: {args.get('message', '')}",
            )
            await self._flush()
            if not await self._message_played(VOICEMAIL_MESSAGE_MAX_S):
                self.log.warning("the voicemail message did not finish within %.0f s", VOICEMAIL_MESSAGE_MAX_S)
            await self.end_call("voicemail")
        else:
            self.log.warning("unknown call command %r ignored", name[:40])

    async def _console_command(self, call: Call, name: str, args: Mapping[str, str]) -> None:
        """An operator's step; the console has written it to the call's record with who and when."""
        by = args.get("by", "")[:80]
        if name == "console_hangup":
            self.log.info("hung up from the console", extra={"by": by})
            call.stop_speaking()
            await self._flush()
            await self.end_call("console_hangup")
        elif name == "console_transfer":
            destination = args.get("destination", "")
            number = self.agent.transfer_numbers.get(destination)
            if number is None:
                self.log.warning("console transfer to %r refused: not a destination of the profile", destination[:40])
                return
            self.log.info("transferred from the console to %s", destination, extra={"by": by})
            call.stop_speaking()
            await self._flush()
            try:
                await self.transfer_call(number)
            except Exception as exc:
                self.log.warning("console transfer failed (%s)", type(exc).__name__)
                self._publish("error", code="transfer_failed")
        elif name == "console_instruct":
            text = args.get("text", "").strip()[:CONSOLE_INSTRUCTION_MAX]
            if not text:
                return
            self.log.info("instruction from the console", extra={"by": by})
            call.say(f"{CONSOLE_INSTRUCTION_PREFIX}{text}")  # after what it is saying now
            await self._flush()

    async def _message_played(self, timeout: float) -> bool:
        """Until the assistant started speaking, finished, and Twilio played it all (or the timeout)."""
        call = self.call
        assert call is not None
        deadline = time.monotonic() + timeout
        started = False
        while time.monotonic() < deadline and self.twilio.open:
            listening = call.phase.value == "listening"
            started = started or not listening
            if started and listening and call.playback_idle:
                return True
            await asyncio.sleep(PLAYBACK_POLL_S)
        return False

    async def goodbye(self, text: str, timeout: float) -> None:
        """Shutdown: a short spoken goodbye where the session allows, then close."""
        call = self.call
        if call is not None and call.session_ready and self.upstream is not None and not self.end.ending:
            call.note_event("drain_goodbye")
            call.say_exactly(text, interrupt=True)
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
        # A dropped stream may be resumed: its summary becomes the caller's memory only once no new
        # stream did (relay/caller_memory.py), else the resumed call's last stream writes the memory.
        self.memory_later = reason in MAY_RESUME
        if (
            self.memory_on
            and not self._final_summary.is_set()  # a SIP call asks for it before hanging up
            and reason not in GOES_ON  # another stream carries the call on and writes the memory at its end
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
        if reason not in GOES_ON:  # else the call goes on on another stream
            self.runtime.webhooks.call_ended(self.call_sid, settle_s=0.0 if self._over else LOST_STREAM_SETTLE_S)
        self.log.info("call ended", extra=ended)

    def _latency_fields(self) -> dict[str, str]:
        """Mouth-to-ear latency of this stream's answers for the call's record (the post-call webhook
        reports them): median and worst, ms, per stage (sent to Twilio, heard by the caller)."""
        fields: dict[str, str] = {}
        for stage, values in self._m2e.items():
            if values:
                ordered = sorted(values)
                fields[f"m2e_{stage}_p50_ms"] = str(round(ordered[(len(ordered) - 1) // 2] * 1000))
                fields[f"m2e_{stage}_max_ms"] = str(round(ordered[-1] * 1000))
                fields[f"m2e_{stage}_count"] = str(len(ordered))
        return fields

    def _record_end(self, call: Call, reason: str) -> dict[str, object]:
        """The call's record and metrics at this stream's end; returns the fields of its last log line.

        A call may have had several streams (resumed after a drop or a hand-off, maybe on other
        instances): each adds its frames (and its cost as it is spent) to the record's totals, and
        ``duration_s`` runs from the call's first stream's start, so the record of a resumed call
        describes the whole call, not its last stream."""
        store = self.runtime.store
        duration = time.monotonic() - self.started_at
        now = datetime.now(UTC)
        store.add_totals(self.call_sid, {"frames_in": call.frames_in, "frames_out": call.frames_out, "cost_usd": 0.0})
        if reason == "handed_off":  # the call goes on elsewhere: its record is not ended
            store.call_updated(self.call_sid, {"handed_off": now.isoformat()})
            self._publish("handed_off")
        else:
            call_duration = max(duration, (now - self.call_began).total_seconds())
            store.call_updated(
                self.call_sid,
                {
                    "ended": now.isoformat(),
                    "end_reason": reason,
                    "duration_s": f"{call_duration:.1f}",
                    **self._latency_fields(),
                },
            )
            self._publish("ended", reason=reason)
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
