"""What was said: recent turns, the session's items, the running summary and the instructions.

A call outlives its Realtime session, so the call keeps what a replacement session needs:
the last `RECENT_TURNS_KEPT` turns and a summary the model writes out of band (never spoken).
When the session's conversation grows past ``summary_max_turns`` items or its last response
used more than ``summary_max_tokens`` input tokens, the model is asked for a summary; once it
arrives, the oldest items are deleted and replaced by one system item that carries it, so the
context stays bounded for a long call.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from relay.agent_settings import AgentSettings
from relay.call.effects import Entry, Metric, Outbox, SummaryReady, UsageReport
from relay.realtime import client
from relay.realtime import events as ev
from relay.realtime.dialect import Dialect

SUMMARY_PURPOSE = "summary"
RECENT_TURNS_KEPT = 12
SUMMARY_REQUEST = (
    "Summarize this phone conversation so far for your own memory in at most five "
    "sentences: who the caller is, what they want, what was decided, open items."
)


@dataclass(slots=True)
class Turn:
    role: str
    text: str


def _one_line(text: str) -> str:
    """Stored text as one line: a newline in a transcript or a tool's output cannot start a line
    that reads like another speaker or an instruction."""
    return " ".join(text.split())


def _turn_of(entry: dict[str, Any]) -> Turn | None:
    """A stored entry as a line of the resumed conversation, or None for what is not one."""
    turn = _stored_turn(entry)
    return None if turn is None else Turn(turn.role, _one_line(turn.text))


UNFINISHED_TOOL = "none: the call moved to a new connection before it finished, so its outcome is unknown"


def _unanswered_tool_result(entries: list[dict[str, Any]]) -> bool:
    """Whether the conversation stops at a tool's result nobody has told the caller about yet (a
    hand-off waited for the tool; an instance died between the result and the answer)."""
    for entry in reversed(entries):
        kind = entry.get("kind")
        if kind == "tool_result":
            return True
        if kind in ("caller", "assistant", "dtmf", "tool_call"):
            return False
    return False


def _stored_turn(entry: dict[str, Any]) -> Turn | None:
    kind = entry.get("kind")
    if kind in ("caller", "assistant") and isinstance(entry.get("text"), str) and entry["text"].strip():
        return Turn("Caller" if kind == "caller" else "Assistant", entry["text"])
    if kind == "dtmf" and isinstance(entry.get("digits"), str):
        return Turn("Caller (keypad)", f"entered {entry['digits']}")
    if kind == "tool_call" and isinstance(entry.get("name"), str):
        return Turn("Tool call", f"{entry['name']} {entry.get('arguments', '')}".strip())
    if kind == "tool_result" and isinstance(entry.get("output"), str):
        return Turn("Tool result", entry["output"])
    return None


class Conversation:
    """Turns, items and summary of one call, across its Realtime sessions."""

    __slots__ = (
        "_keep_turns",
        "_max_tokens",
        "_max_turns",
        "_outbox",
        "agent",
        "answer_pending",
        "instructions_suffix",
        "items",
        "last_input_tokens",
        "resumed",
        "sessions_opened",
        "summary",
        "summary_in_flight",
        "turn_count",
        "turns",
    )

    def __init__(
        self,
        outbox: Outbox,
        agent: AgentSettings,
        *,
        instructions_suffix: str,
        summary_max_turns: int,
        summary_max_tokens: int,
        summary_keep_turns: int,
    ) -> None:
        self._outbox = outbox
        self.agent = agent
        self.instructions_suffix = instructions_suffix
        self._max_turns = summary_max_turns
        self._max_tokens = summary_max_tokens
        self._keep_turns = summary_keep_turns
        self.sessions_opened = 0
        self.items: list[str] = []  # the current session's conversation items, oldest first
        self.turns: deque[Turn] = deque(maxlen=RECENT_TURNS_KEPT)
        self.turn_count = 0  # caller turns with words in them
        self.summary: str | None = None
        self.summary_in_flight = False
        self.last_input_tokens = 0
        self.resumed = False  # the call began on another stream (maybe another instance): see resume()
        self.answer_pending = False  # resumed at a tool result the caller was not told yet

    def resume(self, summary: str | None, entries: list[dict[str, Any]]) -> None:
        """Carry on a call that began on another stream: its stored summary and latest entries (what
        the caller and the assistant said, keys entered, tools called and what they returned) seed
        every session's instructions from the first."""
        self.resumed = True
        self.summary = summary or None
        answered = {entry.get("call_id") for entry in entries if entry.get("kind") == "tool_result"}
        for entry in entries:
            turn = _turn_of(entry)
            if turn is not None:
                self.turns.append(turn)
                self.turn_count += entry.get("kind") == "caller"
                if entry.get("kind") == "tool_call" and entry.get("call_id") not in answered:
                    self.turns.append(Turn("Tool result", UNFINISHED_TOOL))  # not to be taken for pending
        self.answer_pending = _unanswered_tool_result(entries)

    def instructions(self) -> str:
        text = self.agent.instructions
        if self.instructions_suffix:
            text = f"{text}\n\n{self.instructions_suffix}"
        if self.sessions_opened > 1 or self.resumed:
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

    def session_opened(self) -> None:
        self.sessions_opened += 1
        self.items = []
        self.summary_in_flight = False

    def caller_said(self, text: str, item_id: str) -> None:
        if text.strip():
            self._outbox.effects.append(Entry("caller", {"text": text, "item_id": item_id}))
            self.turns.append(Turn("Caller", text))
            self.turn_count += 1

    def assistant_said(self, text: str, item_id: str) -> None:
        self._outbox.effects.append(Entry("assistant", {"text": text, "item_id": item_id}))
        self.turns.append(Turn("Assistant", text))

    def caller_keyed(self, digits: str) -> None:
        self.turns.append(Turn("Caller (keypad)", f"entered {digits}"))

    def item_added(self, item_id: str) -> bool:
        """A new item in the session's conversation; True if it was not known."""
        if item_id in self.items:
            return False
        self.items.append(item_id)
        return True

    def item_deleted(self, item_id: str) -> None:
        if item_id in self.items:
            self.items.remove(item_id)

    def needs_summary(self) -> bool:
        too_many = len(self.items) > self._max_turns
        too_big = self.last_input_tokens > self._max_tokens
        return (too_many or too_big) and not self.summary_in_flight

    def summary_request(self, dialect: Dialect, *, final: bool) -> dict[str, Any]:
        """The out-of-band response.create that asks for a summary (the flag is set in flight)."""
        self.summary_in_flight = True
        previous = f" Earlier summary: {self.summary}" if self.summary else ""
        # Out of band and never spoken: these instructions replace the persona on purpose.
        return dialect.response_create(
            instructions=SUMMARY_REQUEST + previous,
            out_of_band=True,
            metadata={"purpose": SUMMARY_PURPOSE, "final": "1" if final else "0"},
            text_only=True,
        )

    def response_done(self, event: ev.ResponseDone) -> None:
        """Every response.done: its usage and status are reported; its input tokens say how big
        the session's context has grown."""
        effects = self._outbox.effects
        if event.usage:
            effects.append(UsageReport(event.response_id, event.usage))
            self.last_input_tokens = event.usage.get("input", self.last_input_tokens)
        effects.append(Metric("responses", 1.0, event.status))

    def summary_done(self, event: ev.ResponseDone, *, session_ready: bool) -> None:
        """response.done of an out-of-band response: if it was the summary, apply what it wrote."""
        metadata = event.metadata or {}
        if metadata.get("purpose") != SUMMARY_PURPOSE:
            return
        self.summary_in_flight = False
        text = event.output_text.strip()
        if event.status == "completed" and text:
            self.apply_summary(text, final=metadata.get("final") == "1", session_ready=session_ready)

    def apply_summary(self, text: str, *, final: bool, session_ready: bool) -> None:
        """A summary arrived: keep it and, mid-call, trim the session's oldest items to it."""
        self.summary = text
        effects = self._outbox.effects
        effects.append(SummaryReady(text, final))
        effects.append(Entry("summary", {"text": text, "final": final}))
        if final or not session_ready:
            return
        keep = self._keep_turns
        old = self.items[:-keep] if keep else list(self.items)
        if not old:
            return
        for item_id in old:
            self._outbox.send_upstream(client.delete_item(item_id))
        self.items = self.items[len(old) :]
        context = client.user_text(f"Summary of the earlier part of this call: {text}", role="system")
        context["previous_item_id"] = "root"
        self._outbox.send_upstream(context)
        effects.append(Metric("context_trims", 1.0))
