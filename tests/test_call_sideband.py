"""A call whose audio does not pass through the relay (a SIP call's sideband socket) runs on the same
core: no audio is relayed and no playback is accounted; OpenAI's output-buffer events say when the
assistant is heard, and its keypad events are keypad entries."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from call_support import CALL_SID, Clock, make_call, ready
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter

from relay.agent_settings import AgentSettings, DtmfSettings, VadSettings
from relay.call import Call, Metric, Phase
from relay.realtime import events as ev
from relay.realtime.dialect import get_dialect

GA = get_dialect("ga")
CLIENT_EVENT: TypeAdapter[Any] = TypeAdapter(RealtimeClientEvent)


def sideband_call(greeting: str | None = "Say hello", **vad: Any) -> tuple[Call, Clock]:
    clock = Clock()
    call = Call(
        call_sid=CALL_SID,
        stream_sid=None,
        dialect=GA,
        agent=AgentSettings(greeting=greeting, vad=VadSettings(**vad), dtmf=DtmfSettings(terminator="#")),
        model="gpt-realtime",
        clock=clock,
    )
    call.upstream_opened()
    call.upstream_event(ev.SessionUpdated({}))
    return call, clock


def upstream(call: Call) -> list[dict[str, Any]]:
    to_twilio, to_upstream, _ = call.take_output()
    assert to_twilio == []  # there is no Twilio stream to write to
    sent = [orjson.loads(m) for m in to_upstream]
    for event in sent:
        CLIENT_EVENT.validate_python(event)
    return sent


def parse(event: dict[str, Any]) -> ev.ServerEvent:
    return GA.parse(orjson.dumps(event))


def test_the_greeting_is_asked_for_and_its_audio_is_neither_relayed_nor_accounted() -> None:
    call, clock = sideband_call()
    assert [e["type"] for e in upstream(call)] == ["session.update", "response.create"]
    call.upstream_event(ev.ResponseCreated("resp_g", None, None))
    call.upstream_event(ev.AudioDelta("resp_g", "item_g", base64.b64encode(b"\xff" * 800).decode()))
    assert call.playback.unplayed_bytes == 0 and call.playback.frames_out == 0
    clock.now += 0.4
    call.upstream_event(parse({"type": "output_audio_buffer.started", "event_id": "e1", "response_id": "resp_g"}))
    assert call.phase is Phase.GREETING
    assert not call.playback_idle
    effects = call.take_output()[2]
    assert [e for e in effects if isinstance(e, Metric)] == [Metric("mouth_to_ear_played_seconds", pytest.approx(0.4))]
    call.upstream_event(ev.ResponseDone("resp_g", "completed", None, (), {}, None, ""))
    assert not call.playback_idle  # the response is done, but OpenAI still plays it
    call.upstream_event(parse({"type": "output_audio_buffer.stopped", "event_id": "e2", "response_id": "resp_g"}))
    assert call.playback_idle
    assert call.phase is Phase.LISTENING


def test_speech_while_openai_plays_is_a_barge_in_the_server_handles_when_it_cancels_itself() -> None:
    call, _ = sideband_call(interrupt_response=True)
    call.take_output()
    call.upstream_event(ev.ResponseCreated("resp_1", None, None))
    call.upstream_event(ev.OutputAudioStarted("resp_1"))
    call.upstream_event(ev.SpeechStarted(3000, "item_u"))
    assert call.phase is Phase.INTERRUPTED
    effects = call.take_output()[2]
    assert upstream(call) == []  # no clear, no truncate, no cancel: the server does all three
    assert Metric("barge_ins", 1.0) in effects
    assert not call.playback_idle
    call.upstream_event(ev.OutputAudioStopped("resp_1", cleared=True))
    assert call.playback_idle


def test_a_key_press_cuts_off_what_openai_plays_with_cancel_then_clear() -> None:
    call, _ = sideband_call(greeting=None)
    call.take_output()
    call.upstream_event(ev.ResponseCreated("resp_1", None, None))
    call.upstream_event(ev.OutputAudioStarted("resp_1"))
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    assert not call.playback_idle
    call.upstream_event(parse({"type": "input_audio_buffer.dtmf_event_received", "event": "4", "received_at": 1}))
    assert [e["type"] for e in upstream(call)] == ["output_audio_buffer.clear"]  # the response was done already
    assert call.playback_idle
    call.upstream_event(parse({"type": "input_audio_buffer.dtmf_event_received", "event": "#", "received_at": 2}))
    sent = upstream(call)
    assert [e["type"] for e in sent] == ["conversation.item.create", "response.create"]
    assert sent[0]["item"]["content"][0]["text"] == "The caller entered 4 #"


def test_a_key_press_during_a_response_cancels_it_before_clearing_the_buffer() -> None:
    call, _ = sideband_call(greeting=None)
    call.take_output()
    call.upstream_event(ev.ResponseCreated("resp_1", None, None))
    call.upstream_event(ev.OutputAudioStarted("resp_1"))
    call.key_pressed("1")
    assert upstream(call) == [
        {"type": "response.cancel", "response_id": "resp_1"},
        {"type": "output_audio_buffer.clear"},
    ]
    call.upstream_event(ev.OutputAudioStarted("resp_1"))  # a late start of the cut response plays nothing
    assert call.playback_idle


@pytest.mark.parametrize("key", ["", "12", "x", 5])
def test_a_keypad_event_that_is_not_one_key_is_malformed(key: object) -> None:
    with pytest.raises(ev.MalformedEvent):
        parse({"type": "input_audio_buffer.dtmf_event_received", "event": key, "received_at": 1})


def test_keys_over_the_per_second_limit_are_dropped_as_on_a_media_stream() -> None:
    call, clock = sideband_call(greeting=None)
    call.take_output()
    for _ in range(12):  # 10 per second by default
        call.upstream_event(ev.KeypadDigit("7"))
    call.upstream_event(ev.KeypadDigit("#"))
    clock.now += 1.5
    call.upstream_event(ev.KeypadDigit("#"))
    entries = [e.data for e in call.take_output()[2] if getattr(e, "kind", "") == "dtmf"]
    assert entries == [{"digits": "7777777777#", "ended": "terminator"}]


def test_a_media_stream_call_goes_by_its_marks_and_its_stream_s_keys_only() -> None:
    """Speech-buffer and keypad events are the sideband's signals; on a call whose audio the relay
    plays they are ignored (OpenAI documents them for SIP and WebRTC only)."""
    call, _ = make_call(greeting=None)
    ready(call)
    call.upstream_event(ev.ResponseCreated("resp_1", None, None))
    call.upstream_event(ev.OutputAudioStarted("resp_1"))
    call.upstream_event(ev.ResponseDone("resp_1", "completed", None, (), {}, None, ""))
    assert call.playback_idle
    call.take_output()
    call.upstream_event(ev.KeypadDigit("5"))
    call.upstream_event(ev.SpeechStarted(100, "item_u"))
    assert call.take_output() == ([], [], [])  # no entry, no clear, no barge-in
    assert call.keypad.deadline() is None  # no entry was started
