"""The offline Realtime simulator: wire conformance (openai package types) and server behaviours.

Every test talks to a real simulator on 127.0.0.1 through a real websockets client, because the relay
meets it the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import struct
import time
import types
import typing
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.beta.realtime import RealtimeClientEvent as BetaClientEvent
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.beta.realtime.session_update_event import Session as BetaSessionUpdate
from openai.types.realtime import RealtimeClientEvent as GAClientEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from openai.types.realtime import RealtimeSessionCreateRequest
from openai.types.realtime.realtime_audio_formats import AudioPCM, RealtimeAudioFormats
from pydantic import BaseModel, TypeAdapter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from relay.sim import ulaw
from relay.sim.realtime import RealtimeSimulator, SimConfig, SimSession
from relay.sim.realtime.schema import BETA_AUDIO_FORMATS, GA_AUDIO_FORMATS, GA_PCM_RATES, SESSION_FIELDS, OneOf

JSON = dict[str, Any]

SERVER_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "ga": TypeAdapter(GAServerEvent),
    "beta": TypeAdapter(BetaServerEvent),
}
CLIENT_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "ga": TypeAdapter(GAClientEvent),
    "beta": TypeAdapter(BetaClientEvent),
}
# Fields we send on purpose that the generated models do not declare (the real service sends them too).
ALLOWED_EXTRAS = {
    "session.created": {"session.object", "session.id", "session.expires_at"},
    "session.updated": {"session.object", "session.id", "session.expires_at"},
    "response.output_audio_transcript.delta": {"obfuscation"},
    "response.audio_transcript.delta": {"obfuscation"},
}
NAMES = {
    "ga": {
        "audio_delta": "response.output_audio.delta",
        "transcript_delta": "response.output_audio_transcript.delta",
        "transcript_done": "response.output_audio_transcript.done",
        "text_delta": "response.output_text.delta",
        "text_done": "response.output_text.done",
        "item_added": "conversation.item.added",
    },
    "beta": {
        "audio_delta": "response.audio.delta",
        "transcript_delta": "response.audio_transcript.delta",
        "transcript_done": "response.audio_transcript.done",
        "text_delta": "response.text.delta",
        "text_done": "response.text.done",
        "item_added": "conversation.item.created",
    },
}
TOOL = {
    "type": "function",
    "name": "lookup_order",
    "description": "Find an order by its number.",
    "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
}


def undeclared_fields(model: Any, path: str = "") -> set[str]:
    """Paths of keys the pydantic models accepted only as extras: typos would hide there."""
    found: set[str] = set()
    if isinstance(model, BaseModel):
        for key in model.model_extra or {}:
            found.add(f"{path}{key}")
        for name in type(model).model_fields:
            found |= undeclared_fields(getattr(model, name), f"{path}{name}.")
    elif isinstance(model, list):
        for value in model:
            found |= undeclared_fields(value, path)
    return found


def assert_conforms(rec: SimSession) -> None:
    """Every event the simulator sent validates for its dialect, with no stray fields and unique ids."""
    adapter = SERVER_ADAPTERS[rec.dialect]
    for event in rec.sent:
        model = adapter.validate_python(event)
        extras = undeclared_fields(model) - ALLOWED_EXTRAS.get(event["type"], set())
        assert not extras, (event["type"], extras)
    ids = [event["event_id"] for event in rec.sent]
    assert len(ids) == len(set(ids))
    assert all(event_id.startswith("event_") for event_id in ids)


class Client:
    """A test-side Realtime client: sends validated client events, reads server events in order."""

    def __init__(self, ws: ClientConnection, dialect: str) -> None:
        self.ws = ws
        self.dialect = dialect
        self.events: list[JSON] = []

    async def send(self, event: JSON, *, validate: bool = True) -> None:
        if validate:
            CLIENT_ADAPTERS[self.dialect].validate_python(event)
        await self.ws.send(orjson.dumps(event).decode())

    async def recv(self, wait_s: float = 5.0) -> JSON:
        event: JSON = orjson.loads(await asyncio.wait_for(self.ws.recv(), wait_s))
        self.events.append(event)
        return event

    async def until(self, kind: str, wait_s: float = 5.0) -> list[JSON]:
        """Events up to and including the next one of type ``kind``."""
        seen: list[JSON] = []
        deadline = time.monotonic() + wait_s
        while True:
            event = await self.recv(max(0.01, deadline - time.monotonic()))
            seen.append(event)
            if event["type"] == kind:
                return seen

    async def expect(self, kind: str, wait_s: float = 5.0) -> JSON:
        return (await self.until(kind, wait_s))[-1]

    async def quiet(self, seconds: float = 0.15) -> list[JSON]:
        """Whatever arrives within ``seconds`` (used to prove something did not happen)."""
        seen: list[JSON] = []
        with contextlib.suppress(TimeoutError):
            while True:
                seen.append(await self.recv(seconds))
        return seen

    async def speak(self, audio: bytes) -> None:
        """Append audio as Twilio would deliver it: one 20 ms frame per event."""
        for offset in range(0, len(audio), ulaw.FRAME_BYTES):
            frame = base64.b64encode(audio[offset : offset + ulaw.FRAME_BYTES]).decode()
            await self.ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": frame}).decode())


@contextlib.asynccontextmanager
async def open_client(
    sim: RealtimeSimulator, dialect: str = "ga", *, key: str | None = "sk-test-key-0001"
) -> AsyncIterator[Client]:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    model = "gpt-realtime" if dialect == "ga" else "gpt-4o-realtime-preview"
    async with connect(f"{sim.url}?model={model}", additional_headers=headers, compression=None, max_size=None) as ws:
        yield Client(ws, dialect)


def session_update(dialect: str, *, turn_detection: JSON | str | None = "vad", **extra: Any) -> JSON:
    """A relay-like ``session.update`` in the dialect's shape (µ-law, VAD, transcription, a tool)."""
    vad: JSON | None = (
        {"type": "server_vad", "silence_duration_ms": 300, "prefix_padding_ms": 300}
        if turn_detection == "vad"
        else turn_detection  # type: ignore[assignment]
    )
    if dialect == "ga":
        session: JSON = {
            "type": "realtime",
            "model": "gpt-realtime",
            "output_modalities": ["audio"],
            "instructions": "You answer phone calls. Be brief.",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": vad,
                    "transcription": {"model": "gpt-4o-transcribe"},
                },
                "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
            },
            "tools": [TOOL],
            "tool_choice": "auto",
        }
    else:
        session = {
            "modalities": ["audio", "text"],
            "instructions": "You answer phone calls. Be brief.",
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "voice": "alloy",
            "turn_detection": vad,
            "input_audio_transcription": {"model": "whisper-1"},
            "tools": [TOOL],
            "tool_choice": "auto",
        }
    session.update(extra)
    return {"type": "session.update", "event_id": "evt_cfg", "session": session}


