"""The call's state: four small machines, each a transition table, and the phase derived from them.

Theory of operation
-------------------

A phone call has four things going on at once, each with a handful of states:

* the **upstream session**, the Realtime socket: opened, configured by ``session.update``
  until ``session.updated`` says it is ready, possibly lost and replaced, finally closed;
* the **assistant's speech** (`Speech`): idle, greeting, responding (a response exists, no
  audio yet), speaking (audio sent to Twilio that the caller has not heard yet), or
  interrupted (the caller's voice cut it off and they are still talking);
* the **caller**: silent, speaking (per server VAD or the relay's endpointer) or keying in
  an entry on the keypad;
* **tools**: idle, or running while a function call waits for its handler's result.

Each machine is a `Machine` with a table ``{state: {event: next_state}}``, as in h11's
``_state.py``: the table is the documentation. An event that is not in the table for the
current state is illegal: `Machine.fire` returns False, the state stays as it was, the event
is counted in `Machine.refused` and logged through a `RepeatLimiter` with the call's
logger, which carries the call SID, so a peer that floods one illegal event costs a bounded
number of lines. The call then does nothing else with that event.

Every machine ends in CLOSED, which accepts nothing (the session also takes ``lost`` there:
its socket going away after the call ended is expected), so an event after the call ended
changes nothing.

Nobody assigns the call's `Phase`: `derive_phase` computes it from the four states, for logs,
metrics and the I/O layer. The hot paths (an audio delta, a mark) fire an event only when the
state actually changes; a table lookup on every frame would buy nothing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Generic, TypeVar

from relay.logbound import RepeatLimiter


class Phase(enum.Enum):
    CONFIGURING = "configuring"  # Realtime session opened, waiting for session.updated
    GREETING = "greeting"  # the assistant's first words are being generated or played
    LISTENING = "listening"  # nothing playing, waiting for the caller
    ASSISTANT_SPEAKING = "assistant_speaking"
    INTERRUPTED = "interrupted"  # the caller barged in; their turn is being captured
    TOOL_RUNNING = "tool_running"
    RECONNECTING = "reconnecting"  # the Realtime socket dropped; a new session is being opened
    CLOSED = "closed"


class Session(enum.Enum):
    CONNECTING = "connecting"
    CONFIGURING = "configuring"
    READY = "ready"
    LOST = "lost"
    CLOSED = "closed"


class Speech(enum.Enum):
    IDLE = "idle"
    GREETING = "greeting"
    RESPONDING = "responding"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"
    CLOSED = "closed"


class Caller(enum.Enum):
    SILENT = "silent"
    SPEAKING = "speaking"
    KEYING = "keying"
    CLOSED = "closed"


class Tools(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"


S = TypeVar("S", bound=enum.Enum)
Table = Mapping[S, Mapping[str, S]]

# The transport reports a socket lost before it opens the next one, so "opened" comes only while
# connecting or after a loss; session.updated again on a ready session acknowledges an update.
SESSION_TABLE: Table[Session] = {
    Session.CONNECTING: {"opened": Session.CONFIGURING, "lost": Session.LOST, "close": Session.CLOSED},
    Session.CONFIGURING: {
        "configured": Session.READY,
        "lost": Session.LOST,
        "close": Session.CLOSED,
    },
    Session.READY: {
        "configured": Session.READY,
        "lost": Session.LOST,
        "close": Session.CLOSED,
    },
    Session.LOST: {"opened": Session.CONFIGURING, "lost": Session.LOST, "close": Session.CLOSED},
    Session.CLOSED: {"lost": Session.CLOSED},
}

# "created": an in-band response.created; "audio": the first chunk of audio sent to Twilio;
# "finished": nothing unplayed and no response active; "barge_in": the caller's voice cut the
# assistant off; "caller_done": that caller stopped talking.
_ANY_SPEECH_CUT_OFF = {"barge_in": Speech.INTERRUPTED, "close": Speech.CLOSED}
SPEECH_TABLE: Table[Speech] = {
    Speech.IDLE: {
        "greet": Speech.GREETING,
        "created": Speech.RESPONDING,
        "audio": Speech.SPEAKING,
        **_ANY_SPEECH_CUT_OFF,
    },
    Speech.GREETING: {"created": Speech.GREETING, "finished": Speech.IDLE, **_ANY_SPEECH_CUT_OFF},
    Speech.RESPONDING: {
        "created": Speech.RESPONDING,
        "audio": Speech.SPEAKING,
        "finished": Speech.IDLE,
        **_ANY_SPEECH_CUT_OFF,
    },
    Speech.SPEAKING: {"created": Speech.SPEAKING, "finished": Speech.IDLE, **_ANY_SPEECH_CUT_OFF},
    Speech.INTERRUPTED: {
        "created": Speech.RESPONDING,
        "audio": Speech.SPEAKING,
        "caller_done": Speech.IDLE,
        **_ANY_SPEECH_CUT_OFF,
    },
    Speech.CLOSED: {},
}

# KEYING is "an entry is open and the caller is not talking"; speech and keys are independent
# inputs, so a key pressed while talking and an entry ending while talking leave SPEAKING as is.
CALLER_TABLE: Table[Caller] = {
    Caller.SILENT: {
        "speech_started": Caller.SPEAKING,
        "speech_stopped": Caller.SILENT,
        "key": Caller.KEYING,
        "entry_done": Caller.SILENT,
        "close": Caller.CLOSED,
    },
    Caller.SPEAKING: {
        "speech_started": Caller.SPEAKING,
        "speech_stopped": Caller.SILENT,
        "key": Caller.SPEAKING,
        "entry_done": Caller.SPEAKING,
        "close": Caller.CLOSED,
    },
    Caller.KEYING: {
        "speech_started": Caller.SPEAKING,
        "speech_stopped": Caller.KEYING,
        "key": Caller.KEYING,
        "entry_done": Caller.SILENT,
        "close": Caller.CLOSED,
    },
    Caller.CLOSED: {},
}

# "answered": no function call is waiting any more; "lost": the session that asked is gone, and
# with it any use for the results still out.
TOOLS_TABLE: Table[Tools] = {
    Tools.IDLE: {"start": Tools.RUNNING, "close": Tools.CLOSED},
    Tools.RUNNING: {
        "start": Tools.RUNNING,
        "result": Tools.RUNNING,
        "answered": Tools.IDLE,
        "lost": Tools.IDLE,
        "close": Tools.CLOSED,
    },
    Tools.CLOSED: {},
}


class Machine(Generic[S]):
    """One named state machine: the current state and the table that says where each event leads."""

    __slots__ = ("_limiter", "name", "refused", "state", "table")

    def __init__(self, name: str, table: Table[S], initial: S, limiter: RepeatLimiter) -> None:
        self.name = name
        self.table = table
        self.state = initial
        self.refused = 0
        self._limiter = limiter

    def fire(self, event: str) -> bool:
        """Move to the state the table gives for `event`; False (and nothing changed) if illegal here."""
        next_state = self.table[self.state].get(event)
        if next_state is None:
            self.refuse(event)
            return False
        self.state = next_state
        return True

    def refuse(self, event: str, detail: str = "") -> None:
        """Count and log `event` as illegal now; for callers that find it illegal by finer data."""
        self.refused += 1
        self._limiter.log(
            f"illegal.{self.name}.{event}",
            logging.WARNING,
            "%s event %s is illegal in state %s%s; ignored",
            self.name,
            event,
            self.state.value,
            f" ({detail})" if detail else "",
        )


class CallMachines:
    """The four machines of one call; what they refuse is logged through one `RepeatLimiter`."""

    __slots__ = ("caller", "session", "speech", "tools")

    def __init__(self, limiter: RepeatLimiter) -> None:
        self.session = Machine("session", SESSION_TABLE, Session.CONNECTING, limiter)
        self.speech = Machine("speech", SPEECH_TABLE, Speech.IDLE, limiter)
        self.caller = Machine("caller", CALLER_TABLE, Caller.SILENT, limiter)
        self.tools = Machine("tools", TOOLS_TABLE, Tools.IDLE, limiter)

    @property
    def phase(self) -> Phase:
        return derive_phase(self.session.state, self.speech.state, self.caller.state, self.tools.state)

    def close(self) -> None:
        for machine in (self.session, self.speech, self.caller, self.tools):
            machine.fire("close")


def derive_phase(session: Session, speech: Speech, caller: Caller, tools: Tools) -> Phase:
    """The one-word phase of the call, for logs and metrics; the first rule that holds wins."""
    if session is Session.CLOSED:
        return Phase.CLOSED
    if session is Session.LOST:
        return Phase.RECONNECTING
    if session is not Session.READY:
        return Phase.CONFIGURING
    if tools is Tools.RUNNING:
        return Phase.TOOL_RUNNING
    if speech is Speech.INTERRUPTED:
        return Phase.INTERRUPTED
    if caller is Caller.SPEAKING:
        return Phase.LISTENING
    if speech is Speech.GREETING:
        return Phase.GREETING
    if speech is Speech.RESPONDING or speech is Speech.SPEAKING:
        return Phase.ASSISTANT_SPEAKING
    return Phase.LISTENING
