"""Turn taking on its own: who commits a caller's turn, who answers it, how much audio is committed."""

from __future__ import annotations

from relay.agent_settings import VadSettings
from relay.call.turns import COMMITS_REMEMBERED, TurnTaking


def test_server_vad_that_answers_by_itself_needs_nothing_from_the_relay() -> None:
    turns = TurnTaking(VadSettings())
    assert turns.endpointer is None
    assert turns.server_cancels_on_speech
    assert not turns.answer_commit("item_u")


def test_with_create_response_false_each_committed_turn_is_answered_once() -> None:
    turns = TurnTaking(VadSettings(create_response=False, interrupt_response=False))
    assert not turns.server_cancels_on_speech
    assert turns.answer_commit("item_u")
    assert not turns.answer_commit("item_u")
    for n in range(COMMITS_REMEMBERED):
        turns.answer_commit(f"item_{n}")
    assert turns.answer_commit("item_u")  # long forgotten: only the recent ones are remembered


def test_the_committed_position_only_grows_and_a_new_session_starts_from_zero() -> None:
    turns = TurnTaking(VadSettings())
    turns.speech_stopped(1200)
    turns.speech_stopped(900)
    assert turns.committed_ms == 1200
    turns.session_opened()
    assert turns.committed_ms == 0


def test_a_relay_side_turn_waits_for_a_ready_session_to_be_committed() -> None:
    turns = TurnTaking(VadSettings(type="none"))
    assert turns.endpointer is not None
    assert not turns.server_cancels_on_speech and not turns.answers_commits
    assert not turns.commit_relay_turn(session_ready=False)
    assert turns.turn_unsent
    turns.endpointer.feed(b"\xff" * 8000)  # one second of silence fed
    assert turns.commit_relay_turn(session_ready=True)
    assert not turns.turn_unsent
    assert turns.committed_ms == turns.endpointer.position_ms == 1000