def assert_service_defaults(session: JSON, dialect: str) -> None:
    """``session.created`` reports the service's own defaults (as recorded live), not a client's choices."""
    vad = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "create_response": True,
        "interrupt_response": True,
    }
    if dialect == "ga":
        assert session["type"] == "realtime" and session["output_modalities"] == ["audio"]
        assert session["audio"] == {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {**vad, "idle_timeout_ms": None},
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
        }
        assert (session["tools"], session["tool_choice"], session["max_output_tokens"]) == ([], "auto", "inf")
    else:
        assert "type" not in session and session["modalities"] == ["text", "audio"]
        assert (session["voice"], session["input_audio_format"], session["output_audio_format"]) == (
            "alloy",
            "pcm16",
            "pcm16",
        )
        assert session["turn_detection"] == vad and session["input_audio_transcription"] is None
        assert (session["tools"], session["tool_choice"], session["max_response_output_tokens"]) == ([], "auto", "inf")


def delta_ms(events: list[JSON], dialect: str) -> list[int]:
    return [
        len(base64.b64decode(e["delta"])) // ulaw.ULAW_BYTES_PER_MS
        for e in events
        if e["type"] == NAMES[dialect]["audio_delta"]
    ]


@pytest.fixture
async def sim() -> AsyncIterator[RealtimeSimulator]:
    simulator = RealtimeSimulator(SimConfig(realtime_factor=0, response_delay_ms=0, reply_ms=400))
    await simulator.start()
    yield simulator
    await simulator.stop()


async def configured(client: Client, dialect: str, **kwargs: Any) -> JSON:
    created = await client.expect("session.created")
    assert created["session"]["id"].startswith("sess_")
    await client.send(session_update(dialect, **kwargs))
    return await client.expect("session.updated")


