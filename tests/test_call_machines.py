"""The call's state machines: their tables, refused events (logged once, with the call SID), the phase."""

from __future__ import annotations

import enum
import logging
from typing import Any

import orjson
import pytest
from call_support import CALL_SID, audio, make_call, ready, start_response, twilio_msgs

from relay.call import Phase
from relay.call.machines import (
    CALLER_TABLE,
    SESSION_TABLE,
    SPEECH_TABLE,
    TOOLS_TABLE,
    Caller,
    Machine,
    Session,
    Speech,
    Table,
    Tools,
    derive_phase,
)
from relay.logbound import RepeatLimiter, lines_for
from relay.logs import call_logger
from relay.realtime import events as ev

TABLES: list[tuple[type[enum.Enum], Table[Any]]] = [
    (Session, SESSION_TABLE),
    (Speech, SPEECH_TABLE),
    (Caller, CALLER_TABLE),
    (Tools, TOOLS_TABLE),
]


@pytest.mark.parametrize(("states", "table"), TABLES)
def test_every_state_has_a_row_and_closed_accepts_nothing_but_a_late_socket_loss(
    states: type[enum.Enum], table: Table[Any]
) -> None:
    assert set(table) == set(states)
    closed = states["CLOSED"]
    assert dict(table[closed]) == ({"lost": closed} if states is Session else {})
    for state, row in table.items():
        if state is not closed:
            assert row["close"] is closed


def refusing_call(caplog: pytest.LogCaptureFixture) -> Machine[Tools]:
    machine = Machine("tools", TOOLS_TABLE, Tools.IDLE, RepeatLimiter(call_logger(CALL_SID)))
    caplog.set_level(logging.DEBUG, logger="relay.call")
    return machine


def test_a_legal_event_moves_the_machine(caplog: pytest.LogCaptureFixture) -> None:
    machine = refusing_call(caplog)
    assert machine.fire("start")
    assert machine.state is Tools.RUNNING
    assert machine.fire("answered")
    assert machine.state is Tools.IDLE
    assert machine.refused == 0
    assert caplog.records == []


def test_an_illegal_event_changes_nothing_and_is_logged_once_with_the_call_sid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    machine = refusing_call(caplog)
    assert not machine.fire("answered")
    assert machine.state is Tools.IDLE
    assert machine.refused == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "tools event answered is illegal in state idle; ignored"
    assert record.__dict__["call_sid"] == CALL_SID


def test_a_flood_of_illegal_events_costs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    machine = refusing_call(caplog)
    for _ in range(10_000):
        machine.fire("answered")
    assert machine.refused == 10_000
    assert len(caplog.records) == lines_for(10_000) == 9
    assert caplog.records[-1].getMessage().endswith("(10000 so far on this call)")


PHASES = [
    (Session.CONNECTING, Speech.IDLE, Caller.SILENT, Tools.IDLE, Phase.CONFIGURING),
    (Session.CONFIGURING, Speech.SPEAKING, Caller.SPEAKING, Tools.RUNNING, Phase.CONFIGURING),
    (Session.LOST, Speech.SPEAKING, Caller.SILENT, Tools.IDLE, Phase.RECONNECTING),
    (Session.CLOSED, Speech.CLOSED, Caller.CLOSED, Tools.CLOSED, Phase.CLOSED),
    (Session.READY, Speech.IDLE, Caller.SILENT, Tools.IDLE, Phase.LISTENING),
    (Session.READY, Speech.IDLE, Caller.KEYING, Tools.IDLE, Phase.LISTENING),
    (Session.READY, Speech.GREETING, Caller.SILENT, Tools.IDLE, Phase.GREETING),
    (Session.READY, Speech.RESPONDING, Caller.SILENT, Tools.IDLE, Phase.ASSISTANT_SPEAKING),
    (Session.READY, Speech.SPEAKING, Caller.KEYING, Tools.IDLE, Phase.ASSISTANT_SPEAKING),
    (Session.READY, Speech.SPEAKING, Caller.SPEAKING, Tools.IDLE, Phase.LISTENING),
    (Session.READY, Speech.GREETING, Caller.SPEAKING, Tools.IDLE, Phase.LISTENING),
    (Session.READY, Speech.INTERRUPTED, Caller.SPEAKING, Tools.IDLE, Phase.INTERRUPTED),
    (Session.READY, Speech.INTERRUPTED, Caller.SPEAKING, Tools.RUNNING, Phase.TOOL_RUNNING),
    (Session.READY, Speech.SPEAKING, Caller.SILENT, Tools.RUNNING, Phase.TOOL_RUNNING),
]


@pytest.mark.parametrize(("session", "speech", "caller", "tools", "phase"), PHASES)
def test_phase_is_derived_from_the_four_machines(
    session: Session, speech: Speech, caller: Caller, tools: Tools, phase: Phase
) -> None:
    assert derive_phase(session, speech, caller, tools) is phase


