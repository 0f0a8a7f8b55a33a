"""Every client event the relay can send validates against the official openai types of its dialect."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest
from openai.types.beta.realtime import RealtimeClientEvent as BetaClientEvent
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeClientEvent as GaClientEvent
from openai.types.realtime import RealtimeServerEvent as GaServerEvent
from pydantic import BaseModel, TypeAdapter
from websockets.asyncio.client import connect

from relay.agent_settings import AgentSettings, VadSettings
from relay.call import Call
from relay.realtime import client
from relay.realtime import events as ev
from relay.realtime.dialect import get_dialect
from relay.sim.realtime import RealtimeSimulator

ADAPTERS = {"ga": TypeAdapter(GaClientEvent), "beta": TypeAdapter(BetaClientEvent)}
SERVER = {"ga": TypeAdapter(GaServerEvent), "beta": TypeAdapter(BetaServerEvent)}


def _set_fields(model: Any) -> Any:
    """The fields a parsed model really holds, recursively (extra keys would vanish here)."""
    if isinstance(model, BaseModel):
        known = type(model).model_fields
        return {k: _set_fields(getattr(model, k)) for k in model.model_fields_set if k in known}
    if isinstance(model, list):
        return [_set_fields(m) for m in model]
    if isinstance(model, dict):
        return {k: _set_fields(v) for k, v in model.items()}
    return model


def test_oracle_catches_misspelled_fields() -> None:
    with pytest.raises(AssertionError):
        assert_valid(
            "ga",
            {
                "type": "conversation.item.truncate",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": 5,
                "audio_endms": 3,
            },
        )
    with pytest.raises(AssertionError):
        assert_valid(
            "ga",
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"input": {"formatt": {"type": "audio/pcmu"}}}},
            },
        )


def assert_valid(dialect: str, event: dict[str, Any] | str) -> None:
    data = orjson.loads(event) if isinstance(event, str) else event
    parsed = ADAPTERS[dialect].validate_python(data)
    assert _set_fields(parsed) == data, f"fields the {dialect} types do not know: {data}"


TOOLS = [
    {
        "type": "function",
        "name": "lookup_order",
        "description": "Find an order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
    }
]


def agents() -> list[AgentSettings]:
    return [
        AgentSettings(),
        AgentSettings(
            vad=VadSettings(type="semantic_vad", eagerness="low"), transcription_model=None, noise_reduction=None
        ),
        AgentSettings(vad=VadSettings(type="none")),
        AgentSettings(vad=VadSettings(idle_timeout_ms=6000, create_response=False), voice="verse", speed=1.2),
    ]


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_session_updates_validate(dialect: str) -> None:
    d = get_dialect(dialect)
    for agent in agents():
        assert_valid(dialect, d.session_update(agent, model="m", instructions="hi", tools=TOOLS))
        assert_valid(dialect, d.session_update(agent, model="m", instructions="hi"))


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_simulator_accepts_every_session_update_the_relay_builds(dialect: str) -> None:
    """The simulator refuses fields the dialect does not declare, at any depth, as the service does."""
    d = get_dialect(dialect)
    async with (
        RealtimeSimulator() as sim,
        connect(sim.url, additional_headers=d.headers({"Authorization": "Bearer sk-test"})) as ws,
    ):
        assert orjson.loads(await ws.recv())["type"] == "session.created"
        for agent in agents():
            event = d.session_update(agent, model="gpt-realtime", instructions="hi", tools=TOOLS)
            await ws.send(orjson.dumps(event).decode())
            answer = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert answer["type"] == "session.updated", answer
    assert not any(e["type"] == "error" for e in sim.sessions[0].sent)


def test_mcp_servers_pass_through_in_ga_tools() -> None:
    agent = AgentSettings(
        mcp_servers=(
            {
                "type": "mcp",
                "server_label": "crm",
                "server_url": "https://crm.example/mcp",
                "require_approval": "never",
            },
        )
    )
    event = get_dialect("ga").session_update(agent, model="m", instructions="x", tools=TOOLS)
    assert event["session"]["tools"][-1]["type"] == "mcp"
    assert_valid("ga", event)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_client_events_validate(dialect: str) -> None:
    d = get_dialect(dialect)
    system = client.user_text("summary", role="system")
    system["previous_item_id"] = "root"
    events: list[dict[str, Any] | str] = [
        client.append_audio("/////w=="),
        client.truncate("item_1", 1234),
        client.cancel("resp_1"),
        client.cancel(),
        client.user_text("The caller pressed 5"),
        system,
        client.function_output("call_1", '{"ok": true}'),
        client.delete_item("item_1"),
        client.commit(),
        d.response_create(),
        d.response_create(instructions="Greet the caller"),
        d.response_create(instructions="Summarize", out_of_band=True, metadata={"purpose": "summary"}, text_only=True),
    ]
    for event in events:
        assert_valid(dialect, event)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_call_object_output_validates(dialect: str) -> None:
    """Drive a call through greeting, barge-in, DTMF, tools and a summary; validate all it sends."""
    call = Call(
        call_sid="CA1",
        stream_sid="MZ1",
        dialect=get_dialect(dialect),
        agent=AgentSettings(),
        model="m",
        tools=TOOLS,
        summary_max_turns=2,
        summary_keep_turns=1,
    )
    sent: list[str] = []
    call.upstream_opened()
    call.upstream_event(ev.SessionUpdated({}))
    call.upstream_event(ev.ResponseCreated("r1", None, None))
    call.upstream_event(ev.AudioDelta("r1", "i1", "/////w=="))
    call.upstream_event(ev.SpeechStarted(10, "u1"))
    call.key_pressed("7")
    call.key_pressed("#")
    call.upstream_event(ev.ResponseDone("r1", "cancelled", None, (), {}, None, ""))
    for i in range(3):
        call.upstream_event(ev.ItemAdded(f"x{i}", None, {}))
    call.upstream_event(ev.ResponseCreated("r2", {"purpose": "summary"}, None))
    call.upstream_event(ev.ResponseDone("r2", "completed", None, (), {}, {"purpose": "summary"}, "sum"))
    call.upstream_event(ev.ResponseCreated("r3", None, None))
    call.upstream_event(
        ev.ResponseDone(
            "r3", "completed", None, (ev.FunctionCall("c1", "lookup_order", '{"order_id":"1"}', "f1"),), {}, None, ""
        )
    )
    call.tool_result("c1", '{"status":"shipped"}')
    sent.extend(call.take_output()[1])
    kinds = {orjson.loads(m)["type"] for m in sent}
    assert {
        "session.update",
        "response.create",
        "conversation.item.truncate",
        "conversation.item.create",
        "conversation.item.delete",
    } <= kinds
    for message in sent:
        assert_valid(dialect, message)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_relay_side_turns_validate(dialect: str) -> None:
    """Without server VAD: commit, response.create and the barge-in cancel, as the call sends them."""
    call = Call(
        call_sid="CA1",
        stream_sid="MZ1",
        dialect=get_dialect(dialect),
        agent=AgentSettings(vad=VadSettings(type="none", silence_duration_ms=100)),
        model="m",
    )
    call.upstream_opened()
    call.upstream_event(ev.SessionUpdated({}))
    call.upstream_event(ev.ResponseCreated("r1", None, None))
    call.upstream_event(ev.AudioDelta("r1", "i1", "/////w=="))
    loud = base64.b64encode(bytes([0x80, 0x00] * 80)).decode()
    silent = base64.b64encode(b"\xff" * 160).decode()
    for payload in [loud] * 10 + [silent] * 10:
        call.find_turns(payload)
    call.upstream_event(ev.ResponseDone("r1", "cancelled", None, (), {}, None, ""))
    sent = call.take_output()[1]
    kinds = [orjson.loads(m)["type"] for m in sent]
    assert [k for k in kinds if k != "input_audio_buffer.append"] == [
        "session.update",
        "response.create",
        "conversation.item.truncate",
        "response.cancel",
        "input_audio_buffer.commit",
        "response.create",
    ]
    for message in sent:
        assert_valid(dialect, message)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_parser_reads_simulator_shapes(dialect: str) -> None:
    """Server events built to the openai types parse into the normalized vocabulary."""
    d = get_dialect(dialect)
    delta_type = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
    delta = {
        "type": delta_type,
        "event_id": "e1",
        "response_id": "r",
        "item_id": "i",
        "output_index": 0,
        "content_index": 0,
        "delta": "/////w==",
    }
    SERVER[dialect].validate_python(delta)
    assert d.parse(orjson.dumps(delta)) == ev.AudioDelta("r", "i", "/////w==")
    error = {
        "type": "error",
        "event_id": "e2",
        "error": {
            "type": "invalid_request_error",
            "code": "invalid_value",
            "message": "m",
            "param": None,
            "event_id": "x",
        },
    }
    SERVER[dialect].validate_python(error)
    parsed = d.parse(orjson.dumps(error))
    assert isinstance(parsed, ev.ServerError) and parsed.code == "invalid_value" and parsed.event_id == "x"


def test_malformed_events_raise_named_error() -> None:
    d = get_dialect("ga")
    for raw in [
        b"{",
        b"[]",
        b'{"type": 3}',
        b'{"type":"response.output_audio.delta","delta":5}',
        b'{"type":"input_audio_buffer.speech_started","audio_start_ms":"x","item_id":"i"}',
    ]:
        with pytest.raises(ev.MalformedEvent):
            d.parse(raw)
    assert isinstance(d.parse(b'{"type":"brand.new.event"}'), ev.Unknown)