# ---------------------------------------------------------------------------- the scripted call


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_scripted_call_conforms_and_behaves(sim: RealtimeSimulator, dialect: str) -> None:
    names = NAMES[dialect]
    sim.config.greeting_reply_ms = 200
    sim.config.function_calls_on_turn = {2: [("lookup_order", '{"order": "A1"}')]}
    sim.config.function_calls_on_text = {"DTMF 9": [("transfer_call", '{"to": "sales"}')]}
    async with open_client(sim, dialect) as client:
        rec = sim.sessions[-1]
        assert rec.dialect == dialect and rec.path == "/v1/realtime"
        assert rec.headers["authorization"] == rec.headers["Authorization"] == "Bearer sk-test-key-0001"
        created = await client.expect("session.created")
        assert_service_defaults(created["session"], dialect)

        await client.send(session_update(dialect))
        updated = (await client.expect("session.updated"))["session"]
        vad = updated["audio"]["input"]["turn_detection"] if dialect == "ga" else updated["turn_detection"]
        assert vad["silence_duration_ms"] == 300 and vad["create_response"] and vad["interrupt_response"]
        fmt = updated["audio"]["input"]["format"] if dialect == "ga" else updated["input_audio_format"]
        assert fmt in ({"type": "audio/pcmu"}, "g711_ulaw")

        # Greeting: response.create with instructions -> greeting_reply_ms of audio in cycled chunks.
        await client.send({"type": "response.create", "response": {"instructions": "Greet the caller."}})
        greeting = await client.until("response.done")
        assert delta_ms(greeting, dialect) == [40, 100, 60]
        done = greeting[-1]["response"]
        assert done["status"] == "completed" and done["output"][0]["type"] == "message"
        assert done["usage"]["output_token_details"]["audio_tokens"] == 200 // 50
        transcript = next(e for e in greeting if e["type"] == names["transcript_done"])["transcript"]
        assert transcript == "assistant reply 1"
        transcript_deltas = [e for e in greeting if e["type"] == names["transcript_delta"]]
        assert "".join(e["delta"] for e in transcript_deltas) == transcript
        assert all(isinstance(e["obfuscation"], str) and e["obfuscation"] for e in transcript_deltas)
        audio_part = next(e for e in greeting if e["type"] == "response.content_part.added")["part"]
        assert audio_part == {"type": "audio", "transcript": ""}  # "audio", not "output_audio", in GA too
        rate_limits = await client.recv()
        assert rate_limits["type"] == "rate_limits.updated"
        total_tokens = done["usage"]["total_tokens"]
        assert rate_limits["rate_limits"] == [
            {
                "name": "tokens",
                "limit": 40000,
                "remaining": 40000 - total_tokens,
                "reset_seconds": round(total_tokens * 60.0 / 40000, 3),
            }
        ]
        greeting_item = done["output"][0]["id"]
        assert rec.audio_ms(greeting_item) == 200

        # Caller turn 1: 400 ms silence, 600 ms speech, silence -> VAD events, item, transcript, auto reply.
        await client.speak(ulaw.silence(400) + ulaw.synth_speech(600, seed=1) + ulaw.silence(400))
        started = await client.expect("input_audio_buffer.speech_started")
        assert started["audio_start_ms"] == 400 - 300  # speech onset minus prefix padding
        # The 3rd loud frame (60 ms of speech, frame index 22) is the one that triggers it.
        assert rec.append_times[22] <= rec.speech_started_at[0] <= rec.append_times[23]
        turn = await client.until("response.done")
        kinds = [e["type"] for e in turn]
        stopped = turn[kinds.index("input_audio_buffer.speech_stopped")]
        assert stopped["audio_end_ms"] == 1000 + 300 and stopped["item_id"] == started["item_id"]
        committed = turn[kinds.index("input_audio_buffer.committed")]
        assert committed["item_id"] == started["item_id"] and committed["previous_item_id"] == greeting_item
        user_item = turn[kinds.index(names["item_added"])]["item"]
        assert user_item["role"] == "user" and user_item["content"][0]["type"] == "input_audio"
        transcription = turn[kinds.index("conversation.item.input_audio_transcription.completed")]
        assert transcription["transcript"] == "caller turn 1 (1.2 s)"
        input_deltas = [
            (i, e) for i, e in enumerate(turn) if e["type"] == "conversation.item.input_audio_transcription.delta"
        ]
        assert "".join(e["delta"] for _, e in input_deltas) == "caller turn 1 (1.2 s)"
        assert {e["item_id"] for _, e in input_deltas} == {started["item_id"]}
        assert max(i for i, _ in input_deltas) < kinds.index("conversation.item.input_audio_transcription.completed")
        assert kinds.index("conversation.item.input_audio_transcription.completed") < kinds.index("response.created")
        assert turn[-1]["response"]["status"] == "completed"

        # Caller turn 2 is scripted as a function call instead of audio.
        await client.speak(ulaw.synth_speech(300, seed=2) + ulaw.silence(400))
        call_turn = await client.until("response.done")
        call_item = next(e for e in call_turn if e["type"] == "response.output_item.added")["item"]
        assert call_item["type"] == "function_call" and call_item["name"] == "lookup_order"
        assert call_item["arguments"] == ""
        pieces = [e["delta"] for e in call_turn if e["type"] == "response.function_call_arguments.delta"]
        assert len(pieces) == 2 and "".join(pieces) == '{"order": "A1"}'
        args_done = next(e for e in call_turn if e["type"] == "response.function_call_arguments.done")
        assert args_done["arguments"] == '{"order": "A1"}' and args_done["call_id"] == call_item["call_id"]
        assert (args_done.get("name") == "lookup_order") is (dialect == "ga")
        assert not any(e["type"] == names["audio_delta"] for e in call_turn)
        output = call_turn[-1]["response"]["output"]
        assert [o["type"] for o in output] == ["function_call"] and output[0]["arguments"] == '{"order": "A1"}'

        await client.send(
            {
                "type": "conversation.item.create",
                "event_id": "evt_bad_call",
                "item": {"type": "function_call_output", "call_id": "call_nope", "output": "{}"},
            }
        )
        error = (await client.expect("error"))["error"]
        assert error["code"] == "invalid_value" and error["event_id"] == "evt_bad_call"
        await client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "function_call_output",
                    "call_id": call_item["call_id"],
                    "output": '{"ok":true}',
                },
            }
        )
        await client.expect(names["item_added"])
        await client.send({"type": "response.create"})
        after_tool = await client.until("response.done")
        assert sum(delta_ms(after_tool, dialect)) == 400

        # Barge-in: a long reply paced in real time, interrupted by caller speech.
        sim.config.realtime_factor = 1.0
        sim.config.reply_ms = 3000
        await client.send({"type": "response.create"})
        long_created = (await client.expect("response.created"))["response"]
        for _ in range(3):
            await client.expect(names["audio_delta"])
        await client.send({"type": "response.create", "event_id": "evt_second"})
        error = (await client.expect("error"))["error"]
        assert error["code"] == "conversation_already_has_active_response"
        assert error["event_id"] == "evt_second"
        sim.config.realtime_factor = 0
        sim.config.reply_ms = 300
        await client.speak(ulaw.synth_speech(200, seed=3))
        barge = await client.until("response.done")
        barge_kinds = [e["type"] for e in barge]
        after_start = barge[barge_kinds.index("input_audio_buffer.speech_started") :]
        late = [e for e in after_start if e["type"] == names["audio_delta"]]
        assert len(late) == 2 and {e["response_id"] for e in late} == {long_created["id"]}  # already in flight
        cancelled = barge[-1]["response"]
        assert cancelled["id"] == long_created["id"] and cancelled["status"] == "cancelled"
        assert cancelled["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        assert cancelled["output"][0]["status"] == "incomplete"
        long_item = cancelled["output"][0]["id"]
        sent_ms = rec.audio_ms(long_item)
        assert 0 < sent_ms < 3000
        assert sent_ms == sum(delta_ms(client.events, dialect)[-len(delta_ms(barge, dialect)) - 3 :])

        await client.send(
            {
                "type": "conversation.item.truncate",
                "event_id": "evt_trunc",
                "item_id": long_item,
                "content_index": 0,
                "audio_end_ms": sent_ms + 500,
            }
        )
        error = (await client.expect("error"))["error"]
        assert error == {
            "type": "invalid_request_error",
            "code": None,
            "message": f"Audio content of {sent_ms}ms is already shorter than {sent_ms + 500}ms",
            "param": None,
            "event_id": "evt_trunc",
        }
        await client.send(
            {
                "type": "conversation.item.truncate",
                "item_id": long_item,
                "content_index": 0,
                "audio_end_ms": sent_ms // 2,
            }
        )
        truncated = await client.expect("conversation.item.truncated")
        assert truncated["audio_end_ms"] == sent_ms // 2
        assert [(t["audio_end_ms"], t["sent_ms"], t["ok"]) for t in rec.truncates] == [
            (sent_ms + 500, sent_ms, False),
            (sent_ms // 2, sent_ms, True),
        ]
        assert rec.audio_ms(long_item) == sent_ms // 2
        await client.speak(ulaw.silence(400))  # end of the barge-in turn -> its own reply
        assert (await client.expect("response.done"))["response"]["status"] == "completed"

        # Nothing to cancel now.
        await client.send({"type": "response.cancel", "event_id": "evt_cancel"})
        error = (await client.expect("error"))["error"]
        assert error["code"] == "response_cancel_not_active"
        assert error["message"] == "Cancellation failed: no active response found"
        assert error["event_id"] == "evt_cancel"

        # DTMF as a text item; the scripted text match turns the next response into a tool call.
        dtmf = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "DTMF 9 pressed"}],
        }
        await client.send({"type": "conversation.item.create", "item": dtmf})
        added = await client.expect(names["item_added"])
        assert added["item"]["content"][0]["text"] == "DTMF 9 pressed"
        await client.send({"type": "response.create"})
        dtmf_turn = await client.until("response.done")
        assert dtmf_turn[-1]["response"]["output"][0]["name"] == "transfer_call"

        # Out-of-band summary: text only, metadata echoed, not part of the conversation.
        items_before = len(rec.items())
        oob: JSON = {"conversation": "none", "metadata": {"purpose": "summary"}, "instructions": "Summarize."}
        oob["output_modalities" if dialect == "ga" else "modalities"] = ["text"]
        await client.send({"type": "response.create", "response": oob})
        summary = await client.until("response.done")
        oob_created = next(e for e in summary if e["type"] == "response.created")
        assert oob_created["response"]["conversation_id"] is None
        assert not any(e["type"] in (names["audio_delta"], names["item_added"]) for e in summary)
        assert any(e["type"] == names["text_delta"] for e in summary)
        text = next(e for e in summary if e["type"] == names["text_done"])["text"]
        assert f"{items_before} conversation items" in text and "DTMF 9 pressed" in text
        final = summary[-1]["response"]
        assert final["metadata"] == {"purpose": "summary"} and final["conversation_id"] is None
        assert final["output"][0]["content"][0]["text"] == text
        assert len(rec.items()) == items_before

        # Item housekeeping and malformed input; the session stays usable.
        await client.send({"type": "conversation.item.retrieve", "item_id": greeting_item})
        assert (await client.expect("conversation.item.retrieved"))["item"]["id"] == greeting_item
        await client.send({"type": "conversation.item.delete", "item_id": greeting_item})
        assert (await client.expect("conversation.item.deleted"))["item_id"] == greeting_item
        await client.send({"type": "conversation.item.delete", "item_id": greeting_item})
        assert (await client.expect("error"))["error"]["code"] == "item_not_found"
        await client.send(
            {
                "type": "conversation.item.truncate",
                "item_id": "item_missing",
                "content_index": 0,
                "audio_end_ms": 1,
            }
        )
        assert (await client.expect("error"))["error"]["code"] == "item_not_found"
        await client.send({"type": "no.such.event", "event_id": "evt_unknown"}, validate=False)
        error = (await client.expect("error"))["error"]
        assert error["code"] == "invalid_value" and error["param"] == "type" and error["event_id"] == "evt_unknown"
        await client.ws.send("{not json")
        assert (await client.expect("error"))["error"]["code"] == "invalid_json"
        await client.send({"type": "input_audio_buffer.append", "audio": "***"}, validate=False)
        assert (await client.expect("error"))["error"]["param"] == "audio"
        await client.send({"type": "conversation.item.retrieve", "item_id": long_item})
        await client.expect("conversation.item.retrieved")

        assert rec.turns == 3
        assert [i["role"] for i in rec.items() if i["type"] == "message"][:2] == ["user", "assistant"]
        assert rec.append_count == len(rec.appended) == len(rec.append_times)
        assert all(e[1]["type"] != "input_audio_buffer.append" for e in rec.received if e[1].get("type"))

    assert_conforms(rec)
    # Everything the client read is exactly what the simulator says it sent, in order.
    assert [e["event_id"] for e in client.events] == [e["event_id"] for e in rec.sent][: len(client.events)]


