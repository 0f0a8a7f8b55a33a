"""One phone call as a sans-I/O state machine.

Feed it what arrives (Twilio frames, normalized Realtime events, tool results, the
clock) and collect what to send (``to_twilio``, ``to_upstream``) and what to do on the
side (``effects``: store writes, tool runs, metrics). It never awaits, so barge-in and
truncation arithmetic are tested to the millisecond without sockets.

Playback accounting: each assistant audio chunk sent to Twilio is followed by a mark
named ``<generation>.<seq>``; Twilio echoes the mark when the chunk has played. A
``clear`` bumps the generation, so marks echoed for discarded audio never count.
"""

from __future__ import annotations

import binascii
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay.audio import FRAME_MS, ULAW_BYTES_PER_MS, audio_bytes
from relay.config import AgentSettings
from relay.endpointing import Endpointer, SpeechStart
from relay.logbound import RepeatLimiter, clip
from relay.realtime import client
from relay.realtime import events as ev
from relay.realtime.dialect import Dialect
from relay.twilio.messages import Outbound, is_base64

SUMMARY_PURPOSE = "summary"
RECENT_TURNS_KEPT = 12


class Phase(enum.Enum):
    CONFIGURING = "configuring"  # Realtime session opened, waiting for session.updated
    GREETING = "greeting"  # the assistant's first words are being generated or played
    LISTENING = "listening"  # nothing playing, waiting for the caller
    ASSISTANT_SPEAKING = "assistant_speaking"
    INTERRUPTED = "interrupted"  # the caller barged in; their turn is being captured
    TOOL_RUNNING = "tool_running"
    RECONNECTING = "reconnecting"  # the Realtime socket dropped; a new session is being opened
    CLOSED = "closed"


