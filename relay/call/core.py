"""One phone call as a sans-I/O object: the facade over the call's parts and state machines.

Feed it what arrives (Twilio frames, normalized Realtime events, tool results, the clock) and
collect what to send and do with ``take_output()``: messages for Twilio, messages for the
Realtime API and effects (store writes, tool runs, metrics). It never awaits, so barge-in and
truncation arithmetic are tested to the millisecond without sockets.

The facade decides which part an event concerns and in what order the parts act; the rules
live in the parts: `Playback` (marks, barge-in), `Responses` (the response.create queue),
`ToolBatches`, `Conversation` (turns, summaries, instructions), `Keypad`, and the four
machines of `relay.call.machines`, from which `phase` is derived.
"""

from __future__ import annotations

import binascii
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relay.audio import audio_bytes
from relay.call.conversation import SUMMARY_PURPOSE, Conversation
from relay.call.effects import Effect, Entry, Metric, Outbox, RunTool, UpstreamFailed, UsageReport
from relay.call.keypad import Keypad
from relay.call.machines import (
    CALLER_TABLE,
    OUTPUT_TABLE,
    SESSION_TABLE,
    TOOLS_TABLE,
    Caller,
    Machine,
    Output,
    Phase,
    Session,
    Tools,
    derive_phase,
)
from relay.call.playback import PendingMark, Playback
from relay.call.responses import Responses, is_out_of_band
from relay.call.tool_batches import ToolBatches
from relay.config import AgentSettings
from relay.endpointing import Endpointer, SpeechStart
from relay.logbound import RepeatLimiter, clip
from relay.realtime import client
from relay.realtime import events as ev
from relay.realtime.dialect import Dialect
from relay.twilio.messages import is_base64


