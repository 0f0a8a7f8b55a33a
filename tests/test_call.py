"""The sans-I/O call object: playback accounting, barge-in, responses, DTMF, tools, summaries."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.call import Call, Entry, Metric, Phase, RunTool, SummaryReady, UsageReport, b64_decoded_len
from relay.config import AgentSettings
from relay.realtime import events as ev
from relay.realtime.dialect import get_dialect

STREAM = "MZ" + "0" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_call(dialect: str = "ga", greeting: str | None = "Say hello", **kw: Any) -> tuple[Call, Clock]:
    clock = Clock()
    call = Call(
        call_sid="CA" + "1" * 32,
        stream_sid=STREAM,
        dialect=get_dialect(dialect),
        agent=AgentSettings(greeting=greeting),
        model="gpt-realtime",
        clock=clock,
        **kw,
    )
    call.upstream_opened()
    call.drain()
    return call, clock


def ready(call: Call) -> list[dict[str, Any]]:
    call.upstream_event(ev.SessionUpdated({}))
    return [orjson.loads(m) for m in call.drain()[1]]


def audio(ms: int) -> str:
    return base64.b64encode(b"\xff" * (ms * 8)).decode()


def twilio_msgs(call: Call) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in call.drain()[0]]


def start_response(call: Call, rid: str = "resp_1", item: str = "item_a") -> None:
    call.upstream_event(ev.ResponseCreated(rid, None, None))
    call.upstream_event(ev.OutputItemAdded(rid, item, "message", {"id": item}))


def test_b64_length_without_decoding() -> None:
    for n in range(0, 50):
        s = base64.b64encode(bytes(n)).decode()
        assert b64_decoded_len(s) == n


def test_greeting_after_session_updated_only_once() -> None:
    call, _ = make_call()
    sent = ready(call)
    assert [m["type"] for m in sent] == ["response.create"]
    assert sent[0]["response"]["instructions"] == "Say hello"
    call.upstream_event(ev.SessionUpdated({}))
    assert call.drain()[1] == []
    assert call.phase is Phase.GREETING


def test_no_response_create_after_server_vad_turn() -> None:
    """The server answers a finished turn by itself (create_response true): we must not."""
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.SpeechStarted(1000, "item_u"))
    call.upstream_event(ev.SpeechStopped(2000, "item_u"))
    call.upstream_event(ev.ItemAdded("item_u", None, {"type": "message"}))
    call.upstream_event(ev.InputTranscriptCompleted("item_u", "hello there"))
    _, upstream, effects = call.drain()
    assert upstream == []
    assert Entry("caller", {"text": "hello there", "item_id": "item_u"}) in effects


def test_each_delta_becomes_media_then_mark_with_same_payload() -> None:
    call, _ = make_call()
    ready(call)
    start_response(call)
    payload = audio(40)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", payload))
    msgs = twilio_msgs(call)
    assert msgs[0] == {"event": "media", "streamSid": STREAM, "media": {"payload": payload}}
    assert msgs[1]["event"] == "mark" and msgs[1]["streamSid"] == STREAM
    assert call.unplayed_bytes == 320


def test_barge_in_truncates_at_played_audio_and_clears() -> None:
    call, _ = make_call()
    ready(call)
    start_response(call)
    marks = []
    for _ in range(5):
        call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
        marks.append(twilio_msgs(call)[1]["mark"]["name"])
    call.twilio_mark(marks[0])
    call.twilio_mark(marks[1])  # 200 ms heard
    call.upstream_event(ev.SpeechStarted(5000, "item_u"))
    to_twilio, to_upstream, effects = call.drain()
    assert [orjson.loads(m)["event"] for m in to_twilio] == ["clear"]
    sent = [orjson.loads(m) for m in to_upstream]
    assert sent[0] == {
        "type": "conversation.item.truncate",
        "item_id": "item_a",
        "content_index": 0,
        "audio_end_ms": 200,
    }
    assert sent[1] == {"type": "response.cancel", "response_id": "resp_1"}
    assert Metric("barge_ins") in effects
    assert call.unplayed_bytes == 0
    # marks of cleared audio are echoed by Twilio but never count as played
    call.twilio_mark(marks[2])
    assert call.played_bytes["item_a"] == 1600
    # late deltas of the cancelled response are dropped
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    assert call.drain()[0] == []
    assert call.dropped_deltas == 1


def test_truncate_counts_the_part_of_a_chunk_already_playing() -> None:
    """Marks confirm whole chunks; the head chunk is interpolated from the time it has played."""
    call, clock = make_call()
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    first = twilio_msgs(call)[1]["mark"]["name"]
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    call.drain()
    clock.now += 0.100
    call.twilio_mark(first)  # 100 ms heard, the second chunk starts now
    clock.now += 0.037
    call.upstream_event(ev.SpeechStarted(0, "u"))
    truncate = orjson.loads(call.drain()[1][0])
    assert truncate["audio_end_ms"] == 140  # 100 acknowledged + the 20 ms frame begun at 37 ms


def test_barge_in_after_response_done_does_not_cancel() -> None:
    call, _ = make_call()
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(500)))
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    call.drain()
    call.upstream_event(ev.SpeechStarted(100, "item_u"))
    sent = [orjson.loads(m)["type"] for m in call.drain()[1]]
    assert sent == ["conversation.item.truncate"]


def test_speech_without_unplayed_audio_is_not_a_barge_in() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.SpeechStarted(100, "item_u"))
    to_twilio, to_upstream, effects = call.drain()
    assert to_twilio == [] and to_upstream == [] and Metric("barge_ins") not in effects


def test_truncate_is_clamped_to_received_audio() -> None:
    call, _ = make_call()
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(60)))
    mark = twilio_msgs(call)[1]["mark"]["name"]
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(60)))
    call.drain()
    call.twilio_mark(mark)
    call.upstream_event(ev.SpeechStarted(1, "u"))
    truncate = orjson.loads(call.drain()[1][0])
    assert truncate["audio_end_ms"] == 60


def test_dtmf_becomes_user_text_and_one_response() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.twilio_dtmf("5")
    sent = [orjson.loads(m) for m in call.drain()[1]]
    assert sent[0]["item"]["content"][0]["text"] == "The caller pressed 5"
    assert sent[1]["type"] == "response.create"


def test_response_create_waits_for_active_response() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    start_response(call)
    call.twilio_dtmf("1")
    call.twilio_dtmf("2")
    sent = [orjson.loads(m)["type"] for m in call.drain()[1]]
    assert sent.count("response.create") == 0
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    sent = [orjson.loads(m)["type"] for m in call.drain()[1]]
    assert sent == ["response.create"]  # one response sees both digits


def test_active_response_error_requeues() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.twilio_dtmf("1")
    create = [orjson.loads(m) for m in call.drain()[1]][1]
    call.upstream_event(
        ev.ServerError(
            "invalid_request_error", "conversation_already_has_active_response", "busy", None, create["event_id"]
        )
    )
    call.upstream_event(ev.ResponseCreated("resp_vad", None, None))
    call.upstream_event(ev.ResponseDone("resp_vad", "completed", None, (), {}, None, ""))
    assert [orjson.loads(m)["type"] for m in call.drain()[1]] == ["response.create"]


def test_two_tool_calls_one_response_create() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    calls = (ev.FunctionCall("c1", "a", "{}", "i1"), ev.FunctionCall("c2", "b", "{}", "i2"))
    call.upstream_event(ev.ResponseCreated("r", None, None))
    call.upstream_event(ev.ResponseDone("r", "completed", None, calls, {}, None, ""))
    effects = call.drain()[2]
    assert [e.call_id for e in effects if isinstance(e, RunTool)] == ["c1", "c2"]
    assert call.phase is Phase.TOOL_RUNNING
    call.tool_result("c2", '{"x":1}')
    sent = [orjson.loads(m) for m in call.drain()[1]]
    assert [m["type"] for m in sent] == ["conversation.item.create"]
    assert sent[0]["item"] == {"type": "function_call_output", "call_id": "c2", "output": '{"x":1}'}
    call.tool_result("c1", "ok")
    assert [orjson.loads(m)["type"] for m in call.drain()[1]] == ["conversation.item.create", "response.create"]


def test_usage_and_summary_trim_context() -> None:
    call, _ = make_call(greeting=None, summary_max_turns=4, summary_keep_turns=2)
    ready(call)
    for i in range(5):
        call.upstream_event(ev.ItemAdded(f"it{i}", None, {}))
    sent = [orjson.loads(m) for m in call.drain()[1]]
    assert sent[-1]["type"] == "response.create"
    assert sent[-1]["response"]["conversation"] == "none"
    assert sent[-1]["response"]["metadata"]["purpose"] == "summary"
    call.upstream_event(ev.ResponseCreated("rs", {"purpose": "summary", "final": "0"}, None))
    call.upstream_event(
        ev.ResponseDone(
            "rs",
            "completed",
            None,
            (),
            {"input": 10, "output": 5},
            {"purpose": "summary", "final": "0"},
            "They want a table.",
        )
    )
    to_twilio, upstream, effects = call.drain()
    assert to_twilio == []
    sent = [orjson.loads(m) for m in upstream]
    assert [m["item_id"] for m in sent if m["type"] == "conversation.item.delete"] == ["it0", "it1", "it2"]
    context = sent[-1]
    assert context["previous_item_id"] == "root"
    assert "They want a table." in context["item"]["content"][0]["text"]
    assert SummaryReady("They want a table.", False) in effects
    assert any(isinstance(e, UsageReport) for e in effects)


def test_out_of_band_audio_is_never_relayed() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.ResponseCreated("oob", {"purpose": "summary"}, None))
    call.upstream_event(ev.AudioDelta("oob", "x", audio(20)))
    assert call.drain()[0] == []


def test_stale_mark_generation_ignored_and_fatal_error_reported() -> None:
    call, _ = make_call()
    ready(call)
    call.twilio_mark("7.3")
    assert call.stale_marks == 1
    call.upstream_event(ev.ServerError("invalid_request_error", "invalid_api_key", "bad key", None, None))
    effects = call.drain()[2]
    assert any(getattr(e, "fatal", False) for e in effects)


def test_reconnected_session_gets_summary_and_turns_and_no_greeting() -> None:
    call, _ = make_call()
    ready(call)
    call.upstream_event(ev.InputTranscriptCompleted("u1", "I need a table for four"))
    call.upstream_event(ev.AssistantTranscriptDone("r", "a1", "For what time?"))
    call.summary = "Caller wants a table for four."
    call.upstream_lost()
    call.upstream_opened()
    update = orjson.loads(call.drain()[1][0])
    instructions = update["session"]["instructions"]
    assert "Caller wants a table for four." in instructions
    assert "I need a table for four" in instructions and "For what time?" in instructions
    assert ready(call) == []  # no second greeting


# ---- property: any interleaving keeps played <= received and never truncates past audio ------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("delta"), st.integers(1, 3), st.integers(1, 400)),
        st.tuples(st.just("mark"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("stale_mark"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("speech"), st.just(0), st.just(0)),
        st.tuples(st.just("created"), st.integers(1, 3), st.just(0)),
        st.tuples(st.just("done"), st.integers(1, 3), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_property_played_never_exceeds_received(sequence: list[tuple[str, int, int]]) -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    sent_marks: list[str] = []
    for op, a, b in sequence:
        if op == "delta":
            call.upstream_event(ev.AudioDelta(f"r{a}", f"item{a}", audio(b)))
        elif op == "mark" and sent_marks:
            call.twilio_mark(sent_marks[a % len(sent_marks)])
        elif op == "stale_mark":
            call.twilio_mark(f"{a}.{b}")
        elif op == "speech":
            call.upstream_event(ev.SpeechStarted(0, "u"))
        elif op == "created":
            call.upstream_event(ev.ResponseCreated(f"r{a}", None, None))
        elif op == "done":
            call.upstream_event(ev.ResponseDone(f"r{a}", "completed", None, (), {}, None, ""))
        to_twilio, to_upstream, _ = call.drain()
        for raw in to_twilio:
            msg = orjson.loads(raw)
            if msg["event"] == "mark":
                sent_marks.append(msg["mark"]["name"])
        for raw in to_upstream:
            msg = orjson.loads(raw)
            if msg["type"] == "conversation.item.truncate":
                item = msg["item_id"]
                assert msg["audio_end_ms"] * 8 <= call.received_bytes[item]
                assert msg["audio_end_ms"] * 8 <= call.played_bytes.get(item, 0)
        for item, played in call.played_bytes.items():
            assert played <= call.received_bytes[item]
        assert call.unplayed_bytes >= 0
        assert call.unplayed_bytes == sum(n for _, _, n, _ in call._pending_marks)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_session_update_uses_ulaw_both_ways(dialect: str) -> None:
    clock = Clock()
    call = Call(
        call_sid="CA1", stream_sid=STREAM, dialect=get_dialect(dialect), agent=AgentSettings(), model="m", clock=clock
    )
    call.upstream_opened()
    session = orjson.loads(call.drain()[1][0])["session"]
    if dialect == "ga":
        assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    else:
        assert session["input_audio_format"] == session["output_audio_format"] == "g711_ulaw"


def test_summary_request_that_loses_a_race_to_a_vad_response_is_retried() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    assert call.request_summary()
    summary = [orjson.loads(m) for m in call.drain()[1]][-1]
    call.upstream_event(ev.ResponseCreated("vad", None, None))  # the server started a reply meanwhile
    call.upstream_event(
        ev.ServerError(
            "invalid_request_error", "conversation_already_has_active_response", "busy", None, summary["event_id"]
        )
    )
    assert call.drain()[1] == []
    call.upstream_event(ev.ResponseDone("vad", "completed", None, (), {}, None, ""))
    retried = [orjson.loads(m) for m in call.drain()[1]]
    assert [m["event_id"] for m in retried] == [summary["event_id"]]
