"""Function calls of one response: each runs once, one continuation once every call is answered."""

from __future__ import annotations

import orjson
from call_support import make_call, ready

from relay.call import Call, Effect, Entry, Phase, RunTool
from relay.call.machines import Tools
from relay.call.tool_batches import ToolBatches
from relay.realtime import events as ev


def test_a_batch_is_complete_once_done_and_every_call_is_answered() -> None:
    batches = ToolBatches()
    batches.start("r", "c1")
    batches.start("r", "c2")
    assert batches.running and batches.started("c1")
    assert batches.awaited("c1") and batches.answer("c1") == "r"
    assert not batches.awaited("c1")  # answered once
    batches.response_done("r", made_calls=True)
    assert not batches.take_complete("r")  # c2 is still out
    batches.answer("c2")
    assert not batches.running
    assert batches.take_complete("r")
    assert not batches.take_complete("r")  # once


def test_a_batch_without_any_answer_is_never_complete() -> None:
    batches = ToolBatches()
    batches.response_done("r", made_calls=True)
    assert not batches.take_complete("r")


def test_a_response_done_for_a_response_without_calls_makes_no_batch() -> None:
    batches = ToolBatches()
    batches.response_done("r", made_calls=False)
    assert not batches.running and not batches.take_complete("r")


def test_a_lost_session_abandons_every_call_it_made() -> None:
    batches = ToolBatches()
    batches.start("r", "c1")
    batches.abandon()
    assert not batches.running and not batches.awaited("c1")
    assert batches.response_of("c1") == "r"  # known, so a late result is not "never started"


def test_beta_arguments_done_takes_the_name_from_the_output_item() -> None:
    batches = ToolBatches()
    batches.note_name("item_1", "lookup_order")
    assert batches.name_for("item_1", "") == "lookup_order"
    assert batches.name_for("item_1", "") == ""  # used once
    assert batches.name_for("item_2", "from_ga") == "from_ga"


def tool_call() -> tuple[Call, list[Effect]]:
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.ResponseCreated("r", None, None))
    call.upstream_event(ev.FunctionCallArgumentsDone("r", "i1", "c1", "lookup", '{"id": 1}'))
    calls = (ev.FunctionCall("c1", "lookup", '{"id": 1}', "i1"),)  # announced again
    call.upstream_event(ev.ResponseDone("r", "completed", None, calls, {}, None, ""))
    return call, call.take_output()[2]


def test_a_call_announced_twice_runs_once() -> None:
    call, effects = tool_call()
    assert [e for e in effects if isinstance(e, RunTool)] == [RunTool("r", "c1", "lookup", '{"id": 1}')]
    assert [e for e in effects if isinstance(e, Entry)] == [
        Entry("tool_call", {"call_id": "c1", "name": "lookup", "arguments": '{"id": 1}'})
    ]
    assert call.phase is Phase.TOOL_RUNNING


def test_the_result_goes_to_the_model_and_the_model_is_asked_to_continue() -> None:
    call, _ = tool_call()
    call.tool_result("c1", '{"status": "shipped"}')
    _, upstream, effects = call.take_output()
    assert [orjson.loads(m)["type"] for m in upstream] == ["conversation.item.create", "response.create"]
    assert effects == [Entry("tool_result", {"call_id": "c1", "output": '{"status": "shipped"}', "ok": True})]
    assert call.tools_machine.state is Tools.IDLE
    call.tool_result("c1", "{}")
    assert call.take_output() == ([], [], [])


def test_a_result_after_the_session_was_lost_is_dropped_without_a_word() -> None:
    call, _ = tool_call()
    call.upstream_lost()
    assert call.tools_machine.state is Tools.IDLE
    call.tool_result("c1", "{}")
    assert call.take_output() == ([], [], [])
    assert call.tools_machine.refused == 0
