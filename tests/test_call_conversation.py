"""Turns, items, summaries and instructions on their own, across Realtime sessions."""

from __future__ import annotations

from typing import Any

import orjson

from relay.agent_settings import AgentSettings
from relay.call import Entry, Metric, SummaryReady
from relay.call.conversation import RECENT_TURNS_KEPT, Conversation
from relay.call.effects import Outbox
from relay.realtime.dialect import get_dialect


def conversation(**kw: Any) -> tuple[Conversation, Outbox]:
    outbox = Outbox()
    settings: dict[str, Any] = {
        "instructions_suffix": "",
        "summary_max_turns": 4,
        "summary_max_tokens": 1000,
        "summary_keep_turns": 2,
    }
    settings.update(kw)
    return Conversation(outbox, AgentSettings(instructions="Be brief."), **settings), outbox


def test_instructions_carry_the_suffix_and_from_the_second_session_the_resume_context() -> None:
    conv, _ = conversation(instructions_suffix="Caller is Ana.")
    conv.session_opened()
    assert conv.instructions() == "Be brief.\n\nCaller is Ana."
    assert conv.with_session_instructions("Say hello") == "Be brief.\n\nCaller is Ana.\n\nSay hello"
    conv.caller_said("I need a table", "item_1")
    conv.summary = "Ana books a table."
    conv.session_opened()
    assert conv.instructions() == (
        "Be brief.\n\nCaller is Ana.\n\n"
        "This phone call is already in progress; the connection to you was re-established. "
        "Do not greet the caller again; continue the conversation naturally from where it stopped.\n"
        "Summary of the conversation so far: Ana books a table.\n"
        "Most recent turns:\n"
        "Caller: I need a table"
    )


def test_only_turns_with_words_count_and_only_the_recent_ones_are_kept() -> None:
    conv, outbox = conversation()
    conv.caller_said("  ", "item_0")
    assert (conv.turn_count, outbox.take()[2]) == (0, [])
    for n in range(RECENT_TURNS_KEPT + 3):
        conv.caller_said(f"turn {n}", f"item_{n}")
    conv.assistant_said("ok", "item_x")
    conv.caller_keyed("42#")
    assert conv.turn_count == RECENT_TURNS_KEPT + 3
    assert len(conv.turns) == RECENT_TURNS_KEPT
    assert [(t.role, t.text) for t in list(conv.turns)[-2:]] == [
        ("Assistant", "ok"),
        ("Caller (keypad)", "entered 42#"),
    ]
    assert outbox.take()[2][-1] == Entry("assistant", {"text": "ok", "item_id": "item_x"})


def test_a_summary_is_needed_past_the_item_or_token_limit_and_not_while_one_is_in_flight() -> None:
    conv, _ = conversation()
    for n in range(4):
        assert conv.item_added(f"i{n}")
    assert not conv.item_added("i0")
    assert not conv.needs_summary()
    conv.item_added("i4")
    assert conv.needs_summary()
    conv.item_deleted("i4")
    conv.last_input_tokens = 1001
    assert conv.needs_summary()
    conv.summary_request(get_dialect("ga"), final=False)
    assert conv.summary_in_flight and not conv.needs_summary()


def test_the_summary_request_is_out_of_band_text_and_carries_the_earlier_summary() -> None:
    conv, _ = conversation()
    conv.summary = "Earlier."
    create = conv.summary_request(get_dialect("ga"), final=True)
    response = create["response"]
    assert response["conversation"] == "none"
    assert response["metadata"] == {"purpose": "summary", "final": "1"}
    assert response["instructions"].endswith("open items. Earlier summary: Earlier.")


def test_a_summary_trims_the_oldest_items_and_keeps_the_newest() -> None:
    conv, outbox = conversation()
    for n in range(5):
        conv.item_added(f"i{n}")
    conv.apply_summary("Ana books a table.", final=False, session_ready=True)
    _, upstream, effects = outbox.take()
    sent = [orjson.loads(m) for m in upstream]
    assert sent[:3] == [{"type": "conversation.item.delete", "item_id": f"i{n}"} for n in range(3)]
    assert sent[3]["previous_item_id"] == "root"
    assert sent[3]["item"]["role"] == "system"
    assert sent[3]["item"]["content"][0]["text"] == "Summary of the earlier part of this call: Ana books a table."
    assert len(sent) == 4
    assert conv.items == ["i3", "i4"]
    assert effects == [
        SummaryReady("Ana books a table.", False),
        Entry("summary", {"text": "Ana books a table.", "final": False}),
        Metric("context_trims"),
    ]


def test_a_final_summary_or_one_without_a_session_trims_nothing() -> None:
    for final, ready in ((True, True), (False, False)):
        conv, outbox = conversation()
        for n in range(5):
            conv.item_added(f"i{n}")
        conv.apply_summary("S.", final=final, session_ready=ready)
        _, upstream, effects = outbox.take()
        assert upstream == []
        assert effects == [SummaryReady("S.", final), Entry("summary", {"text": "S.", "final": final})]
        assert conv.summary == "S."


def test_a_resumed_conversation_knows_which_tools_finished_and_which_result_is_unanswered() -> None:
    call = {"kind": "tool_call", "call_id": "call_1", "name": "book_table", "arguments": '{"time": "8pm"}'}
    booked = {"kind": "tool_result", "call_id": "call_1", "output": '{"booked": true}', "ok": True}
    said = {"kind": "assistant", "text": "Your table is booked."}
    hand_off = {"kind": "system", "event": "handed_off", "at_pause": False}
    waiting, _ = conversation()
    waiting.resume(None, [{"kind": "caller", "text": "A table at eight"}, call, booked, hand_off])
    assert waiting.answer_pending
    answered, _ = conversation()
    answered.resume(None, [call, booked, said, hand_off])
    assert not answered.answer_pending
    cut_off, _ = conversation()  # the instance died while the tool ran: nothing came back
    cut_off.resume(None, [call])
    assert not cut_off.answer_pending
    assert [(t.role, t.text) for t in cut_off.turns] == [
        ("Tool call", 'book_table {"time": "8pm"}'),
        ("Tool result", "none: the call moved to a new connection before it finished, so its outcome is unknown"),
    ]
