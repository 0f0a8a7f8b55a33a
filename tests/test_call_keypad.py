"""Keypad entries: the Keypad part on its own, then entries as the call answers them."""

from __future__ import annotations

from typing import Any

import orjson
from call_support import Clock, audio, make_call, ready, start_response, twilio_msgs

from relay.agent_settings import AgentSettings, DtmfSettings
from relay.call import Call, Entry
from relay.call.effects import Outbox
from relay.call.keypad import Keypad
from relay.realtime import events as ev


def test_keypad_ends_an_entry_at_the_terminator_and_keeps_it_in_the_digits() -> None:
    keypad = Keypad(Outbox(), DtmfSettings(terminator="#", max_digits=10, timeout_ms=2000))
    assert [keypad.press(key, 10.0) for key in "12"] == [None, None]
    assert keypad.open
    assert keypad.press("#", 10.5) == "terminator"
    assert keypad.take("terminator") == "12#"
    assert not keypad.open
    assert keypad.deadline() is None


def test_an_entry_is_recorded_and_told_to_the_model_now_or_once_a_session_is_ready() -> None:
    outbox = Outbox()
    keypad = Keypad(outbox, DtmfSettings())
    keypad.press("7", 0.0)
    assert keypad.take("timeout") == "7"
    keypad.tell_model("7", session_ready=False)
    assert outbox.take() == ([], [], [Entry("dtmf", {"digits": "7", "ended": "timeout"})])
    assert keypad.send_unsent()
    (item,) = [orjson.loads(m) for m in outbox.take()[1]]
    assert item["item"]["content"] == [{"type": "input_text", "text": "The caller entered 7"}]
    assert not keypad.send_unsent()
    keypad.tell_model("8#", session_ready=True)
    assert [orjson.loads(m)["item"]["content"][0]["text"] for m in outbox.take()[1]] == ["The caller entered 8 #"]


def test_keypad_ends_an_entry_at_max_digits() -> None:
    keypad = Keypad(Outbox(), DtmfSettings(terminator="", max_digits=2, timeout_ms=2000))
    assert keypad.press("#", 0.0) is None
    assert keypad.press("1", 0.0) == "max_digits"
    assert keypad.take("max_digits") == "#1"


def test_keypad_deadline_is_the_last_key_plus_the_timeout_exactly() -> None:
    keypad = Keypad(Outbox(), DtmfSettings(timeout_ms=2500))
    keypad.press("4", 100.0)
    keypad.press("5", 101.0)
    assert keypad.deadline() == 103.5
    assert not keypad.expired(103.499)
    assert keypad.expired(103.5)
    keypad.take("timeout")
    assert not keypad.expired(1e9)


def keypad_call(**dtmf: Any) -> tuple[Call, Clock]:
    call, clock = make_call(greeting=None, agent=AgentSettings(dtmf=DtmfSettings(**dtmf)))
    ready(call)
    return call, clock


def press(call: Call, keys: str) -> tuple[list[dict[str, Any]], list[Any]]:
    for key in keys:
        call.key_pressed(key)
    _, upstream, effects = call.take_output()
    return [orjson.loads(m) for m in upstream], [e for e in effects if isinstance(e, Entry)]


def test_keys_until_the_terminator_are_one_entry_and_one_response() -> None:
    call, _ = keypad_call()
    assert press(call, "4512") == ([], [])  # still typing: nothing is sent, nothing answered
    sent, entries = press(call, "#")
    assert [e["type"] for e in sent] == ["conversation.item.create", "response.create"]
    assert sent[0]["item"]["content"] == [{"type": "input_text", "text": "The caller entered 4 5 1 2 #"}]
    assert entries == [Entry("dtmf", {"digits": "4512#", "ended": "terminator"})]
    assert call.next_deadline() is None