# ---------------------------------------------------------------------------- connection and session errors


async def test_missing_key_gets_error_and_close(sim: RealtimeSimulator) -> None:
    async with open_client(sim, key=None) as client:
        error = (await client.expect("error"))["error"]
        assert error["code"] == "missing_api_key" and error["type"] == "invalid_request_error"
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 1008
    assert sim.connections == 1 and sim.sessions[0].closed
    assert not any(e["type"] == "session.created" for e in sim.sessions[0].sent)
    assert_conforms(sim.sessions[0])


async def test_expected_key_and_fatal_error_on_connect(sim: RealtimeSimulator) -> None:
    sim.config.expected_api_key = "sk-right-key-1234"
    async with open_client(sim, "beta", key="sk-wrong-key-9999") as client:
        error = (await client.expect("error"))["error"]
        assert error["code"] == "invalid_api_key" and "9999" in error["message"]
        assert "sk-wrong-key" not in error["message"]
    async with open_client(sim, key="sk-right-key-1234") as client:
        await client.expect("session.created")
    sim.config.fatal_error_on_connect = "insufficient_quota"
    async with open_client(sim, key="sk-right-key-1234") as client:
        assert (await client.expect("error"))["error"]["code"] == "insufficient_quota"
        with pytest.raises(ConnectionClosed):
            await client.recv()
    assert sim.connections == 3
    for rec in sim.sessions:
        assert_conforms(rec)


