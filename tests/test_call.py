"""The sans-I/O call object: playback accounting, barge-in, responses, DTMF, tools, summaries."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from call_support import STREAM, Clock, audio, make_call, ready, start_response, twilio_msgs
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.agent_settings import AgentSettings, DtmfSettings, VadSettings
from relay.audio import audio_bytes
from relay.call import Call, Entry, Metric, Phase, RunTool, SummaryReady, UsageReport
from relay.endpointing import MAX_TURN_MS, ULAW_TO_LINEAR, Endpointer, SpeechEnd, SpeechStart
from relay.realtime import events as ev
from relay.realtime.dialect import get_dialect


def test_b64_length_without_decoding() -> None:
    for n in range(0, 50):
        s = base64.b64encode(bytes(n)).decode()
        assert audio_bytes(s) == n


def test_greeting_after_session_updated_only_once() -> None:
    call, _ = make_call()
    sent = ready(call)
    assert [m["type"] for m in sent] == ["response.create"]
    # the session's instructions stay in force for the greeting (response.instructions replaces them)
    assert sent[0]["response"]["instructions"] == f"{call.agent.instructions}\n\nSay hello"
    call.upstream_event(ev.SessionUpdated({}))
    assert call.take_output()[1] == []
    assert call.phase is Phase.GREETING


def test_no_response_create_after_server_vad_turn() -> None:
    """The server answers a finished turn by itself (create_response true): we must not."""
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.SpeechStarted(1000, "item_u"))
    call.upstream_event(ev.SpeechStopped(2000, "item_u"))
    call.upstream_event(ev.ItemAdded("item_u", None, {"type": "message"}))
    call.upstream_event(ev.InputTranscriptCompleted("item_u", "hello there"))
    _, upstream, effects = call.take_output()
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
    assert call.playback.unplayed_bytes == 320


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
    to_twilio, to_upstream, effects = call.take_output()
    assert [orjson.loads(m)["event"] for m in to_twilio] == ["clear"]
    sent = [orjson.loads(m) for m in to_upstream]
    assert sent[0] == {
        "type": "conversation.item.truncate",
        "item_id": "item_a",
        "content_index": 0,
        "audio_end_ms": 200,
    }
    # interrupt_response (default true): the server cancels the response itself; no response.cancel
    assert len(sent) == 1
    assert Metric("barge_ins") in effects
    assert call.playback.unplayed_bytes == 0
    # marks of cleared audio are echoed by Twilio but never count as played
    call.twilio_mark(marks[2])
    assert call.playback.played_bytes["item_a"] == 1600
    # late deltas of the cancelled response are dropped
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    assert call.take_output()[0] == []
    assert call.assistant.dropped_deltas == 1


def test_truncate_counts_the_part_of_a_chunk_already_playing() -> None:
    """Marks confirm whole chunks; the head chunk is interpolated from the time it has played."""
    call, clock = make_call()
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    first = twilio_msgs(call)[1]["mark"]["name"]
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    call.take_output()
    clock.now += 0.100
    call.twilio_mark(first)  # 100 ms heard, the second chunk starts now
    clock.now += 0.037
    call.upstream_event(ev.SpeechStarted(0, "u"))
    truncate = orjson.loads(call.take_output()[1][0])
    assert truncate["audio_end_ms"] == 140  # 100 acknowledged + the 20 ms frame begun at 37 ms


def test_barge_in_after_response_done_does_not_cancel() -> None:
    call, _ = make_call()
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(500)))
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    call.take_output()
    call.upstream_event(ev.SpeechStarted(100, "item_u"))
    sent = [orjson.loads(m)["type"] for m in call.take_output()[1]]
    assert sent == ["conversation.item.truncate"]


def test_speech_without_unplayed_audio_is_not_a_barge_in() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.SpeechStarted(100, "item_u"))
    to_twilio, to_upstream, effects = call.take_output()
    assert to_twilio == [] and to_upstream == [] and Metric("barge_ins") not in effects


def test_truncate_is_clamped_to_received_audio() -> None:
    call, _ = make_call()
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(60)))
    mark = twilio_msgs(call)[1]["mark"]["name"]
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(60)))
    call.take_output()
    call.twilio_mark(mark)
    call.upstream_event(ev.SpeechStarted(1, "u"))
    truncate = orjson.loads(call.take_output()[1][0])
    assert truncate["audio_end_ms"] == 60


def test_response_create_waits_for_active_response() -> None:
    call, _ = make_call(greeting=None, agent=AgentSettings(dtmf=DtmfSettings(interrupt=False)))
    ready(call)
    start_response(call)
    call.key_pressed("1")
    call.key_pressed("#")
    call.key_pressed("2")
    call.key_pressed("#")
    sent = [orjson.loads(m)["type"] for m in call.take_output()[1]]
    assert sent == ["conversation.item.create", "conversation.item.create"]
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    sent = [orjson.loads(m)["type"] for m in call.take_output()[1]]
    assert sent == ["response.create"]  # one response sees both entries


def test_active_response_error_requeues() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.key_pressed("#")
    create = [orjson.loads(m) for m in call.take_output()[1]][1]
    call.upstream_event(
        ev.ServerError(
            "invalid_request_error", "conversation_already_has_active_response", "busy", None, create["event_id"]
        )
    )
    call.upstream_event(ev.ResponseCreated("resp_vad", None, None))
    call.upstream_event(ev.ResponseDone("resp_vad", "completed", None, (), {}, None, ""))
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["response.create"]


def test_two_tool_calls_one_response_create() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    calls = (ev.FunctionCall("c1", "a", "{}", "i1"), ev.FunctionCall("c2", "b", "{}", "i2"))
    call.upstream_event(ev.ResponseCreated("r", None, None))
    call.upstream_event(ev.ResponseDone("r", "completed", None, calls, {}, None, ""))
    effects = call.take_output()[2]
    assert [e.call_id for e in effects if isinstance(e, RunTool)] == ["c1", "c2"]
    assert call.phase is Phase.TOOL_RUNNING
    call.tool_result("c2", '{"x":1}')
    sent = [orjson.loads(m) for m in call.take_output()[1]]
    assert [m["type"] for m in sent] == ["conversation.item.create"]
    assert sent[0]["item"] == {"type": "function_call_output", "call_id": "c2", "output": '{"x":1}'}
    call.tool_result("c1", "ok")
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["conversation.item.create", "response.create"]


def test_usage_and_summary_trim_context() -> None:
    call, _ = make_call(greeting=None, summary_max_turns=4, summary_keep_turns=2)
    ready(call)
    for i in range(5):
        call.upstream_event(ev.ItemAdded(f"it{i}", None, {}))
    sent = [orjson.loads(m) for m in call.take_output()[1]]
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
    to_twilio, upstream, effects = call.take_output()
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
    assert call.take_output()[0] == []


def test_stale_mark_generation_ignored_and_fatal_error_reported() -> None:
    call, _ = make_call()
    ready(call)
    call.twilio_mark("7.3")
    assert call.playback.stale_marks == 1
    call.upstream_event(ev.ServerError("invalid_request_error", "invalid_api_key", "bad key", None, None))
    effects = call.take_output()[2]
    assert any(getattr(e, "fatal", False) for e in effects)


def test_reconnected_session_gets_summary_and_turns_and_no_greeting() -> None:
    call, _ = make_call()
    ready(call)
    call.upstream_event(ev.InputTranscriptCompleted("u1", "I need a table for four"))
    call.upstream_event(ev.AssistantTranscriptDone("r", "a1", "For what time?"))
    call.summary = "Caller wants a table for four."
    call.upstream_lost()
    call.upstream_opened()
    update = orjson.loads(call.take_output()[1][0])
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
        to_twilio, to_upstream, _ = call.take_output()
        for raw in to_twilio:
            msg = orjson.loads(raw)
            if msg["event"] == "mark":
                sent_marks.append(msg["mark"]["name"])
        for raw in to_upstream:
            msg = orjson.loads(raw)
            if msg["type"] == "conversation.item.truncate":
                item = msg["item_id"]
                assert msg["audio_end_ms"] * 8 <= call.playback.received_bytes[item]
                assert msg["audio_end_ms"] * 8 <= call.playback.played_bytes.get(item, 0)
        for item, played in call.playback.played_bytes.items():
            assert played <= call.playback.received_bytes[item]
        assert call.playback.unplayed_bytes >= 0
        assert call.playback.unplayed_bytes == sum(n for _, _, n, _ in call.playback.pending_marks)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_session_update_uses_ulaw_both_ways(dialect: str) -> None:
    clock = Clock()
    call = Call(
        call_sid="CA1", stream_sid=STREAM, dialect=get_dialect(dialect), agent=AgentSettings(), model="m", clock=clock
    )
    call.upstream_opened()
    session = orjson.loads(call.take_output()[1][0])["session"]
    if dialect == "ga":
        assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    else:
        assert session["input_audio_format"] == session["output_audio_format"] == "g711_ulaw"


def test_summary_request_that_loses_a_race_to_a_vad_response_is_retried() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    assert call.request_summary()
    summary = [orjson.loads(m) for m in call.take_output()[1]][-1]
    call.upstream_event(ev.ResponseCreated("vad", None, None))  # the server started a reply meanwhile
    call.upstream_event(
        ev.ServerError(
            "invalid_request_error", "conversation_already_has_active_response", "busy", None, summary["event_id"]
        )
    )
    assert call.take_output()[1] == []
    call.upstream_event(ev.ResponseDone("vad", "completed", None, (), {}, None, ""))
    retried = [orjson.loads(m) for m in call.take_output()[1]]
    assert [m["event_id"] for m in retried] == [summary["event_id"]]


# ---- relay-side endpointing (vad.type = "none") ------------------------------------------------

LOUD = bytes([0xDB, 0x5B] * 80)  # one 20 ms frame at +-524 linear: RMS 524, just over 0.5 -> 500
QUIET = bytes([0xDC, 0x5C] * 80)  # RMS 492: just under it
SILENT = b"\xff" * 160


def frames(frame: bytes, count: int) -> list[str]:
    return [base64.b64encode(frame).decode()] * count


def test_ulaw_expansion_table_is_g711() -> None:
    assert ULAW_TO_LINEAR[0xFF] == ULAW_TO_LINEAR[0x7F] == 0
    assert ULAW_TO_LINEAR[0x80] == 32124 and ULAW_TO_LINEAR[0x00] == -32124
    assert ULAW_TO_LINEAR[0xDB] == 524 and ULAW_TO_LINEAR[0x5B] == -524
    assert len(set(ULAW_TO_LINEAR)) == 255  # every code but the two zeros is distinct


def test_endpointer_boundaries_to_the_frame() -> None:
    endpointer = Endpointer(VadSettings(type="none", threshold=0.5, silence_duration_ms=500))
    assert endpointer.feed(SILENT * 10) == []
    assert endpointer.feed(LOUD) == [] and endpointer.feed(LOUD) == []
    # the third loud frame in a row (60 ms) starts speech, dated at the first one: 200 ms
    assert endpointer.feed(LOUD) == [SpeechStart(onset_ms=200)]
    assert endpointer.feed(LOUD * 20) == []  # speech until 660 ms
    assert endpointer.feed(QUIET * 24) == []  # 480 ms of silence: not yet
    assert endpointer.feed(QUIET) == [SpeechEnd(audio_end_ms=660)]  # the 25th quiet frame: 500 ms
    assert not endpointer.in_speech


def test_endpointer_threshold_scales_and_frames_may_be_split() -> None:
    strict = Endpointer(VadSettings(type="none", threshold=0.6, silence_duration_ms=100))
    assert strict.feed(LOUD * 10) == []  # 524 is under 0.6 -> 600
    split = Endpointer(VadSettings(type="none", threshold=0.5, silence_duration_ms=100))
    audio = SILENT * 2 + LOUD * 5 + SILENT * 5
    found = [b for offset in range(0, len(audio), 100) for b in split.feed(audio[offset : offset + 100])]
    assert found == [SpeechStart(40), SpeechEnd(140)]


def test_endpointer_never_ends_a_turn_under_the_commit_minimum() -> None:
    endpointer = Endpointer(VadSettings(type="none", silence_duration_ms=0))
    assert endpointer.feed(LOUD * 3) == [SpeechStart(0)]
    assert endpointer.feed(SILENT) == []  # 80 ms buffered: the API refuses commits under 100 ms
    assert endpointer.feed(SILENT) == [SpeechEnd(60)]


def test_endpointer_ends_a_turn_on_a_line_that_stays_loud_every_max_turn() -> None:
    assert MAX_TURN_MS == 15_000
    endpointer = Endpointer(VadSettings(type="none", threshold=0.5, silence_duration_ms=500))
    assert endpointer.feed(LOUD * 749) == [SpeechStart(0)]
    assert endpointer.feed(LOUD) == [SpeechEnd(audio_end_ms=15_000)]  # the 750th frame: 15 s
    assert not endpointer.in_speech
    endpointer.committed()
    # still loud: no new speech (it would cancel the answer) until another 15 s have passed
    assert endpointer.feed(LOUD * 749) == []
    assert endpointer.feed(LOUD) == [SpeechStart(15_000), SpeechEnd(30_000)]
    endpointer.committed()
    assert endpointer.feed(LOUD * 749) == []
    assert endpointer.feed(LOUD) == [SpeechStart(30_000), SpeechEnd(45_000)]


def test_endpointer_after_a_forced_end_detects_speech_afresh_once_the_line_was_quiet() -> None:
    endpointer = Endpointer(VadSettings(type="none", threshold=0.5, silence_duration_ms=100))
    assert endpointer.feed(LOUD * 750) == [SpeechStart(0), SpeechEnd(15_000)]
    endpointer.committed()
    assert endpointer.feed(LOUD * 100) == []  # held: the line has not been quiet yet
    assert endpointer.feed(QUIET) == []  # quiet once at 17 000..17 020 ms
    assert endpointer.feed(LOUD * 2) == []
    assert endpointer.feed(LOUD) == [SpeechStart(17_020)]  # the usual 60 ms onset
    assert endpointer.feed(QUIET * 5) == [SpeechEnd(17_080)]  # and the usual silence window


def test_endpointer_a_long_turn_with_short_pauses_also_ends_at_the_max() -> None:
    endpointer = Endpointer(VadSettings(type="none", threshold=0.5, silence_duration_ms=500))
    speech = (LOUD * 40 + QUIET * 10) * 15  # 15 s of 800 ms phrases with 200 ms pauses
    assert endpointer.feed(speech) == [SpeechStart(0), SpeechEnd(audio_end_ms=14_800)]
    assert endpointer.feed(LOUD * 3) == [SpeechStart(15_000)]  # ended in a pause: nothing is held


def no_vad_call(greeting: str | None = None, **vad: Any) -> tuple[Call, Clock]:
    agent = AgentSettings(vad=VadSettings(type="none", silence_duration_ms=200, **vad))
    return make_call(greeting=greeting, agent=agent)


def feed(call: Call, payloads: list[str]) -> list[dict[str, Any]]:
    """Caller frames in; what the call sent upstream besides the appends themselves."""
    for payload in payloads:
        call.find_turns(payload)
    return [e for e in map(orjson.loads, call.take_output()[1]) if e["type"] != "input_audio_buffer.append"]


def test_without_server_vad_the_relay_commits_the_turn_and_asks_for_one_answer() -> None:
    call, _ = no_vad_call()
    ready(call)
    assert feed(call, frames(SILENT, 5) + frames(LOUD, 30) + frames(SILENT, 9)) == []
    assert call.caller_speaking
    sent = feed(call, frames(SILENT, 1))  # the 10th silent frame completes the 200 ms silence window
    assert [e["type"] for e in sent] == ["input_audio_buffer.commit", "response.create"]
    assert not call.caller_speaking
    assert call.caller_audio_committed_ms == 900  # all input audio so far is in that turn
    # the server's committed event for our own commit asks for nothing more
    call.upstream_event(ev.InputCommitted("item_u1"))
    assert call.take_output()[1] == []
    assert feed(call, frames(SILENT, 50)) == []


def test_without_server_vad_speech_interrupts_and_cancels_and_the_answer_waits() -> None:
    call, _ = no_vad_call(greeting="Say hello")
    ready(call)
    start_response(call, "resp_g", "item_g")
    marks = []
    for _ in range(4):
        call.upstream_event(ev.AudioDelta("resp_g", "item_g", audio(100)))
        marks.append(twilio_msgs(call)[1]["mark"]["name"])
    call.twilio_mark(marks[0])  # 100 ms heard
    assert feed(call, frames(LOUD, 2)) == []
    assert call.take_output()[0] == []
    for payload in frames(LOUD, 1):  # the third loud frame: speech
        call.find_turns(payload)
    to_twilio, to_upstream, _ = call.take_output()
    assert [orjson.loads(m)["event"] for m in to_twilio] == ["clear"]
    sent = [e for e in map(orjson.loads, to_upstream) if e["type"] != "input_audio_buffer.append"]
    assert sent == [
        {"type": "conversation.item.truncate", "item_id": "item_g", "content_index": 0, "audio_end_ms": 100},
        {"type": "response.cancel", "response_id": "resp_g"},  # no server VAD: nobody else cancels
    ]
    # the turn ends before the cancelled response is done: the answer waits for response.done
    assert [e["type"] for e in feed(call, frames(LOUD, 5) + frames(SILENT, 10))] == ["input_audio_buffer.commit"]
    call.upstream_event(ev.ResponseDone("resp_g", "cancelled", "client_cancelled", (), {}, None, ""))
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["response.create"]


def test_without_server_vad_a_line_that_stays_loud_still_gets_an_answer_every_15_s() -> None:
    call, _ = no_vad_call()
    ready(call)
    assert feed(call, frames(LOUD, 749)) == []
    assert call.caller_speaking
    sent = feed(call, frames(LOUD, 1))
    assert [e["type"] for e in sent] == ["input_audio_buffer.commit", "response.create"]
    assert not call.caller_speaking
    assert call.caller_audio_committed_ms == 15_000
    call.upstream_event(ev.InputCommitted("item_u1"))
    start_response(call, "resp_1", "item_a")
    assert feed(call, frames(LOUD, 100)) == []  # the answer is not cancelled by the same noise
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    call.take_output()
    assert feed(call, frames(LOUD, 649)) == []
    assert [e["type"] for e in feed(call, frames(LOUD, 1))] == ["input_audio_buffer.commit", "response.create"]
    assert call.caller_audio_committed_ms == 30_000


def test_a_relay_side_turn_ending_between_sessions_is_committed_once_the_next_is_ready() -> None:
    call, _ = no_vad_call()
    ready(call)
    feed(call, frames(LOUD, 10))
    call.upstream_lost()
    call.upstream_opened()
    call.take_output()
    assert feed(call, frames(SILENT, 10)) == []  # nothing can take a commit now
    assert [e["type"] for e in ready(call)] == ["input_audio_buffer.commit", "response.create"]


def test_server_vad_default_needs_no_response_create_after_a_commit() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.SpeechStarted(100, "item_u"))
    call.upstream_event(ev.SpeechStopped(900, "item_u"))
    call.upstream_event(ev.InputCommitted("item_u"))
    assert call.take_output()[1] == []


def test_create_response_false_gets_one_response_create_per_committed_turn() -> None:
    call, _ = make_call(greeting=None, agent=AgentSettings(vad=VadSettings(create_response=False)))
    ready(call)
    call.upstream_event(ev.SpeechStarted(100, "item_u1"))
    call.upstream_event(ev.SpeechStopped(900, "item_u1"))
    assert call.take_output()[1] == []  # not at speech_stopped: only once the turn is committed
    call.upstream_event(ev.InputCommitted("item_u1"))
    call.upstream_event(ev.InputCommitted("item_u1"))  # the same turn again asks for nothing
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["response.create"]
    start_response(call, "resp_1", "item_a")
    call.upstream_event(ev.InputCommitted("item_u2"))  # while a response is active: queued
    assert call.take_output()[1] == []
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    assert [orjson.loads(m)["type"] for m in call.take_output()[1]] == ["response.create"]


def test_barge_in_cancels_only_when_the_server_will_not() -> None:
    call, _ = make_call(agent=AgentSettings(vad=VadSettings(interrupt_response=False)))
    ready(call)
    start_response(call)
    call.upstream_event(ev.AudioDelta("resp_1", "item_a", audio(100)))
    call.take_output()
    call.upstream_event(ev.SpeechStarted(500, "item_u"))
    sent = [orjson.loads(m) for m in call.take_output()[1]]
    assert [e["type"] for e in sent] == ["conversation.item.truncate", "response.cancel"]


def test_cancel_not_active_error_is_only_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    with caplog.at_level("DEBUG", logger="relay.call"):
        call.upstream_event(ev.ServerError("invalid_request_error", "response_cancel_not_active", "no", None, None))
    assert [r.levelname for r in caplog.records] == ["DEBUG"]


def test_a_refused_commit_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    call, _ = no_vad_call()
    ready(call)
    with caplog.at_level("DEBUG", logger="relay.call"):
        call.upstream_event(
            ev.ServerError("invalid_request_error", "input_audio_buffer_commit_empty", "small", None, None)
        )
    assert [r.levelname for r in caplog.records] == ["INFO"]


# ---- greeting and one-off responses keep the session's instructions -----------------------------


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_greeting_and_goodbye_carry_the_session_instructions(dialect: str) -> None:
    call, _ = make_call(
        dialect, agent=AgentSettings(instructions="You are ACME support."), instructions_suffix="Caller is Ana."
    )
    (greeting,) = ready(call)
    assert greeting["response"]["instructions"] == "You are ACME support.\n\nCaller is Ana.\n\nSay hello"
    call.upstream_event(ev.ResponseCreated("resp_g", None, None))
    call.say("Say goodbye", interrupt=True)
    (cancel,) = (orjson.loads(m) for m in call.take_output()[1])  # the goodbye waits for the cancel to be done
    assert cancel == {"type": "response.cancel", "response_id": "resp_g"}
    call.upstream_event(ev.ResponseDone("resp_g", "cancelled", None, (), {}, None, ""))
    (goodbye,) = (orjson.loads(m) for m in call.take_output()[1])
    assert goodbye["response"]["instructions"] == "You are ACME support.\n\nCaller is Ana.\n\nSay goodbye"


def test_a_create_refused_for_an_active_response_waits_for_a_response_done() -> None:
    call, _ = make_call(greeting=None)
    ready(call)
    assert call.request_summary()
    call.take_output()
    call.upstream_event(ev.ResponseCreated("resp_oob", {"purpose": "summary", "final": "0"}, None))
    for key in "1#":
        call.key_pressed(key)
    (create,) = [orjson.loads(m) for m in call.take_output()[1] if orjson.loads(m)["type"] == "response.create"]
    refusal = "Conversation already has an active response in progress: resp_oob"
    call.upstream_event(
        ev.ServerError(
            "invalid_request_error", "conversation_already_has_active_response", refusal, None, create["event_id"]
        )
    )
    assert call.take_output()[1] == []  # sending it again now would only draw the same error
    call.upstream_event(ev.ResponseDone("resp_oob", "completed", None, (), {}, {"purpose": "summary"}, "A summary."))
    again = [orjson.loads(m) for m in call.take_output()[1]]
    assert [m["type"] for m in again] == ["response.create"]
    assert again[0]["event_id"] == create["event_id"]