class Call:
    """The logic of one call. Not thread-safe; driven by one bridge."""

    def __init__(
        self,
        *,
        call_sid: str,
        stream_sid: str,
        dialect: Dialect,
        agent: AgentSettings,
        model: str,
        tools: Sequence[Mapping[str, Any]] = (),
        instructions_suffix: str = "",
        summary_max_turns: int = 24,
        summary_max_tokens: int = 6000,
        summary_keep_turns: int = 6,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.dialect = dialect
        self.agent = agent
        self.model = model
        self.tools = list(tools)
        self.clock = clock
        self.log = logger or logging.getLogger("relay.call")
        self.repeats = RepeatLimiter(self.log)  # what the caller's side sends again and again
        self._outbox = Outbox()

        illegal = RepeatLimiter(self.log)  # events a machine refused, per machine and event
        self.session_machine = Machine("session", SESSION_TABLE, Session.CONNECTING, illegal)
        self.output_machine = Machine("output", OUTPUT_TABLE, Output.IDLE, illegal)
        self.caller_machine = Machine("caller", CALLER_TABLE, Caller.SILENT, illegal)
        self.tools_machine = Machine("tools", TOOLS_TABLE, Tools.IDLE, illegal)

        self.playback = Playback(self._outbox, stream_sid, clock, self.repeats)
        self.responses = Responses(self._outbox)
        self.conversation = Conversation(
            self._outbox,
            agent,
            instructions_suffix=instructions_suffix,
            summary_max_turns=summary_max_turns,
            summary_max_tokens=summary_max_tokens,
            summary_keep_turns=summary_keep_turns,
        )
        self.tool_batches = ToolBatches()
        self.keypad = Keypad(agent.dtmf)
        self.greeted = False
        self._unsent_items: list[dict[str, Any]] = []  # entries typed while no session was ready

        # How much of this session's input audio it has made into a user turn (speech_stopped's
        # audio_end_ms): a replacement session must not be sent that audio again.
        self.caller_audio_committed_ms = 0
        self._speech_stopped_at: float | None = None  # mouth-to-ear latency counts from here

        # turn taking: who asks for the answer to a caller's turn (PROTOCOLS §7)
        vad = agent.vad
        # relay-side endpointing when the session has no turn detection; the bridge feeds it caller audio
        self.endpointer: Endpointer | None = Endpointer(vad) if vad.type == "none" else None
        # server VAD that commits turns but leaves the answer to us (create_response false)
        self._answer_commits = vad.type != "none" and not vad.create_response
        # the server cancels a response at speech start by itself only with interrupt_response true
        self._server_cancels_on_speech = vad.type != "none" and vad.interrupt_response
        self._answered_commits: deque[str] = deque(maxlen=32)
        self._turn_unsent = False  # relay-side turn ended while no session was ready to take the commit

        self.dropped_deltas = 0
        self.frames_in = 0  # counted by the I/O layer

    # ---- output and derived state --------------------------------------------------------

    def take_output(self) -> tuple[list[str], list[str], list[Effect]]:
        """Everything produced since the last take_output(): (to_twilio, to_upstream, effects)."""
        return self._outbox.take()

    def note_event(self, event: str, **data: Any) -> None:
        """A system entry for the call's record, from the I/O side (reconnects, drain goodbye)."""
        self._outbox.effects.append(Entry("system", {"event": event, **data}))

    @property
    def to_twilio(self) -> list[str]:
        return self._outbox.to_twilio

    @property
    def to_upstream(self) -> list[str]:
        return self._outbox.to_upstream

    @property
    def effects(self) -> list[Effect]:
        return self._outbox.effects

    @property
    def phase(self) -> Phase:
        """The call's phase for logs and metrics, derived from its machines (see machines.py)."""
        return derive_phase(
            self.session_machine.state, self.output_machine.state, self.caller_machine.state, self.tools_machine.state
        )

    @property
    def session_ready(self) -> bool:
        return self.session_machine.state is Session.READY

    @property
    def caller_speaking(self) -> bool:
        return self.caller_machine.state is Caller.SPEAKING

    @property
    def playback_idle(self) -> bool:
        """True when the caller has heard everything sent and nothing is being generated or waits to be."""
        return self.playback.unplayed_bytes == 0 and self.responses.idle

    @property
    def unplayed_bytes(self) -> int:
        return self.playback.unplayed_bytes

    @property
    def played_bytes(self) -> dict[str, int]:
        return self.playback.played_bytes

    @property
    def received_bytes(self) -> dict[str, int]:
        return self.playback.received_bytes

    @property
    def pending_marks(self) -> tuple[PendingMark, ...]:
        return self.playback.pending_marks

    @property
    def stale_marks(self) -> int:
        return self.playback.stale_marks

    @property
    def frames_out(self) -> int:
        return self.playback.frames_out

    @property
    def summary(self) -> str | None:
        return self.conversation.summary

    @summary.setter
    def summary(self, text: str | None) -> None:
        self.conversation.summary = text

    @property
    def turn_count(self) -> int:
        return self.conversation.turn_count

    def instructions(self) -> str:
        return self.conversation.instructions()

    def resume_context(self) -> str:
        """What a replacement Realtime session needs to continue mid-call."""
        return self.conversation.resume_context()

    def _settle_output(self) -> None:
        """The assistant's output is over once nothing is unplayed and no response is active."""
        state = self.output_machine.state
        if state is Output.SPEAKING or state is Output.RESPONDING or state is Output.GREETING:
            if self.playback.unplayed_bytes == 0 and self.responses.active is None:
                self.output_machine.fire("finished")

    # ---- upstream session lifecycle ---------------------------------------------------

    def upstream_opened(self) -> None:
        """A new Realtime socket is open: configure it. Playback state on Twilio's side is kept."""
        if not self.session_machine.fire("opened"):
            return
        self.conversation.session_opened()
        self.caller_audio_committed_ms = 0
        self.responses.session_opened()
        self.playback.session_items = set()
        if self.endpointer is not None:
            self.endpointer.new_session()
        self._settle_output()
        self._outbox.send_upstream(
            self.dialect.session_update(
                self.agent, model=self.model, instructions=self.instructions(), tools=self.tools
            )
        )

    def upstream_lost(self) -> None:
        """The Realtime socket is gone; anything it was generating will never finish."""
        if not self.session_machine.fire("lost"):
            return
        self.responses.session_lost()
        self.tool_batches.abandon()
        if self.tools_machine.state is Tools.RUNNING:
            self.tools_machine.fire("lost")
        self._settle_output()

    def close(self, reason: str) -> None:
        if self.session_machine.state is Session.CLOSED:
            return
        if self.keypad.open:  # the caller hung up mid-entry: keep what was typed, answer nothing
            self._record_entry("hangup")
        for machine in (self.session_machine, self.output_machine, self.caller_machine, self.tools_machine):
            machine.fire("close")
        self._outbox.effects.append(Entry("system", {"event": "call_ended", "reason": reason}))

    # ---- Twilio side ------------------------------------------------------------------

    def twilio_mark(self, name: str) -> None:
        """Twilio played everything up to mark `name`."""
        playback = self.playback
        if playback.ack(name) and playback.unplayed_bytes == 0:
            self._settle_output()

    def caller_audio(self, payload: str) -> None:
        """Relay-side endpointing only: look at a caller frame already sent upstream as is."""
        endpointer = self.endpointer
        if endpointer is None:
            return
        try:
            audio = binascii.a2b_base64(payload)
        except binascii.Error:
            return  # the parser lets only base64 through; nothing to look at otherwise
        for boundary in endpointer.feed(audio):
            if isinstance(boundary, SpeechStart):
                self._caller_started(cancel=True)  # no server VAD: nobody else cancels the response
            elif self._caller_stopped(boundary.audio_end_ms):
                self._end_relay_turn()

    def _end_relay_turn(self) -> None:
        """input_audio_buffer.commit, then one response.create (PROTOCOLS §7, turn_detection null)."""
        assert self.endpointer is not None
        if not self.session_ready:
            self._turn_unsent = True  # committed once the new session (with the replayed audio) is ready
            return
        self._turn_unsent = False
        self.endpointer.committed()
        self.caller_audio_committed_ms = max(self.caller_audio_committed_ms, self.endpointer.position_ms)
        self._outbox.send_upstream(client.commit())
        self.request_response(self.dialect.response_create())

    def twilio_dtmf(self, digit: str) -> None:
        """One key press. Keys are collected into one entry, which ends with the terminator, a pause
        of ``dtmf.timeout_ms`` (see ``next_deadline``/``tick``) or ``dtmf.max_digits`` keys."""
        now = self.clock()
        if self.keypad.expired(now):
            self._finish_entry("timeout")  # the timer had not fired yet: that entry was over
        if not self.caller_machine.fire("key"):
            return
        if self.keypad.settings.interrupt:
            self._interrupt_assistant(cancel=True)  # the server never cancels for a key press
            self._settle_output()
        ended = self.keypad.press(digit, now)
        if ended is not None:
            self._finish_entry(ended)

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do (clock time), or None: the bridge sleeps until then."""
        return self.keypad.deadline()

    def tick(self) -> None:
        """Let time pass: a keypad entry whose inter-key pause is over is complete."""
        if self.keypad.expired(self.clock()):
            self._finish_entry("timeout")

    def _record_entry(self, ended: str) -> str:
        digits = self.keypad.take()
        self._outbox.effects.append(Entry("dtmf", {"digits": digits, "ended": ended}))
        return digits

    def _finish_entry(self, ended: str) -> None:
        digits = self._record_entry(ended)
        self.caller_machine.fire("entry_done")
        self.conversation.caller_keyed(digits)
        item = client.user_text(f"The caller entered {' '.join(digits)}")
        if self.session_ready:
            self._outbox.send_upstream(item)
        else:
            self._unsent_items.append(item)
        self.request_response(self.dialect.response_create())

    # ---- responses ----------------------------------------------------------------------

    def request_response(self, create: dict[str, Any]) -> None:
        """Send response.create now, or once the current response is done (never two at once)."""
        self.responses.request(create, session_ready=self.session_ready)

    def say(self, instructions: str, *, interrupt: bool = False) -> None:
        """Make the assistant speak now (drain goodbye, announcements), optionally cutting it off."""
        if interrupt and self.responses.cut_active(cancel=True) is not None:
            self._settle_output()
        self.request_response(
            self.dialect.response_create(instructions=self.conversation.with_session_instructions(instructions))
        )

    def request_summary(self, *, final: bool = False) -> bool:
        """Ask for an out-of-band text summary; never spoken, never relayed to the caller."""
        if self.conversation.summary_in_flight or not self.session_ready:
            return False
        self.request_response(self.conversation.summary_request(self.dialect, final=final))
        return True

    # ---- upstream events -----------------------------------------------------------------

    def upstream_event(self, event: ev.ServerEvent) -> None:
        kind = type(event)
        if kind is ev.AudioDelta:
            assert isinstance(event, ev.AudioDelta)
            self._on_audio_delta(event)
        elif kind is ev.SpeechStarted:
            # With interrupt_response true the server has cancelled the response already; a cancel
            # from us could only draw response_cancel_not_active (PROTOCOLS §7, §11).
            self._caller_started(cancel=not self._server_cancels_on_speech)
        elif kind is ev.SpeechStopped:
            assert isinstance(event, ev.SpeechStopped)
            self._caller_stopped(event.audio_end_ms)
        elif kind is ev.InputCommitted:
            assert isinstance(event, ev.InputCommitted)
            self._on_input_committed(event)
        elif kind is ev.ResponseCreated:
            assert isinstance(event, ev.ResponseCreated)
            self._on_response_created(event)
        elif kind is ev.ResponseDone:
            assert isinstance(event, ev.ResponseDone)
            self._on_response_done(event)
        elif kind is ev.OutputItemAdded:
            assert isinstance(event, ev.OutputItemAdded)
            if event.item_id:
                self.playback.item_response[event.item_id] = event.response_id
                self.playback.session_items.add(event.item_id)
                if event.item_type == "function_call" and isinstance(event.item.get("name"), str):
                    self.tool_batches.note_name(event.item_id, event.item["name"])
        elif kind is ev.FunctionCallArgumentsDone:
            assert isinstance(event, ev.FunctionCallArgumentsDone)
            name = self.tool_batches.name_for(event.item_id, event.name)
            if name:  # without a name, the call is started from response.done, which has it
                self._start_tool(event.response_id, event.call_id, name, event.arguments)
        elif kind is ev.AssistantTranscriptDone:
            assert isinstance(event, ev.AssistantTranscriptDone)
            if event.response_id not in self.responses.out_of_band and event.transcript:
                self.conversation.assistant_said(event.transcript, event.item_id)
        elif kind is ev.InputTranscriptCompleted:
            assert isinstance(event, ev.InputTranscriptCompleted)
            self.conversation.caller_said(event.transcript, event.item_id)
        elif kind is ev.ItemAdded:
            assert isinstance(event, ev.ItemAdded)
            if event.item_id and self.conversation.item_added(event.item_id):
                self.playback.session_items.add(event.item_id)
                if self.conversation.needs_summary():
                    self.request_summary()
        elif kind is ev.ItemDeleted:
            assert isinstance(event, ev.ItemDeleted)
            self.conversation.item_deleted(event.item_id)
        elif kind is ev.SessionUpdated:
            self._on_session_updated()
        elif kind is ev.ServerError:
            assert isinstance(event, ev.ServerError)
            self._on_error(event)
        elif kind is ev.InputTranscriptFailed:
            assert isinstance(event, ev.InputTranscriptFailed)
            self.log.info("input transcription failed for %s: %s", event.item_id, event.message)
        elif kind is ev.Unknown:
            assert isinstance(event, ev.Unknown)
            self.log.debug("ignoring unknown Realtime event %s", event.type)

    def _on_session_updated(self) -> None:
        first = not self.session_ready
        if not self.session_machine.fire("configured") or not first:
            return
        if not self.greeted and self.conversation.sessions_opened == 1 and self.agent.greeting:
            self.output_machine.fire("greet")
            self._speech_stopped_at = self.clock()  # greeting latency counts from session ready
            greeting = self.conversation.with_session_instructions(self.agent.greeting)
            self.request_response(self.dialect.response_create(instructions=greeting))
        self.greeted = True
        typed_meanwhile = bool(self._unsent_items)
        for item in self._unsent_items:
            self._outbox.send_upstream(item)
        self._unsent_items.clear()
        if typed_meanwhile and not self.responses.has_plain_queued():
            # their response.create was queued in a session that was lost before it was ready
            self.request_response(self.dialect.response_create())
        if self._turn_unsent:
            self._end_relay_turn()
        self.responses.flush(session_ready=True)

    def _on_input_committed(self, event: ev.InputCommitted) -> None:
        """Server VAD with create_response false: each committed caller turn gets one response.create."""
        if not self._answer_commits or event.item_id in self._answered_commits:
            return
        self._answered_commits.append(event.item_id)
        self.request_response(self.dialect.response_create())

    def _on_response_created(self, event: ev.ResponseCreated) -> None:
        metadata = event.metadata or {}
        out_of_band = metadata.get("purpose") == SUMMARY_PURPOSE or event.conversation == "none"
        if out_of_band or self.output_machine.fire("created"):
            self.responses.created(event.response_id, out_of_band=out_of_band)

    def _on_response_done(self, event: ev.ResponseDone) -> None:
        effects = self._outbox.effects
        if event.usage:
            effects.append(UsageReport(event.response_id, event.usage))
            self.conversation.last_input_tokens = event.usage.get("input", self.conversation.last_input_tokens)
        effects.append(Metric("responses", 1.0, event.status))
        if self.responses.done(event.response_id):  # out of band
            metadata = event.metadata or {}
            if metadata.get("purpose") == SUMMARY_PURPOSE:
                self.conversation.summary_in_flight = False
                if event.status == "completed" and event.output_text.strip():
                    self.conversation.apply_summary(
                        event.output_text.strip(), final=metadata.get("final") == "1", session_ready=self.session_ready
                    )
            self.responses.flush(session_ready=self.session_ready)
            return
        if event.status == "failed":
            self.log.warning("response %s failed: %s", event.response_id, event.error_code or event.status_reason)
        for call in event.function_calls:
            self._start_tool(event.response_id, call.call_id, call.name, call.arguments)
        self.tool_batches.response_done(event.response_id, made_calls=bool(event.function_calls))
        self._continue_after_tools(event.response_id)
        self.responses.flush(session_ready=self.session_ready)
        self._settle_output()

    def _on_error(self, error: ev.ServerError) -> None:
        code = error.code or error.type
        self._outbox.effects.append(Metric("realtime_errors", 1.0, code))
        if code == "response_cancel_not_active":
            self.log.debug("cancel raced the end of the response (harmless)")
            return
        if code == "input_audio_buffer_commit_empty":
            self.log.info("the Realtime API found too little caller audio to commit that turn")
            return
        refused = self.responses.refused(error.event_id)
        if code == "conversation_already_has_active_response":
            # A response won the race (one the server started, or one this call does not count as
            # active); ours goes out at the next response.done. Sending it again now could only draw
            # the same error, again and again.
            if refused is not None:
                self.responses.requeue(refused)
            self.log.info("response.create raced an active response; queued until it is done")
            return
        if refused is not None:
            if is_out_of_band(refused):
                self.conversation.summary_in_flight = False
            self.responses.flush(session_ready=self.session_ready)
        fatal = code in ev.FATAL_ERROR_CODES
        if fatal or code in ("session_expired", "session_expiration"):
            self._outbox.effects.append(UpstreamFailed(code, error.message, fatal))
        self.log.warning("Realtime error %s: %s", code, error.message)

    # ---- audio and barge-in ----------------------------------------------------------

    def _on_audio_delta(self, event: ev.AudioDelta) -> None:
        responses = self.responses
        response_id = event.response_id
        if response_id in responses.dropped or response_id in responses.out_of_band:
            self.dropped_deltas += 1
            return
        payload = event.delta
        if not payload or not is_base64(payload):
            self.log.warning("audio delta of %s is not base64; skipped", event.item_id)
            return
        output = self.output_machine
        if output.state is not Output.SPEAKING and output.state is not Output.GREETING:
            if not output.fire("audio"):
                return
        name = self.playback.send(payload, audio_bytes(payload), event.item_id, response_id)
        if response_id not in responses.had_audio:
            responses.had_audio.add(response_id)
            if self._speech_stopped_at is not None:
                now = self.clock()
                self._outbox.effects.append(Metric("mouth_to_ear_sent_seconds", now - self._speech_stopped_at))
                self.playback.watch(name, self._speech_stopped_at)
                self._speech_stopped_at = None

    def _caller_started(self, *, cancel: bool) -> None:
        """The caller started speaking (server VAD or relay-side endpointing)."""
        if not self.caller_machine.fire("speech_started"):
            return
        self._speech_stopped_at = None
        if self._interrupt_assistant(cancel=cancel):
            self.output_machine.fire("barge_in")

    def _caller_stopped(self, audio_end_ms: int) -> bool:
        """The caller stopped speaking; False (and nothing done) if that is illegal now."""
        if not self.caller_machine.fire("speech_stopped"):
            return False
        self.caller_audio_committed_ms = max(self.caller_audio_committed_ms, audio_end_ms)
        self._speech_stopped_at = self.clock()
        if self.output_machine.state is Output.INTERRUPTED:
            self.output_machine.fire("caller_done")
        self._settle_output()
        return True

    def _interrupt_assistant(self, *, cancel: bool) -> bool:
        """Barge-in: clear Twilio, truncate each item at what was heard, drop the response's late
        deltas and, when ``cancel`` (the server won't), cancel it. False if nothing was playing."""
        responses = self.responses
        if not self.playback.has_pending and responses.active is None:
            return False
        self._outbox.effects.append(Metric("barge_ins", 1.0))
        responses.dropped.update(self.playback.cut())
        responses.cut_active(cancel=cancel)
        return True

    # ---- tools ----------------------------------------------------------------------------

    def _start_tool(self, response_id: str, call_id: str, name: str, arguments: str) -> None:
        if self.tool_batches.started(call_id) or not self.tools_machine.fire("start"):
            return
        self.tool_batches.start(response_id, call_id)
        effects = self._outbox.effects
        effects.append(Entry("tool_call", {"call_id": call_id, "name": name, "arguments": arguments}))
        effects.append(RunTool(response_id, call_id, name, arguments))

    def tool_result(self, call_id: str, output: str, *, ok: bool = True) -> None:
        """A handler finished (or failed): give the model its output; continue once all are in."""
        batches = self.tool_batches
        if batches.response_of(call_id) is None:
            self.tools_machine.refuse("result", f"call {clip(call_id)} was never started")
            return
        if not batches.awaited(call_id) or not self.tools_machine.fire("result"):
            return  # answered before, or its session was lost
        response_id = batches.answer(call_id)
        self._outbox.effects.append(Entry("tool_result", {"call_id": call_id, "output": output[:4000], "ok": ok}))
        if self.session_ready:
            self._outbox.send_upstream(client.function_output(call_id, output))
        if not batches.running:
            self.tools_machine.fire("answered")
        self._continue_after_tools(response_id)
        self._settle_output()

    def _continue_after_tools(self, response_id: str) -> None:
        if self.tool_batches.take_complete(response_id) and self.session_ready:
            self.request_response(self.dialect.response_create())