async def test_wrong_path_is_refused_before_upgrade(sim: RealtimeSimulator) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(sim.url.replace("/v1/realtime", "/v1/other")):
            pass
    assert refused.value.response.status_code == 404
    assert sim.connections == 0 and sim.sessions == []


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Annotated, typing.Union, types.UnionType, list):
        args = typing.get_args(annotation)[:1] if origin is typing.Annotated else typing.get_args(annotation)
        return [model for arg in args for model in _models_in(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _literals(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Annotated, typing.Union, types.UnionType):
        return [value for arg in typing.get_args(annotation) for value in _literals(arg)]
    return []


def _fields_of(model: type[BaseModel]) -> dict[str, Any]:
    return {name: _shape_of(info.annotation) for name, info in model.model_fields.items()}


def _shape_of(annotation: Any) -> Any:
    """The simulator's field-shape notation, read off the ``openai`` package's pydantic models."""
    models = _models_in(annotation)
    if not models:
        return None
    if len(models) == 1 and "type" not in models[0].model_fields:
        return _fields_of(models[0])
    by_type = {kind: _fields_of(model) for model in models for kind in _literals(model.model_fields["type"].annotation)}
    return OneOf(all(model.model_fields["type"].is_required() for model in models), by_type)


def test_session_fields_are_the_openai_packages() -> None:
    """The simulator accepts exactly the session fields (at every depth) and audio formats the package declares."""
    assert SESSION_FIELDS["ga"] == _fields_of(RealtimeSessionCreateRequest)
    assert SESSION_FIELDS["beta"] == _fields_of(BetaSessionUpdate)
    ga_formats = {
        kind for model in _models_in(RealtimeAudioFormats) for kind in _literals(model.model_fields["type"].annotation)
    }
    assert GA_AUDIO_FORMATS == ga_formats
    assert set(GA_PCM_RATES) == set(_literals(AudioPCM.model_fields["rate"].annotation))
    assert BETA_AUDIO_FORMATS == set(_literals(BetaSessionUpdate.model_fields["input_audio_format"].annotation))
    assert BETA_AUDIO_FORMATS == set(_literals(BetaSessionUpdate.model_fields["output_audio_format"].annotation))


GA_INPUT_VAD = {"type": "server_vad", "silence_duration_ms": 400}


@pytest.mark.parametrize(
    ("dialect", "session", "code", "param"),
    [
        ("ga", {"modalities": ["audio"], "input_audio_format": "g711_ulaw"}, "beta_api_shape_disabled", "session.type"),
        (
            "ga",
            {"type": "realtime", "input_audio_format": "g711_ulaw"},
            "unknown_parameter",
            "session.input_audio_format",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"turn_detection": {"silence_duration_ms": 9}}}},
            "missing_required_parameter",
            "session.audio.input.turn_detection.type",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"turn_detection": {**GA_INPUT_VAD, "idle_timeout": 5000}}}},
            "unknown_parameter",
            "session.audio.input.turn_detection.idle_timeout",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}}},
            "unknown_parameter",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}},
            "invalid_value",
            "session.audio.input.turn_detection.type",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1", "lang": "en"}}}},
            "unknown_parameter",
            "session.audio.input.transcription.lang",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"noise_reduction": {"type": "near_field", "level": 2}}}},
            "unknown_parameter",
            "session.audio.input.noise_reduction.level",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}, "sample_rate": 8000}}},
            "unknown_parameter",
            "session.audio.output.sample_rate",
        ),
        (
            "ga",
            {"type": "realtime", "tools": [{**TOOL, "strict": True}]},
            "unknown_parameter",
            "session.tools[0].strict",
        ),
        ("ga", {"type": "realtime", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu", "rate": 8000}}}},
            "unknown_parameter",
            "session.audio.input.format.rate",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"output": {"format": {"type": "g711_ulaw"}}}},
            "invalid_value",
            "session.audio.output.format.type",
        ),
        (
            "ga",
            {"type": "realtime", "audio": {"output": {"format": "g711_ulaw"}}},
            "invalid_type",
            "session.audio.output.format",
        ),
        ("beta", {"type": "realtime"}, "unknown_parameter", "session.type"),
        ("beta", {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "unknown_parameter", "session.audio"),
        ("beta", {"input_audio_format": "audio/pcmu"}, "invalid_value", "session.input_audio_format"),
        ("beta", {"output_audio_format": "ulaw"}, "invalid_value", "session.output_audio_format"),
        (
            "beta",
            {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}},
            "unknown_parameter",
            "session.turn_detection.idle_timeout_ms",
        ),
        ("beta", {"turn_detection": {"type": "manual"}}, "invalid_value", "session.turn_detection.type"),
        (
            "beta",
            {"input_audio_transcription": {"model": "whisper-1", "delay": "low"}},
            "unknown_parameter",
            "session.input_audio_transcription.delay",
        ),
        ("beta", {"output_modalities": ["audio"]}, "unknown_parameter", "session.output_modalities"),
    ],
)
async def test_session_update_rejections(
    sim: RealtimeSimulator, dialect: str, session: JSON, code: str, param: str
) -> None:
    async with open_client(sim, dialect) as client:
        before = (await client.expect("session.created"))["session"]
        await client.send({"type": "session.update", "event_id": "evt_bad", "session": session}, validate=False)
        error = await client.expect("error")
        assert set(error) == {"type", "event_id", "error"}
        assert error["error"]["type"] == "invalid_request_error"
        assert (error["error"]["code"], error["error"]["param"]) == (code, param)
        assert error["error"]["event_id"] == "evt_bad"
        if code == "unknown_parameter":
            assert error["error"]["message"] == f"Unknown parameter: '{param}'."
        assert sim.sessions[0].session == before  # a rejected update changes nothing
        assert [e["type"] for e in await client.quiet(0.1)] == []
    assert_conforms(sim.sessions[0])