# ---- effects: what the I/O layer performs on the call's behalf -------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A conversation entry for the store (caller/assistant transcript, dtmf, tool, interruption…)."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UsageReport:
    response_id: str
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class RunTool:
    response_id: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class SummaryReady:
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    value: float = 1.0
    label: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The Realtime API reported an error the call cannot continue past."""

    code: str
    message: str
    fatal: bool


Effect = Entry | UsageReport | RunTool | SummaryReady | Metric | UpstreamFailed


@dataclass(slots=True)
class _Turn:
    role: str
    text: str


@dataclass(slots=True)
class _ToolBatch:
    """Function calls of one response; one response.create once every call is answered."""

    pending: set[str] = field(default_factory=set)
    response_done: bool = False
    answered: int = 0


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
        self.instructions_suffix = instructions_suffix
        self.summary_max_turns = summary_max_turns
        self.summary_max_tokens = summary_max_tokens
        self.summary_keep_turns = summary_keep_turns
        self.clock = clock
        self.log = logger or logging.getLogger("relay.call")
        self.repeats = RepeatLimiter(self.log)  # what the caller's side sends again and again
        self.out = Outbound(stream_sid)

        self.to_twilio: list[str] = []
        self.to_upstream: list[str] = []
        self.effects: list[Effect] = []

        self.phase = Phase.CONFIGURING
        self.session_ready = False
        self.sessions_opened = 0
        self.greeted = False

        # playback
        self._generation = 0
        self._mark_seq = 0
        self._pending_marks: deque[tuple[str, str, int, float]] = deque()  # (mark, item id, bytes, sent at)
        self._last_ack_at = 0.0
        self.unplayed_bytes = 0
        self.played_bytes: dict[str, int] = {}
        self.received_bytes: dict[str, int] = {}
        self._item_response: dict[str, str] = {}
        self._session_items: set[str] = set()

        # responses
        self.active_response: str | None = None
        # Interrupted responses whose response.done has not come yet: a response.create sent now
        # would be refused with conversation_already_has_active_response, so creates wait for it.
        self._ending_responses: set[str] = set()
        self._out_of_band: set[str] = set()
        self._dropped_responses: set[str] = set()
        self._create_in_flight: dict[str, Any] | None = None
        self._sent_creates: dict[str, dict[str, Any]] = {}  # event_id -> response.create, recent ones
        self._queued_creates: deque[dict[str, Any]] = deque()
        self._create_seq = 0
        self._response_had_audio: set[str] = set()

        # turns, latency, summaries
        self.caller_speaking = False
        # How much of this session's input audio it has made into a user turn (speech_stopped's
        # audio_end_ms): a replacement session must not be sent that audio again.
        self.caller_audio_committed_ms = 0
        self._speech_stopped_at: float | None = None
        self._awaiting_first_mark_since: float | None = None
        self._awaiting_first_mark_name: str | None = None
        self.conversation_items: list[str] = []
        self.turns: deque[_Turn] = deque(maxlen=RECENT_TURNS_KEPT)
        self.turn_count = 0
        self.summary: str | None = None
        self._summary_in_flight = False
        self._last_input_tokens = 0

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

        # keypad entries
        self._keys: list[str] = []
        self._last_key_at = 0.0
        self._unsent_items: list[dict[str, Any]] = []  # entries typed while no session was ready

        # tools
        self._tool_batches: dict[str, _ToolBatch] = {}
        self._tool_call_response: dict[str, str] = {}
        self._started_tool_calls: set[str] = set()
        self._function_names: dict[str, str] = {}  # item id -> name (beta's arguments.done has no name)

        # counters (also visible to tests)
        self.dropped_deltas = 0
        self.stale_marks = 0
        self.frames_in = 0
        self.frames_out = 0

    # ---- helpers -------------------------------------------------------------------

    def _send_upstream(self, event: Mapping[str, Any]) -> None:
        self.to_upstream.append(orjson.dumps(event).decode())

    def take_output(self) -> tuple[list[str], list[str], list[Effect]]:
        """Everything produced since the last take_output(): (to_twilio, to_upstream, effects)."""
        out = (self.to_twilio, self.to_upstream, self.effects)
        self.to_twilio, self.to_upstream, self.effects = [], [], []
        return out

    def note_event(self, event: str, **data: Any) -> None:
        """A system entry for the call's record, from the I/O side (reconnects, drain goodbye)."""
        self.effects.append(Entry("system", {"event": event, **data}))

    @property
    def playback_idle(self) -> bool:
        """True when the caller has heard everything sent and nothing is being generated or waits to be."""
        return (
            self.unplayed_bytes == 0
            and self.active_response is None
            and self._create_in_flight is None
            and not any(c.get("response", {}).get("conversation") != "none" for c in self._queued_creates)
        )

    def _set_phase(self, phase: Phase) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = phase

    def _settle_phase(self) -> None:
        if self.phase in (Phase.CLOSED, Phase.RECONNECTING, Phase.CONFIGURING):
            return
        if any(batch.pending for batch in self._tool_batches.values()):
            self.phase = Phase.TOOL_RUNNING
        elif self.caller_speaking:
            self.phase = Phase.INTERRUPTED if self.phase is Phase.INTERRUPTED else Phase.LISTENING
        elif self.unplayed_bytes or self.active_response:
            if self.phase is not Phase.GREETING:
                self.phase = Phase.ASSISTANT_SPEAKING
        else:
            self.phase = Phase.LISTENING

    def instructions(self) -> str:
        text = self.agent.instructions
        if self.instructions_suffix:
            text = f"{text}\n\n{self.instructions_suffix}"
        if self.sessions_opened > 1:
            text = f"{text}\n\n{self.resume_context()}"
        return text

    def with_session_instructions(self, text: str) -> str:
        """``response.instructions`` replaces the session's for that response (PROTOCOLS §8): a spoken
        one-off (greeting, goodbye) carries the session's instructions too, so the persona and what
        is known about the caller hold from the first word."""
        return f"{self.instructions()}\n\n{text}"

    def resume_context(self) -> str:
        """What a replacement Realtime session needs to continue mid-call."""
        lines = [
            "This phone call is already in progress; the connection to you was re-established. "
            "Do not greet the caller again; continue the conversation naturally from where it stopped."
        ]
        if self.summary:
            lines.append(f"Summary of the conversation so far: {self.summary}")
        if self.turns:
            lines.append("Most recent turns:")
            lines.extend(f"{t.role}: {t.text}" for t in self.turns)
        return "\n".join(lines)

    # ---- upstream session lifecycle ---------------------------------------------------

    def upstream_opened(self) -> None:
        """A new Realtime socket is open: configure it. Playback state on Twilio's side is kept."""
        self.sessions_opened += 1
        self.session_ready = False
        self.caller_audio_committed_ms = 0
        self.active_response = None
        self._ending_responses.clear()
        self._out_of_band.clear()
        self._create_in_flight = None
        self._session_items = set()
        if self.endpointer is not None:
            self.endpointer.new_session()
        self.conversation_items = []
        self._summary_in_flight = False
        self._set_phase(Phase.CONFIGURING)
        self._send_upstream(
            self.dialect.session_update(
                self.agent, model=self.model, instructions=self.instructions(), tools=self.tools
            )
        )

    def upstream_lost(self) -> None:
        """The Realtime socket is gone; anything it was generating will never finish."""
        if self.active_response:
            self._dropped_responses.add(self.active_response)
        self.active_response = None
        self._ending_responses.clear()
        self._create_in_flight = None
        self._queued_creates.clear()
        self.session_ready = False
        for batch in self._tool_batches.values():
            batch.pending.clear()
        self._set_phase(Phase.RECONNECTING)

    def close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._keys:  # the caller hung up mid-entry: keep what was typed, answer nothing
            self._record_entry("hangup")
        self.phase = Phase.CLOSED
        self.effects.append(Entry("system", {"event": "call_ended", "reason": reason}))

    # ---- Twilio side ------------------------------------------------------------------

    def twilio_mark(self, name: str) -> None:
        gen, _, _ = name.partition(".")
        if gen != str(self._generation):
            self.stale_marks += 1
            return
        if not any(entry[0] == name for entry in self._pending_marks):
            self.stale_marks += 1
            self.repeats.log("unknown_mark", logging.DEBUG, "mark %s is not pending; ignored", clip(name))
            return
        self._last_ack_at = self.clock()
        while self._pending_marks:
            mark_name, item_id, nbytes, _ = self._pending_marks.popleft()
            self.unplayed_bytes -= nbytes
            self.played_bytes[item_id] = self.played_bytes.get(item_id, 0) + nbytes
            if mark_name == name:
                break
        if self._awaiting_first_mark_since is not None and self._awaiting_first_mark_name is not None:
            if self._awaiting_first_mark_name not in {m[0] for m in self._pending_marks}:
                self.effects.append(
                    Metric("mouth_to_ear_played_seconds", self.clock() - self._awaiting_first_mark_since)
                )
                self._awaiting_first_mark_since = None
                self._awaiting_first_mark_name = None
        self._settle_phase()

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
            else:
                self._caller_stopped(boundary.audio_end_ms)
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
        self._send_upstream(client.commit())
        self.request_response(self.dialect.response_create())

    def twilio_dtmf(self, digit: str) -> None:
        """One key press. Keys are collected into one entry, which ends with the terminator, a pause
        of ``dtmf.timeout_ms`` (see ``next_deadline``/``tick``) or ``dtmf.max_digits`` keys."""
        settings = self.agent.dtmf
        now = self.clock()
        if self._keys and now >= self._last_key_at + settings.timeout_ms / 1000.0:
            self._finish_entry("timeout")  # the timer had not fired yet: that entry was over
        if settings.interrupt:
            self._interrupt_assistant(cancel=True)  # the server never cancels for a key press
            self._settle_phase()
        self._keys.append(digit)
        self._last_key_at = now
        if settings.terminator and digit == settings.terminator:
            self._finish_entry("terminator")
        elif len(self._keys) >= settings.max_digits:
            self._finish_entry("max_digits")

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do (clock time), or None: the bridge sleeps until then."""
        if self._keys:
            return self._last_key_at + self.agent.dtmf.timeout_ms / 1000.0
        return None

    def tick(self) -> None:
        """Let time pass: a keypad entry whose inter-key pause is over is complete."""
        deadline = self.next_deadline()
        if deadline is not None and self.clock() >= deadline and self.phase is not Phase.CLOSED:
            self._finish_entry("timeout")

    def _record_entry(self, ended: str) -> str:
        digits = "".join(self._keys)
        self._keys.clear()
        self.effects.append(Entry("dtmf", {"digits": digits, "ended": ended}))
        return digits

    def _finish_entry(self, ended: str) -> None:
        digits = self._record_entry(ended)
        self.turns.append(_Turn("Caller (keypad)", f"entered {digits}"))
        item = client.user_text(f"The caller entered {' '.join(digits)}")
        if self.session_ready:
            self._send_upstream(item)
        else:
            self._unsent_items.append(item)
        self.request_response(self.dialect.response_create())

    # ---- responses ----------------------------------------------------------------------

    def request_response(self, create: dict[str, Any]) -> None:
        """Send response.create now, or once the current response is done (never two at once)."""
        self._create_seq += 1
        create["event_id"] = f"relay_create_{self._create_seq}"
        if not self.session_ready:
            self._queued_creates.append(create)
            return
        if self.active_response is None and self._create_in_flight is None and not self._ending_responses:
            self._send_create(create)
            return
        is_plain = "response" not in create
        if is_plain and any("response" not in queued for queued in self._queued_creates):
            return  # one plain response will see every new item; don't ask twice
        self._queued_creates.append(create)

    def _send_create(self, create: dict[str, Any]) -> None:
        self._create_in_flight = create
        self._sent_creates[create["event_id"]] = create
        while len(self._sent_creates) > 16:
            del self._sent_creates[next(iter(self._sent_creates))]
        self._send_upstream(create)

    def say(self, instructions: str, *, interrupt: bool = False) -> None:
        """Make the assistant speak now (drain goodbye, announcements), optionally cutting it off."""
        if interrupt and self.active_response is not None:
            self._dropped_responses.add(self.active_response)
            self._ending_responses.add(self.active_response)
            self._send_upstream(client.cancel(self.active_response))
            self.active_response = None
        self.request_response(self.dialect.response_create(instructions=self.with_session_instructions(instructions)))

    def _flush_queued_create(self) -> None:
        if self.session_ready and self._queued_creates and self.active_response is None:
            if self._create_in_flight is None and not self._ending_responses:
                self._send_create(self._queued_creates.popleft())

    def request_summary(self, *, final: bool = False) -> bool:
        """Ask for an out-of-band text summary; never spoken, never relayed to the caller."""
        if self._summary_in_flight or not self.session_ready:
            return False
        self._summary_in_flight = True
        previous = f" Earlier summary: {self.summary}" if self.summary else ""
        # Out of band and never spoken: these instructions replace the persona on purpose.
        self.request_response(
            self.dialect.response_create(
                instructions=(
                    "Summarize this phone conversation so far for your own memory in at most five "
                    "sentences: who the caller is, what they want, what was decided, open items." + previous
                ),
                out_of_band=True,
                metadata={"purpose": SUMMARY_PURPOSE, "final": "1" if final else "0"},
                text_only=True,
            )
        )
        return True

    def _maybe_summarize(self) -> None:
        too_many = len(self.conversation_items) > self.summary_max_turns
        too_big = self._last_input_tokens > self.summary_max_tokens
        if (too_many or too_big) and not self._summary_in_flight:
            self.request_summary()

    def _apply_summary(self, text: str, final: bool) -> None:
        self.summary = text
        self.effects.append(SummaryReady(text, final))
        self.effects.append(Entry("summary", {"text": text, "final": final}))
        if final or not self.session_ready:
            return
        keep = self.summary_keep_turns
        old = self.conversation_items[:-keep] if keep else list(self.conversation_items)
        if not old:
            return
        for item_id in old:
            self._send_upstream(client.delete_item(item_id))
        self.conversation_items = self.conversation_items[len(old) :]
        context = client.user_text(f"Summary of the earlier part of this call: {text}", role="system")
        context["previous_item_id"] = "root"
        self._send_upstream(context)
        self.effects.append(Metric("context_trims", 1.0))

    # ---- upstream events -----------------------------------------------------------------

    def upstream_event(self, event: ev.ServerEvent) -> None:
        kind = type(event)
        if kind is ev.AudioDelta:
            assert isinstance(event, ev.AudioDelta)
            self._on_audio_delta(event)
        elif kind is ev.SpeechStarted:
            assert isinstance(event, ev.SpeechStarted)
            self._on_speech_started(event)
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
                self._item_response[event.item_id] = event.response_id
                self._session_items.add(event.item_id)
                if event.item_type == "function_call" and isinstance(event.item.get("name"), str):
                    self._function_names[event.item_id] = event.item["name"]
        elif kind is ev.FunctionCallArgumentsDone:
            assert isinstance(event, ev.FunctionCallArgumentsDone)
            name = self._function_names.pop(event.item_id, "") or event.name
            if name:  # without a name, the call is started from response.done, which has it
                self._start_tool(event.response_id, event.call_id, name, event.arguments)
        elif kind is ev.AssistantTranscriptDone:
            assert isinstance(event, ev.AssistantTranscriptDone)
            if event.response_id not in self._out_of_band and event.transcript:
                self.effects.append(Entry("assistant", {"text": event.transcript, "item_id": event.item_id}))
                self.turns.append(_Turn("Assistant", event.transcript))
        elif kind is ev.InputTranscriptCompleted:
            assert isinstance(event, ev.InputTranscriptCompleted)
            if event.transcript.strip():
                self.effects.append(Entry("caller", {"text": event.transcript, "item_id": event.item_id}))
                self.turns.append(_Turn("Caller", event.transcript))
                self.turn_count += 1
        elif kind is ev.ItemAdded:
            assert isinstance(event, ev.ItemAdded)
            if event.item_id and event.item_id not in self.conversation_items:
                self.conversation_items.append(event.item_id)
                self._session_items.add(event.item_id)
                self._maybe_summarize()
        elif kind is ev.ItemDeleted:
            assert isinstance(event, ev.ItemDeleted)
            if event.item_id in self.conversation_items:
                self.conversation_items.remove(event.item_id)
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
        self.session_ready = True
        if not first:
            return
        self._set_phase(Phase.LISTENING)
        if not self.greeted and self.sessions_opened == 1 and self.agent.greeting:
            self.greeted = True
            self._set_phase(Phase.GREETING)
            self._speech_stopped_at = self.clock()  # greeting latency counts from session ready
            greeting = self.with_session_instructions(self.agent.greeting)
            self.request_response(self.dialect.response_create(instructions=greeting))
        self.greeted = True
        typed_meanwhile = bool(self._unsent_items)
        for item in self._unsent_items:
            self._send_upstream(item)
        self._unsent_items.clear()
        if typed_meanwhile and not any("response" not in queued for queued in self._queued_creates):
            # their response.create was queued in a session that was lost before it was ready
            self.request_response(self.dialect.response_create())
        if self._turn_unsent:
            self._end_relay_turn()
        self._flush_queued_create()

    def _on_input_committed(self, event: ev.InputCommitted) -> None:
        """Server VAD with create_response false: each committed caller turn gets one response.create."""
        if not self._answer_commits or event.item_id in self._answered_commits:
            return
        self._answered_commits.append(event.item_id)
        self.request_response(self.dialect.response_create())

    def _on_response_created(self, event: ev.ResponseCreated) -> None:
        metadata = event.metadata or {}
        if metadata.get("purpose") == SUMMARY_PURPOSE or event.conversation == "none":
            self._out_of_band.add(event.response_id)
            in_flight = self._create_in_flight
            if in_flight is not None and in_flight.get("response", {}).get("conversation") == "none":
                self._create_in_flight = None
            return
        # Ours or one the server started by itself; if the latter, ours fails with
        # "already has an active response" and is queued again by its event_id.
        self._create_in_flight = None
        self.active_response = event.response_id
        if self.phase is not Phase.GREETING:
            self._set_phase(Phase.ASSISTANT_SPEAKING)

    def _on_response_done(self, event: ev.ResponseDone) -> None:
        if event.usage:
            self.effects.append(UsageReport(event.response_id, event.usage))
            self._last_input_tokens = event.usage.get("input", self._last_input_tokens)
        self.effects.append(Metric("responses", 1.0, event.status))
        if event.response_id in self._out_of_band:
            self._out_of_band.discard(event.response_id)
            metadata = event.metadata or {}
            if metadata.get("purpose") == SUMMARY_PURPOSE:
                self._summary_in_flight = False
                if event.status == "completed" and event.output_text.strip():
                    self._apply_summary(event.output_text.strip(), metadata.get("final") == "1")
            self._flush_queued_create()
            return
        if event.status == "failed":
            self.log.warning("response %s failed: %s", event.response_id, event.error_code or event.status_reason)
        self._ending_responses.discard(event.response_id)
        if self.active_response == event.response_id or self.active_response is None:
            self.active_response = None
        if event.function_calls:
            batch = self._tool_batches.setdefault(event.response_id, _ToolBatch())
            for call in event.function_calls:
                self._start_tool(event.response_id, call.call_id, call.name, call.arguments)
            batch.response_done = True
            self._maybe_continue_after_tools(event.response_id)
        elif event.response_id in self._tool_batches:
            self._tool_batches[event.response_id].response_done = True
        self._flush_queued_create()
        self._settle_phase()

    def _on_error(self, error: ev.ServerError) -> None:
        code = error.code or error.type
        self.effects.append(Metric("realtime_errors", 1.0, code))
        if code == "response_cancel_not_active":
            self.log.debug("cancel raced the end of the response (harmless)")
            return
        if code == "input_audio_buffer_commit_empty":
            self.log.info("the Realtime API found too little caller audio to commit that turn")
            return
        refused = self._sent_creates.pop(error.event_id, None) if error.event_id else None
        if refused is not None and self._create_in_flight is refused:
            self._create_in_flight = None
        if code == "conversation_already_has_active_response":
            # A response won the race (one the server started, or one this call does not count as
            # active); ours goes out at the next response.done. Sending it again now could only draw
            # the same error, again and again.
            if refused is not None and refused not in self._queued_creates:
                self._queued_creates.appendleft(refused)
            self.log.info("response.create raced an active response; queued until it is done")
            return
        if refused is not None:
            if refused.get("response", {}).get("conversation") == "none":
                self._summary_in_flight = False
            self._flush_queued_create()
        fatal = code in ev.FATAL_ERROR_CODES
        if fatal or code in ("session_expired", "session_expiration"):
            self.effects.append(UpstreamFailed(code, error.message, fatal))
        self.log.warning("Realtime error %s: %s", code, error.message)

    # ---- audio and barge-in ----------------------------------------------------------

    def _on_audio_delta(self, event: ev.AudioDelta) -> None:
        if event.response_id in self._dropped_responses or event.response_id in self._out_of_band:
            self.dropped_deltas += 1
            return
        payload = event.delta
        if not payload or not is_base64(payload):
            self.log.warning("audio delta of %s is not base64; skipped", event.item_id)
            return
        nbytes = audio_bytes(payload)
        item_id = event.item_id
        self.received_bytes[item_id] = self.received_bytes.get(item_id, 0) + nbytes
        self._item_response.setdefault(item_id, event.response_id)
        self._session_items.add(item_id)
        name = f"{self._generation}.{self._mark_seq}"
        self._mark_seq += 1
        self._pending_marks.append((name, item_id, nbytes, self.clock()))
        self.unplayed_bytes += nbytes
        self.to_twilio.append(self.out.media(payload))
        self.to_twilio.append(self.out.mark(name))
        self.frames_out += 1
        if event.response_id not in self._response_had_audio:
            self._response_had_audio.add(event.response_id)
            if self._speech_stopped_at is not None:
                self.effects.append(Metric("mouth_to_ear_sent_seconds", self.clock() - self._speech_stopped_at))
                self._awaiting_first_mark_since = self._speech_stopped_at
                self._awaiting_first_mark_name = name
                self._speech_stopped_at = None
        if self.phase is Phase.LISTENING:
            self._set_phase(Phase.ASSISTANT_SPEAKING)

    def _playing_now(self) -> tuple[str | None, int]:
        """The chunk being played right now and how much of it the caller has heard.

        Marks only confirm whole chunks; the head chunk has been playing since the later of
        its send time and the previous acknowledgement, at 8 bytes per ms, in 20 ms frames.
        """
        if not self._pending_marks:
            return None, 0
        _, item_id, nbytes, sent_at = self._pending_marks[0]
        started = max(sent_at, self._last_ack_at)
        elapsed_ms = max(0.0, self.clock() - started) * 1000.0
        # Audio is played in 20 ms frames and a frame that has begun is heard whole.
        frames_begun = int(elapsed_ms // FRAME_MS) + 1 if elapsed_ms > 0 else 0
        return item_id, min(nbytes, frames_begun * FRAME_MS * ULAW_BYTES_PER_MS)

    def _on_speech_started(self, event: ev.SpeechStarted) -> None:
        # With interrupt_response true the server has cancelled the response already; a cancel from
        # us could only draw response_cancel_not_active (PROTOCOLS §7, §11).
        self._caller_started(cancel=not self._server_cancels_on_speech)

    def _caller_started(self, *, cancel: bool) -> None:
        """The caller started speaking (server VAD or relay-side endpointing)."""
        self.caller_speaking = True
        self._speech_stopped_at = None
        if self._interrupt_assistant(cancel=cancel):
            self._set_phase(Phase.INTERRUPTED)
        else:
            self._settle_phase()

    def _caller_stopped(self, audio_end_ms: int) -> None:
        self.caller_speaking = False
        self.caller_audio_committed_ms = max(self.caller_audio_committed_ms, audio_end_ms)
        self._speech_stopped_at = self.clock()
        self._settle_phase()

    def _interrupt_assistant(self, *, cancel: bool) -> bool:
        """Barge-in: clear Twilio, truncate each item at what was heard, drop the response's late
        deltas and, when ``cancel`` (the server won't), cancel it. False if nothing was playing."""
        interrupted_response = self.active_response
        if not self._pending_marks and interrupted_response is None:
            return False
        self.effects.append(Metric("barge_ins", 1.0))
        if self._pending_marks:
            self.to_twilio.append(self.out.clear())
            seen: list[str] = []
            for _, item_id, _, _ in self._pending_marks:
                if item_id not in seen:
                    seen.append(item_id)
            playing_item, playing_bytes = self._playing_now()
            for item_id in seen:
                played = self.played_bytes.get(item_id, 0) + (playing_bytes if item_id == playing_item else 0)
                self.played_bytes[item_id] = played
                received = self.received_bytes.get(item_id, 0)
                audio_end_ms = min(played, received) // ULAW_BYTES_PER_MS
                response_id = self._item_response.get(item_id)
                if response_id:
                    self._dropped_responses.add(response_id)
                if item_id in self._session_items:
                    self._send_upstream(client.truncate(item_id, audio_end_ms))
                    self.effects.append(Metric("truncations", 1.0))
                self.effects.append(
                    Entry(
                        "interruption",
                        {
                            "item_id": item_id,
                            "audio_end_ms": audio_end_ms,
                            "received_ms": received // ULAW_BYTES_PER_MS,
                        },
                    )
                )
            self._pending_marks.clear()
            self.unplayed_bytes = 0
            self._generation += 1
            self._mark_seq = 0
            self._awaiting_first_mark_since = None
            self._awaiting_first_mark_name = None
        if interrupted_response is not None:
            self._dropped_responses.add(interrupted_response)
            self._ending_responses.add(interrupted_response)
            if cancel:
                self._send_upstream(client.cancel(interrupted_response))
            self.active_response = None
        return True

    # ---- tools ----------------------------------------------------------------------------

    def _start_tool(self, response_id: str, call_id: str, name: str, arguments: str) -> None:
        if call_id in self._started_tool_calls:
            return
        self._started_tool_calls.add(call_id)
        batch = self._tool_batches.setdefault(response_id, _ToolBatch())
        batch.pending.add(call_id)
        self._tool_call_response[call_id] = response_id
        self.effects.append(Entry("tool_call", {"call_id": call_id, "name": name, "arguments": arguments}))
        self.effects.append(RunTool(response_id, call_id, name, arguments))
        self._set_phase(Phase.TOOL_RUNNING)

    def tool_result(self, call_id: str, output: str, *, ok: bool = True) -> None:
        """A handler finished (or failed): give the model its output; continue once all are in."""
        response_id = self._tool_call_response.get(call_id)
        if response_id is None:
            self.log.warning("result for unknown tool call %s ignored", call_id)
            return
        batch = self._tool_batches.get(response_id)
        if batch is None or call_id not in batch.pending:
            return
        batch.pending.discard(call_id)
        batch.answered += 1
        self.effects.append(Entry("tool_result", {"call_id": call_id, "output": output[:4000], "ok": ok}))
        if self.session_ready:
            self._send_upstream(client.function_output(call_id, output))
        self._maybe_continue_after_tools(response_id)
        self._settle_phase()

    def _maybe_continue_after_tools(self, response_id: str) -> None:
        batch = self._tool_batches.get(response_id)
        if batch is None or batch.pending or not batch.response_done or batch.answered == 0:
            return
        del self._tool_batches[response_id]
        if self.session_ready and self.phase is not Phase.CLOSED:
            self.request_response(self.dialect.response_create())
