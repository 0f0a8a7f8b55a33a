"""The caller-audio policy, with a fake clock: budget, exact sizes, replay, backlog, keypad, junk."""

from __future__ import annotations

import base64
import logging

import pytest
from call_support import make_call

from relay.call.caller_audio import (
    CALLER_AUDIO_BUFFER_FRAMES,
    FLOODED,
    MEDIA_BURST_BYTES,
    REPLAY_FRAMES,
    CallerAudio,
    CallerFrame,
    KeyPress,
    frame_bytes,
)
from relay.realtime import events as ev
from relay.realtime.client import append_audio

LOG = logging.getLogger("test.caller_audio")
FRAME = base64.b64encode(b"\xff" * 160).decode()  # 20 ms: 216 characters, two of them padding


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def make(max_dtmf_per_second: float = 5) -> tuple[CallerAudio, Clock]:
    clock = Clock()
    return CallerAudio(clock, LOG, max_dtmf_per_second=max_dtmf_per_second), clock


def frames(count: int, start: int = 0) -> list[CallerFrame]:
    """Distinct 20 ms frames, so their order can be checked."""
    return [
        CallerFrame(append_audio(base64.b64encode(n.to_bytes(2, "big") + b"\xff" * 158).decode()))
        for n in range(start, start + count)
    ]


def send(audio: CallerAudio, sent: list[CallerFrame]) -> None:
    for frame in sent:
        audio.sent(frame_bytes(frame), frame)


# ---- sizes and the flood budget ------------------------------------------------------------------


def test_sizes_are_exact_not_three_quarters_of_the_text() -> None:
    audio, _ = make()
    assert len(FRAME) == 216 and len(FRAME) * 3 // 4 == 162
    assert audio.arrived(FRAME) == 160
    assert frame_bytes(CallerFrame(append_audio(FRAME))) == 160


def test_flood_budget_is_the_burst_at_once_then_real_time() -> None:
    audio, clock = make()
    per_burst = MEDIA_BURST_BYTES // 160
    assert per_burst == 500
    assert [audio.arrived(FRAME) for _ in range(per_burst)] == [160] * 500  # exactly the burst: allowed
    assert audio.arrived(FRAME) == FLOODED  # one frame over it
    assert audio.arrived(FRAME) == FLOODED  # a refused frame counts nothing, so it stays refused
    clock.now += 0.25  # a quarter second of real time is 4000 bytes of budget (16 000 a second)
    assert [audio.arrived(FRAME) for _ in range(25)] == [160] * 25  # up to exactly on the budget
    assert audio.arrived(FRAME) == FLOODED  # one frame over it


def test_flood_budget_is_cumulative_so_a_stall_backlog_passes() -> None:
    audio, clock = make()
    for _ in range(100):
        assert audio.arrived(FRAME) == 160
    clock.now += 10.0  # the process stalled; Twilio's frames piled up meanwhile (and some more)
    allowed = (MEDIA_BURST_BYTES + 10 * 16000) // 160 - 100
    assert [audio.arrived(FRAME) for _ in range(allowed)] == [160] * allowed
    assert audio.arrived(FRAME) == FLOODED


def test_budget_counts_from_the_stream_start() -> None:
    audio, clock = make()
    clock.now += 30.0  # admission and setup took a while: no credit for that time
    audio.stream_started()
    assert [audio.arrived(FRAME) for _ in range(500)] == [160] * 500
    assert audio.arrived(FRAME) == FLOODED


# ---- replay across a session change ----------------------------------------------------------------


def test_replay_excludes_audio_the_lost_session_committed() -> None:
    audio, _ = make()
    sent = frames(10)
    send(audio, sent)
    audio.session_lost(committed_ms=100)  # 800 bytes: the first five frames end at 160 … 800
    assert audio.session_opened() == sent[5:]


def test_a_cut_mid_utterance_replays_its_beginning() -> None:
    audio, _ = make()
    committed = frames(5)
    send(audio, committed)
    utterance = frames(8, start=5)
    send(audio, utterance)  # the caller is still speaking when the socket drops
    audio.session_lost(committed_ms=100)
    assert audio.session_opened() == utterance


def test_replay_is_the_most_recent_window() -> None:
    audio, _ = make()
    sent = frames(REPLAY_FRAMES + 25)
    send(audio, sent)
    audio.session_lost(committed_ms=0)
    replay = audio.session_opened()
    assert len(replay) == REPLAY_FRAMES == 75
    assert replay == sent[25:]