def test_phase_through_one_call() -> None:
    call, clock = make_call()
    assert call.phase is Phase.CONFIGURING
    ready(call)
    assert call.phase is Phase.GREETING
    start_response(call, "resp_g", "item_g")
    call.upstream_event(ev.AudioDelta("resp_g", "item_g", audio(40)))
    (mark,) = [m["mark"]["name"] for m in twilio_msgs(call) if m["event"] == "mark"]
    assert call.phase is Phase.GREETING
    call.upstream_event(ev.ResponseDone("resp_g", "completed", None, (), {}, None, ""))
    assert call.phase is Phase.GREETING  # the caller has not heard all of it yet
    call.twilio_mark(mark)
    assert call.phase is Phase.LISTENING
    start_response(call, "resp_2", "item_2")
    assert call.phase is Phase.ASSISTANT_SPEAKING
    call.upstream_event(ev.AudioDelta("resp_2", "item_2", audio(100)))
    clock.now += 0.05
    call.upstream_event(ev.SpeechStarted(3000, "item_u"))
    assert call.phase is Phase.INTERRUPTED
    call.upstream_event(ev.SpeechStopped(4000, "item_u"))
    assert call.phase is Phase.LISTENING
    call.upstream_event(ev.ResponseCreated("resp_3", None, None))
    calls = (ev.FunctionCall("c1", "lookup", "{}", "i1"),)
    call.upstream_event(ev.ResponseDone("resp_3", "completed", None, calls, {}, None, ""))
    assert call.phase is Phase.TOOL_RUNNING
    call.tool_result("c1", "{}")
    assert call.phase is Phase.LISTENING  # the continuation is asked for, not created yet
    call.upstream_event(ev.ResponseCreated("resp_4", None, None))
    assert call.phase is Phase.ASSISTANT_SPEAKING
    call.upstream_lost()
    assert call.phase is Phase.RECONNECTING
    call.upstream_opened()
    assert call.phase is Phase.CONFIGURING
    call.close("caller_hung_up")
    assert call.phase is Phase.CLOSED
    assert call.phase.value == "closed"


def illegal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines about refused events, each of which must name the call."""
    lines = [r for r in caplog.records if "illegal" in r.getMessage()]
    assert all(getattr(r, "call_sid", None) == CALL_SID for r in lines)
    return [r.getMessage() for r in lines]


def test_audio_and_speech_after_close_are_refused_and_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    call, _ = make_call(greeting=None, logger=call_logger(CALL_SID))
    ready(call)
    start_response(call)
    call.close("caller_hung_up")
    call.take_output()
    with caplog.at_level(logging.WARNING, logger="relay.call"):
        call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(20)))
        call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(20)))
        call.upstream_event(ev.SpeechStarted(100, "item_u"))
    assert call.take_output() == ([], [], [])
    assert (call.playback.unplayed_bytes, call.frames_out, call.playback.received_bytes) == (0, 0, {})
    assert call.machines.speech.refused == 2
    assert illegal_lines(caplog) == [
        "speech event audio is illegal in state closed; ignored",
        "speech event audio is illegal in state closed; ignored",
        "caller event speech_started is illegal in state closed; ignored",
    ]
    assert call.phase is Phase.CLOSED


def test_session_updated_while_the_session_is_lost_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    call, _ = make_call(logger=call_logger(CALL_SID))
    call.upstream_lost()
    call.take_output()
    with caplog.at_level(logging.WARNING, logger="relay.call"):
        call.upstream_event(ev.SessionUpdated({}))
    assert call.take_output() == ([], [], [])
    assert not call.session_ready
    assert not call.greeted
    assert call.phase is Phase.RECONNECTING
    assert illegal_lines(caplog) == ["session event configured is illegal in state lost; ignored"]


def test_a_result_for_a_tool_call_never_started_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    call, _ = make_call(greeting=None, logger=call_logger(CALL_SID))
    ready(call)
    with caplog.at_level(logging.WARNING, logger="relay.call"):
        call.tool_result("call_nobody_made", '{"ok": true}')
    assert call.take_output() == ([], [], [])
    assert call.machines.tools.state is Tools.IDLE
    assert call.machines.tools.refused == 1
    assert illegal_lines(caplog) == [
        "tools event result is illegal in state idle (call call_nobody_made was never started); ignored"
    ]


def test_a_key_after_close_is_refused() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.close("caller_hung_up")
    call.take_output()
    call.key_pressed("5")
    assert call.take_output() == ([], [], [])
    assert call.next_deadline() is None
    assert call.machines.caller.refused == 1


def test_the_socket_closing_after_the_call_ended_is_not_refused() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.close("caller_hung_up")
    call.upstream_lost()
    assert call.machines.session.refused == 0
    assert call.phase is Phase.CLOSED
    assert [orjson.loads(m) for m in call.take_output()[1]] == []