@pytest.mark.parametrize(
    ("dialect", "formats"),
    [
        ("ga", [{"type": "audio/pcmu"}, {"type": "audio/pcma"}, {"type": "audio/pcm", "rate": 24000}]),
        ("beta", ["g711_ulaw", "g711_alaw", "pcm16"]),
    ],
)
async def test_session_update_accepts_every_format_the_dialect_names(
    sim: RealtimeSimulator, dialect: str, formats: list[Any]
) -> None:
    async with open_client(sim, dialect) as client:
        await client.expect("session.created")
        for fmt in formats:
            if dialect == "ga":
                update: JSON = {"type": "realtime", "audio": {"input": {"format": fmt}, "output": {"format": fmt}}}
            else:
                update = {"input_audio_format": fmt, "output_audio_format": fmt}
            await client.send({"type": "session.update", "session": update})
            session = (await client.expect("session.updated"))["session"]
            if dialect == "ga":
                assert session["audio"]["input"]["format"] == session["audio"]["output"]["format"] == fmt
            else:
                assert session["input_audio_format"] == session["output_audio_format"] == fmt
        full = session_update(dialect)  # the relay-like full configuration, nested fields included
        await client.send(full)
        await client.expect("session.updated")
    assert not any(e["type"] == "error" for e in client.events)
    assert_conforms(sim.sessions[0])


@pytest.mark.parametrize(
    ("dialect", "fmt", "convert"),
    [
        ("ga", {"type": "audio/pcma"}, ulaw.to_alaw),
        ("ga", {"type": "audio/pcm", "rate": 24000}, ulaw.to_pcm16_24k),
        ("ga", None, ulaw.to_pcm16_24k),  # never configured: the service's PCM16 default
        ("beta", "g711_alaw", ulaw.to_alaw),
        ("beta", "pcm16", ulaw.to_pcm16_24k),
    ],
)
async def test_replies_come_in_the_configured_output_format(
    sim: RealtimeSimulator, dialect: str, fmt: Any, convert: Any
) -> None:
    replies: list[list[bytes]] = []
    finals: list[JSON] = []
    for output_format in ("ulaw", fmt):
        async with open_client(sim, dialect) as client:
            await client.expect("session.created")
            if output_format == "ulaw":
                await client.send(session_update(dialect))
                await client.expect("session.updated")
            elif output_format is not None:
                key = "output_audio_format" if dialect == "beta" else "audio"
                value = output_format if dialect == "beta" else {"output": {"format": output_format}}
                update: JSON = {key: value} if dialect == "beta" else {"type": "realtime", key: value}
                await client.send({"type": "session.update", "session": update})
                await client.expect("session.updated")
            await client.send({"type": "response.create"})
            events = await client.until("response.done")
            replies.append([base64.b64decode(e["delta"]) for e in events if e["type"] == NAMES[dialect]["audio_delta"]])
            finals.append(events[-1]["response"])
    ulaw_chunks, chunks = replies
    assert [len(c) for c in ulaw_chunks] == [8 * ms for ms in [40, 100, 60, 120, 80]]
    assert chunks == [convert(c) for c in ulaw_chunks]
    expected = fmt if fmt is not None else {"type": "audio/pcm", "rate": 24000}
    reported = finals[1]["audio"]["output"]["format"] if dialect == "ga" else finals[1]["output_audio_format"]
    assert reported == expected
    for rec in sim.sessions:
        assert_conforms(rec)


def test_alaw_and_pcm_conversions_match_g711() -> None:
    # µ-law codes of 0, +max and -max; A-law codes from the G.711 tables.
    assert ulaw.to_alaw(bytes([0xFF, 0x80, 0x00])) == bytes([0xD5, 0xAA, 0x2A])
    assert ulaw.to_pcm16_24k(bytes([0x80, 0xFF])) == struct.pack("<6h", 32124, 32124, 32124, 0, 0, 0)
    codes = bytes(range(256))
    assert len(ulaw.to_alaw(codes)) == 256 and len(ulaw.to_pcm16_24k(codes)) == 256 * 6


async def test_unanswered_session_update_still_applies(sim: RealtimeSimulator) -> None:
    sim.config.answer_session_update = False
    async with open_client(sim) as client:
        await client.expect("session.created")
        await client.send(session_update("ga"))
        assert [e["type"] for e in await client.quiet(0.2)] == []
        assert sim.sessions[0].session["audio"]["input"]["format"] == {"type": "audio/pcmu"}


async def test_max_session_duration_sends_error_and_closes(sim: RealtimeSimulator) -> None:
    sim.config.max_session_s = 0.2
    async with open_client(sim) as client:
        await client.expect("session.created")
        error = (await client.expect("error", wait_s=2))["error"]
        assert error["code"] == "session_expired"
        assert error["message"].startswith("Your session hit the maximum duration of")
        with pytest.raises(ConnectionClosed):
            await client.recv()
    assert_conforms(sim.sessions[0])


# ---------------------------------------------------------------------------- turn taking variants