def test_backlog_follows_the_replay_in_order_and_positions_restart() -> None:
    audio, _ = make()
    recent = frames(3)
    send(audio, recent)
    audio.session_lost(committed_ms=0)
    held = frames(2, start=3)
    assert [audio.hold(frame) for frame in held] == [False, False]
    assert audio.session_opened() == recent + held
    assert audio.session_opened() == []  # handed over once
    # the new session's input audio starts at 0: a frame it commits is not replayed again
    first = frames(1, start=9)
    send(audio, first)
    audio.session_lost(committed_ms=20)
    assert audio.session_opened() == []


def test_committed_positions_are_per_session() -> None:
    audio, _ = make()
    send(audio, frames(10))
    audio.session_lost(committed_ms=200)
    assert audio.session_opened() == []
    again = frames(3, start=10)
    send(audio, again)  # positions 160, 320, 480 in the new session
    audio.session_lost(committed_ms=40)
    assert audio.session_opened() == again[2:]


def test_backlog_keeps_the_newest_frames_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    audio, _ = make()
    held = frames(CALLER_AUDIO_BUFFER_FRAMES + 2)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        dropped = [audio.hold(frame) for frame in held]
    assert dropped == [False] * 150 + [True, True]
    assert audio.dropped_frames == 2
    assert [r.getMessage() for r in caplog.records] == [
        "no Realtime session for 3 s: caller audio older than that is being dropped"
    ]
    assert audio.session_opened() == held[2:]


# ---- keypad ------------------------------------------------------------------------------------


def test_keypad_passes_up_to_the_cap_drops_over_it_and_floods_at_three_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audio, _ = make(max_dtmf_per_second=5)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        presses = [audio.keypress() for _ in range(16)]
    assert presses == [KeyPress.PASS] * 5 + [KeyPress.DROP] * 10 + [KeyPress.FLOOD]
    assert [r.getMessage() for r in caplog.records] == [
        "DTMF over 5 per second: digits dropped",
        "DTMF flood (16 digits in a second); closing stream",
    ]


def test_keypad_window_is_one_second() -> None:
    audio, clock = make(max_dtmf_per_second=1)
    assert audio.keypress() is KeyPress.PASS
    clock.now += 1.0  # exactly a second later: the first digit still counts
    assert audio.keypress() is KeyPress.DROP
    clock.now += 0.0001  # the first has left the window; the second (dropped) still counts
    assert audio.keypress() is KeyPress.DROP
    clock.now += 1.5  # both have left it
    assert audio.keypress() is KeyPress.PASS


# ---- junk ------------------------------------------------------------------------------------------


def test_junk_is_counted_and_logged_a_bounded_number_of_times(caplog: pytest.LogCaptureFixture) -> None:
    audio, _ = make()
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        for _ in range(12):
            audio.malformed("not JSON")
        audio.binary_frame()
        audio.second_start()
        audio.unknown_event("x" * 200)
    assert audio.malformed_frames == 12
    assert audio.repeats.counts == {"malformed_frame": 12, "binary_frame": 1, "second_start": 1, "unknown_event": 1}
    malformed = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert malformed == ["malformed Twilio frame skipped: not JSON"] * 5 + [
        "malformed Twilio frame skipped: not JSON (10 so far on this call)"
    ]
    unknown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unknown")]
    assert unknown == [f"unknown Twilio event {'x' * 80}…(200 chars) ignored"]


# ---- through the call: a session change --------------------------------------------------------


def test_a_new_session_hears_what_the_lost_one_had_not_made_into_a_turn_then_the_backlog() -> None:
    call, _ = make_call(greeting=None)  # its first session is open
    call.upstream_event(ev.SessionUpdated({}))
    sent = frames(10)
    send(call.audio, sent)  # 200 ms in the session's socket
    call.upstream_event(ev.SpeechStarted(0, "item_u1"))
    call.upstream_event(ev.SpeechStopped(120, "item_u1"))  # the first 6 frames are that turn
    call.upstream_lost()
    held = frames(3, start=10)  # while no session is open
    for frame in held:
        call.audio.hold(frame)
    assert call.upstream_opened() == sent[6:] + held
    call.upstream_lost()
    assert call.upstream_opened() == []  # each frame is heard again once, by the next session only


def test_what_the_caller_s_side_sends_wrong_is_logged_under_the_transport_s_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = logging.getLogger("relay.bridge")
    call, _ = make_call(greeting=None, transport_logger=transport)
    with caplog.at_level(logging.WARNING):
        call.audio.malformed("not JSON")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("relay.bridge", "malformed Twilio frame skipped: not JSON")
    ]
