"""Tools: the registry (schemas, validation, failures, loading from configuration) and tool calls
through the whole relay (uvicorn on loopback, the Realtime simulator, the simulated caller)."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import pytest
from conftest import greeted, relay_settings, wait_for
from tools_support import (
    after_last_output,
    errors_sent,
    function_calls_sent,
    largest_gap,
    only_session,
    outputs,
    outputs_by_call,
    received,
)

from relay.agent_settings import AgentSettings
from relay.config import Settings
from relay.env import ConfigError
from relay.runtime import Runtime
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig
from relay.tools import (
    ToolContext,
    ToolDefinitionError,
    ToolFailure,
    ToolRegistry,
    schema_from_signature,
    tool,
)

# ---- a context for calling tools directly ------------------------------------------------------


def make_ctx(profile: AgentSettings | None = None) -> ToolContext:
    async def end_call(reason: str) -> None:
        raise AssertionError("not used here")

    async def transfer_call(number: str, whisper: str | None) -> None:
        raise AssertionError("not used here")

    return ToolContext(
        call_sid="CA" + "1" * 32,
        caller="+15550001111",
        called="+15550002222",
        profile=profile or AgentSettings(),
        store=None,
        log=logging.getLogger("test.tools"),
        end_call=end_call,
        transfer_call=transfer_call,
    )


def error_of(output: str) -> dict[str, str]:
    parsed = json.loads(output)
    assert set(parsed) == {"error"}, parsed
    assert set(parsed["error"]) == {"type", "message"}, parsed
    return dict(parsed["error"])


# ---- tools used by the registry tests -----------------------------------------------------------

CALLS: list[dict[str, Any]] = []


@tool(description="Book a slot.")
async def book(
    ctx: ToolContext,
    day: Annotated[str, "Day, YYYY-MM-DD"],
    people: int,
    budget: float = 10.0,
    vip: bool = False,
    period: Literal["morning", "afternoon"] = "morning",
    notes: str | None = None,
    tags: list[str] | None = None,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    CALLS.append({"day": day, "people": people, "period": period, "notes": notes, "tags": tags})
    return {"booked": day, "people": people}


@tool(
    "set_volume",
    description="Set the volume.",
    parameters={
        "type": "object",
        "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 10}},
        "required": ["level"],
        "additionalProperties": False,
    },
    timeout_s=1.0,
)
async def set_volume_impl(ctx: ToolContext, **kwargs: Any) -> str:
    CALLS.append(kwargs)
    return "volume set"


@tool()
async def broken(ctx: ToolContext) -> None:
    """Always raises."""
    raise ValueError("secret internal detail")


@tool()
async def refuses(ctx: ToolContext) -> None:
    """Raises a ToolFailure the model should hear."""
    raise ToolFailure("the booking system is closed on Sundays")


@tool(timeout_s=0.05)
async def sleepy(ctx: ToolContext) -> str:
    """Takes too long."""
    await asyncio.sleep(5)
    return "never"


@tool()
async def slow_default(ctx: ToolContext) -> str:
    """Takes longer than the registry's default timeout."""
    await asyncio.sleep(5)
    return "never"


@pytest.fixture(autouse=True)
def _reset_calls() -> Iterator[None]:
    CALLS.clear()
    yield
    CALLS.clear()


def registry() -> ToolRegistry:
    reg = ToolRegistry(default_timeout_s=0.1)
    for func in (book, set_volume_impl, broken, refuses, sleepy, slow_default):
        reg.add(func)
    return reg


# ---- schema ---------------------------------------------------------------------------------------


def test_schema_from_type_hints() -> None:
    spec = registry().tools["book"]
    assert spec.realtime_tool() == {
        "type": "function",
        "name": "book",
        "description": "Book a slot.",
        "parameters": {
            "type": "object",
            "properties": {
                "day": {"type": "string", "description": "Day, YYYY-MM-DD"},
                "people": {"type": "integer"},
                "budget": {"type": "number"},
                "vip": {"type": "boolean"},
                "period": {"type": "string", "enum": ["morning", "afternoon"]},
                "notes": {"type": ["string", "null"]},
                "tags": {"type": ["array", "null"], "items": {"type": "string"}},
                "extras": {"type": ["object", "null"]},
            },
            "required": ["day", "people"],
            "additionalProperties": False,
        },
    }


