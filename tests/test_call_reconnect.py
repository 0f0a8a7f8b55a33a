"""When a call opens another Realtime session: doubling backoff, a limit, and what resets it."""

from __future__ import annotations

from relay.call.reconnect import ReconnectPolicy


def test_connection_failures_back_off_doubling_then_give_up() -> None:
    policy = ReconnectPolicy(attempts=3, backoff_s=0.5)
    assert [policy.connect_failed() for _ in range(4)] == [0.5, 1.0, 2.0, None]
    assert policy.failures == 4


def test_no_attempts_gives_up_at_the_first_failure() -> None:
    policy = ReconnectPolicy(attempts=0, backoff_s=0.5)
    assert policy.session_lost(became_ready=True, timed_out=False) is None


def test_a_session_that_became_ready_starts_the_count_again() -> None:
    policy = ReconnectPolicy(attempts=3, backoff_s=0.5)
    assert policy.connect_failed() == 0.5
    assert policy.connect_failed() == 1.0
    assert policy.session_lost(became_ready=True, timed_out=False) == 0.5
    assert policy.failures == 1


def test_sessions_that_never_became_ready_keep_counting() -> None:
    policy = ReconnectPolicy(attempts=2, backoff_s=1.0)
    assert policy.session_lost(became_ready=False, timed_out=False) == 1.0
    assert policy.session_lost(became_ready=False, timed_out=False) == 2.0
    assert policy.session_lost(became_ready=False, timed_out=False) is None


def test_a_configuration_timeout_is_not_proof_the_service_works() -> None:
    policy = ReconnectPolicy(attempts=2, backoff_s=1.0)
    assert policy.connect_failed() == 1.0
    assert policy.session_lost(became_ready=True, timed_out=True) == 2.0
    assert policy.session_lost(became_ready=True, timed_out=True) is None