async def test_manual_turns_without_vad(sim: RealtimeSimulator) -> None:
    async with open_client(sim) as client:
        await configured(client, "ga", turn_detection=None)
        await client.send({"type": "input_audio_buffer.commit", "event_id": "evt_commit"})
        error = (await client.expect("error"))["error"]
        assert error["code"] == "input_audio_buffer_commit_empty" and error["event_id"] == "evt_commit"
        await client.speak(ulaw.synth_speech(500) + ulaw.silence(600))
        await client.send({"type": "input_audio_buffer.commit"})
        committed = await client.expect("input_audio_buffer.committed")
        events = await client.until("conversation.item.input_audio_transcription.completed")
        assert events[-1]["transcript"] == "caller turn 1 (1.1 s)"
        assert not any(e["type"].startswith("input_audio_buffer.speech") for e in client.events)
        assert [e["type"] for e in await client.quiet(0.15)] == []  # no automatic reply
        await client.speak(ulaw.silence(100))
        await client.send({"type": "input_audio_buffer.clear"})
        await client.expect("input_audio_buffer.cleared")
        await client.send({"type": "response.create"})
        assert (await client.expect("response.done"))["response"]["status"] == "completed"
        assert sim.sessions[0].items()[0]["id"] == committed["item_id"]
    assert_conforms(sim.sessions[0])


async def test_vad_without_interrupt_or_auto_response(sim: RealtimeSimulator) -> None:
    sim.config.realtime_factor = 2.0
    sim.config.reply_ms = 800
    vad = {
        "type": "server_vad",
        "silence_duration_ms": 200,
        "create_response": False,
        "interrupt_response": False,
    }
    async with open_client(sim, "beta") as client:
        await configured(client, "beta", turn_detection=vad)
        await client.send({"type": "response.create"})
        await client.expect("response.audio.delta")
        await client.speak(ulaw.synth_speech(200) + ulaw.silence(300))
        events = await client.until("response.done")
        assert events[-1]["response"]["status"] == "completed"  # speech did not cancel it
        assert any(e["type"] == "input_audio_buffer.committed" for e in events)
        assert not any(e["type"] == "response.created" for e in await client.quiet(0.15))
    assert_conforms(sim.sessions[0])


@pytest.mark.parametrize(
    ("lead_ms", "speech_ms", "append_bytes"),
    [(0, 400, 160), (120, 60, 160), (1000, 300, 100), (500, 200, 1000)],
)
async def test_vad_timing(sim: RealtimeSimulator, lead_ms: int, speech_ms: int, append_bytes: int) -> None:
    """Windows are 20 ms of the session's input, whatever the append sizes (odd sizes are carried over)."""
    vad = {
        "type": "server_vad",
        "silence_duration_ms": 300,
        "prefix_padding_ms": 300,
        "create_response": False,
    }
    async with open_client(sim) as client:
        await configured(client, "ga", turn_detection=vad)
        audio = ulaw.silence(lead_ms) + ulaw.synth_speech(speech_ms, seed=lead_ms) + ulaw.silence(400)
        for offset in range(0, len(audio), append_bytes):
            chunk = base64.b64encode(audio[offset : offset + append_bytes]).decode()
            await client.send({"type": "input_audio_buffer.append", "audio": chunk})
        started = await client.expect("input_audio_buffer.speech_started")
        stopped = await client.expect("input_audio_buffer.speech_stopped")
        assert started["audio_start_ms"] == max(0, lead_ms - 300)
        assert stopped["audio_end_ms"] == lead_ms + speech_ms + 300
        items = sim.sessions[0].items()
        assert items[0]["audio_ms"] == stopped["audio_end_ms"] - started["audio_start_ms"]


async def test_client_cancel_and_pacing() -> None:
    config = SimConfig(realtime_factor=4.0, response_delay_ms=0, reply_ms=800)
    async with RealtimeSimulator(config) as sim, open_client(sim) as client:
        await configured(client, "ga")
        await client.send({"type": "response.create"})
        created_at = time.monotonic()
        events = await client.until("response.done")
        elapsed = time.monotonic() - created_at
        assert delta_ms(events, "ga") == [40, 100, 60, 120, 80, 40, 100, 60, 120, 80]
        assert 0.8 / 4.0 * 0.8 <= elapsed < 0.8  # about 200 ms of generation for 800 ms of audio
        sim.config.reply_ms = 5000
        await client.send({"type": "response.create"})
        response_id = (await client.expect("response.created"))["response"]["id"]
        await client.expect("response.output_audio.delta")
        await client.send({"type": "response.cancel", "response_id": response_id})
        done = (await client.expect("response.done"))["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        assert not any(e["type"] == "response.output_audio.delta" for e in await client.quiet(0.1))
    assert_conforms(sim.sessions[0])


@pytest.mark.parametrize("late", [0, 1, 3])
async def test_cancelled_response_still_sends_deltas_in_flight(late: int) -> None:
    """After a cancel, ``late_audio_deltas`` more chunks of the same response arrive before its done events."""
    config = SimConfig(realtime_factor=0.01, response_delay_ms=0, reply_ms=5000, late_audio_deltas=late)
    async with RealtimeSimulator(config) as sim, open_client(sim) as client:
        await configured(client, "ga")
        await client.send({"type": "response.create"})
        response_id = (await client.expect("response.created"))["response"]["id"]
        first = await client.expect("response.output_audio.delta")  # the next one is due 4 s later
        await client.send({"type": "response.cancel", "event_id": "evt_cancel"})
        events = await client.until("response.done")
        kinds = [e["type"] for e in events]
        late_deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
        assert len(late_deltas) == late
        assert all(e["response_id"] == response_id and e["item_id"] == first["item_id"] for e in late_deltas)
        assert all(i < kinds.index("response.output_audio.done") for i, k in enumerate(kinds) if k.endswith(".delta"))
        assert events[-1]["response"]["status"] == "cancelled"
        assert sim.sessions[0].audio_ms(first["item_id"]) == 40 + sum([100, 60, 120][:late])
        assert [e["type"] for e in await client.quiet(0.1)] == ["rate_limits.updated"]
    assert_conforms(sim.sessions[0])


# ---------------------------------------------------------------------------- lifecycle


async def test_drop_all_aborts_without_close_frame(sim: RealtimeSimulator) -> None:
    async with open_client(sim) as first, open_client(sim, "beta") as second:
        await first.expect("session.created")
        await second.expect("session.created")
        assert len(sim.active_sessions()) == 2
        await sim.drop_all()
        assert sim.active_sessions() == []
        for client in (first, second):
            with pytest.raises(ConnectionClosedError):
                await client.recv()
            assert client.ws.close_code == 1006  # no close frame: the connection just died
    assert sim.connections == 2 and all(rec.closed for rec in sim.sessions)


async def test_stop_leaves_no_tasks_behind() -> None:
    baseline = asyncio.all_tasks()
    sim = RealtimeSimulator(SimConfig(realtime_factor=1.0, reply_ms=5000, response_delay_ms=0, max_session_s=30))
    await sim.start()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_client(sim)) for _ in range(3)]
        for client in clients:
            await client.expect("session.created")
        await clients[0].send({"type": "response.create"})
        await clients[0].expect("response.output_audio.delta")
        await sim.stop()
        assert sim.active_sessions() == []
        with pytest.raises(ConnectionClosed):
            while True:
                await clients[0].recv()
        assert clients[0].ws.close_code == 1001
    for _ in range(50):
        if asyncio.all_tasks() == baseline:
            break
        await asyncio.sleep(0.01)
    assert asyncio.all_tasks() == baseline


