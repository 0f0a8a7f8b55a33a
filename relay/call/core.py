"""One phone call as a sans-I/O object: the facade over the call's parts and state machines.

Feed it what arrives (Twilio frames, normalized Realtime events, tool results, the clock) and
collect what to send and do with ``take_output()``: messages for Twilio, messages for the
Realtime API and effects (store writes, tool runs, metrics). It never awaits, so barge-in and
truncation arithmetic are tested to the millisecond without sockets.

The facade decides which part an event concerns and in what order the parts act; the rules
live in the parts: `Assistant` (the assistant's output and barge-in) over `Playback` (marks,
what was heard) and `Responses` (the response.create queue), `TurnTaking`, `ToolBatches`,
`Conversation` (turns, summaries, instructions) and `Keypad`. The call's state is the four
machines of machines.py; `phase` is derived from them and never assigned.
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relay.agent_settings import AgentSettings
from relay.call.assistant import Assistant
from relay.call.caller_audio import CallerAudio, CallerFrame, KeyPress
from relay.call.conversation import Conversation
from relay.call.effects import Effect, Entry, Outbox
from relay.call.keypad import Keypad
from relay.call.machines import Caller, CallMachines, Phase, Session
from relay.call.playback import Playback
from relay.call.responses import Responses
from relay.call.tool_batches import ToolBatches
from relay.call.turns import TurnTaking
from relay.endpointing import SpeechStart
from relay.logbound import RepeatLimiter
from relay.realtime import client
from relay.realtime import events as ev
from relay.realtime.dialect import Dialect

SAY_EXACTLY = "Say exactly this and nothing else: "
ANSWER_TOOL_RESULT = (
    "The result of your last tool call, the last of the most recent turns above, arrived as the call moved "
    "to this connection and the caller has not heard it yet: tell the caller what it means for them."
)


class Call:
    """The logic of one call. Not thread-safe; driven by one transport."""

    def __init__(
        self,
        *,
        call_sid: str,
        stream_sid: str | None,
        dialect: Dialect,
        agent: AgentSettings,
        model: str,
        tools: Sequence[Mapping[str, Any]] = (),
        instructions_suffix: str = "",
        summary_max_turns: int = 24,
        summary_max_tokens: int = 6000,
        summary_keep_turns: int = 6,
        max_dtmf_per_second: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        transport_logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.call_sid = call_sid
        # None: the call's audio does not pass through the relay (a SIP call's sideband socket): no
        # audio deltas are relayed, no marks come back, and no playback is accounted here
        self.stream_sid = stream_sid
        self.audio_path = stream_sid is not None
        self.dialect = dialect
        self.agent = agent
        self.model = model
        self.tools = list(tools)
        self.clock = clock
        self.log = logger or logging.getLogger("relay.call")
        self.repeats = RepeatLimiter(self.log)  # what the caller's side sends again and again
        self._outbox = Outbox()

        self.machines = CallMachines(RepeatLimiter(self.log))

        self.playback = Playback(self._outbox, stream_sid, clock, self.repeats)
        self.responses = Responses(self._outbox)
        self.assistant = Assistant(self._outbox, self.machines.speech, self.playback, self.responses, clock, self.log)
        self.conversation = Conversation(
            self._outbox,
            agent,
            instructions_suffix=instructions_suffix,
            summary_max_turns=summary_max_turns,
            summary_max_tokens=summary_max_tokens,
            summary_keep_turns=summary_keep_turns,
        )
        self.tool_batches = ToolBatches(self._outbox, self.machines.tools)
        self.keypad = Keypad(self._outbox, agent.dtmf)
        self.greeted = False

        self.turn_taking = TurnTaking(agent.vad)
        self.endpointer = self.turn_taking.endpointer  # the transport feeds it caller audio (relay-side endpointing)
        # what the caller's side sends is logged under the transport's name (operators filter on it)
        self.audio = CallerAudio(clock, transport_logger or self.log, max_dtmf_per_second=max_dtmf_per_second)
        self.frames_in = 0  # counted by the I/O layer

    # ---- output and derived state --------------------------------------------------------

    def take_output(self) -> tuple[list[str], list[str], list[Effect]]:
        """Everything produced since the last take_output(): (to_twilio, to_upstream, effects)."""
        return self._outbox.take()

    def resume(self, summary: str | None, entries: list[dict[str, Any]]) -> None:
        """This stream carries on a call begun on another (an instance that died or handed it off):
        the stored conversation seeds the session, and there is no second greeting."""
        self.conversation.resume(summary, entries)
        self.greeted = True

    def note_event(self, event: str, **data: Any) -> None:
        """A system entry for the call's record, from the I/O side (reconnects, drain goodbye)."""
        self._outbox.effects.append(Entry("system", {"event": event, **data}))

    @property
    def has_output(self) -> bool:
        """Something waits for ``take_output()``."""
        outbox = self._outbox
        return bool(outbox.to_twilio or outbox.to_upstream or outbox.effects)

    @property
    def phase(self) -> Phase:
        """The call's phase for logs and metrics, derived from its machines (see machines.py)."""
        return self.machines.phase

    @property
    def session_ready(self) -> bool:
        return self.machines.session.state is Session.READY

    @property
    def caller_speaking(self) -> bool:
        return self.machines.caller.state is Caller.SPEAKING

    @property
    def playback_idle(self) -> bool:
        """True when the caller has heard everything sent and nothing is being generated or waits to be."""
        return self.playback.unplayed_bytes == 0 and self.responses.idle and not self.assistant.remote_playing

    @property
    def caller_audio_committed_ms(self) -> int:
        """How much of this session's input audio it has made into turns (speech_stopped's
        audio_end_ms): a replacement session must not be sent that audio again."""
        return self.turn_taking.committed_ms

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

    # ---- upstream session lifecycle ---------------------------------------------------

    def upstream_opened(self) -> list[CallerFrame]:
        """A new Realtime socket is open: configure it. Playback state on Twilio's side is kept.

        Returns the caller audio the new session must hear right after its configuration (the
        recent frames the lost one may not have had, then those held while none was open)."""
        if not self.machines.session.fire("opened"):
            return []
        self.conversation.session_opened()
        self.turn_taking.session_opened()
        self.responses.session_opened()
        self.playback.session_items = set()
        self.assistant.settle()
        self._outbox.send_upstream(
            self.dialect.session_update(
                self.agent, model=self.model, instructions=self.conversation.instructions(), tools=self.tools
            )
        )
        return self.audio.session_opened()

    def upstream_lost(self) -> None:
        """The Realtime socket is gone; anything it was generating will never finish."""
        if not self.machines.session.fire("lost"):
            return
        self.audio.session_lost(self.turn_taking.committed_ms)  # that audio reaches the next one as a turn
        self.responses.session_lost()
        self.tool_batches.abandon()
        self.assistant.settle()

    def close(self, reason: str) -> None:
        if self.machines.session.state is Session.CLOSED:
            return
        if self.keypad.open:  # the caller hung up mid-entry: keep what was typed, answer nothing
            self.keypad.take("hangup")
        self.machines.close()
        self._outbox.effects.append(Entry("system", {"event": "call_ended", "reason": reason}))

    # ---- Twilio side ------------------------------------------------------------------

    def twilio_mark(self, name: str) -> None:
        """Twilio played everything up to mark `name`."""
        playback = self.playback
        if playback.ack(name) and playback.unplayed_bytes == 0:
            self.assistant.settle()

    def find_turns(self, payload: str) -> None:
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
        if self.turn_taking.commit_relay_turn(session_ready=self.session_ready):
            self._outbox.send_upstream(client.commit())
            self.request_response(self.dialect.response_create())

    def key_pressed(self, digit: str) -> None:
        """One key press. Keys are collected into one entry, which ends with the terminator, a pause
        of ``dtmf.timeout_ms`` (see ``next_deadline``/``tick``) or ``dtmf.max_digits`` keys."""
        now = self.clock()
        if self.keypad.expired(now):
            self._finish_entry("timeout")  # the timer had not fired yet: that entry was over
        if not self.machines.caller.fire("key"):
            return
        if self.keypad.settings.interrupt:
            self.assistant.cut_off(cancel=True)  # the server never cancels for a key press
            self.assistant.settle()
        ended = self.keypad.press(digit, now)
        if ended is not None:
            self._finish_entry(ended)

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do (clock time), or None: the transport sleeps until then."""
        return self.keypad.deadline()

    def tick(self) -> None:
        """Let time pass: a keypad entry whose inter-key pause is over is complete."""
        if self.keypad.expired(self.clock()):
            self._finish_entry("timeout")

    def _finish_entry(self, ended: str) -> None:
        digits = self.keypad.take(ended)
        self.machines.caller.fire("entry_done")
        self.conversation.caller_keyed(digits)
        self.keypad.tell_model(digits, session_ready=self.session_ready)
        self.request_response(self.dialect.response_create())

    # ---- responses ----------------------------------------------------------------------

    def request_response(self, create: dict[str, Any]) -> None:
        """Send response.create now, or once the current response is done (never two at once)."""
        self.responses.request(create, session_ready=self.session_ready)

    def say(self, instructions: str, *, interrupt: bool = False) -> None:
        """Make the assistant speak now (drain goodbye, announcements), optionally cutting it off."""
        if interrupt and self.responses.cut_active(cancel=True) is not None:
            self.assistant.settle()
        self.request_response(
            self.dialect.response_create(instructions=self.conversation.with_session_instructions(instructions))
        )

    def stop_speaking(self) -> bool:
        """Cut the assistant off now, as a barge-in does (Twilio cleared, each item truncated at what
        was heard, the response cancelled) but without a caller turn: an answering machine picked up.
        False if nothing was playing or being generated."""
        cut = self.assistant.cut_off(cancel=True, barge_in=False)
        self.assistant.settle()
        return cut

    def say_exactly(self, text: str, *, interrupt: bool = False) -> None:
        """Make the assistant speak `text` word for word (the drain goodbye, the resumption line)."""
        self.say(f"{SAY_EXACTLY}{text}", interrupt=interrupt)

    def request_summary(self, *, final: bool = False) -> bool:
        """Ask for an out-of-band text summary; never spoken, never relayed to the caller."""
        if self.conversation.summary_in_flight or not self.session_ready:
            return False
        self.request_response(self.conversation.summary_request(self.dialect, final=final))
        return True

    # ---- upstream events -----------------------------------------------------------------

    def upstream_event(self, event: ev.ServerEvent) -> None:
        if type(event) is ev.AudioDelta:
            if self.audio_path:  # otherwise OpenAI plays it to the caller itself
                self.assistant.audio_delta(event)
        elif type(event) is ev.SpeechStarted:  # a cancel after the server's own would be refused (§11)
            self._caller_started(cancel=not self.turn_taking.server_cancels_on_speech)
        elif type(event) is ev.SpeechStopped:
            self._caller_stopped(event.audio_end_ms)
        elif type(event) is ev.InputCommitted:
            if self.turn_taking.answer_commit(event.item_id):  # server VAD with create_response false
                self.request_response(self.dialect.response_create())
        elif type(event) is ev.ResponseCreated:
            self.assistant.response_created(event)
        elif type(event) is ev.ResponseDone:
            self._on_response_done(event)
        elif type(event) is ev.OutputItemAdded:
            if event.item_id:
                self.playback.item_response[event.item_id] = event.response_id
                self.playback.session_items.add(event.item_id)
                if event.item_type == "function_call" and isinstance(event.item.get("name"), str):
                    self.tool_batches.note_name(event.item_id, event.item["name"])
        elif type(event) is ev.FunctionCallArgumentsDone:
            name = self.tool_batches.name_for(event.item_id, event.name)
            if name:  # without a name, the call is started from response.done, which has it
                self.tool_batches.start(event.response_id, event.call_id, name, event.arguments)
        elif type(event) is ev.AssistantTranscriptDone:
            if event.response_id not in self.responses.out_of_band and event.transcript:
                self.conversation.assistant_said(event.transcript, event.item_id)
        elif type(event) is ev.InputTranscriptCompleted:
            self.conversation.caller_said(event.transcript, event.item_id)
        elif type(event) is ev.ItemAdded:
            if event.item_id and self.conversation.item_added(event.item_id):
                self.playback.session_items.add(event.item_id)
                if self.conversation.needs_summary():
                    self.request_summary()
        elif type(event) is ev.ItemDeleted:
            self.conversation.item_deleted(event.item_id)
        elif type(event) is ev.SessionUpdated:
            self._on_session_updated()
        elif type(event) is ev.ServerError:
            self._on_error(event)
        elif type(event) is ev.OutputAudioStarted or type(event) is ev.OutputAudioStopped:
            self._output_buffer(event)
        elif type(event) is ev.KeypadDigit:
            self._keypad_digit(event.digit)
        elif type(event) is ev.InputTranscriptFailed:
            self.log.info("input transcription failed for %s: %s", event.item_id, event.message)
        elif type(event) is ev.Unknown:
            self.log.debug("ignoring unknown Realtime event %s", event.type)

    def _output_buffer(self, event: ev.OutputAudioStarted | ev.OutputAudioStopped) -> None:
        """OpenAI's own playback (SIP, WebRTC); where the audio passes through us, marks tell it."""
        if self.audio_path:
            self.log.debug("output_audio_buffer event on a call whose audio the relay plays; ignored")
        elif type(event) is ev.OutputAudioStarted:
            self.assistant.remote_started(event)
        else:
            self.assistant.remote_stopped()

    def _keypad_digit(self, digit: str) -> None:
        """A key press reported by the Realtime session (SIP), under the same per-second limit as
        Media Streams' keys; a flood of them is dropped here, since there is no stream to close.
        Where the audio passes through us, keys come from the Media Stream instead."""
        if self.audio_path:
            self.log.debug("keypad event from the Realtime session of a Media Stream call; ignored")
        elif self.audio.keypress(on_flood="digits dropped") is KeyPress.PASS:
            self.key_pressed(digit)

    def _on_session_updated(self) -> None:
        first = not self.session_ready
        if not self.machines.session.fire("configured") or not first:
            return
        first_session = self.conversation.sessions_opened == 1
        if not self.greeted and first_session and self.agent.greeting:
            self.assistant.greet()
            greeting = self.conversation.with_session_instructions(self.agent.greeting)
            self.request_response(self.dialect.response_create(instructions=greeting))
        elif self.conversation.resumed and first_session:
            if self.agent.resume_line:
                # a call carried on from another stream: the caller was cut off for a moment and may
                # wonder; the profile's line says so, once, and it is no greeting (that was the first stream's)
                self.say_exactly(self.agent.resume_line)
            if self.conversation.answer_pending:  # the tool's result came in as the call moved here
                self.say(ANSWER_TOOL_RESULT)
        self.greeted = True
        if self.keypad.send_unsent() and not self.responses.has_plain_queued():
            # their response.create was queued in a session that was lost before it was ready
            self.request_response(self.dialect.response_create())
        if self.turn_taking.turn_unsent:
            self._end_relay_turn()
        self.responses.flush(session_ready=True)

    def _on_response_done(self, event: ev.ResponseDone) -> None:
        self.conversation.response_done(event)
        if self.responses.done(event.response_id):  # out of band
            self.conversation.summary_done(event, session_ready=self.session_ready)
            self.responses.flush(session_ready=self.session_ready)
            return
        if event.status == "failed":
            self.log.warning("response %s failed: %s", event.response_id, event.error_code or event.status_reason)
        for call in event.function_calls:
            self.tool_batches.start(event.response_id, call.call_id, call.name, call.arguments)
        self.tool_batches.response_done(event.response_id, made_calls=bool(event.function_calls))
        self._continue_after_tools(event.response_id)
        self.responses.flush(session_ready=self.session_ready)
        self.assistant.settle()

    def _on_error(self, error: ev.ServerError) -> None:
        if self.responses.server_error(error, self.log, session_ready=self.session_ready):
            self.conversation.summary_in_flight = False  # the summary's create was refused

    # ---- audio and barge-in ----------------------------------------------------------

    def _caller_started(self, *, cancel: bool) -> None:
        """The caller started speaking (server VAD or relay-side endpointing)."""
        if self.machines.caller.fire("speech_started"):
            self.assistant.caller_started(cancel=cancel)

    def _caller_stopped(self, audio_end_ms: int) -> bool:
        """The caller stopped speaking; False (and nothing done) if that is illegal now."""
        if not self.machines.caller.fire("speech_stopped"):
            return False
        self.turn_taking.speech_stopped(audio_end_ms)
        self.assistant.caller_stopped()
        return True

    # ---- tools ----------------------------------------------------------------------------

    def tool_result(self, call_id: str, output: str, *, ok: bool = True) -> None:
        """A handler finished (or failed): give the model its output; continue once all are in."""
        response_id = self.tool_batches.result(call_id, output, ok=ok, session_ready=self.session_ready)
        if response_id is not None:
            self._continue_after_tools(response_id)
            self.assistant.settle()

    def tool_result_for_next_stream(self, call_id: str, output: str, *, ok: bool = True) -> None:
        """A handler finished while the call is being handed off: its result is recorded (the stream
        that resumes the call answers it, see Conversation.resume); this session is asked nothing."""
        self.tool_batches.result(call_id, output, ok=ok, session_ready=False)

    def _continue_after_tools(self, response_id: str) -> None:
        if self.tool_batches.take_complete(response_id) and self.session_ready:
            self.request_response(self.dialect.response_create())
