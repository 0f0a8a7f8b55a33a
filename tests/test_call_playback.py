"""Playback accounting on its own: marks, what was heard, and the truncation point at a barge-in."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from call_support import STREAM, Clock, audio

from relay.call import Entry, Metric
from relay.call.effects import Outbox
from relay.call.playback import Playback
from relay.logbound import RepeatLimiter


def playback() -> tuple[Playback, Outbox, Clock]:
    outbox, clock = Outbox(), Clock()
    return Playback(outbox, STREAM, clock, RepeatLimiter(logging.getLogger("relay.call"))), outbox, clock


def twilio(outbox: Outbox) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in outbox.take()[0]]


def test_each_chunk_is_media_then_a_mark_named_generation_dot_seq() -> None:
    play, outbox, _ = playback()
    assert play.send(audio(20), 160, "item_a", "resp_1") == "0.0"
    assert play.send(audio(40), 320, "item_a", "resp_1") == "0.1"
    assert twilio(outbox) == [
        {"event": "media", "streamSid": STREAM, "media": {"payload": audio(20)}},
        {"event": "mark", "streamSid": STREAM, "mark": {"name": "0.0"}},
        {"event": "media", "streamSid": STREAM, "media": {"payload": audio(40)}},
        {"event": "mark", "streamSid": STREAM, "mark": {"name": "0.1"}},
    ]
    assert (play.unplayed_bytes, play.received_bytes, play.frames_out) == (480, {"item_a": 480}, 2)
    assert [m[:3] for m in play.pending_marks] == [("0.0", "item_a", 160), ("0.1", "item_a", 320)]
    assert play.item_response == {"item_a": "resp_1"}
    assert play.session_items == {"item_a"}


def test_a_mark_confirms_its_chunk_and_every_chunk_before_it() -> None:
    play, _, _ = playback()
    for _ in range(3):
        play.send(audio(20), 160, "item_a", "resp_1")
    assert play.ack("0.1")
    assert (play.unplayed_bytes, play.played_bytes) == (160, {"item_a": 320})
    assert [m[0] for m in play.pending_marks] == ["0.2"]


def test_stale_and_unknown_marks_count_and_change_nothing() -> None:
    play, _, _ = playback()
    play.send(audio(20), 160, "item_a", "resp_1")
    assert not play.ack("7.0")  # another generation
    assert not play.ack("0.9")  # never sent
    assert not play.ack("junk")
    assert play.stale_marks == 3
    assert (play.unplayed_bytes, play.played_bytes) == (160, {})


def test_the_head_chunk_is_heard_in_begun_20_ms_frames_since_the_later_of_send_and_last_ack() -> None:
    play, _, clock = playback()
    play.send(audio(100), 800, "item_a", "resp_1")
    play.send(audio(100), 800, "item_a", "resp_1")
    assert play.playing_now() == ("item_a", 0)  # nothing has elapsed
    clock.now += 0.030  # 30 ms: the second frame has begun
    assert play.playing_now() == ("item_a", 320)
    clock.now += 0.070
    assert play.ack("0.0")
    assert play.playing_now() == ("item_a", 0)  # counted from this acknowledgement
    clock.now += 0.001
    assert play.playing_now() == ("item_a", 160)
    clock.now += 5.0
    assert play.playing_now() == ("item_a", 800)  # never more than the chunk


def test_a_cut_clears_twilio_and_truncates_each_item_at_what_was_heard() -> None:
    play, outbox, clock = playback()
    play.send(audio(100), 800, "item_a", "resp_1")
    play.send(audio(100), 800, "item_a", "resp_1")
    play.send(audio(100), 800, "item_b", "resp_2")
    play.session_items.discard("item_b")  # an item of a session since replaced: not truncated
    outbox.take()
    play.ack("0.0")
    clock.now += 0.045  # 45 ms into the second chunk: three frames begun
    assert play.cut() == ["resp_1", "resp_2"]
    to_twilio, to_upstream, effects = outbox.take()
    assert [orjson.loads(m) for m in to_twilio] == [{"event": "clear", "streamSid": STREAM}]
    assert [orjson.loads(m) for m in to_upstream] == [
        {"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0, "audio_end_ms": 160}
    ]
    assert effects == [
        Metric("truncations"),
        Entry("interruption", {"item_id": "item_a", "audio_end_ms": 160, "received_ms": 200}),
        Entry("interruption", {"item_id": "item_b", "audio_end_ms": 0, "received_ms": 100}),
    ]
    assert (play.unplayed_bytes, play.pending_marks, play.generation) == (0, (), 1)
    assert play.played_bytes == {"item_a": 1280, "item_b": 0}
    assert not play.ack("0.2")  # echoed for cleared audio
    assert play.send(audio(20), 160, "item_c", "resp_3") == "1.0"


def test_a_cut_with_nothing_pending_does_nothing() -> None:
    play, outbox, _ = playback()
    assert play.cut() == []
    assert outbox.take() == ([], [], [])
    assert play.generation == 0


def test_truncation_never_exceeds_what_was_received() -> None:
    play, outbox, clock = playback()
    play.send(audio(20), 160, "item_a", "resp_1")
    clock.now += 10.0
    play.cut()
    assert orjson.loads(outbox.take()[1][0])["audio_end_ms"] == 20


def test_a_watched_mark_reports_mouth_to_ear_latency_once_when_heard() -> None:
    play, outbox, clock = playback()
    name = play.send(audio(20), 160, "item_a", "resp_1")
    play.send(audio(20), 160, "item_a", "resp_1")
    play.watch(name, clock.now - 0.5)
    outbox.take()
    clock.now += 0.25
    play.ack("0.1")
    assert outbox.take()[2] == [Metric("mouth_to_ear_played_seconds", 0.75)]
    play.send(audio(20), 160, "item_a", "resp_1")
    play.ack("0.2")
    assert outbox.take()[2] == []


def test_a_cut_forgets_the_watched_mark() -> None:
    play, outbox, clock = playback()
    name = play.send(audio(20), 160, "item_a", "resp_1")
    play.watch(name, clock.now)
    play.cut()
    outbox.take()
    play.send(audio(20), 160, "item_a", "resp_1")
    play.ack("1.0")
    assert outbox.take()[2] == []