def test_docstring_is_the_description_and_explicit_schema_is_used_verbatim() -> None:
    reg = registry()
    assert reg.tools["broken"].description == "Always raises."
    volume = reg.tools["set_volume"]
    assert volume.parameters["properties"] == {"level": {"type": "integer", "minimum": 0, "maximum": 10}}
    assert volume.timeout_s == 1.0
    assert [t["name"] for t in reg.specs(["set_volume", "book", "nope"])] == ["set_volume", "book"]


async def test_valid_arguments_reach_the_handler() -> None:
    result = await registry().run("book", '{"day": "2026-12-01", "people": 2, "notes": null}', make_ctx())
    assert result.outcome == "ok"
    assert json.loads(result.output) == {"booked": "2026-12-01", "people": 2}
    assert CALLS == [{"day": "2026-12-01", "people": 2, "period": "morning", "notes": None, "tags": None}]
    result = await registry().run("set_volume", '{"level": 7}', make_ctx())
    assert (result.outcome, result.output) == ("ok", "volume set")


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("book", '{"day": "2026-12-01", "people": "two"}', "arguments.people must be of type integer"),
        ("book", '{"day": "2026-12-01", "people": true}', "arguments.people must be of type integer"),
        ("book", '{"day": "2026-12-01"}', "arguments.people is required"),
        ("book", '{"day": "2026-12-01", "people": 2, "pets": 1}', "arguments.pets is not a known parameter"),
        ("book", '{"day": "2026-12-01", "people": 2, "period": "night"}', "arguments.period must be one of"),
        ("book", '{"day": "2026-12-01", "people": 2, "tags": ["a", 3]}', "arguments.tags[1] must be of type string"),
        ("book", '{"day": 20261201, "people": 2}', "arguments.day must be of type string"),
        ("book", '{"day": "x", "people": 2', "arguments are not valid JSON"),
        ("book", '["2026-12-01", 2]', "arguments must be a JSON object"),
        ("set_volume", '{"level": 11}', "arguments.level must be <= 10"),
        ("set_volume", '{"level": 1.5}', "arguments.level must be of type integer"),
        ("set_volume", "{}", "arguments.level is required"),
    ],
)
async def test_invalid_arguments_are_a_structured_error_and_the_handler_never_runs(
    name: str, arguments: str, message: str
) -> None:
    result = await registry().run(name, arguments, make_ctx())
    assert result.outcome == "invalid_arguments"
    error = error_of(result.output)
    assert error["type"] == "invalid_arguments"
    assert message in error["message"]
    assert CALLS == []


async def test_a_raising_handler_gives_a_structured_error_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    result = await registry().run("broken", "{}", make_ctx())
    assert result.outcome == "error"
    assert error_of(result.output) == {"type": "tool_error", "message": "the broken tool failed (ValueError)"}
    assert "secret internal detail" not in result.output
    assert any("tool broken raised" in r.getMessage() and r.exc_info for r in caplog.records)
    refused = await registry().run("refuses", "", make_ctx())
    assert error_of(refused.output) == {"type": "tool_error", "message": "the booking system is closed on Sundays"}


async def test_timeouts_per_tool_and_by_default() -> None:
    reg = registry()
    started = time.monotonic()
    result = await reg.run("sleepy", "{}", make_ctx())
    assert time.monotonic() - started < 1.0
    assert result.outcome == "timeout"
    assert error_of(result.output)["message"] == "the sleepy tool did not answer within 0.05 seconds"
    result = await reg.run("slow_default", "{}", make_ctx())
    assert result.outcome == "timeout"
    assert "within 0.1 seconds" in error_of(result.output)["message"]