def test_an_entry_ends_after_the_pause_exactly_at_the_timeout() -> None:
    call, clock = keypad_call(timeout_ms=2000)
    press(call, "4")
    clock.now += 1.5
    press(call, "5")  # each key restarts the pause
    assert call.next_deadline() == clock.now + 2.0
    clock.now += 1.999
    call.tick()
    assert call.take_output()[1] == []
    clock.now += 0.001  # exactly 2000 ms after the last key
    call.tick()
    _, upstream, effects = call.take_output()
    assert [orjson.loads(m)["item"]["content"][0]["text"] for m in upstream[:1]] == ["The caller entered 4 5"]
    assert Entry("dtmf", {"digits": "45", "ended": "timeout"}) in effects
    assert call.next_deadline() is None


def test_a_key_after_an_overdue_pause_starts_a_new_entry() -> None:
    call, clock = keypad_call(timeout_ms=2000)
    press(call, "1")
    clock.now += 2.5  # the timer has not fired yet
    sent, entries = press(call, "2")
    assert sent[0]["item"]["content"][0]["text"] == "The caller entered 1"
    assert entries == [Entry("dtmf", {"digits": "1", "ended": "timeout"})]
    assert call.next_deadline() == clock.now + 2.0


def test_max_digits_end_an_entry_and_no_terminator_can_be_configured() -> None:
    call, _ = keypad_call(max_digits=3, terminator="")
    assert press(call, "#1") == ([], [])  # without a terminator "#" is a key like any other
    sent, entries = press(call, "2")
    assert sent[0]["item"]["content"][0]["text"] == "The caller entered # 1 2"
    assert entries == [Entry("dtmf", {"digits": "#12", "ended": "max_digits"})]


def test_a_key_press_interrupts_the_assistant_like_speech() -> None:
    call, _ = keypad_call()
    start_response(call)
    marks = []
    for _ in range(5):
        call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
        marks.append(twilio_msgs(call)[1]["mark"]["name"])
    call.twilio_mark(marks[2])  # 300 ms heard
    call.key_pressed("1")
    to_twilio, to_upstream, effects = call.take_output()
    assert [orjson.loads(m)["event"] for m in to_twilio] == ["clear"]
    assert [orjson.loads(m) for m in to_upstream] == [
        {"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0, "audio_end_ms": 300},
        {"type": "response.cancel", "response_id": "resp_1"},  # the server never cancels for a key
    ]
    assert Entry("interruption", {"item_id": "item_a", "audio_end_ms": 300, "received_ms": 500}) in effects
    # the entry's answer waits for the cancelled response to be done
    assert [e["type"] for e in press(call, "#")[0]] == ["conversation.item.create"]
    call.upstream_event(ev.ResponseDone("resp_1", "cancelled", None, (), {}, None, ""))
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["response.create"]


def test_a_profile_can_keep_key_presses_from_interrupting() -> None:
    call, _ = keypad_call(interrupt=False)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    call.take_output()
    call.key_pressed("1")
    assert call.take_output()[:2] == ([], [])
    assert call.playback.unplayed_bytes == 800


def test_keys_typed_when_the_caller_hangs_up_are_kept() -> None:
    call, _ = keypad_call()
    press(call, "12")
    call.close("caller_hung_up")
    _, upstream, effects = call.take_output()
    assert upstream == []
    assert effects[0] == Entry("dtmf", {"digits": "12", "ended": "hangup"})


def test_a_keypad_entry_typed_in_a_session_lost_before_it_was_ready_is_answered_by_the_next() -> None:
    call, _ = make_call(greeting=None)  # the first session is open, still configuring
    for key in "42#":
        call.key_pressed(key)
    assert call.take_output()[1] == []  # nothing goes to a session that is not configured
    call.upstream_lost()  # it never became ready (dropped socket, session.update timeout)
    call.upstream_opened()
    call.take_output()
    sent = ready(call)
    assert [m["type"] for m in sent] == ["conversation.item.create", "response.create"]
    assert sent[0]["item"]["content"][0]["text"] == "The caller entered 4 2 #"
