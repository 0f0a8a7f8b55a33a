"""Why a Realtime session closes when more than one reason comes up while it closes."""

from __future__ import annotations

import pytest

from relay.transport.realtime_session import SessionClose

FATAL, EXPIRED, ROLLOVER, TIMEOUT = (
    SessionClose.FATAL_ERROR,
    SessionClose.EXPIRED,
    SessionClose.ROLLOVER,
    SessionClose.CONFIGURATION_TIMEOUT,
)


@pytest.mark.parametrize(
    ("current", "reason", "outcome"),
    [
        (None, TIMEOUT, TIMEOUT),
        (None, EXPIRED, EXPIRED),
        (EXPIRED, TIMEOUT, EXPIRED),  # the session expired; its late configuration timeout is no failure
        (ROLLOVER, TIMEOUT, ROLLOVER),
        (EXPIRED, FATAL, FATAL),  # a refusal ends the call whatever came before
        (TIMEOUT, FATAL, FATAL),
        (FATAL, EXPIRED, FATAL),
        (FATAL, TIMEOUT, FATAL),
        (TIMEOUT, EXPIRED, EXPIRED),
    ],
)
def test_a_refusal_outranks_a_renewal_which_outranks_a_timeout(
    current: SessionClose | None, reason: SessionClose, outcome: SessionClose
) -> None:
    assert SessionClose.outcome(current, reason) is outcome