async def test_unknown_tool_and_tool_not_offered_on_this_number() -> None:
    reg = registry()
    result = await reg.run("launch_rockets", "{}", make_ctx())
    assert result.outcome == "unknown_tool"
    assert error_of(result.output) == {"type": "unknown_tool", "message": "no tool named 'launch_rockets'"}
    result = await reg.run("book", '{"day": "d", "people": 1}', make_ctx(), allowed=["set_volume"])
    assert result.outcome == "unknown_tool"
    assert CALLS == []


def test_definitions_that_cannot_be_tools_are_refused() -> None:
    def sync_tool(ctx: ToolContext) -> str:
        return ""

    with pytest.raises(ToolDefinitionError, match="must be async"):
        tool(description="x")(sync_tool)  # type: ignore[arg-type]

    async def undocumented(ctx: ToolContext) -> None:
        pass

    with pytest.raises(ToolDefinitionError, match="description"):
        tool()(undocumented)
    with pytest.raises(ToolDefinitionError, match="tool names"):
        tool("has spaces", description="x")(undocumented)

    async def untyped(ctx: ToolContext, thing) -> None:  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(ToolDefinitionError, match="type hint is required"):
        tool(description="x")(untyped)

    async def odd(ctx: ToolContext, thing: set[str]) -> None:
        pass

    with pytest.raises(ToolDefinitionError, match="unsupported parameter type"):
        tool(description="x")(odd)

    async def union(ctx: ToolContext, thing: int | str) -> None:
        pass

    with pytest.raises(ToolDefinitionError, match="Optional"):
        tool(description="x")(union)

    async def varargs(ctx: ToolContext, *things: str) -> None:
        pass

    with pytest.raises(ToolDefinitionError, match=r"\*args"):
        tool(description="x")(varargs)

    async def no_context() -> None:
        pass

    with pytest.raises(ToolDefinitionError, match="ToolContext"):
        schema_from_signature(no_context)
    with pytest.raises(ToolDefinitionError, match="JSON Schema object"):
        tool(description="x", parameters={"type": "string"})(undocumented)
    with pytest.raises(ToolDefinitionError, match="not decorated"):
        ToolRegistry().add(undocumented)


def test_duplicate_names_are_refused() -> None:
    async def other_book(ctx: ToolContext) -> None:
        pass

    reg = registry()
    reg.add(book)  # the same function again is harmless (a module re-exporting a tool)
    with pytest.raises(ToolDefinitionError, match="two tools are named 'book'"):
        reg.add(tool("book", description="Another book.")(other_book))


# ---- loading handler modules from configuration -------------------------------------------------

MODULE_SOURCE = '''
"""Test tools, loaded from a temporary directory through settings.handler_modules."""
import asyncio
import time
from typing import Annotated

from relay.tools import ToolContext, ToolFailure, tool

RUNS: list[tuple[str, float, float]] = []


@tool(description="Look up an order slowly (1.5 s).")
async def slow_lookup(ctx: ToolContext, order_id: Annotated[str, "Order number"]) -> dict[str, str]:
    started = time.monotonic()
    await asyncio.sleep(1.5)
    RUNS.append(("slow_lookup", started, time.monotonic()))
    return {"order_id": order_id, "status": "shipped", "call_sid": ctx.call_sid, "caller": ctx.caller}


@tool(description="Echo quickly.")
async def fast_echo(ctx: ToolContext, text: str) -> dict[str, str]:
    started = time.monotonic()
    await asyncio.sleep(0.05)
    RUNS.append(("fast_echo", started, time.monotonic()))
    return {"echo": text}


@tool(description="Always fails.")
async def explode(ctx: ToolContext) -> None:
    RUNS.append(("explode", time.monotonic(), time.monotonic()))
    raise RuntimeError("database password is hunter2")


@tool(description="Never answers in time.", timeout_s=0.3)
async def hang(ctx: ToolContext) -> None:
    RUNS.append(("hang", time.monotonic(), time.monotonic()))
    await asyncio.sleep(30)


@tool(description="Count things.")
async def count_things(ctx: ToolContext, count: int) -> dict[str, int]:
    RUNS.append(("count_things", time.monotonic(), time.monotonic()))
    return {"count": count}
'''