async def test_record_audio_off_keeps_counts_only(sim: RealtimeSimulator) -> None:
    sim.config.record_audio = False
    async with open_client(sim) as client:
        await configured(client, "ga")
        await client.speak(ulaw.synth_speech(200) + ulaw.silence(400))
        await client.expect("response.done")
    rec = sim.sessions[0]
    assert rec.append_count == 30 and rec.appended == [] and rec.append_times == []
    assert all(e["delta"] == "" for e in rec.sent if e["type"] == "response.output_audio.delta")
    assert rec.appends_while_not_ulaw == 0


# ---------------------------------------------------------------------------- µ-law


def _reference_encode(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, 32635) + 0x84
    exponent = max(0, (magnitude >> 7).bit_length() - 1)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def test_ulaw_tables_match_g711() -> None:
    samples = list(range(-32768, 32768))
    assert ulaw.encode(samples) == bytes(_reference_encode(s) for s in samples)
    assert ulaw.encode([40000, -40000]) == ulaw.encode([32767, -32768])
    assert ulaw.decode(bytes([0xFF, 0x7F, 0x00, 0x80])) == [0, 0, -32124, 32124]
    codes = bytes(range(256))
    assert ulaw.decode(ulaw.encode(ulaw.decode(codes))) == ulaw.decode(codes)
    assert ulaw.FRAME_BYTES == 160 and ulaw.ULAW_BYTES_PER_MS == 8 and ulaw.SILENCE_BYTE == 0xFF


@given(st.lists(st.integers(-40000, 40000), max_size=300))
def test_ulaw_round_trip_error_is_bounded(samples: list[int]) -> None:
    decoded = ulaw.decode(ulaw.encode(samples))
    assert len(decoded) == len(samples)
    for sample, value in zip(samples, decoded, strict=True):
        if abs(sample) <= 32635:
            assert abs(sample - value) <= abs(sample) / 16 + 8
        else:
            assert value == (32124 if sample > 0 else -32124)


def test_ulaw_signals() -> None:
    assert ulaw.silence(20) == b"\xff" * 160 and ulaw.rms(ulaw.silence(100)) == 0.0 and ulaw.rms(b"") == 0.0
    speech = ulaw.synth_speech(2000, seed=7)
    assert len(speech) == 16000 and speech == ulaw.synth_speech(2000, seed=7) != ulaw.synth_speech(2000, seed=8)
    windows = [ulaw.rms(speech[i : i + 160]) for i in range(0, len(speech), 160)]
    assert min(windows) > 3 * SimConfig().vad_rms_threshold
    tone = ulaw.tone(1000, 440.0, 0.5)
    assert math.isclose(ulaw.rms(tone), 0.5 * 32767 / math.sqrt(2), rel_tol=0.05)


def test_wav_round_trip_and_formats(tmp_path: Path) -> None:
    speech = ulaw.synth_speech(300, seed=3)
    pcm_path = tmp_path / "speech.wav"
    ulaw.write_wav(pcm_path, speech)
    with wave.open(str(pcm_path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (
            1,
            2,
            8000,
            2400,
        )
    assert ulaw.decode(ulaw.read_wav(pcm_path)) == ulaw.decode(speech)

    fmt = struct.pack("<HHIIHH", 7, 1, 8000, 8000, 1, 8)
    mulaw = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(speech)) + speech
    mulaw_path = tmp_path / "mulaw.wav"
    mulaw_path.write_bytes(b"RIFF" + struct.pack("<I", len(mulaw)) + mulaw)
    assert ulaw.read_wav(mulaw_path) == speech

    stereo_path = tmp_path / "stereo.wav"
    with wave.open(str(stereo_path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(b"\x00" * 400)
    with pytest.raises(ValueError, match="8000 Hz mono"):
        ulaw.read_wav(stereo_path)
    junk_path = tmp_path / "junk.wav"
    junk_path.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="RIFF"):
        ulaw.read_wav(junk_path)
