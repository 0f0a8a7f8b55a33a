"""When to open another Realtime session for a call, and how long to wait first.

Pure policy, so the rules are tested without sockets (tests/test_call_reconnect.py): each
failure in a row waits twice as long as the one before (``backoff_s * 2**(n-1)``), and the call
gives up after ``attempts`` of them. A session that became ready and did not time out is proof
the service works: the count starts again. A planned rollover is not a failure at all.
"""

from __future__ import annotations


class ReconnectPolicy:
    """Failures in a row of one call's Realtime sessions; each answer is a delay or None (give up)."""

    __slots__ = ("attempts", "backoff_s", "failures")

    def __init__(self, attempts: int, backoff_s: float) -> None:
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.failures = 0

    def connect_failed(self) -> float | None:
        """Opening a session failed: seconds to wait before the next try, or None to give up."""
        return self._failed()

    def session_lost(self, *, became_ready: bool, timed_out: bool) -> float | None:
        """An open session ended unplanned: seconds to wait before the next, or None to give up."""
        if became_ready and not timed_out:
            self.failures = 0
        return self._failed()

    def _failed(self) -> float | None:
        self.failures += 1
        if self.failures > self.attempts:
            return None
        return float(self.backoff_s * 2 ** (self.failures - 1))