@pytest.fixture
def tool_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A handler module on a temporary path, importable under a unique name."""
    name = f"user_tools_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


def test_handler_modules_come_from_configuration(tool_module: ModuleType, tmp_path: Path) -> None:
    env = {"RELAY_INSECURE_DEV": "1", "RELAY_HANDLERS": f"handlers.call_control, {tool_module.__name__}"}
    runtime = Runtime(Settings.from_env(env))
    assert set(runtime.tools.tools) == {"end_call", "transfer_call", "slow_lookup", "fast_echo", "explode", "hang",
                                        "count_things"}  # fmt: skip
    assert runtime.tools.tools["hang"].timeout_s == 0.3
    default = Runtime(Settings.from_env({"RELAY_INSECURE_DEV": "1"}))
    assert set(default.tools.tools) == {"end_call", "transfer_call", "lookup_order"}

    with pytest.raises(ConfigError, match="RELAY_HANDLERS: cannot import 'no_such_module_x'"):
        Runtime(Settings.from_env({"RELAY_INSECURE_DEV": "1", "RELAY_HANDLERS": "no_such_module_x"}))

    clash = f"dup_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{clash}.py").write_text(
        "from relay.tools import ToolContext, tool\n\n"
        "@tool(description='Another end_call.')\n"
        "async def end_call(ctx: ToolContext) -> None:\n"
        "    pass\n"
    )
    try:
        with pytest.raises(ToolDefinitionError, match="two tools are named 'end_call'"):
            Runtime(Settings.from_env({"RELAY_INSECURE_DEV": "1", "RELAY_HANDLERS": f"handlers.call_control,{clash}"}))
    finally:
        sys.modules.pop(clash, None)


async def test_example_domain_tool() -> None:
    reg = ToolRegistry()
    reg.load_modules(["handlers.orders"])
    found = await reg.run("lookup_order", '{"order_id": "#10042"}', make_ctx())
    assert json.loads(found.output) == {
        "order_id": "10042",
        "status": "shipped",
        "carrier": "UPS",
        "estimated_delivery": "2026-12-02",
    }
    items = await reg.run("lookup_order", '{"order_id": "10043", "include_items": true}', make_ctx())
    assert json.loads(items.output)["items"] == [{"name": "Coffee beans 1 kg", "qty": 3}]
    missing = await reg.run("lookup_order", '{"order_id": "999"}', make_ctx())
    assert missing.outcome == "error"
    assert "there is no order number 999" in error_of(missing.output)["message"]


def test_transfer_tool_lists_the_profile_destinations() -> None:
    reg = ToolRegistry()
    reg.load_modules(["handlers.call_control"])
    profile = AgentSettings(transfer_numbers={"sales": "+15550004444", "billing": "+15550003333"})
    spec = next(t for t in reg.specs(["transfer_call"], profile))
    assert spec["parameters"]["properties"]["destination"]["enum"] == ["billing", "sales"]
    assert spec["description"].endswith("Available destinations: billing, sales.")
    anyone = next(t for t in reg.specs(["transfer_call"], AgentSettings(allow_any_transfer_number=True)))
    assert "enum" not in anyone["parameters"]["properties"]["destination"]
    assert "E.164" in anyone["description"]
    # the shared spec is not changed by tailoring it to one profile
    assert "enum" not in reg.tools["transfer_call"].parameters["properties"]["destination"]


# ---- through the whole relay --------------------------------------------------------------------


def tool_settings(sim: RealtimeSimulator, module: ModuleType, **overrides: Any) -> Settings:
    return relay_settings(
        sim.url, handler_modules=("handlers.call_control", "handlers.orders", module.__name__), **overrides
    )


def tool_sim(**config: Any) -> RealtimeSimulator:
    config.setdefault("realtime_factor", 8.0)
    config.setdefault("greeting_reply_ms", 200)
    config.setdefault("reply_ms", 300)
    return RealtimeSimulator(SimConfig(**config))


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_slow_tool_runs_beside_the_audio_and_one_response_follows(tool_module: ModuleType, dialect: str) -> None:
    sim = tool_sim(function_calls_on_text={"entered 5 #": [("slow_lookup", '{"order_id": "10042"}')]})
    await sim.start()
    try:
        async with LocalRelay(tool_settings(sim, tool_module, dialect=dialect)) as relay:
            caller = await greeted(relay)
            heard_before = caller.played_bytes
            await caller.enter("5#")
            session = only_session(sim)
            assert await wait_for(lambda: outputs(session), timeout=5)
            # the model's answer to the tool output reaches the caller
            assert await caller.wait_for_audio(heard_before // 8 + 300, timeout=5)
            await caller.hangup()
    finally:
        await sim.stop()
    (name, started, ended), *_ = tool_module.RUNS
    assert name == "slow_lookup" and ended - started >= 1.5
    # caller audio kept reaching the model while the handler ran: no stall in the relayed frames
    assert largest_gap(session.append_times, started, ended) < 0.2
    assert session.appended == caller.sent_payloads
    call = function_calls_sent(session)[0]
    assert [o["call_id"] for o in outputs(session)] == [call["call_id"]]
    assert outputs_by_call(session)[call["call_id"]] == {
        "order_id": "10042",
        "status": "shipped",
        "call_sid": caller.call_sid,
        "caller": "+15550001111",
    }
    # greeting, the key press, and exactly one after the output (none while the tool ran)
    types = [e["type"] for e in received(session)]
    assert types.count("response.create") == 3
    assert after_last_output(session) == ["response.create"]
    assert errors_sent(session) == []
    assert session.responses[-1]["status"] == "completed"


async def test_two_calls_in_one_response_then_one_response_create(tool_module: ModuleType) -> None:
    # the function calls come from a spoken caller turn (server VAD starts that response itself)
    sim = tool_sim(
        function_calls_on_turn={
            1: [("slow_lookup", '{"order_id": "10043"}'), ("fast_echo", '{"text": "hi"}')],
        }
    )
    await sim.start()
    try:
        async with LocalRelay(tool_settings(sim, tool_module)) as relay:
            caller = await greeted(relay)
            await caller.say_and_wait(ulaw.synth_speech(400) + ulaw.silence(700))
            session = only_session(sim)
            assert await wait_for(lambda: len(outputs(session)) == 2, timeout=6)
            assert await wait_for(lambda: len(session.responses) >= 3, timeout=5)
            await caller.wait_idle(timeout=5)
            await caller.hangup()
    finally:
        await sim.stop()
    calls = {c["name"]: c["call_id"] for c in function_calls_sent(session)}
    # the fast one answered first; the response waited for both
    assert [o["call_id"] for o in outputs(session)] == [calls["fast_echo"], calls["slow_lookup"]]
    events = received(session)
    first_output = next(i for i, e in enumerate(events) if e["type"] == "conversation.item.create")
    assert "response.create" not in [e["type"] for e in events[first_output:]][:2]
    assert after_last_output(session) == ["response.create"]
    # the greeting and the one after both outputs; VAD started the turn's response itself
    assert [e["type"] for e in events].count("response.create") == 2
    assert errors_sent(session) == []
    assert session.responses[-1]["output"][0]["type"] == "message"


@pytest.mark.parametrize(
    ("name", "arguments", "error_type", "message", "handler_ran"),
    [
        ("explode", "{}", "tool_error", "the explode tool failed (RuntimeError)", True),
        ("hang", "{}", "timeout", "the hang tool did not answer within 0.3 seconds", True),
        ("count_things", '{"count": "three"}', "invalid_arguments", "arguments.count must be of type integer", False),
        ("count_things", '{"count": 3, "unit": "kg"}', "invalid_arguments", "arguments.unit is not a known", False),
        ("delete_everything", "{}", "unknown_tool", "no tool named 'delete_everything'", False),
    ],
)
async def test_failing_tools_give_the_model_an_error_and_the_call_goes_on(
    tool_module: ModuleType, name: str, arguments: str, error_type: str, message: str, handler_ran: bool
) -> None:
    sim = tool_sim(function_calls_on_text={"entered 5 #": [(name, arguments)]})
    await sim.start()
    try:
        async with LocalRelay(tool_settings(sim, tool_module)) as relay:
            caller = await greeted(relay)
            heard_before = caller.played_bytes
            await caller.enter("5#")
            session = only_session(sim)
            assert await wait_for(lambda: outputs(session), timeout=5)
            # the call goes on: the model speaks about the error, and the caller hears it
            assert await caller.wait_for_audio(heard_before // 8 + 300, timeout=5)
            assert relay.runtime.calls
            frames = session.append_count
            assert await wait_for(lambda: session.append_count > frames + 5, timeout=2)
            await caller.hangup()
            assert await wait_for(lambda: not relay.runtime.calls)
            record = await relay.runtime.store.get_call(caller.call_sid)
    finally:
        await sim.stop()
    output = outputs(session)[0]
    assert output["call_id"] == function_calls_sent(session)[0]["call_id"]
    error = error_of(output["output"])
    assert error["type"] == error_type
    assert message in error["message"]
    assert "hunter2" not in output["output"]
    assert [run[0] for run in tool_module.RUNS] == ([name] if handler_ran else [])
    # the call record keeps the call and its failed result
    assert record is not None
    kinds = {e["kind"]: e for e in record.entries if e["kind"] in ("tool_call", "tool_result")}
    assert (kinds["tool_call"]["name"], kinds["tool_call"]["arguments"]) == (name, arguments)
    assert kinds["tool_result"]["ok"] is False and error_type in kinds["tool_result"]["output"]
    assert after_last_output(session) == ["response.create"]
    assert errors_sent(session) == []


def test_beta_arguments_done_without_a_name_uses_the_item_name() -> None:
    """Beta's response.function_call_arguments.done has no ``name``: take it from the output item."""
    from relay.call import Call, RunTool
    from relay.realtime import events as ev
    from relay.realtime.dialect import get_dialect

    call = Call(
        call_sid="CA" + "1" * 32,
        stream_sid="MZ" + "0" * 32,
        dialect=get_dialect("beta"),
        agent=AgentSettings(greeting=None),
        model="gpt-4o-realtime-preview",
    )
    call.upstream_opened()
    call.upstream_event(ev.SessionUpdated({}))
    call.take_output()
    item = {"id": "item_1", "type": "function_call", "name": "lookup_order", "call_id": "call_1", "arguments": ""}
    call.upstream_event(ev.ResponseCreated("resp_1", None, None))
    call.upstream_event(ev.OutputItemAdded("resp_1", "item_1", "function_call", item))
    call.upstream_event(ev.FunctionCallArgumentsDone("resp_1", "item_1", "call_1", "", '{"order_id": "1"}'))
    runs = [e for e in call.take_output()[2] if isinstance(e, RunTool)]
    assert runs == [RunTool("resp_1", "call_1", "lookup_order", '{"order_id": "1"}')]
    # no item seen at all: the call starts from response.done, which carries the name
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    call.upstream_event(ev.ResponseCreated("resp_2", None, None))
    call.upstream_event(ev.FunctionCallArgumentsDone("resp_2", "item_2", "call_2", "", "{}"))
    assert not [e for e in call.take_output()[2] if isinstance(e, RunTool)]
    done_call = ev.FunctionCall("call_2", "end_call", "{}", "item_2")
    call.upstream_event(ev.ResponseDone("resp_2", "completed", None, (done_call,), {}, None, ""))
    assert [e for e in call.take_output()[2] if isinstance(e, RunTool)] == [
        RunTool("resp_2", "call_2", "end_call", "{}")
    ]


async def test_a_broken_explicit_schema_is_the_tool_s_error_not_a_stuck_call() -> None:
    @tool("bad_pattern", description="x", parameters={"type": "object", "properties": {"s": {"pattern": "("}}})
    async def bad_pattern(ctx: ToolContext, **kwargs: Any) -> str:
        return "unreachable"

    reg = ToolRegistry()
    reg.add(bad_pattern)
    result = await reg.run("bad_pattern", '{"s": "x"}', make_ctx())
    assert (result.outcome, error_of(result.output)["type"]) == ("error", "tool_error")
