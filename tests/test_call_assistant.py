"""The assistant's output on its own: relaying audio, dropping what must not be heard, cutting off."""

from __future__ import annotations

import logging

import orjson
from call_support import STREAM, Clock, audio

from relay.call import Metric
from relay.call.assistant import Assistant
from relay.call.effects import Outbox
from relay.call.machines import SPEECH_TABLE, Machine, Speech
from relay.call.playback import Playback
from relay.call.responses import Responses
from relay.logbound import RepeatLimiter
from relay.realtime import events as ev

LOG = logging.getLogger("relay.call")


def assistant() -> tuple[Assistant, Outbox, Clock]:
    outbox, clock = Outbox(), Clock()
    limiter = RepeatLimiter(LOG)
    machine = Machine("speech", SPEECH_TABLE, Speech.IDLE, limiter)
    part = Assistant(outbox, machine, Playback(outbox, STREAM, clock, limiter), Responses(outbox), clock, LOG)
    return part, outbox, clock


def test_the_first_audio_of_a_response_reports_the_wait_since_the_turn_ended() -> None:
    part, outbox, clock = assistant()
    part.caller_stopped()
    part.response_created(ev.ResponseCreated("resp_1", None, None))
    assert part.machine.state is Speech.RESPONDING
    clock.now += 0.5
    part.audio_delta(ev.AudioDelta("resp_1", "item_a", audio(20)))
    part.audio_delta(ev.AudioDelta("resp_1", "item_a", audio(20)))
    to_twilio, _, effects = outbox.take()
    assert len(to_twilio) == 4
    assert effects == [Metric("mouth_to_ear_sent_seconds", 0.5)]
    assert part.machine.state is Speech.SPEAKING
    clock.now += 0.25
    part.playback.ack("0.0")
    assert outbox.take()[2] == [Metric("mouth_to_ear_played_seconds", 0.75)]


def test_audio_of_dropped_and_out_of_band_responses_is_counted_and_never_sent() -> None:
    part, outbox, _ = assistant()
    part.response_created(ev.ResponseCreated("resp_oob", {"purpose": "summary"}, None))
    assert part.machine.state is Speech.IDLE  # a summary is no output of the assistant's
    part.responses.dropped.add("resp_old")
    part.audio_delta(ev.AudioDelta("resp_oob", "item_s", audio(20)))
    part.audio_delta(ev.AudioDelta("resp_old", "item_o", audio(20)))
    part.audio_delta(ev.AudioDelta("resp_1", "item_a", "not base64!"))
    assert outbox.take() == ([], [], [])
    assert part.dropped_deltas == 2
    assert part.machine.state is Speech.IDLE


def test_the_callers_voice_cuts_off_a_response_and_the_output_is_idle_once_they_stop() -> None:
    part, outbox, _ = assistant()
    part.response_created(ev.ResponseCreated("resp_1", None, None))
    part.audio_delta(ev.AudioDelta("resp_1", "item_a", audio(20)))
    outbox.take()
    part.caller_started(cancel=True)
    to_twilio, to_upstream, effects = outbox.take()
    assert [orjson.loads(m)["event"] for m in to_twilio] == ["clear"]
    assert [orjson.loads(m) for m in to_upstream] == [
        {"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0, "audio_end_ms": 0},
        {"type": "response.cancel", "response_id": "resp_1"},
    ]
    assert effects[0] == Metric("barge_ins")
    assert part.machine.state is Speech.INTERRUPTED
    assert part.responses.dropped == {"resp_1"}
    part.caller_stopped()
    assert part.machine.state is Speech.IDLE


def test_speech_with_nothing_playing_is_no_barge_in() -> None:
    part, outbox, _ = assistant()
    part.caller_started(cancel=True)
    assert outbox.take() == ([], [], [])
    assert part.machine.state is Speech.IDLE


def test_the_output_settles_only_once_everything_was_heard_and_nothing_is_active() -> None:
    part, _, _ = assistant()
    part.response_created(ev.ResponseCreated("resp_1", None, None))
    part.audio_delta(ev.AudioDelta("resp_1", "item_a", audio(20)))
    part.responses.done("resp_1")
    part.settle()
    assert part.machine.state is Speech.SPEAKING  # still playing
    part.playback.ack("0.0")
    part.settle()
    assert part.machine.state is Speech.IDLE
