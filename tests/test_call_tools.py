"""Function calls of one response: each runs once, one continuation once every call is answered."""

from __future__ import annotations

import logging

import orjson
from call_support import make_call, ready

from relay.call import Call, Effect, Entry, Phase, RunTool
from relay.call.effects import Outbox
from relay.call.machines import TOOLS_TABLE, Machine, Tools
from relay.call.tool_batches import ToolBatches
from relay.logbound import RepeatLimiter
from relay.realtime import events as ev


def batches() -> tuple[ToolBatches, Outbox]:
    outbox = Outbox()
    limiter = RepeatLimiter(logging.getLogger("relay.call"))
    return ToolBatches(outbox, Machine("tools", TOOLS_TABLE, Tools.IDLE, limiter)), outbox


def test_a_batch_is_complete_once_done_and_every_call_is_answered() -> None:
    tools, outbox = batches()
    tools.start("r", "c1", "lookup", "{}")
    tools.start("r", "c2", "lookup", "{}")
    assert tools.running and tools.machine.state is Tools.RUNNING
    assert tools.result("c1", "1", ok=True, session_ready=True) == "r"
    assert tools.result("c1", "1", ok=True, session_ready=True) is None  # answered once
    tools.response_done("r", made_calls=True)
    assert not tools.take_complete("r")  # c2 is still out
    assert tools.result("c2", "x" * 5000, ok=False, session_ready=False) == "r"
    assert not tools.running and tools.machine.state is Tools.IDLE
    assert tools.take_complete("r")
    assert not tools.take_complete("r")  # once
    _, upstream, effects = outbox.take()
    assert [orjson.loads(m)["item"]["call_id"] for m in upstream] == ["c1"]  # no session: c2 output is not sent
    assert effects[-1] == Entry("tool_result", {"call_id": "c2", "output": "x" * 4000, "ok": False})
    assert [type(e).__name__ for e in effects] == ["Entry", "RunTool", "Entry", "RunTool", "Entry", "Entry"]


def test_a_batch_without_any_answer_is_never_complete() -> None:
    tools, _ = batches()
    tools.response_done("r", made_calls=True)
    assert not tools.take_complete("r")


def test_a_response_done_for_a_response_without_calls_makes_no_batch() -> None:
    tools, _ = batches()
    tools.response_done("r", made_calls=False)
    assert not tools.running and not tools.take_complete("r")


def test_a_lost_session_abandons_every_call_it_made() -> None:
    tools, _ = batches()
    tools.start("r", "c1", "lookup", "{}")
    tools.abandon()
    assert not tools.running and not tools.awaited("c1")
    assert tools.machine.state is Tools.IDLE
    assert tools.result("c1", "{}", ok=True, session_ready=True) is None
    assert tools.machine.refused == 0  # it was started: a late result is no surprise


def test_beta_arguments_done_takes_the_name_from_the_output_item() -> None:
    tools, _ = batches()
    tools.note_name("item_1", "lookup_order")
    assert tools.name_for("item_1", "") == "lookup_order"
    assert tools.name_for("item_1", "") == ""  # used once
    assert tools.name_for("item_2", "from_ga") == "from_ga"


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
    assert call.machines.tools.state is Tools.IDLE
    call.tool_result("c1", "{}")
    assert call.take_output() == ([], [], [])


def test_a_result_after_the_session_was_lost_is_dropped_without_a_word() -> None:
    call, _ = tool_call()
    call.upstream_lost()
    assert call.machines.tools.state is Tools.IDLE
    call.tool_result("c1", "{}")
    assert call.take_output() == ([], [], [])
    assert call.machines.tools.refused == 0


def test_calls_answered_before_a_response_done_that_lists_none_still_get_their_answer() -> None:
    """A response.done without function_call items completes the batch its calls started by
    arguments.done: once every call is answered, one response.create follows (none would ever
    come otherwise, and the caller would wait in silence)."""
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.ResponseCreated("r", None, None))
    call.upstream_event(ev.FunctionCallArgumentsDone("r", "i1", "c1", "lookup", '{"id": 1}'))
    call.tool_result("c1", '{"status": "shipped"}')
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["conversation.item.create"]
    call.upstream_event(ev.ResponseDone("r", "completed", None, (), {}, None, ""))
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["response.create"]
    assert call.machines.tools.state is Tools.IDLE
